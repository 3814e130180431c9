#!/usr/bin/env python
"""Time each segment-attention backend on the layouts ACE runs, and show what ``auto`` picks.

ACE's attention is block-diagonal: self-attention within each sample, cross-attention
from each frame to its own text (``ace.models.attention``). Which backend is fastest
depends on the device, the dtype and the segment shapes, so ``select_backend``'s rule
comes from this table. For every layout below it first checks each backend against the
``dense`` oracle (relative error), then times forward and forward + backward (median of
``--repeats`` after ``--warmup``), and prints one table, or JSON with --json:

    python scripts/benchmark_attention.py                          # CPU, fp32, 1/8 sizes
    python scripts/benchmark_attention.py --device cuda --dtype bf16 --scale 1

Layouts (segment lengths at --scale 1; q = queries, k = keys; H=16 heads of D=72 as in
the released 0.6B model):

- ``self 8x2048``: a 512 px training batch, 8 samples of target + one condition;
- ``self 2x8192``: a 1024 px batch of 2 samples, or the CFG pair of one 1024 px edit;
- ``self 2x2048``: the CFG pair of one 512 px edit;
- ``self ragged``: mixed LCUs of 1, 2 and 3 frames at 512 px;
- ``cross 16x1024:120``: each frame of the 512 px batch reads 120 text tokens;
- ``cross ragged``: the same frames reading texts of 8 to 120 valid tokens.

``flex`` runs compiled on CUDA (its kernel only exists compiled) and eager elsewhere;
``varlen`` needs CUDA and fp16/bf16. Timings are not tested; the correctness check is:
a backend whose relative error against the oracle exceeds ``TOLERANCE`` (1e-5 in fp32,
2e-2 in bf16 and fp16) is named on stderr and the exit status is 1, after the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from ace.cli import HelpFormatter, OneLineParser, text_table

DTYPES = ("fp32", "bf16", "fp16")
PROG = "benchmark_attention.py"
HEADS, HEAD_DIM = 16, 72
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 2e-2}
"""The largest relative error against the fp32 dense oracle that passes the check."""


def layouts(scale: float) -> dict[str, tuple[list[int], list[int]]]:
    """Name -> (query lengths, key lengths) per segment, lengths scaled and at least 1."""

    def s(n: int) -> int:
        return max(1, round(n * scale))

    ragged = [s(n) for n in (1024, 2048, 3072, 2048, 1024, 3072)]
    texts = [8, 120, 23, 57, 14, 120, 31, 90, 9, 45, 120, 17, 66, 12, 101, 38]
    return {
        "self 8x2048": ([s(2048)] * 8, [s(2048)] * 8),
        "self 2x8192": ([s(8192)] * 2, [s(8192)] * 2),
        "self 2x2048": ([s(2048)] * 2, [s(2048)] * 2),
        "self ragged": (ragged, ragged),
        "cross 16x1024:120": ([s(1024)] * 16, [120] * 16),
        "cross ragged": ([s(1024)] * 16, texts),
    }


def attention_flops(q_lens: list[int], k_lens: list[int]) -> int:
    """Forward FLOPs of softmax(q k^T) v inside each segment: two matmuls of 2*lq*lk*D each."""
    return sum(4 * lq * lk * HEADS * HEAD_DIM for lq, lk in zip(q_lens, k_lens))


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(
        prog="benchmark_attention.py",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument(
        "--scale", type=float, default=0.125, help="segment lengths times this (1 = real sizes)"
    )
    p.add_argument("--layouts", default="all", help="comma-separated layout names, or 'all'")
    p.add_argument("--backends", default="sdpa,varlen,flex", help="comma-separated backends")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if not 0 < args.scale <= 1:
        p.error(f"--scale must be in (0, 1], got {args.scale}")
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats}, {args.warmup}")
    known = list(layouts(1.0))
    names = known if args.layouts == "all" else args.layouts.split(",")
    for name in names:
        if name not in known:
            p.error(f"unknown layout {name!r}; choose from {known}")
    args.layout_names = names
    args.backend_names = args.backends.split(",")
    for name in args.backend_names:
        if name not in ("sdpa", "varlen", "flex", "dense"):
            p.error(f"unknown backend {name!r}; choose from sdpa, varlen, flex, dense")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import warnings

    import torch

    from ace.device import DTYPES as TORCH_DTYPES
    from ace.models.attention import SegmentLayout, segment_attention, select_backend
    from ace.models.attention import varlen_available as has_varlen

    device = torch.device(args.device)
    dtype = TORCH_DTYPES[args.dtype]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def median_ms(fn) -> float:
        for _ in range(args.warmup):
            fn()
        times = []
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    flex_fn = None
    if "flex" in args.backend_names and device.type == "cuda":
        from ace.models import attention as attn_module

        flex_fn = torch.compile(attn_module.flex_attention)

    rows, failed = [], []
    for name in args.layout_names:
        q_lens, k_lens = layouts(args.scale)[name]
        layout = SegmentLayout.build(q_lens, k_lens, device)
        g = torch.Generator(device="cpu").manual_seed(0)

        def rand(n, g=g):
            return torch.randn(n, HEADS, HEAD_DIM, generator=g).to(device, dtype)

        q, k, v = rand(layout.num_q), rand(layout.num_k), rand(layout.num_k)
        grad = rand(layout.num_q)
        oracle = segment_attention(q.float(), k.float(), v.float(), layout, "dense")
        auto = select_backend(layout, device, dtype)
        row = {
            "layout": name,
            "q_tokens": layout.num_q,
            "k_tokens": layout.num_k,
            "auto": auto,
            "gflop": attention_flops(q_lens, k_lens) / 1e9,
        }
        for backend in args.backend_names:
            if backend == "varlen" and not has_varlen(device, dtype):
                continue

            def attend(q, k, v, backend=backend, layout=layout):
                if backend == "flex" and flex_fn is not None:
                    return flex_fn(q, k, v, layout)
                return segment_attention(q, k, v, layout, backend)

            out = attend(q, k, v)
            err = ((out.float() - oracle).norm() / oracle.norm()).item()
            if not err <= TOLERANCE[args.dtype]:  # NaN fails too
                failed.append(f"{name}, {backend}: relative error {err:.2e}")
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

            def forward(attend=attend, qkv=(q, k, v)):
                with torch.no_grad():
                    attend(*qkv)

            def fwd_bwd(attend=attend, qkv=(qg, kg, vg), grad=grad):
                attend(*qkv).backward(grad)

            row[f"{backend}_err"] = err
            row[f"{backend}_fwd_ms"] = median_ms(forward)
            if backend == "flex" and device.type != "cuda":  # eager flex has no backward
                row[f"{backend}_fwd_bwd_ms"] = None
            else:  # anything else that fails here (out of memory, say) is a real failure
                row[f"{backend}_fwd_bwd_ms"] = median_ms(fwd_bwd)
        timed = [b for b in args.backend_names if f"{b}_fwd_ms" in row]
        if not timed:
            print(
                f"{PROG}: error: none of --backends {','.join(args.backend_names)} runs on "
                f"{device} in {args.dtype} (varlen needs a CUDA GPU of compute capability "
                ">= 8.0 and bf16 or fp16)",
                file=sys.stderr,
            )
            return 2
        row["fastest_fwd"] = min(timed, key=lambda b: row[f"{b}_fwd_ms"])
        with_bwd = [b for b in timed if row[f"{b}_fwd_bwd_ms"] is not None]
        row["fastest_fwd_bwd"] = (
            min(with_bwd, key=lambda b: row[f"{b}_fwd_bwd_ms"]) if with_bwd else None
        )
        rows.append(row)

    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "scale": args.scale,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "command": "python scripts/benchmark_attention.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows, "failed": failed}, indent=2))
    else:
        print(report_table({"meta": meta, "rows": rows}))
    for line in failed:
        print(f"{PROG}: check failed: {line} (tolerance {TOLERANCE[args.dtype]})", file=sys.stderr)
    return 1 if failed else 0


def report_table(report: dict) -> str:
    """The plain-text table of a ``--json`` report (also used by summarize_benchmarks.py)."""
    meta, rows = report["meta"], report["rows"]
    head = f"# {meta['device']} | torch {meta['torch']} | {meta['dtype']} | scale {meta['scale']}"
    backends = [
        b for b in ("sdpa", "varlen", "flex", "dense") if any(f"{b}_fwd_ms" in r for r in rows)
    ]
    heads = ["layout", "q/k tokens", "auto"]
    heads += [f"{b} fwd / fwd+bwd ms (err)" for b in backends] + ["fastest fwd / fwd+bwd"]
    lines = []
    for r in rows:
        line = [r["layout"], f"{r['q_tokens']}/{r['k_tokens']}", r["auto"]]
        for b in backends:
            if f"{b}_fwd_ms" not in r:
                line.append("-")
                continue
            bwd = r[f"{b}_fwd_bwd_ms"]
            bwd = "-" if bwd is None else f"{bwd:.2f}"
            line.append(f"{r[f'{b}_fwd_ms']:.2f} / {bwd} ({r[f'{b}_err']:.0e})")
        line.append(f"{r['fastest_fwd']} / {r['fastest_fwd_bwd'] or '-'}")
        lines.append(line)
    return "\n".join([head, text_table(heads, lines)])


if __name__ == "__main__":
    sys.exit(main())
