"""What the command-line scripts share: one-line argument errors, the --device choice, the
output-path check and plain-text tables.

    from ace.cli import OneLineParser, UserError, pick_device, text_table

    p = OneLineParser(prog="evaluate.py", description=__doc__)
    ...
    raise UserError("--n must be >= 1, got 0")  # the script prints "evaluate.py: error: ..."
    print(text_table(["task", "n"], [["recolor", "8"]]))

Imports nothing heavy: a script's ``--help`` and its argument errors stay instant.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path


class UserError(Exception):
    """A mistake in the command line: reported in one line, exit code 2, nothing written."""


def pick_device(name: str | None):
    """``--device`` as a torch.device: ``name``, or ``ace.device.default_device()`` (the
    first of cuda, xpu and mps this machine has, else the CPU); UserError for a name torch
    does not know or a device this machine does not have."""
    import torch  # here, not at the top: --help and argument errors stay instant

    from ace.device import default_device, device_count, has_device

    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(
            f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, xpu, mps ...)"
        ) from None
    if not has_device(device.type):  # meta, or hpu without its torch plugin, too
        raise UserError(f"--device {name}: this machine has no {device.type} device")
    count = device_count(device.type)
    if device.index is not None and count is not None and device.index >= count:
        raise UserError(f"--device {name}: this machine has {count} {device.type} device(s)")
    return device


def check_out(path: Path, flag: str = "--out", *siblings: str) -> None:
    """UserError unless a file can be written at ``path`` (and at its ``siblings``, the same
    path with other suffixes, written beside it): none is a directory, and the nearest
    existing ancestor is a directory this process may write in. For scripts that write
    only after long work. (A read-only file system or a full disk is seen only at the write.)"""
    from ace.atomic import nearest_existing

    if not path.name or path.is_dir():  # "", ".", "/" or a directory
        raise UserError(f"{flag} {path} is a directory; give a file path")
    for target in (path.with_suffix(suffix) for suffix in siblings):
        if target.is_dir():
            raise UserError(f"{flag} {path}: {target} is a directory; give a file path")
    parent = nearest_existing(path.parent)
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: no permission to write in {parent}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The scripts' ``--help``: the module docstring as written, and every option's default
    after its help (unless the help already names it, or there is none to name)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        d = action.default
        quiet = d is None or d is False or d in ("", [], argparse.SUPPRESS) or action.required
        if quiet or "default" in text or not action.option_strings:
            return action.help
        return f"{text} (default: %(default)s)"


def open_pipeline(path: str, flag: str = "--pipeline", **kwargs):
    """``ACEPipeline.from_pretrained(path, **kwargs)``; a missing or broken component (a
    model_index.json without ``_class_name``, a missing weight file) is a UserError naming
    the directory, not diffusers' traceback."""
    from ace.pipeline import ACEPipeline

    try:
        return ACEPipeline.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"{flag} {path}: cannot load it ({type(e).__name__}: {first})") from e


class OneLineParser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors are one line, ``PROG: error: ...``, exit code 2
    (not the usage block followed by the error)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def text_table(
    heads: Sequence[str], rows: Sequence[Sequence[str]], footer: Sequence[str] | None = None
) -> str:
    """Columns two spaces apart, the first left-aligned and the rest right-aligned, a rule
    under the header, and ``footer`` (a last row, e.g. an overall mean) under a second rule."""
    lines = [*rows, *([footer] if footer is not None else [])]
    for i, row in enumerate(lines):
        if len(row) != len(heads):
            raise ValueError(f"text_table: row {i} has {len(row)} cells for {len(heads)} columns")
    widths = [max(len(r[i]) for r in [heads, *lines]) for i in range(len(heads))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        )

    rule = "-" * len(fmt(heads))
    out = [fmt(heads), rule, *map(fmt, rows)]
    if footer is not None:
        out += [rule, fmt(footer)]
    return "\n".join(out)
