#!/usr/bin/env python
"""Create or edit images with an ACE pipeline directory: one request from the flags, or
many from a JSONL file (--requests, below).

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

Many requests: a JSONL file, one request a line, sampled --batch-size at a time in one
transformer call per step (ACEPipeline.generate), each image written under --output (a
directory) as soon as its batch is done:
    python scripts/infer.py --pipeline DIR --requests requests.jsonl --output outputs/batch
A line holds "instruction" and, as wanted, "images", "masks" and "history" (as above),
"task", "negative_prompt", "height" and "width", "seed" (default: --seed plus the request's
index, 0-based) and "output" (a file name under --output; default: 00000.png, 00001.png,
... by index). Paths are relative to the file. Every request is read and checked before
the pipeline loads; --skip-existing leaves out those whose output is already there (each
image is written whole or not at all), so a stopped batch continues where it stopped:
    {"instruction": "a red circle", "height": 256, "width": 256}
    {"instruction": "make {image} blue", "images": ["in.png"], "masks": ["mask.png"], "seed": 7}
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import NamedTuple

from ace.atomic import atomic_write
from ace.cli import HelpFormatter, OneLineParser, UserError, check_out, open_pipeline, pick_device

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
        "--instruction", help="the instruction; name images {image}, {image1}, ... (or --requests)"
    )
    p.add_argument(
        "--requests",
        help="a JSONL file of requests, one a line (see above), instead of --instruction; "
        "--output is then a directory",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="--requests: requests sampled together, in one transformer call per step (default: 8)",
    )
    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="--requests: leave out the requests whose output file exists",
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
        "--seed",
        type=int,
        default=0,
        help="seed of the initial noise (0 <= seed < 2**64); with --requests, the seed of "
        "request i (from 0) is SEED + i unless its line gives one",
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
        "--output",
        required=True,
        help="where to write the image (.png; .jpg, .webp at quality 95); with --requests, "
        "the directory to write them in",
    )
    args = p.parse_args(argv)
    if (args.instruction is None) == (args.requests is None):
        p.error("give --instruction (one request) or --requests FILE (many), not both")
    if args.requests is not None:
        per_request = {"--image": args.image, "--mask": args.mask, "--history": args.history,
                       "--negative": args.negative, "--task": args.task,
                       "--height": args.height, "--width": args.width}  # fmt: skip
        given = [flag for flag, value in per_request.items() if value not in (None, "", [])]
        if given:
            p.error(f"with --requests, give {', '.join(given)} per request, in the file")
        args.batch_size = 8 if args.batch_size is None else args.batch_size
        if args.batch_size < 1:
            p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    elif args.skip_existing or args.batch_size is not None:
        p.error("--batch-size and --skip-existing go with --requests")
    return args


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


def _paths(turn: dict, key: str, where: str, nulls: bool) -> list:
    """``turn[key]``: a list of file paths (or nulls, where ``nulls``)."""
    value = turn.get(key, [])
    if not isinstance(value, list) or not all(
        isinstance(v, str) or (nulls and v is None) for v in value
    ):
        kind = "file paths or null" if nulls else "file paths"
        raise UserError(f"{where}: '{key}' must be a list of {kind}, got {json.dumps(value)}")
    return value


def load_unit(turn: dict, base: Path, where: str, known: set[str]):
    """One turn (or request) object: its instruction, images and masks (paths relative to
    ``base``) and task as a ConditionUnit, checked; ``known``: the keys it may hold."""
    from ace.lcu import ConditionUnit

    unknown = set(turn) - known
    if "instruction" not in turn or unknown:
        optional = ", ".join(f"'{k}'" for k in sorted(known - {"instruction"}))
        raise UserError(
            f"{where}: needs 'instruction' (and optional {optional}); got {sorted(turn)}"
        )
    image_paths = _paths(turn, "images", where, False)
    mask_paths = None if turn.get("masks") is None else _paths(turn, "masks", where, True)
    try:
        images = [load_image(base / p, "RGB") for p in image_paths]
        masks = None  # "masks": null or absent -> no masks
        if mask_paths is not None:
            masks = [None if m is None else load_mask(base / m) for m in mask_paths]
    except UserError as e:
        raise UserError(f"{where}: {e}") from e
    try:  # checked here, before the pipeline loads: counts, sizes, references
        return ConditionUnit(turn["instruction"], images, masks, turn.get("task", ""))
    except ValueError as e:
        raise UserError(f"{where}: {e}") from e


TURN_KEYS = {"instruction", "images", "masks", "task"}


def load_turns(turns, base: Path, where: str, prefix: str = "") -> list:
    """A list of turn objects, oldest first, as ConditionUnits (``where``: the file or
    request they come from; ``prefix``: what each turn's errors begin with)."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise UserError(f"{where} must hold a list of turns (objects)")
    return [
        load_unit(turn, base, f"{prefix}history turn {i}", TURN_KEYS)
        for i, turn in enumerate(turns)
    ]


def load_history(path: str) -> list:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"history file not found: {file}")
    try:
        turns = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"history file {file} is not valid JSON: {e}") from e
    return load_turns(turns, file.parent, f"history file {file}")


def auto_dtype(device) -> str:
    """``--dtype auto``: bf16 on a CUDA GPU with native bf16 (compute capability 8.0+; a
    T4 or V100 would emulate it slowly), fp32 elsewhere."""
    import torch

    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp32"


def check_settings(args: argparse.Namespace) -> None:
    """What every request shares, checked before anything is read or loaded."""
    from ace.request import check_inputs

    if not 0 <= args.seed < 2**64:
        raise UserError(f"--seed must lie in [0, 2**64), got {args.seed}")
    if not (Path(args.pipeline) / "model_index.json").is_file():
        raise UserError(
            f"--pipeline {args.pipeline} is not an ACEPipeline directory (no model_index.json)"
        )
    steps = 1 if args.steps is None else args.steps
    try:
        check_inputs(steps, None, None, args.guidance, args.rescale)
    except ValueError as e:
        raise UserError(str(e)) from e


def check_request(args, instruction, images, masks, history, task, height, width):
    """One request, checked before the (slow) pipeline load: its size (both or neither,
    within the model's token budget), its inputs, references and inpainting masks, and
    its images as the pipeline will preprocess them (one too small to keep a pixel)."""
    from ace.pipeline import ACEPipeline
    from ace.request import check_inpainting_masks, check_size, check_target_size, prepare_lcu

    try:
        check_target_size(height, width)
        lcu = ACEPipeline.build_lcu(instruction, images, masks, history, task)
        check_inpainting_masks(lcu)
        if height is None and not lcu.images:
            return
        budget = token_budget(args.pipeline)  # the model's, from its configs
        if height is not None:
            check_size(height, width, budget)
        if lcu.images:
            prepare_lcu(lcu, budget, None if height is None else (height, width))
    except ValueError as e:
        raise UserError(str(e)) from e


@functools.cache
def token_budget(pipeline: str) -> int:
    from ace.pipeline import ACEPipeline

    try:
        return ACEPipeline.max_seq_len_of(pipeline)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--pipeline {pipeline}: unreadable config: {e}") from e


def load_pipeline(args: argparse.Namespace, device):
    from ace.device import DTYPES

    if args.offload and device.type == "cpu":
        raise UserError("--offload moves components to an accelerator as they run; there is none")
    name = args.dtype if args.dtype != "auto" else auto_dtype(device)
    pipe = open_pipeline(args.pipeline, dtype=DTYPES[name])
    if args.offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe = pipe.to(device)
    return pipe


def run(args: argparse.Namespace) -> Path:
    """One request from the flags; returns the image's path."""
    import torch

    output = Path(args.output)
    if output.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"--output must end with one of {IMAGE_SUFFIXES}, got {output.name}")
    check_out(output, "--output")
    if (args.height is None) != (args.width is None):
        raise UserError("give both --height and --width, or neither")
    if args.mask and len(args.mask) != len(args.image):
        raise UserError(
            f"got {len(args.image)} --image but {len(args.mask)} --mask; give one --mask per image, or none"
        )
    check_settings(args)
    device = pick_device(args.device)
    images = [load_image(p, "RGB") for p in args.image]
    masks = [None if m.lower() == "none" else load_mask(m) for m in args.mask] or None
    history = load_history(args.history) if args.history else None
    request = (args.instruction, images, masks, history, args.task, args.height, args.width)
    check_request(args, *request)
    pipe = load_pipeline(args, device)
    steps = args.steps if args.steps is not None else pipe.config.default_steps
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


# ------------------------------------------------------------------------ --requests

REQUEST_KEYS = TURN_KEYS | {"history", "negative_prompt", "height", "width", "seed", "output"}


class Entry(NamedTuple):
    """One line of a requests file: where it is, what it holds, its seed and output."""

    where: str
    request: dict
    seed: int
    output: Path


def read_requests(args: argparse.Namespace) -> list[Entry]:
    """The requests file's lines, each a JSON object, with its seed and output path (both
    checked; no image read yet)."""
    from ace.request import is_int

    file, root = Path(args.requests), Path(args.output)
    if not file.is_file():
        raise UserError(f"--requests {file}: no such file")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"--requests {file} is not UTF-8 text: {e}") from e
    entries: list[Entry] = []
    outputs: dict[Path, str] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{file} line {n}"
        try:
            request = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON: {e}") from e
        if not isinstance(request, dict):
            raise UserError(f"{where}: expected a request (a JSON object), got {line.strip()}")
        index = len(entries)
        seed = request.get("seed", args.seed + index)
        if not (is_int(seed) and 0 <= seed < 2**64):
            raise UserError(f"{where}: seed must be an int in [0, 2**64), got {json.dumps(seed)}")
        name = request.get("output", f"{index:05d}.png")
        if not isinstance(name, str) or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(
                f"{where}: output must be a file name ending with one of {IMAGE_SUFFIXES}, "
                f"got {json.dumps(name)}"
            )
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise UserError(f"{where}: output {name} must lie under --output (a relative path)")
        path = root / name
        if path in outputs:
            raise UserError(f"{where}: output {name} is also {outputs[path]}'s")
        check_out(path, f"{where}: output")
        outputs[path] = where
        entries.append(Entry(where, request, seed, path))
    if not entries:
        raise UserError(f"--requests {file} holds no request")
    return entries


def load_request(entry: Entry, base: Path) -> dict:
    """An entry's request for ``ACEPipeline.generate``: images, masks and history read."""
    request, where = entry.request, entry.where
    unit = load_unit(request, base, where, REQUEST_KEYS)
    history = request.get("history")
    if history is not None:
        history = load_turns(history, base, f"{where}: history", prefix=f"{where}: ")
    negative = request.get("negative_prompt", "")
    if not isinstance(negative, str):
        raise UserError(f"{where}: negative_prompt must be a str, got {json.dumps(negative)}")
    return {
        "instruction": unit.instruction, "images": unit.images, "masks": unit.masks,
        "history": history, "task": unit.task, "negative_prompt": negative,
        "height": request.get("height"), "width": request.get("width"),
    }  # fmt: skip


def check_entry(entry: Entry, base: Path, args: argparse.Namespace) -> None:
    """An entry read and checked as ``check_request`` checks the flags' request."""
    r = load_request(entry, base)
    try:
        check_request(
            args, r["instruction"], r["images"], r["masks"], r["history"], r["task"],
            r["height"], r["width"],
        )  # fmt: skip
    except UserError as e:
        raise UserError(f"{entry.where}: {e}") from e


def run_requests(args: argparse.Namespace) -> tuple[list[Path], int]:
    """Every request of --requests, --batch-size at a time; returns the paths written and
    how many requests --skip-existing left out."""
    import re

    import torch
    from tqdm import tqdm

    root = Path(args.output)
    if root.exists() and not root.is_dir():
        raise UserError(f"--output {root} is a file; with --requests give a directory")
    check_settings(args)
    entries = read_requests(args)
    todo = [e for e in entries if not (args.skip_existing and e.output.is_file())]
    base = Path(args.requests).parent
    for entry in tqdm(todo, desc="check", unit="request", disable=len(todo) < 64):
        check_entry(entry, base, args)  # read and checked, then let go: memory stays one batch's
    device = pick_device(args.device)
    written: list[Path] = []
    if not todo:
        return written, len(entries)
    pipe = load_pipeline(args, device)
    pipe.set_progress_bar_config(disable=True)  # one bar for the whole file instead
    steps = args.steps if args.steps is not None else pipe.config.default_steps
    bar = tqdm(total=len(todo), desc="infer", unit="image")
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start : start + args.batch_size]
        try:
            result = pipe.generate(
                [load_request(e, base) for e in batch],  # checked above
                num_inference_steps=steps,
                guidance_scale=args.guidance,
                guidance_rescale=args.rescale,
                generator=[torch.Generator(device).manual_seed(e.seed) for e in batch],
                batch_size=len(batch),
            )
        except ValueError as e:  # "request K: ..." names the batch's K-th
            found = re.match(r"request (\d+): (.*)", str(e), re.S)
            if not found:
                raise UserError(str(e)) from e
            raise UserError(f"{batch[int(found[1])].where}: {found[2]}") from e
        for entry, image in zip(batch, result.images):
            entry.output.parent.mkdir(parents=True, exist_ok=True)
            written.append(
                atomic_write(entry.output, lambda tmp, im=image: im.save(tmp, quality=95))
            )
        bar.update(len(batch))
    bar.close()
    return written, len(entries) - len(todo)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.requests is not None:
            paths, skipped = run_requests(args)
            kept = f" (left out {skipped} already there)" if skipped else ""
            print(f"wrote {len(paths)} images under {args.output}{kept}")
            return 0
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
