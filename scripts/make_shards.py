#!/usr/bin/env python
"""Convert an LCU dataset (docs/DATA.md) into WebDataset tar shards (ace/data/shards.py).

    python scripts/make_shards.py --manifest data/toy/train --out data/toy/train-shards
    python scripts/make_shards.py --manifest data/big/manifest.jsonl --out shards/ \\
        --samples-per-shard 5000 --overwrite

Every record is loaded and checked as it is written; the shards are written under
temporary names and renamed into place at the end, so an error leaves no shard at --out. Bad input
prints one line ``make_shards.py: error: ...`` and exits with status 2. Stream the
result with ``ace.data.shards.ShardStream("OUT/shard-{000000..NNNNNN}.tar")``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ace.cli import HelpFormatter, OneLineParser

PROG = "make_shards.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--manifest", type=Path, required=True, help="dataset dir or manifest.jsonl")
    p.add_argument("--out", type=Path, required=True, help="directory for shard-NNNNNN.tar")
    p.add_argument(
        "--samples-per-shard", type=int, default=1000, help="LCUs per shard (default 1000)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace shards already at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ace.data.shards import write_shards  # lazy: --help works without torch

    try:
        paths = write_shards(
            args.manifest,
            args.out,
            samples_per_shard=args.samples_per_shard,
            progress=not args.quiet,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    last = len(paths) - 1
    print(f"wrote {len(paths)} shard(s) to {args.out}: shard-{{000000..{last:06d}}}.tar")
    return 0


if __name__ == "__main__":
    sys.exit(main())
