#!/usr/bin/env python
"""Why does a trained pipeline fail a task? Probe whether it copies its input and reads its text.

    python scripts/probe.py --pipeline outputs/demo/train/pipeline --n 64
    python scripts/probe.py --pipeline DIR --data outputs/demo/data --n 32 --levels 0.5,0.95 --out probe.json
    python scripts/probe.py --pipeline tiny --n 4

Reads held-out toy LCUs (the default) or the first ``--n`` LCUs of a
manifest (``--data``), and prints per task family (see ``ace.eval.probe``):

- x0 MSE at each noise level, and copy MSE (the first input taken as the answer; "nan"
  for text-to-image, which has none);
- x0 PSNR at each noise level: the clean image the model implies, decoded, against the
  target (dB), next to the mean target ("mean psnr", the baseline text-to-image and
  analysis tasks must beat: on toy LCUs the mean of 256 training targets of the family,
  as the evaluation's; with --data, of the family's other targets) and the VAE's ceiling;
- text effect: how much blanking the current instruction moves the prediction;
- copy attention: the strongest same-position target -> input attention, best layer.

``--out`` writes the full report as JSON (atomically), with copy attention per layer.
"""

from __future__ import annotations

import argparse
import json
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

PROG = "probe.py"


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--pipeline", required=True, help="an ACEPipeline directory, or 'tiny' (random, for tests)"
    )
    p.add_argument("--data", default=None, help="an LCU manifest (default: held-out toy LCUs)")
    p.add_argument("--n", type=int, default=64, help="LCUs to probe (default 64)")
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="toy image side in pixels (default: the size the pipeline's VAE records, as "
        "evaluate.py reads it: 32 for the demo's, else 64); not with --data",
    )
    p.add_argument(
        "--levels", default="0.5,0.8,0.95", help="noise levels in (0, 1], comma-separated"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the toy set and of the noise")
    p.add_argument(
        "--device", default=None, help="cpu, cuda, ... (default: cuda, xpu or mps when available)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", default=None, help="also write the report here (.json)")
    return p.parse_args(argv)


def check(args: argparse.Namespace) -> list[float]:
    """Every check that needs no model; returns the levels."""
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if args.size is not None and (args.size < 32 or args.size % 16):
        raise UserError(f"--size must be a multiple of 16, at least 32, got {args.size}")
    if args.data is not None and args.size is not None:
        raise UserError("--size sets the toy LCUs' size; a --data manifest keeps its own")
    if not 0 <= args.seed < 2**64:
        raise UserError(f"--seed must lie in [0, 2**64), got {args.seed}")
    try:
        levels = [float(v) for v in args.levels.split(",")]
    except ValueError:
        raise UserError(
            f"--levels must be numbers separated by commas, got {args.levels!r}"
        ) from None
    if any(not 0 < v <= 1 for v in levels):
        raise UserError(f"--levels must lie in (0, 1], got {args.levels}")
    if len({f"{v:g}" for v in levels}) < len(levels):
        raise UserError(f"--levels must be distinct, got {args.levels}")
    if args.out is not None and Path(args.out).suffix.lower() != ".json":
        raise UserError(f"--out must end with .json, got {args.out}")
    if args.out is not None:
        check_out(Path(args.out))
    if args.pipeline != "tiny" and not (Path(args.pipeline) / "model_index.json").is_file():
        raise UserError(
            f"--pipeline {args.pipeline} is not an ACEPipeline directory (no model_index.json)"
        )
    return levels


def lcus(args: argparse.Namespace, size: int) -> list:
    """The first ``--n`` LCUs with a target, from ``--data`` or the held-out toy set (every
    family equally often, ``size`` px)."""
    if args.data is None:
        from ace.data.toy import sample_stream

        stream = sample_stream(args.n, args.seed, split="eval", balanced=True, size=size)
        stream = (s.lcu for s in stream)
    else:
        from ace.data.manifest import LCUManifest

        try:
            dataset = LCUManifest(args.data)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(str(e)) from e
        stream = (dataset[i] for i in range(len(dataset)))
    out = []
    for lcu in stream:
        if lcu.target is not None:
            out.append(lcu)
            if len(out) == args.n:
                break
    if not out:
        raise UserError("no LCU with a target to probe")
    return out


def run(args: argparse.Namespace):
    levels = check(args)

    from ace.eval.harness import mean_targets, scoring_size
    from ace.eval.probe import probe
    from ace.testing import tiny_pipeline

    device = pick_device(args.device)
    if args.data is not None:
        items = lcus(args, size=0)  # a manifest keeps its sizes; read before the load
    pipe = tiny_pipeline() if args.pipeline == "tiny" else open_pipeline(args.pipeline)
    means = None
    if args.data is None:  # toy LCUs, with the evaluation's mean baseline (256 training targets)
        try:
            size = scoring_size(pipe, args.size)
        except ValueError as e:
            raise UserError(str(e)) from e
        items = lcus(args, size)
        probed = list(dict.fromkeys(lcu.task for lcu in items))  # the families probed only
        means = mean_targets(probed, size, args.seed)
    report = probe(
        pipe.to(device), items, levels, seed=args.seed, progress=not args.quiet, means=means
    )
    toy = {"size": size} if args.data is None else {}
    report.config = {
        "pipeline": str(args.pipeline),
        "data": args.data or "toy",
        **toy,
        **report.config,
    }
    return report


def table(report) -> str:
    levels = report.config["levels"]
    heads = ["task", "n", "copy mse", *[f"x0 mse@{v:g}" for v in levels]]
    heads += ["mean psnr", *[f"x0 psnr@{v:g}" for v in levels], "vae psnr"]
    heads += [f"text@{v:g}" for v in levels] + ["copy attn"]
    rows = []
    for task, m in report.per_task.items():
        attn = max(m["copy_attention"]) if m["copy_attention"] else float("nan")
        mse = [m["copy_mse"], *[m[f"x0_mse@{v:g}"] for v in levels]]
        db = [m["mean_psnr"], *[m[f"x0_psnr@{v:g}"] for v in levels], m["vae_psnr"]]
        rest = [m[f"text_effect@{v:g}"] for v in levels] + [attn]
        cells = [f"{c:.3f}" for c in mse] + [f"{c:.2f}" for c in db] + [f"{c:.3f}" for c in rest]
        rows.append([task, str(m["n"]), *cells])
    return text_table(heads, rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(table(report))
    if args.out is not None:
        from ace.atomic import atomic_write

        text = json.dumps(report.to_json(), indent=1, allow_nan=False)
        atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(text))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
