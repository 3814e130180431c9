#!/usr/bin/env python
"""Seconds per training step of a config's DiT and of the toy VAE, with and without the
trainer's speed-ups, side by side in one process (BENCHMARKS.md, session 18).

    python scripts/benchmark_train_step.py          # the demo's DiT and VAE (after make demo)
    python scripts/benchmark_train_step.py --config configs/tiny.yaml --steps 20 --vae-steps 50
    python scripts/benchmark_train_step.py --json --repeats 3 data.cache=outputs/demo/cache

- **DiT.** The config's ``Trainer`` (with the ``key=value`` overrides), built once with
  ``optim.fused=false`` (torch's per-parameter AdamW loop on a CPU, foreach on a GPU) and
  once with ``optim.fused=true`` (the default), each timing ``--steps`` optimizer steps
  after ``--warmup``, on the same micro-batches. Its data, cache and VAE are the config's:
  ``make demo`` makes the demo's; training output goes to a temporary directory.
- **VAE.** ``train_vae`` for ``--vae-steps`` steps of batch 8 on ``--vae-size`` px toy
  images: plain (the usual layout and the AdamW loop) and as it runs (NHWC convolutions on
  a CPU, fused AdamW).

Each pair runs ``--repeats`` times, plain first; the table gives the medians and the ratio
fast / plain. Bad input prints one line ``benchmark_train_step.py: error: ...`` (status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ace.cli import HelpFormatter, OneLineParser, UserError, text_table

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(
        prog="benchmark_train_step.py", description=__doc__, formatter_class=HelpFormatter
    )
    p.add_argument("--config", default=str(ROOT / "configs" / "toy.yaml"))
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    p.add_argument("--steps", type=int, default=60, help="timed DiT steps per run")
    p.add_argument("--warmup", type=int, default=10, help="untimed DiT steps first")
    p.add_argument("--vae-steps", type=int, default=200, help="timed VAE steps (0: skip)")
    p.add_argument("--vae-size", type=int, default=32, help="toy image side for the VAE")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = p.parse_args(argv)
    for name in ("steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup", "vae_steps"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.vae_size < 8 or args.vae_size % 8:
        p.error(f"--vae-size must be a multiple of 8, got {args.vae_size}")
    return args


def dit_config(args: argparse.Namespace):
    """The config to time; a missing manifest or toy VAE is an error, not minutes of making."""
    from ace.train import load_config

    cfg = load_config(args.config, args.overrides)
    if cfg.data.manifest and not Path(cfg.data.manifest).exists():
        raise UserError(f"data.manifest {cfg.data.manifest} does not exist (make demo makes it)")
    m = cfg.model
    if m.vae != "tiny" and m.vae_toy_steps > 0 and not Path(m.vae).exists():
        raise UserError(f"model.vae {m.vae} does not exist (make demo trains it)")
    return cfg


def time_dit(args: argparse.Namespace, fused: bool) -> float:
    """Seconds per optimizer step of the config's Trainer with ``optim.fused``."""
    from ace.train import Trainer, load_config

    with tempfile.TemporaryDirectory() as out:
        extra = [f"optim.fused={str(fused).lower()}", f"train.output_dir={out}"]
        trainer = Trainer(load_config(args.config, [*args.overrides, *extra]))
        for _ in range(args.warmup):
            trainer.train_step()
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        return (time.perf_counter() - start) / args.steps


@contextlib.contextmanager
def plain_vae_path():
    """``train_vae`` with the usual layout and torch's AdamW loop (what it ran before)."""
    import torch

    adamw, channels_last = torch.optim.AdamW, torch.channels_last
    torch.optim.AdamW = lambda *a, fused=None, **k: adamw(*a, **k)
    torch.channels_last = torch.contiguous_format
    try:
        yield
    finally:
        torch.optim.AdamW, torch.channels_last = adamw, channels_last


def time_vae(images, steps: int, plain: bool) -> float:
    from ace.train.vae import train_vae

    with plain_vae_path() if plain else contextlib.nullcontext():
        start = time.perf_counter()
        train_vae(images, steps=steps, batch_size=8, progress=False)
        return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = dit_config(args)
    except (UserError, ValueError) as e:
        print(f"benchmark_train_step.py: error: {e}", file=sys.stderr)
        return 2
    import torch

    times: dict[str, list[float]] = {k: [] for k in ("dit_plain", "dit_fused")}
    images = None
    if args.vae_steps:
        from ace.train.vae import toy_images

        images = toy_images(2048, seed=0, size=args.vae_size)
        times.update(vae_plain=[], vae_fast=[])
    for _ in range(args.repeats):
        times["dit_plain"].append(time_dit(args, fused=False))
        times["dit_fused"].append(time_dit(args, fused=True))
        if images is not None:
            times["vae_plain"].append(time_vae(images, args.vae_steps, plain=True))
            times["vae_fast"].append(time_vae(images, args.vae_steps, plain=False))
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "config": args.config,
        "overrides": args.overrides,
        "preset": cfg.model.preset,
        "seconds_per_step": med,
        "runs": times,
        "dit_ratio": med["dit_fused"] / med["dit_plain"],
    }
    if images is not None:
        report["vae_ratio"] = med["vae_fast"] / med["vae_plain"]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    rows = [
        [name, f"{med[plain]:.4f}", f"{med[fast]:.4f}", f"{med[fast] / med[plain]:.3f}"]
        for name, plain, fast in (
            ("DiT", "dit_plain", "dit_fused"),
            ("VAE", "vae_plain", "vae_fast"),
        )
        if plain in med
    ]
    where = " ".join([args.config, *args.overrides])
    print(f"{report['machine']}; {where}; medians of {args.repeats} (seconds per step)")
    print(text_table(["step", "plain", "fast", "fast / plain"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
