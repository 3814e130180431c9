#!/usr/bin/env python
"""Print the tables of a ``scripts/benchmark_suite.sh`` run from its JSON files.

    python scripts/summarize_benchmarks.py OUTDIR

Reads OUTDIR/{dit_512,dit_1024,compile,attention,flex,pipeline,vae}.json, as written by
``benchmark.py``, ``benchmark_attention.py`` and ``benchmark_vae.py`` with ``--json``,
and prints one plain-text table per file; a step with no result says so (its error is
in OUTDIR/suite.log).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ace.cli import OneLineParser, text_table

KINDS = ("forward", "fwd_bwd", "denoise")


def num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def dit_table(report: dict) -> str:
    heads = ["config", "call", "TFLOP", "ref ms", "ace ms", "speedup", "% peak ref/ace"]
    heads += ["GiB ref/ace", "compiled ms", "speedup", "% peak", "compile s"]
    lines = []
    for r in report["rows"]:
        for k in KINDS:
            line = [r["config"], k, f"{r[f'{k}_tflop']:.3g}"]
            line += [num(r[f"{k}_ref_ms"], ".1f"), num(r[f"{k}_ace_ms"], ".1f")]
            line += [num(r[f"{k}_speedup"], ".2f")]
            line += [f"{num(r[f'{k}_ref_pct_peak'], '.1f')}/{num(r[f'{k}_ace_pct_peak'], '.1f')}"]
            line += [f"{num(r[f'{k}_ref_peak_gib'], '.1f')}/{num(r[f'{k}_ace_peak_gib'], '.1f')}"]
            line += [
                num(r.get(f"{k}_compiled_ms"), ".1f"),
                num(r.get(f"{k}_compiled_speedup"), ".2f"),
            ]
            line += [
                num(r.get(f"{k}_compiled_pct_peak"), ".1f"),
                num(r.get(f"{k}_compile_s"), ".1f"),
            ]
            lines.append(line)
    extra = [
        f"{r['config']}: rel err {r['rel_err']:.1e}, {r['tokens']} image tokens, "
        f"{r['peak_dtype']} peak {r['peak_tflops']:.3g} TFLOP/s, train "
        f"{num(r['train_tokens_per_s_ace'], '.0f')} tokens/s (ref {num(r['train_tokens_per_s_ref'], '.0f')})"
        for r in report["rows"]
    ]
    return "\n".join([text_table(heads, lines), *extra])


def attention_table(report: dict) -> str:
    heads = ["layout", "q/k tokens", "GFLOP", "auto", "backend", "fwd ms", "fwd+bwd ms", "rel err"]
    lines = []
    for r in report["rows"]:
        for b in ("sdpa", "varlen", "flex", "dense"):
            if f"{b}_fwd_ms" in r:
                tokens = f"{r['q_tokens']}/{r['k_tokens']}"
                times = [f"{r[f'{b}_fwd_ms']:.3f}", num(r[f"{b}_fwd_bwd_ms"], ".3f")]
                head = [r["layout"], tokens, f"{r['gflop']:.1f}", r["auto"], b]
                lines.append([*head, *times, f"{r[f'{b}_err']:.1e}"])
    return text_table(heads, lines)


def pipeline_table(report: dict) -> str:
    p = report["pipeline"]
    keys = ("ms", "ms_per_step", "peak_gib", "offload_ms", "offload_peak_gib")
    return text_table(
        ["config", "size", *keys],
        [[p["config"], str(p["size"]), *(num(p.get(k), ".2f") for k in keys)]],
    )


def vae_table(report: dict) -> str:
    rows = report["rows"]
    keys = ("tile_px", "encode_s", "decode_s", "peak_gib", "psnr_vs_whole")
    lines = [[r["mode"], *(num(r.get(k), ".3g") for k in keys)] for r in rows]
    return text_table(["mode", *keys], lines)


STEPS = {
    "dit_512": dit_table,
    "dit_1024": dit_table,
    "compile": dit_table,
    "attention": attention_table,
    "flex": attention_table,
    "pipeline": pipeline_table,
    "vae": vae_table,
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
        meta = report.get("meta", report)  # benchmark_vae.py keeps its meta at the top
        print(
            " | ".join(str(meta[k]) for k in ("machine", "device", "dtype", "command") if k in meta)
        )
        print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
