#!/usr/bin/env python
"""Peak memory and time of the VAE on one large image, whole and tiled (issue #6).

ACE encodes every input image and decodes the target with the Stable-Diffusion KL-f8
VAE, whose full-resolution activations grow with the image's area (3.8 GiB in fp32 at
1024 px, BENCHMARKS.md). ``pipe.vae.enable_tiling()`` (diffusers) encodes and decodes in
overlapping tiles of ``vae.tile_sample_min_size`` pixels instead. This script measures
both ways, each in a fresh process, so that one's peak does not hide the other's:

    python scripts/benchmark_vae.py                        # 1024 px, CPU, random weights
    python scripts/benchmark_vae.py --size 2048 --device cuda --dtype fp16
    python scripts/benchmark_vae.py --vae path/to/ace/vae  # a pipeline's vae/ directory

Memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's peak resident
set (``ru_maxrss``), reported as the rise over the resident set before the first call.
Times are the median of ``--repeats`` calls after one warm-up. The tiled output is
compared with the whole one (PSNR in dB over [-1, 1] mapped to [0, 1]): tiles are
normalised and blended separately, so they differ, mostly along the seams; with random
weights the figure says little about a trained VAE. Prints a table, or JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ace.cli import HelpFormatter, OneLineParser, UserError, text_table

DTYPES = ("fp32", "bf16", "fp16")
MODES = ("whole", "tiled")


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(
        prog="benchmark_vae.py",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (multiple of 8)")
    p.add_argument("--vae", default="sd", help="'sd' (the released architecture, random) or a dir")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)  # one measurement
    p.add_argument("--child-out", help=argparse.SUPPRESS)  # where it leaves its output
    args = p.parse_args(argv)
    if args.size < 64 or args.size % 8:
        p.error(f"--size must be a multiple of 8 and >= 64, got {args.size}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.vae != "sd" and not Path(args.vae).is_dir():
        p.error(f"--vae {args.vae} is not a directory (nor 'sd')")
    return args


def load_vae(spec: str, device: str, dtype: str):
    import torch
    from diffusers import AutoencoderKL

    from ace.conditioning import sd_vae_config
    from ace.device import DTYPES as TORCH_DTYPES

    torch_dtype = TORCH_DTYPES[dtype]
    if spec == "sd":
        torch.manual_seed(0)
        vae = AutoencoderKL(**sd_vae_config())
    else:
        try:
            vae = AutoencoderKL.from_pretrained(spec)
        except (OSError, ValueError) as e:
            raise UserError(f"--vae {spec}: not a diffusers AutoencoderKL directory ({e})") from e
    return vae.to(device, torch_dtype).eval()


def peak_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure(args: argparse.Namespace) -> dict:
    """In this process: encode + decode one image ``args.repeats + 1`` times, one way."""
    import torch

    vae = load_vae(args.vae, args.device, args.dtype)
    if args.child == "tiled":
        vae.enable_tiling()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, args.size, args.size, generator=g) * 2 - 1  # (1, 3, H, W)
    x = x.to(args.device, vae.dtype)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = 0 if args.device.startswith("cuda") else peak_bytes(args.device)
    times = {"encode": [], "decode": []}
    with torch.no_grad():
        for _ in range(args.repeats + 1):
            for kind in times:
                t = time.perf_counter()
                if kind == "encode":
                    z = vae.encode(x).latent_dist.mode()  # (1, C, H/8, W/8)
                else:
                    y = vae.decode(z).sample  # (1, 3, H, W)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[kind].append(time.perf_counter() - t)
    out = y.float().clamp(-1, 1).cpu()
    torch.save(out, Path(args.child_out) / f"{args.child}.pt")
    return {
        "mode": args.child,
        "encode_s": statistics.median(times["encode"][1:]),
        "decode_s": statistics.median(times["decode"][1:]),
        "peak_gib": (peak_bytes(args.device) - before) / 2**30,
        "tile_px": vae.tile_sample_min_size if args.child == "tiled" else None,
        "device_name": (
            torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None
        ),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.child:
            print(json.dumps(measure(args)))
            return 0
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for mode in MODES:
                cmd = [sys.executable, __file__, *(argv or sys.argv[1:])]
                cmd += ["--child", mode, "--child-out", tmp]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    raise UserError(f"the {mode} run failed:\n{done.stderr.strip()[-2000:]}")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            rows[1]["psnr_vs_whole"] = _psnr(Path(tmp))
            rows[1].pop("device_name")
    except UserError as e:
        print(f"benchmark_vae.py: error: {e}", file=sys.stderr)
        return 2
    result = {
        "machine": rows[0].pop("device_name")
        or f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "device": args.device,
        "dtype": args.dtype,
        "size": args.size,
        "vae": args.vae,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(report_table(result))
    return 0


def report_table(report: dict) -> str:
    """The plain-text table of a ``--json`` report (also used by summarize_benchmarks.py)."""
    heads = ["mode", "tile px", "encode s", "decode s", "peak GiB", "PSNR vs whole"]
    body = [
        [
            r["mode"],
            str(r["tile_px"] or "-"),
            f"{r['encode_s']:.2f}",
            f"{r['decode_s']:.2f}",
            f"{r['peak_gib']:.2f}",
            f"{r['psnr_vs_whole']:.1f}" if "psnr_vs_whole" in r else "-",
        ]
        for r in report["rows"]
    ]
    head = f"{report['size']} px, {report['vae']} VAE, {report['machine']}, {report['device']}"
    return "\n".join([f"{head} {report['dtype']}", text_table(heads, body)])


def _psnr(folder: Path) -> float:
    """PSNR (dB, ``ace.eval.metrics.psnr``) of the tiled output against the whole one."""
    import torch

    from ace.eval.metrics import psnr

    whole, tiled = ((torch.load(folder / f"{m}.pt")[0] + 1) / 2 for m in MODES)  # (3, H, W)
    return psnr(tiled.permute(1, 2, 0).numpy(), whole.permute(1, 2, 0).numpy())


if __name__ == "__main__":
    sys.exit(main())
