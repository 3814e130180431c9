"""Evaluation on the toy world: PSNR per task against exact targets, baselines, a contact sheet."""

from ace.eval.harness import (
    METRICS,
    EvalReport,
    check_tasks,
    contact_sheet,
    evaluate,
    toy_size_of,
)
from ace.eval.metrics import PSNR_CAP, psnr, to_float

__all__ = [
    "METRICS",
    "PSNR_CAP",
    "EvalReport",
    "check_tasks",
    "contact_sheet",
    "evaluate",
    "psnr",
    "to_float",
    "toy_size_of",
]
