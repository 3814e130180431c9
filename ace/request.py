"""One request, checked and preprocessed as the released code does: the first two steps of
``ACEPipeline.__call__``, and what training shares with them (``ace.train.batch``).

Shapes: (H, W) pixel size.

    from PIL import Image
    from ace.lcu import LCU, ConditionUnit
    from ace.request import check_inputs, prepare_lcu
    check_inputs(20, None, None, 4.5, 0.5)  # the call's settings; ValueError names a bad one
    lcu = LCU(ConditionUnit("make {image} blue", [Image.new("RGB", (96, 64))]))
    prepare_lcu(lcu, max_seq_len=1024).target_size  # (64, 96)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from ace.conditioning import fill_masked, preprocess_image, preprocess_mask
from ace.diffusion import check_guidance
from ace.lcu import LCU

T = TypeVar("T")

INPAINTING_TASKS = ("inpainting", "Inpainting", "Try On")
"""Task tags whose turn's images are blanked where masked (the released list): the
request's for the current turn, ``ConditionUnit.task`` for a history turn."""


def unconditional_texts(frame_texts: list[T], empty: T) -> list[T]:
    """The per-frame texts of classifier-free guidance's unconditional half, from the
    conditional ones: the released sampler puts the negative prompt in place of the LAST
    entry of its per-image prompt list, which the last frame and the target (frame 0) read;
    every other frame keeps its own instruction. Training drops conditions the same way
    (``empty``: the empty prompt), so the model learns the input guidance will give it.

    >>> unconditional_texts(["edit", "old turn", "edit", "edit"], "")
    ['', 'old turn', 'edit', '']
    """
    out = list(frame_texts)
    out[0] = out[-1] = empty
    return out


def lcu_request(lcu: LCU) -> dict:
    """An LCU as the per-request arguments of ``ACEPipeline.__call__`` (and a request of
    ``ACEPipeline.generate``): its current instruction, images and masks, its history and
    its task."""
    cur = lcu.current
    return dict(
        instruction=cur.instruction, images=cur.images, masks=cur.masks,
        history=lcu.history, task=lcu.task,
    )  # fmt: skip


def check_inpainting_masks(lcu: LCU) -> None:
    """ValueError for a turn with an inpainting task, images and no masks: the released
    fill blanks an unmasked image wholly, so the request would ignore its input. For
    requests; training data keeps that whole fill (``prepare_lcu``). A turn where some
    images have masks passes: the others are references, left whole."""
    for i, cu in enumerate(lcu.turns):
        tag = lcu.task if cu is lcu.current else cu.task
        if tag in INPAINTING_TASKS and cu.images and all(m is None for m in cu.masks):
            where = "" if cu is lcu.current else f"history[{i}]: "
            raise ValueError(
                f"{where}task={tag!r} fills the masked pixels of its images with -1 first, "
                "but it has no masks: the whole input would be blanked and the output "
                "ignore it; pass masks (white = the region to fill)"
            )


def is_int(x) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_inputs(
    num_inference_steps, height, width, guidance_scale, guidance_rescale, output_type="pil"
) -> None:
    """The call's settings (``ACEPipeline.__call__``'s step 1), checked without a pipeline:
    a ValueError names the first bad one. ``scripts/infer.py`` runs it before loading."""
    if output_type not in ("pil", "np", "latent"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
    if not is_int(num_inference_steps) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    check_target_size(height, width)
    check_guidance(guidance_scale, guidance_rescale)


def check_target_size(height, width) -> None:
    """A requested target size: positive ints, multiples of 16, both or neither."""
    for name, side in (("height", height), ("width", width)):
        if side is not None and (not is_int(side) or side <= 0 or side % 16):
            raise ValueError(f"{name} must be a positive int multiple of 16, got {side!r}")
    if (height is None) != (width is None):
        raise ValueError(
            f"give both height and width, or neither (got height={height}, width={width})"
        )


@dataclass
class PreparedLCU:
    """An LCU's pixels, ready to encode: frame 0 is the target, then the condition images."""

    lcu: LCU
    images: list[Tensor]  # (3, H, W) in [-1, 1] per condition image
    masks: list[Tensor]  # (1, H, W) of 0/1 per condition image (ones = whole image)
    target_size: tuple[int, int]  # (H, W) of the target
    target_mask: Tensor  # (1, H, W)


def largest_square(max_seq_len: int) -> int:
    """The side in pixels of the largest square within a budget of ``max_seq_len`` squares
    of 16 px: 512 for the 512 px model's 1024."""
    return int(max_seq_len**0.5) * 16


def check_size(height: int | None, width: int | None, max_seq_len: int) -> None:
    """ValueError when a requested target size exceeds the model's budget of
    ``max_seq_len`` squares of 16 px (``ACEPipeline.max_seq_len``): its tokens would not fit
    the DiT's RoPE table. Checked before any encoder runs."""
    if height is None or width is None:
        return
    squares = (height // 16) * (width // 16)
    if squares > max_seq_len:
        side = largest_square(max_seq_len)
        raise ValueError(
            f"height x width = {height} x {width} is {squares} squares of 16 px, more than "
            f"this model's {max_seq_len} (at most {side} x {side} for a square); ask for a "
            "smaller size"
        )


def prepare_lcu(lcu: LCU, max_seq_len: int, size: tuple[int, int] | None = None) -> PreparedLCU:
    """Preprocess an LCU as the released code does (ACE_REFERENCE section 2).

    Images: centre crop to aspect <= 4, bicubic resize to a token budget, [-1, 1]; masks
    cropped and resized with their image, binarised, all-zero or None = whole image. An
    image whose turn has an inpainting task (``INPAINTING_TASKS``; the current turn's is
    ``lcu.task``, a history turn's its ``ConditionUnit.task``) has its masked pixels set to
    -1, as the released code does with its per-image task list (history tasks first, then
    the request's). In a turn where some images have masks, an image without one is a
    reference and is left as it is (the released chat tags only the masked image as
    inpainting; here a turn has one task); in a turn with no masks at all every image is
    blanked wholly, as released (requests refuse that: ``check_inpainting_masks``). The
    target is
    ``size`` when given (a pipeline's height and width), else the size of the LCU's first
    image; its mask is that image's mask, resized to the target's size with nearest
    neighbours. Without images ``size`` is required and the mask is all ones.
    """
    images, masks = [], []
    # per image: is it filled? its turn is an inpainting one, and it has a mask or no image
    # of its turn has one
    tasks = [(cu.task if cu is not lcu.current else lcu.task, cu) for cu in lcu.turns for _ in cu.images]  # fmt: skip
    fills = [
        task in INPAINTING_TASKS and (mask is not None or all(m is None for m in cu.masks))
        for (task, cu), mask in zip(tasks, lcu.masks)
    ]
    names = [f"history[{t}] images[{j}]" for t, cu in enumerate(lcu.history) for j in range(len(cu.images))]  # fmt: skip
    names += [f"images[{j}]" for j in range(len(lcu.current.images))]
    for image, mask, fill, name in zip(lcu.images, lcu.masks, fills, names):
        try:
            x = preprocess_image(image, max_seq_len)  # (3, H, W)
            m = preprocess_mask(mask, tuple(x.shape[1:]))  # (1, H, W); None -> ones
        except ValueError as e:  # which input: the LCU may hold nine
            raise ValueError(f"{name}: {e}") from e
        if fill:
            x = fill_masked(x, m)
        images.append(x)
        masks.append(m)
    if images:
        target_size = tuple(images[0].shape[1:]) if size is None else size
        target_mask = masks[0]
        if target_mask.shape[1:] != target_size:
            target_mask = torch.nn.functional.interpolate(
                target_mask[None], size=target_size, mode="nearest-exact"
            )[0]
    else:
        if size is None:
            raise ValueError("text-to-image needs a target size")
        target_size, target_mask = size, torch.ones(1, *size)
    return PreparedLCU(lcu, images, masks, tuple(target_size), target_mask)
