#!/usr/bin/env python
"""Score an ACE pipeline on the held-out toy set: PSNR per task against exact targets.

    python scripts/evaluate.py --pipeline DIR --suite toy --out report.json
    python scripts/evaluate.py --pipeline DIR --suite toy --n 128 --steps 20 --tasks recolor,remove \\
        --out outputs/eval/report.json
    python scripts/evaluate.py --pipeline tiny --suite toy --n 6 --steps 2 --out tmp/report.json

Writes report.json ({"tasks": {name: {metrics..., "n"}}, "overall": {...}, "config": {...}})
and, beside it, report.png: one row per sample (inputs | output | target), at most 32 rows.
Both are written atomically once every sample has run. Prints a per-task table. PSNR is in
dB, capped at 100; change = the pixels that should change, keep = the pixels that should stay
(* = the whole image, where everything changes); copy / mean = the two baselines;
vae = the ceiling (the target through the pipeline's VAE: no transformer on it does better).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ace.cli import (
    HelpFormatter,
    OneLineParser,
    UserError,
    check_out,
    open_pipeline,
    pick_device,
    text_table,
)

SUITES = ("toy",)
PROG = "evaluate.py"


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--pipeline", required=True, help="an ACEPipeline directory, or 'tiny' (random, for tests)"
    )
    p.add_argument("--suite", required=True, help=f"the evaluation set: {', '.join(SUITES)}")
    p.add_argument("--n", type=int, default=64, help="number of held-out samples")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the eval set and of the noise")
    p.add_argument(
        "--tasks",
        default=None,
        help="comma-separated task names (default: all); a subset draws other LCUs for a "
        "family than the full set does",
    )
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="image side in pixels, a multiple of 16 (default: the size the pipeline's VAE "
        "records, sample_size, which the toy VAE sets to its training images' size: 32 for "
        "the demo's; else 64)",
    )
    p.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance scale")
    p.add_argument("--rescale", type=float, default=0.5, help="guidance rescale in [0, 1]")
    p.add_argument(
        "--device", default=None, help="cpu, cuda, ... (default: cuda, xpu or mps when available)"
    )
    p.add_argument(
        "--mix",
        choices=["balanced", "train"],
        default="balanced",
        help="task families: equally often (default), or in the toy world's default mix",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="samples per transformer call (ACEPipeline.generate; 1: one call each). The "
        "same images up to float rounding; on 2 CPU cores 16 scored the demo's 32 px set "
        "about twice as fast as 1",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="the report (.json); the sheet goes beside (.png)")
    return p.parse_args(argv)


def check(args: argparse.Namespace) -> list[str] | None:
    """Every check that needs no model; returns the task list."""
    from ace.diffusion import check_guidance
    from ace.eval import check_tasks

    if args.suite not in SUITES:
        raise UserError(f"unknown suite {args.suite!r}; suites: {', '.join(SUITES)}")
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.seed >= 2**32:
        raise UserError(f"--seed must be < 2**32 (the toy world's seed), got {args.seed}")
    if args.size is not None and (args.size < 32 or args.size % 16):
        raise UserError(f"--size must be a multiple of 16, at least 32, got {args.size}")
    try:
        check_guidance(args.guidance, args.rescale)
    except ValueError as e:
        raise UserError(f"--guidance / --rescale: {e}") from e
    name = Path(args.out).name
    if not name.lower().endswith(".json") or len(name) <= len(".json"):  # sheet: beside, .png
        raise UserError(f"--out must be a file name ending in .json, got {args.out}")
    check_out(Path(args.out), "--out", ".png")
    if args.pipeline != "tiny" and not (Path(args.pipeline) / "model_index.json").is_file():
        raise UserError(
            f"--pipeline {args.pipeline} is not an ACEPipeline directory (no model_index.json)"
        )
    try:
        return check_tasks(args.tasks)
    except ValueError as e:
        raise UserError(str(e)) from e


def run(args: argparse.Namespace):
    tasks = check(args)

    from ace.eval import evaluate
    from ace.eval.harness import scoring_size
    from ace.testing import tiny_pipeline

    device = pick_device(args.device)
    pipe = tiny_pipeline() if args.pipeline == "tiny" else open_pipeline(args.pipeline)
    try:
        size = scoring_size(pipe, args.size)
    except ValueError as e:
        raise UserError(str(e)) from e
    report = evaluate(
        pipe.to(device),
        n=args.n,
        steps=args.steps,
        seed=args.seed,
        tasks=tasks,
        size=size,
        guidance_scale=args.guidance,
        guidance_rescale=args.rescale,
        progress=not args.quiet,
        balanced=args.mix == "balanced",
        batch_size=args.batch_size,
    )
    report.config = {"pipeline": str(args.pipeline), **report.config}
    return report


def table(report) -> str:
    """The per-task table; a * marks a keep metric taken over the whole image."""
    from ace.eval import METRICS

    heads = ["task", "n", *METRICS]
    lines = []
    for name, m in [*report.tasks.items(), ("overall", report.overall)]:
        star = "*" if m.get("keep_is_whole") else ""
        cells = [f"{m[k]:.2f}" + (star if k.endswith("_keep") else "") for k in METRICS]
        lines.append([name, str(m["n"]), *cells])
    return text_table(heads, lines[:-1], footer=lines[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    from ace.eval import contact_sheet

    # the sheet first: the report names a finished run, so it lands last, beside its sheet
    sheet = contact_sheet(report.rows, Path(args.out).with_suffix(".png"), labels=report.labels)
    out = report.save(args.out)
    print(table(report))
    if any(m.get("keep_is_whole") for m in report.tasks.values()):
        print("* keep over the whole image: some samples of the task change everything")
    print(f"wrote {out} and {sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
