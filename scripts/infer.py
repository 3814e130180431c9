#!/usr/bin/env python
"""Create or edit one image with an ACE pipeline directory.

    # text-to-image
    python scripts/infer.py --pipeline DIR --instruction "a red circle" --output out.png
    # an edit with a mask (white = the region to change); one --mask per --image, or none
    python scripts/infer.py --pipeline DIR --instruction "make the masked part of {image} blue" \\
        --image in.png --mask mask.png --output out.png
    # inpainting as the released requests do it: the masked pixels are blanked first
    python scripts/infer.py --pipeline DIR --instruction "a blue square in {image}" \\
        --image in.png --mask mask.png --task inpainting --output out.png
    # two reference images
    python scripts/infer.py --pipeline DIR --instruction "put the object of {image1} into {image}" \\
        --image scene.png --image object.png --mask none --mask none --output out.png
    # multi-turn: earlier turns from a JSON file (paths relative to it)
    python scripts/infer.py --pipeline DIR --history turns.json --instruction "now make {image} green" \\
        --image previous.png --output out.png

The history file is a list of turns, oldest first ("images" and "masks" optional; one mask
path or null per image; "task": "inpainting" for a turn that was an inpainting request):
    [{"instruction": "make {image} red", "images": ["a.png"], "masks": [null]}]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ace.atomic import atomic_write
from ace.cli import HelpFormatter, OneLineParser, UserError, check_out, pick_device

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


TASKS = ("inpainting", "Inpainting", "Try On")
"""--task values: the released inpainting tags (``ace.request.INPAINTING_TASKS``, kept
here so that --help needs no torch)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog="infer.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--pipeline",
        required=True,
        help="an ACEPipeline directory (save_pretrained / convert_official.py)",
    )
    p.add_argument(
        "--instruction", required=True, help="the instruction; name images {image}, {image1}, ..."
    )
    p.add_argument("--image", action="append", default=[], help="an input image (repeatable)")
    p.add_argument(
        "--mask", action="append", default=[], help="a mask per --image, or 'none' (repeatable)"
    )
    p.add_argument("--history", help="a JSON file of earlier turns")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps (default: the pipeline's released count, 20 or 50)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=4.5,
        help="classifier-free guidance scale; <= 1 samples the instruction alone, without "
        "guidance or --negative",
    )
    p.add_argument("--rescale", type=float, default=0.5, help="guidance rescale in [0, 1]")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the initial noise (0 <= seed < 2**64)"
    )
    p.add_argument(
        "--task",
        default="",
        choices=("", *TASKS),
        metavar="TASK",
        help="'inpainting' sets the masked pixels of the inputs to -1 first, as the released "
        "inpainting requests do (default: none; masks only mark the region to edit)",
    )
    size_help = (
        "target %s in pixels, a multiple of 16; give both --height and --width, or neither "
        "(default: the size of the request's first image after preprocessing, oldest history "
        "turn first as in the released code, or the pipeline's square)"
    )
    p.add_argument("--height", type=int, default=None, help=size_help % "height")
    p.add_argument("--width", type=int, default=None, help=size_help % "width")
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, mps ... (default: cuda, xpu or mps when available)",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="weights' dtype; auto: bf16 on a CUDA GPU that runs it natively (Ampere or "
        "newer), fp32 elsewhere",
    )
    p.add_argument(
        "--offload",
        action="store_true",
        help="enable_model_cpu_offload(): each component on the GPU only while it runs",
    )
    p.add_argument(
        "--output", required=True, help="where to write the image (.png; .jpg, .webp at quality 95)"
    )
    return p.parse_args(argv)


def load_image(path: str | Path, mode: str):
    from PIL import Image

    from ace.images import open_image

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        return open_image(path, mode)  # upright (EXIF), 16-bit scaled to 8
    except (OSError, Image.DecompressionBombError) as e:  # the latter: PIL's size guard
        raise UserError(f"cannot read image {path}: {e}") from e


def load_mask(path: str | Path):
    """A mask file as greyscale ("L"). One in colour or with transparency is refused: it
    would be read by its grey value (a red brush stroke is 76, at or below the threshold
    of 128, so no mask, the whole image), and its transparency dropped."""
    import numpy as np

    rgba = np.asarray(load_image(path, "RGBA"))  # (H, W, 4)
    if rgba.size and (rgba[..., 3] < 255).any():
        raise UserError(
            f"mask {path} has transparency; give a greyscale mask: white (> 128) marks the "
            "region to edit, black the rest"
        )
    rgb = rgba[..., :3].astype(np.int16)
    if rgb.size and (rgb.max(-1) - rgb.min(-1)).max() > 16:  # JPEG noise aside
        raise UserError(
            f"mask {path} is in colour; give a greyscale mask: white (> 128) marks the "
            "region to edit, black the rest"
        )
    return load_image(path, "L")


def _paths(turn: dict, key: str, i: int, nulls: bool) -> list:
    """Turn ``i``'s ``key``: a list of file paths (or nulls, where ``nulls``)."""
    value = turn.get(key, [])
    if not isinstance(value, list) or not all(
        isinstance(v, str) or (nulls and v is None) for v in value
    ):
        kind = "file paths or null" if nulls else "file paths"
        raise UserError(
            f"history turn {i}: '{key}' must be a list of {kind}, got {json.dumps(value)}"
        )
    return value


def load_history(path: str) -> list:
    from ace.lcu import ConditionUnit

    file = Path(path)
    if not file.is_file():
        raise UserError(f"history file not found: {file}")
    try:
        turns = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"history file {file} is not valid JSON: {e}") from e
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise UserError(f"history file {file} must hold a list of turns (objects)")
    out = []
    for i, turn in enumerate(turns):
        unknown = set(turn) - {"instruction", "images", "masks", "task"}
        if "instruction" not in turn or unknown:
            raise UserError(
                f"history turn {i}: needs 'instruction' (and optional 'images', 'masks', "
                f"'task'); got {sorted(turn)}"
            )
        images = [load_image(file.parent / p, "RGB") for p in _paths(turn, "images", i, False)]
        masks = None  # "masks": null or absent -> no masks
        if turn.get("masks") is not None:
            masks = _paths(turn, "masks", i, True)
            masks = [None if m is None else load_mask(file.parent / m) for m in masks]
        try:  # checked here, before the pipeline loads: counts, sizes, references
            out.append(ConditionUnit(turn["instruction"], images, masks, turn.get("task", "")))
        except ValueError as e:
            raise UserError(f"history turn {i}: {e}") from e
    return out


def auto_dtype(device) -> str:
    """``--dtype auto``: bf16 on a CUDA GPU with native bf16 (compute capability 8.0+; a
    T4 or V100 would emulate it slowly), fp32 elsewhere."""
    import torch

    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp32"


def run(args: argparse.Namespace) -> Path:
    import torch

    from ace.device import DTYPES
    from ace.pipeline import ACEPipeline
    from ace.request import check_inputs, check_size

    output = Path(args.output)
    if output.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"--output must end with one of {IMAGE_SUFFIXES}, got {output.name}")
    check_out(output, "--output")
    if (args.height is None) != (args.width is None):
        raise UserError("give both --height and --width, or neither")
    if not 0 <= args.seed < 2**64:
        raise UserError(f"--seed must lie in [0, 2**64), got {args.seed}")
    if args.mask and len(args.mask) != len(args.image):
        raise UserError(
            f"got {len(args.image)} --image but {len(args.mask)} --mask; give one --mask per image, or none"
        )
    if not (Path(args.pipeline) / "model_index.json").is_file():
        raise UserError(
            f"--pipeline {args.pipeline} is not an ACEPipeline directory (no model_index.json)"
        )
    device = pick_device(args.device)
    images = [load_image(p, "RGB") for p in args.image]
    masks = [None if m.lower() == "none" else load_mask(m) for m in args.mask] or None
    if args.task in TASKS and images and not any(m is not None for m in masks or []):
        raise UserError(
            "--task inpainting needs a --mask: without one the whole input is filled with "
            "-1 first, and the output ignores it"
        )
    history = load_history(args.history) if args.history else None
    steps = args.steps
    try:  # the request and its settings, checked before the (slow) pipeline load
        check_inputs(
            1 if steps is None else steps, args.height, args.width, args.guidance, args.rescale
        )
        if args.height is not None:  # within the model's token budget: from its configs
            try:
                budget = ACEPipeline.max_seq_len_of(args.pipeline)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"--pipeline {args.pipeline}: unreadable config: {e}") from e
            check_size(args.height, args.width, budget)
        ACEPipeline.build_lcu(args.instruction, images, masks, history, args.task)
    except ValueError as e:
        raise UserError(str(e)) from e

    if args.offload and device.type == "cpu":
        raise UserError("--offload moves components to an accelerator as they run; there is none")
    name = args.dtype if args.dtype != "auto" else auto_dtype(device)
    dtype = DTYPES[name]
    try:
        pipe = ACEPipeline.from_pretrained(args.pipeline, dtype=dtype)
    except (OSError, ValueError) as e:  # a missing or broken component
        raise UserError(f"--pipeline {args.pipeline}: {str(e).splitlines()[0]}") from e
    if args.offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe = pipe.to(device)
    steps = steps if steps is not None else pipe.config.default_steps
    try:
        result = pipe(
            args.instruction,
            images=images,
            masks=masks,
            history=history,
            negative_prompt=args.negative,
            height=args.height,
            width=args.width,
            guidance_scale=args.guidance,
            guidance_rescale=args.rescale,
            num_inference_steps=steps,
            generator=torch.Generator(device).manual_seed(args.seed),
            task=args.task,
        )
    except ValueError as e:  # the pipeline's checks name the problem
        raise UserError(str(e)) from e
    # written atomically: a crash never leaves half an image behind
    return atomic_write(output, lambda tmp: result.images[0].save(tmp, quality=95))  # jpg, webp


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        path = run(args)
    except UserError as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2
    from PIL import Image

    with Image.open(path) as im:  # the size the request came to (sides floored to 16)
        print(f"wrote {path} ({im.width} x {im.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
