#!/usr/bin/env python
"""Write a toy-world split in the LCU dataset format (docs/DATA.md).

    python scripts/make_toy_data.py --out data/toy/train --n 2000 --seed 0
    python scripts/make_toy_data.py --out data/toy/edits --n 100 --seed 1 \\
        --tasks recolor,remove --size 64 --split eval

The same arguments write byte-identical files. The split is written atomically:
an error or an interruption leaves nothing at --out. Bad input prints one line
``make_toy_data.py: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ace.cli import HelpFormatter, OneLineParser

PROG = "make_toy_data.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the dataset directory to write")
    p.add_argument("--n", type=int, required=True, help="number of LCUs")
    p.add_argument("--seed", type=int, default=0, help="seed of the toy world")
    p.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        help="tasks to draw from, comma- or space-separated, in the training mix's "
        "proportions (a rare one may not come up in a small --n) (default: all)",
    )
    p.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    p.add_argument("--split", choices=("train", "eval"), default="train", help="seed space")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def make_toy_data(args: argparse.Namespace) -> Path:
    """Check the arguments, then write the split; ValueError on bad input."""
    from ace.data import toy  # lazy: argument parsing works without the toy world
    from ace.data.manifest import write_manifest

    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    toy.check_size(args.size)
    tasks = None
    if args.tasks is not None:
        tasks = [t for arg in args.tasks for t in arg.split(",") if t]
        unknown = [t for t in tasks if t not in toy.TASKS]
        if not tasks:
            raise ValueError(f"--tasks names no task; known: {', '.join(toy.TASKS)}")
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(toy.TASKS)}")
    out = args.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out} exists and is not empty (--overwrite replaces it)")
    stream = toy.sample_stream(args.n, args.seed, args.split, tasks=tasks, size=args.size)
    lcus = (sample.lcu for sample in stream)
    return write_manifest(
        lcus, out, progress=not args.quiet, overwrite=args.overwrite, total=args.n
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest = make_toy_data(args)
    except (ValueError, OSError) as e:  # bad input, or a disk that refuses: one line
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} LCUs to {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
