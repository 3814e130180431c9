#!/usr/bin/env python
"""Time ace's DiT next to the per-sample reference (ace.reference), same weights, same batch.

For each config it first checks that both give the same prediction, then times the
forward pass (no grad), forward + backward, and one classifier-free-guidance denoise
step of one edit (ace: layout built once per sampling run, both halves in one call;
reference: its per-sample forward), as medians over --repeats runs, and
prints one table (or JSON with --json). Speeds are ratios measured side by side in the
same process, so they compare fairly on a shared machine.

    python scripts/benchmark.py                       # tiny and ace-0.6b-512, CPU
    python scripts/benchmark.py --configs tiny --repeats 20 --json
    python scripts/benchmark.py --device cuda --dtype bf16 --size 512 --batch 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
from diffusers.utils import logging as diffusers_logging

from ace.convert import official_dit_to_ace
from ace.diffusion import apply_guidance
from ace.models import PRESETS, ACETransformer
from ace.reference import ReferenceDiT

# forward (no grad), forward + backward, and one CFG denoise step (both halves + guidance)
KINDS = ("forward", "fwd_bwd", "denoise")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--configs",
        default="tiny,ace-0.6b-512",
        help=f"comma-separated presets from {sorted(PRESETS)}",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=2, help="samples per batch")
    p.add_argument("--frames", type=int, default=2, help="frames per sample (target + conditions)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (latent = size / 8)")
    p.add_argument("--text-len", type=int, default=32, help="text tokens per frame")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="also time a whole tiny-pipeline edit (T5, VAE, 20 steps)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    for name in args.configs.split(","):
        if name not in PRESETS:
            p.error(f"unknown config {name!r}; choose from {sorted(PRESETS)}")
    if args.size % 16:
        p.error(f"--size must be a multiple of 16, got {args.size}")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def make_batch(cfg: dict, args, device, dtype, generator):
    h = w = args.size // 8
    E = cfg["text_dim"]
    frames = [
        [
            torch.randn(cfg["in_channels"], h, w, generator=generator).to(device, dtype)
            for _ in range(args.frames)
        ]
        for _ in range(args.batch)
    ]
    masks = [[None] * args.frames for _ in range(args.batch)]
    texts = [
        [
            torch.randn(args.text_len, E, generator=generator).to(device, dtype)
            for _ in range(args.frames)
        ]
        for _ in range(args.batch)
    ]
    t = torch.randint(0, 1000, (args.batch,), generator=generator).float().to(device)
    ind = torch.randn(cfg["num_indicators"], E, generator=generator).to(device, dtype)
    return frames, masks, texts, t, ind


def bench_config(name: str, args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = PRESETS[name]
    torch.manual_seed(0)
    ref = ReferenceDiT(**cfg)
    ours = ACETransformer(**cfg)
    ours.load_state_dict(official_dit_to_ace(ref.state_dict()), strict=True)
    ref, ours = ref.to(device, dtype), ours.to(device, dtype)
    inputs = make_batch(cfg, args, device, dtype, torch.Generator().manual_seed(1))

    # 1. correctness before timing
    with torch.no_grad():
        a, b = ours.predict(*inputs), ref(*inputs)
    err = max(((x.float() - y.float()).norm() / y.float().norm()).item() for x, y in zip(a, b))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    if not err <= tol:
        raise SystemExit(
            f"{name}: ace and the reference disagree (relative error {err:.2e} > {tol:g})"
        )

    # 2. timing
    def call(model):
        return model.predict(*inputs) if isinstance(model, ACETransformer) else model(*inputs)

    def forward(model):
        def run():
            with torch.no_grad():
                call(model)

        return run

    def train_step(model):
        def run():
            out = call(model)
            sum(o.float().square().mean() for o in out).backward()
            model.zero_grad(set_to_none=True)

        return run

    # one CFG denoise step of sample 0, as the pipeline runs it: the layout, RoPE and condition
    # tokens are built once per sampling run, then both halves go through one call
    frames, masks, texts, t, ind = inputs
    cfg_frames, cfg_masks = [frames[0]] * 2, [masks[0]] * 2
    cfg_texts = [
        texts[0],
        [texts[0][0].flip(0), *texts[0][1:]],
    ]  # the negative replaces the current text
    t2 = t[:1].repeat(2)
    packed = ours.pack(
        [[f.shape[-2:] for f in fs] for fs in cfg_frames],
        [[x.shape[0] for x in ts] for ts in cfg_texts],
    )
    tokens, text = packed.pack_frames(cfg_frames, cfg_masks), packed.pack_texts(cfg_texts)

    def denoise(model):
        def run():
            with torch.no_grad():
                if isinstance(model, ACETransformer):
                    c, u = packed.unpack_target(model(tokens, text, t2, packed, ind))
                else:
                    c, u = model(cfg_frames, cfg_masks, cfg_texts, t2, ind)
                apply_guidance(c[None], u[None], 4.5, 0.5)

        return run

    row = {
        "config": name,
        "params_m": round(sum(p.numel() for p in ours.parameters()) / 1e6, 1),
        "tokens": args.batch * args.frames * (args.size // 16) ** 2,
        "rel_err": err,
    }
    for kind, make in zip(KINDS, (forward, train_step, denoise)):
        ref_ms = median_ms(make(ref), device, args.repeats, args.warmup)
        ace_ms = median_ms(make(ours), device, args.repeats, args.warmup)
        row[f"{kind}_ref_ms"], row[f"{kind}_ace_ms"] = ref_ms, ace_ms
        row[f"{kind}_speedup"] = ref_ms / ace_ms
    # training throughput of the DiT step (forward + backward), image tokens of all frames
    row["train_tokens_per_s_ace"] = row["tokens"] / (row["fwd_bwd_ace_ms"] / 1e3)
    row["train_tokens_per_s_ref"] = row["tokens"] / (row["fwd_bwd_ref_ms"] / 1e3)
    return row


def bench_pipeline(args) -> dict:
    """A whole edit through ace.testing.tiny_pipeline: T5 once, VAE encode, 20 CFG steps, decode."""
    from PIL import Image

    from ace.testing import tiny_pipeline

    pipe = tiny_pipeline().to(args.device)
    image = Image.new("RGB", (args.size, args.size), (200, 30, 30))

    def run():
        pipe.set_progress_bar_config(disable=True)
        pipe(
            "make {image} blue",
            images=[image],
            num_inference_steps=20,
            generator=torch.Generator().manual_seed(0),
        )

    ms = median_ms(run, torch.device(args.device), args.repeats, args.warmup)
    return {
        "config": "tiny pipeline edit",
        "size": args.size,
        "steps": 20,
        "ms": ms,
        "ms_per_step": ms / 20,
    }


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()  # its to(dtype) warns even with nothing to keep in fp32
    rows = [bench_config(name, args) for name in args.configs.split(",")]
    pipeline = bench_pipeline(args) if args.pipeline else None
    meta = {
        "machine": machine(),
        "torch": torch.__version__,
        "device": args.device,
        "dtype": args.dtype,
        "batch": f"{args.batch} samples x {args.frames} frames at {args.size}px, {args.text_len} text tokens per frame",
        "command": "python scripts/benchmark.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows, "pipeline": pipeline}, indent=2))
        return 0
    print(
        f"# {meta['machine']} | torch {meta['torch']} | {args.device} {args.dtype} | {meta['batch']}"
    )
    head = f"{'config':<16}{'params':>8}{'tokens':>8}{'rel err':>10}"
    head += "".join(f"{k + ' ref/ace ms':>26}{'speedup':>9}" for k in KINDS)
    print(head)
    for r in rows:
        line = f"{r['config']:<16}{r['params_m']:>7}M{r['tokens']:>8}{r['rel_err']:>10.1e}"
        for k in KINDS:
            line += (
                f"{r[f'{k}_ref_ms']:>14.1f} / {r[f'{k}_ace_ms']:<9.1f}{r[f'{k}_speedup']:>8.2f}x"
            )
        print(line)
    for r in rows:
        print(
            f"{r['config']}: training throughput {r['train_tokens_per_s_ace']:.0f} image tokens/s "
            f"(reference {r['train_tokens_per_s_ref']:.0f})"
        )
    if pipeline:
        print(
            f"{pipeline['config']} at {pipeline['size']} px, {pipeline['steps']} steps: "
            f"{pipeline['ms']:.0f} ms ({pipeline['ms_per_step']:.1f} ms per step, T5 + VAE included)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
