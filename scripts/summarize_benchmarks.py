#!/usr/bin/env python
"""Print the tables of a ``scripts/benchmark_suite.sh`` run from its JSON files.

    python scripts/summarize_benchmarks.py OUTDIR

Reads OUTDIR/{dit_512,dit_1024,compile,attention,flex,pipeline,vae}.json, as written by
``benchmark.py``, ``benchmark_attention.py`` and ``benchmark_vae.py`` with ``--json``,
and prints each with the table its own script prints without ``--json``; a step with
no result says so (its error is in OUTDIR/suite.log).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmark scripts beside it

import benchmark
import benchmark_attention
import benchmark_vae

from ace.cli import OneLineParser

STEPS = {
    "dit_512": benchmark.report_tables,
    "dit_1024": benchmark.report_tables,
    "compile": benchmark.report_tables,
    "attention": benchmark_attention.report_table,
    "flex": benchmark_attention.report_table,
    "pipeline": benchmark.report_tables,
    "vae": benchmark_vae.report_table,
}


def main(argv=None) -> int:
    p = OneLineParser(prog="summarize_benchmarks.py", description=__doc__)
    p.add_argument("outdir")
    args = p.parse_args(argv)
    if not Path(args.outdir).is_dir():
        p.error(f"{args.outdir} is not a directory")
    for name, table in STEPS.items():
        path = Path(args.outdir) / f"{name}.json"
        print(f"\n## {name}")
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            print(f"no result (see {Path(args.outdir) / 'suite.log'})")
            continue
        print(table(report))
        command = report.get("meta", {}).get("command")
        if command:
            print(f"command: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
