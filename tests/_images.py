"""Small test images: random RGB and a box mask (shared by the pipeline tests)."""

import numpy as np
from PIL import Image


def img(w, h, seed=0):
    """A (w, h) RGB image of uniform random pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def box_mask(w, h):
    """A (w, h) "L" mask, white (255) on the box [w/4, w/2) x [h/4, h/2)."""
    m = np.zeros((h, w), dtype=np.uint8)
    m[h // 4 : h // 2, w // 4 : w // 2] = 255
    return Image.fromarray(m)
