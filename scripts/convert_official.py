#!/usr/bin/env python
"""Build an ACEPipeline directory from the released ACE-0.6B files (all local paths).

    python scripts/convert_official.py \\
        --dit models/ace_0.6b_512px.pth --vae models/vae.bin \\
        --t5 models/t5-v1_1-xxl --tokenizer models/t5-v1_1-xxl \\
        --resolution 512 --out pipelines/ace-0.6b-512

It loads the DiT with ``torch.load(weights_only=True)`` and maps either released
spelling to ace's keys, converts the LDM-layout VAE with diffusers' own converter,
loads T5 and its tokenizer from local directories (nothing is downloaded), computes
the image-indicator table once, and writes everything as safetensors with the released
sampler (DDIM, trailing spacing) and defaults (20 steps at 512 px, 50 at 1024 px,
guidance 4.5, rescale 0.5). The directory appears only when complete.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

from ace.atomic import umask
from ace.cli import HelpFormatter, OneLineParser, UserError

RELEASED_STEPS = {512: 20, 1024: 50}


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(
        prog="convert_official.py",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--dit", required=True, help="the released DiT checkpoint (.pth)")
    p.add_argument(
        "--vae", required=True, help="the released LDM-layout VAE (vae.bin / .pth / .safetensors)"
    )
    p.add_argument("--t5", required=True, help="a local transformers T5 directory (T5EncoderModel)")
    p.add_argument("--tokenizer", required=True, help="a local tokenizer directory")
    p.add_argument("--resolution", type=int, choices=sorted(RELEASED_STEPS), required=True)
    p.add_argument("--out", required=True, help="the pipeline directory to write (must not exist)")
    p.add_argument(
        "--dtype",
        default="bf16",
        choices=["fp32", "bf16", "fp16"],
        help="dtype of the T5 encoder (bf16 as released; T5 overflows in fp16)",
    )
    p.add_argument(
        "--dit-config",
        help="JSON of ACETransformer arguments, for sizes other than the released ones",
    )
    p.add_argument(
        "--vae-config", help="JSON of AutoencoderKL arguments (default: the Stable Diffusion VAE)"
    )
    return p.parse_args(argv)


def load_weights(path: str) -> dict:
    import torch

    file = Path(path)
    if not file.is_file():
        raise UserError(f"file not found: {file}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(file)
        except Exception as e:  # SafetensorError: truncated, or not safetensors at all
            raise UserError(f"cannot load {file} as safetensors: {e}") from e
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types
        raise UserError(f"cannot load {file} as a weights-only checkpoint: {e}") from e


def read_json(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read JSON config {path}: {e}") from e


def build(args: argparse.Namespace):
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, T5EncoderModel

    from ace.conditioning import convert_ldm_vae, sd_vae_config
    from ace.convert import official_dit_to_ace
    from ace.device import DTYPES
    from ace.diffusion import DDPMEpsilon
    from ace.models import ACETransformer
    from ace.pipeline import ACEPipeline

    for flag in ("t5", "tokenizer"):
        if not Path(getattr(args, flag)).is_dir():
            raise UserError(f"--{flag} {getattr(args, flag)} is not a directory")
    # the small and quick parts first: a bad tokenizer should not wait for T5-XXL's 10 GB
    spiece_only = (
        not (Path(args.tokenizer) / "tokenizer.json").is_file()
        and (Path(args.tokenizer) / "spiece.model").is_file()
    )
    if spiece_only and importlib.util.find_spec("sentencepiece") is None:
        raise UserError(
            f"--tokenizer {args.tokenizer} holds spiece.model but no tokenizer.json: reading "
            "it needs the sentencepiece package (pip install sentencepiece protobuf)"
        )
    named = re.findall(r"(512|1024)px", str(args.dit))
    if named and int(named[-1]) != args.resolution:  # the same weights shape: nothing else tells
        raise UserError(
            f"--dit {args.dit} is named for {named[-1]} px but --resolution is "
            f"{args.resolution}: the preset sets the RoPE table and the step count; give "
            f"--resolution {named[-1]}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"--tokenizer {args.tokenizer}: not a tokenizer directory ({e})") from e
    dit_config, vae_config = read_json(args.dit_config), read_json(args.vae_config)
    try:
        transformer = (
            ACETransformer(**dit_config)
            if dit_config
            else ACETransformer.from_preset(f"ace-0.6b-{args.resolution}")
        )
        vae = AutoencoderKL(**(vae_config or sd_vae_config()))
    except (TypeError, ValueError) as e:  # an unknown or bad key in a --*-config
        raise UserError(f"bad --dit-config or --vae-config: {e}") from e
    if vae.config.latent_channels != transformer.config.in_channels:
        raise UserError(
            f"the VAE has {vae.config.latent_channels} latent channels and the DiT reads "
            f"{transformer.config.in_channels} (in_channels)"
        )
    try:
        state = official_dit_to_ace(
            load_weights(args.dit),
            transformer.config.in_channels,
            share_qk_norm=transformer.config.get("share_qk_norm", False),
        )
        transformer.load_state_dict(state, strict=True)
        vae.load_state_dict(convert_ldm_vae(load_weights(args.vae), dict(vae.config)), strict=True)
    except (ValueError, RuntimeError) as e:  # unknown keys, wrong shapes
        raise UserError(str(e)) from e
    dtype = DTYPES[args.dtype]
    try:
        text_encoder = T5EncoderModel.from_pretrained(
            args.t5, torch_dtype=dtype, local_files_only=True
        )
    except (OSError, ValueError) as e:
        raise UserError(f"--t5 {args.t5}: not a T5 encoder directory ({e})") from e
    if text_encoder.config.d_model != transformer.config.text_dim:
        raise UserError(
            f"--t5 {args.t5} gives {text_encoder.config.d_model}-wide states and the DiT reads "
            f"{transformer.config.text_dim} (text_dim): the released model reads T5-v1.1-XXL"
        )
    return ACEPipeline(
        transformer=transformer.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=DDPMEpsilon().make_scheduler(),
        default_steps=RELEASED_STEPS[args.resolution],
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists():
            raise UserError(f"--out {out} already exists; choose a new directory")
        pipe = build(args)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            pipe.save_pretrained(tmp, safe_serialization=True)
            tmp.chmod(0o777 & ~umask())  # mkdtemp's 0700 would keep the group out
            try:
                tmp.rename(out)
            except OSError as e:  # --out appeared while converting
                raise UserError(f"--out {out} appeared while converting: {e}") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except UserError as e:
        print(f"convert_official.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
