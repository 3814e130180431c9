"""Image metrics for the toy-world evaluation: PSNR over a region.

Images are arrays shaped (H, W, C) or (H, W): floats in [0, 1] or uint8 in [0, 255]
(uint8 is divided by 255). A region is a bool array (H, W); True marks the pixels
that count, over every channel.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

PSNR_CAP = 100.0
"""PSNR of identical images (and the most any pair scores): inf does not fit in JSON."""


def to_float(image: np.ndarray | Image.Image) -> np.ndarray:
    """An image as float64 in [0, 1]: PIL images are read as RGB, uint8 is divided by 255."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"expected a float array in [0, 1] or uint8, got dtype {a.dtype}")
    if not np.isfinite(a).all():
        raise ValueError("expected a float array in [0, 1], got NaN or inf values")
    if a.size and (a.min() < -1e-6 or a.max() > 1 + 1e-6):
        raise ValueError(
            f"expected a float array in [0, 1], got values in [{a.min():g}, {a.max():g}] "
            "(0-255 images must be uint8)"
        )
    return a.astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB between ``a`` and ``b`` (peak 1.0).

    ``10 * log10(1 / MSE)``, the MSE taken over the pixels where ``region`` (H, W) is
    True and over all channels; all pixels when ``region`` is None. Identical pixels
    give ``PSNR_CAP`` (100 dB) instead of inf; an empty region gives ``nan`` (there is
    nothing to measure, and callers average with ``nanmean``). A shape mismatch, of the
    two images or of the region against their (H, W), raises ValueError, as do float
    images outside [0, 1] or with NaN (a NaN pixel used to score the 100 dB cap).

    >>> a = np.zeros((4, 4, 3)); psnr(a, a + 0.1)  # uniform error 0.1: MSE 0.01
    20.0
    """
    a, b = to_float(a), to_float(b)
    if a.shape != b.shape:
        raise ValueError(f"psnr: image shapes differ: {a.shape} vs {b.shape}")
    if a.ndim not in (2, 3):
        raise ValueError(f"psnr: expected images shaped (H, W) or (H, W, C), got {a.shape}")
    err = (a - b) ** 2  # (H, W[, C])
    if region is not None:
        region = np.asarray(region)
        if region.shape != a.shape[:2]:
            raise ValueError(
                f"psnr: region shape {region.shape} differs from the images' (H, W) {a.shape[:2]}"
            )
        err = err[region.astype(bool)]  # (N[, C]) the pixels inside the region
    if err.size == 0:
        return float("nan")
    mse = float(err.mean())
    if mse == 0.0:
        return PSNR_CAP
    return min(PSNR_CAP, 10.0 * math.log10(1.0 / mse))


def leave_one_out_means(images: list[np.ndarray]) -> list[np.ndarray | None]:
    """Per image, the mean of the OTHER images of its shape (the mean baseline: an image's
    own share would flatter it, and with one image be it); None when no other image has
    its shape (targets of mixed aspect ratios are averaged within each size).

    >>> [m.tolist() for m in leave_one_out_means([np.zeros(2), np.ones(2), np.full(2, 2.0)])]
    [[1.5, 1.5], [1.0, 1.0], [0.5, 0.5]]
    >>> [None if m is None else m.tolist() for m in leave_one_out_means([np.zeros(2), np.ones(3)])]
    [None, None]
    """
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(images):
        by_shape.setdefault(np.shape(x), []).append(i)
    out: list[np.ndarray | None] = [None] * len(images)
    for idx in by_shape.values():
        if len(idx) < 2:
            continue
        total = np.sum([images[i] for i in idx], axis=0)
        for i in idx:
            out[i] = (total - images[i]) / (len(idx) - 1)
    return out
