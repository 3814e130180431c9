"""Reading image files, the same way everywhere: EXIF orientation applied, 16-bit
greyscale scaled to 8 bits, then converted to the mode asked for.

    from ace.images import open_image
    image = open_image("photo.jpg", "RGB")  # upright, as a viewer shows it
    mask = open_image("mask16.png", "L")  # 0-65535 -> 0-255, not clipped to white

PIL alone gets both wrong: ``Image.open(path).convert("RGB")`` keeps a phone photo's
pixels sideways (its EXIF tag says how to turn them), and ``convert`` clips 16-bit values
at 255, so a 16-bit mask or depth map comes out almost all white. Alpha is dropped, as
``convert("RGB")`` does.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""Greyscale modes read as 16-bit (0-65535): PIL's 16-bit PNG and TIFF modes, and "I",
which PIL gives some 16-bit PNGs."""


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` upright (EXIF orientation) in ``mode``. 16-bit greyscale is scaled by 1/257,
    unless no value exceeds 255: then it holds 8-bit values (a 0/255 mask saved from a
    uint16 array), which scaling would turn into 0/1, and an all-but-empty mask into the
    whole image."""
    image = ImageOps.exif_transpose(image)  # a copy, upright; no EXIF tag: unchanged
    if image.mode in SIXTEEN_BIT:
        values = np.asarray(image, dtype=np.float64).clip(0, 65535)  # (H, W)
        scale = 257 if values.size and values.max() > 255 else 1
        image = Image.fromarray((values / scale).round().astype(np.uint8), "L")
    return image if image.mode == mode else image.convert(mode)


def open_image(source: str | os.PathLike | bytes, mode: str) -> Image.Image:
    """The image in file ``source`` (a path, or the file's bytes), fully read, in ``mode``.
    PIL's errors (OSError for a missing, truncated or unknown file) pass through."""
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    with Image.open(fp) as im:
        im.load()
        return to_mode(im, mode)
