#!/usr/bin/env python
"""Train the demo's VAE (``ace.train.vae``) on toy images and save it with ``save_pretrained``.

    python scripts/train_vae.py --out outputs/toy-vae
    python scripts/train_vae.py --out outputs/toy-vae --steps 300 --n-images 1024 --seed 1
    python scripts/train_vae.py --out outputs/toy-vae --data outputs/toy-data
    python scripts/train_vae.py --out outputs/toy-vae --device cuda

Without ``--data`` it trains on the first ``--n-images`` images of the toy stream
(``sample_stream(n, seed, split="train", weights=TOY_VAE_WEIGHTS)``: inputs and targets,
maps more often than the DiT sees them; ``--mix dit``: the DiT's mix), with
``--swatches F`` a fraction F of them replaced by flat swatches of the toy palette
(``ace.train.vae.TOY_VAE_SWATCHES``: better colours, not a better demo DiT); with it, on the
images of an LCU manifest. It then prints the reconstruction PSNR on held-out toy images
(``split="eval"``) and the palette error (``ace.train.vae.palette_error``: how far it
moves the toy world's flat colours, which PSNR hides) and writes OUT/ (``config.json``,
``diffusion_pytorch_model.safetensors`` and ``training.json``, the arguments and
measurements), loadable with
``AutoencoderKL.from_pretrained(OUT)``. OUT appears complete or not at all (a temporary
directory renamed into place). Bad input prints one line
``train_vae.py: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ace.cli import HelpFormatter, OneLineParser, UserError, pick_device

PROG = "train_vae.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the directory to write the VAE to")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--n-images", type=int, default=4096, help="toy training images (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, init and order")
    p.add_argument("--data", type=Path, default=None, help="an LCU manifest to train on instead")
    p.add_argument(
        "--mix",
        choices=["vae", "dit"],
        default=None,
        help="toy task mix: TOY_VAE_WEIGHTS (vae, the default: maps more often) or the DiT's",
    )
    p.add_argument(
        "--swatches",
        type=float,
        default=None,
        help="fraction of the toy training images that are flat swatches of the toy palette "
        "(default 0: none, as the demo's); not with --data",
    )
    p.add_argument("--latent-channels", type=int, default=8, help="latent channels (default 8)")
    p.add_argument("--eval-images", type=int, default=256, help="held-out toy images to score")
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="toy image side in pixels, for training and the held-out score (default 64; "
        "a multiple of 16, at least 32: what the DiT's toy data uses, data.toy_size; the "
        "demo's is 32); not with --data, whose images set it",
    )
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, mps ... (default: cuda, xpu or mps when available)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the first bad argument; nothing is read or written."""
    for name in ("steps", "batch_size", "n_images", "latent_channels", "eval_images"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not args.lr > 0 or args.lr == float("inf"):
        raise ValueError(f"--lr must be a positive finite number, got {args.lr}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.size is not None and (args.size < 32 or args.size % 16):
        raise ValueError(f"--size must be a multiple of 16, at least 32, got {args.size}")
    if args.data is not None and args.size is not None:
        raise ValueError("--size sets the toy images' size; with --data the images set it")
    if args.data is not None and not (args.data.is_dir() or args.data.is_file()):
        raise ValueError(f"--data {args.data} does not exist")
    if args.data is not None and args.mix is not None:
        raise ValueError("--mix picks the toy stream's task mix; it cannot be used with --data")
    if args.data is not None and args.swatches is not None:
        raise ValueError("--swatches mixes palette swatches into the toy images; not with --data")
    if args.swatches is not None and not 0 <= args.swatches < 1:
        raise ValueError(f"--swatches must be in [0, 1), got {args.swatches}")
    out = args.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    from ace.atomic import nearest_existing

    if not nearest_existing(out).is_dir():  # a file on the way: mkdir would fail at the end
        raise ValueError(f"--out {out}: {nearest_existing(out)} is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out} exists and is not empty (--overwrite replaces it)")


def train(args: argparse.Namespace) -> dict:
    """Check the arguments, train, score and save; returns what ``training.json`` holds."""
    check_args(args)
    device = pick_device(args.device)  # before any work
    from ace.train.vae import (  # lazy: --help and argument errors need no torch
        TOY_VAE_SWATCHES,
        TOY_VAE_WEIGHTS,
        load_images,
        measurements,
        save_vae,
        toy_images,
        toy_vae_config,
        train_toy_vae,
        train_vae,
    )

    if args.data is None:
        return train_toy_vae(
            args.out,
            steps=args.steps,
            n_images=args.n_images,
            eval_images=args.eval_images,
            seed=args.seed,
            batch_size=args.batch_size,
            lr=args.lr,
            latent_channels=args.latent_channels,
            weights=None if args.mix == "dit" else TOY_VAE_WEIGHTS,
            swatch_fraction=TOY_VAE_SWATCHES if args.swatches is None else args.swatches,
            progress=not args.quiet,
            device=device,
            size=64 if args.size is None else args.size,
        )
    images = load_images(args.data, limit=args.n_images)
    height, size = images.shape[-2:]  # held-out toy images of the manifest's size
    if height != size or size < 32 or size % 16:
        raise UserError(
            f"--data {args.data}: its images are {height}x{size} px; the VAE is scored on "
            "held-out toy images of the same size, which are square, a multiple of 16 and at "
            "least 32 px"
        )
    held_out = toy_images(args.eval_images, seed=args.seed, split="eval", size=size)
    start = time.perf_counter()
    vae = train_vae(
        images,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        config=toy_vae_config(args.latent_channels, size),
        progress=not args.quiet,
        device=device,
    )
    info = {
        "data": str(args.data),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "size": size,
        "train_images": len(images),
        "train_seconds": round(time.perf_counter() - start, 1),
        **measurements(vae, held_out),
    }
    save_vae(vae.to("cpu"), args.out, info)
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        info = train(args)
    except (UserError, ValueError, OSError) as e:  # OSError: the disk refused the output
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(
        f"trained in {info['train_seconds']:.0f} s on {info['train_images']} images; "
        f"PSNR on {info['eval_images']} held-out toy images: {info['psnr_db']:.2f} dB "
        f"(posterior sample: {info['psnr_sampled_db']:.2f} dB); "
        f"scaling_factor {info['scaling_factor']:.4f}"
    )
    pe = info["palette_error"]
    print(
        f"palette error (largest channel error of a flat colour, 0-1): backgrounds "
        f"{pe['background']:.3f}, objects {pe['object']:.3f}, worst {pe['worst']:.3f}"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
