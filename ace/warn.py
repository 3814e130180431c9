"""Warnings that point at the user's line: ``warn_caller`` skips this library's frames
(and torch's ``no_grad`` wrappers), however deep the call that warns, so a warning about
a request names the line that made the request, not a line of ``ace``."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

# the folders themselves: "/x/ace/" does not hold "/x/ace_experiments/run.py"
_SKIPPED = tuple(str(Path(f).resolve().parent) + os.sep for f in (__file__, torch.__file__))


def warn_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` at the first frame outside ``ace`` and ``torch``."""
    frame, level = sys._getframe(1), 2  # 2: the caller of warn_caller
    while frame.f_back is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_SKIPPED):  # fmt: skip
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
