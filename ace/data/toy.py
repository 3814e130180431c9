"""The toy world: seeded procedural scenes in which every ACE task family has an exact target.

A scene is a light background (a colour and a pattern) with up to nine simple
objects on a 3x3 grid, at most one per cell. Rendering is pure integer and
float64 numpy on pixel centres: no antialiasing, no fonts, so the same scene
gives the same bytes everywhere. Objects stay strictly inside their cell's box,
so an edit of one cell changes only that box.

Each task family (``TASKS``) is a generator of ``ToySample``: an ``LCU`` whose
target is computed exactly from the scene edits, and the ``change_mask`` of
pixels that should change from the current turn's first input image. The generators live in
``ace.data.toy_tasks``; this module holds the scene model, the rendering and
the public entry points.

>>> import numpy as np
>>> scene = Scene(Background("light grey", "plain"), [Obj("circle", "red", "small", "top left")])
>>> render(scene, 64).size
(64, 64)
>>> s = make_sample("recolor", np.random.default_rng(0))
>>> s.lcu.task, s.lcu.target.size, s.change_mask.shape
('recolor', (64, 64), (64, 64))
>>> [s.lcu.task for s in sample_stream(3, seed=0, tasks=["add", "remove"])]
['remove', 'add', 'remove']
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

from ace.lcu import LCU

# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------

CELLS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
"""The 3x3 grid, row-major; cell i has row i // 3 and column i % 3."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
"""Object shapes."""

SIZES: dict[str, float] = {"small": 0.26, "large": 0.44}
"""Object sizes: the half-extent of the shape as a fraction of a cell's side (size / 3)."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (240, 130, 30),
    "cyan": (30, 180, 210),
    "magenta": (220, 50, 170),
}
"""Saturated object colours."""

BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "light grey": (215, 215, 215),
    "cream": (250, 240, 200),
    "light blue": (200, 225, 250),
    "pink": (250, 215, 225),
    "mint": (205, 245, 215),
}
"""Light background colours; patterns are drawn in the same colour ``PATTERN_DARKEN`` darker."""

PATTERNS: tuple[str, ...] = ("plain", "stripes", "checker", "dots")
"""Background patterns, with period max(8, size // 8) px."""

PATTERN_DARKEN = 48
"""How much darker (per channel) pattern marks are: a strong Canny edge (Sobel 4 * 48 > 160)."""

SEG_COLORS: dict[str, tuple[int, int, int]] = {
    "circle": (255, 0, 0),
    "square": (0, 255, 0),
    "triangle": (0, 0, 255),
    "star": (255, 255, 0),
    "diamond": (255, 0, 255),
    "cross": (0, 255, 255),
}
"""Segmentation colour of each shape class; the background is black."""

EDGE_THRESHOLDS: tuple[int, int] = (80, 160)
"""Canny hysteresis thresholds (low, high) of the edge maps, on the RGB image."""

TASKS: tuple[str, ...] = (
    "text_to_image",
    "edge_map",
    "segmentation_map",
    "edge_to_image",
    "segmentation_to_image",
    "recolor",
    "background",
    "grayscale",
    "add",
    "remove",
    "replace",
    "repaint",
    "extract",
    "merge",
    "reference",
    "multi_turn",
)
"""Every task family, in a fixed order; ``LCU.task`` carries the family's name."""

DEFAULT_WEIGHTS: dict[str, float] = {
    "text_to_image": 1.0,
    "edge_map": 0.5,
    "segmentation_map": 0.5,
    "edge_to_image": 0.75,
    "segmentation_to_image": 0.75,
    "recolor": 1.5,
    "background": 1.0,
    "grayscale": 0.5,
    "add": 1.5,
    "remove": 1.5,
    "replace": 1.5,
    "repaint": 1.0,
    "extract": 1.0,
    "merge": 1.0,
    "reference": 1.0,
    "multi_turn": 2.0,
}
"""Sampling weight of each task in ``sample_stream`` (editing-heavy)."""

SPLIT_IDS: dict[str, int] = {"train": 0, "eval": 1}
"""First entry of every sample's seed: splits never share a random stream."""


def _check_choice(value: str, valid: Sequence[str], what: str) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid {what}s: {', '.join(valid)}")


def check_size(size: int) -> None:
    """Raise ValueError unless ``size`` is an int, a multiple of 16 and at least 32."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 32 or size % 16:
        raise ValueError(f"impossible image size {size!r}: need a multiple of 16 that is >= 32")


# ---------------------------------------------------------------------------
# Scene model
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Background:
    """A light colour (a key of ``BACKGROUND_COLORS``) and a pattern (one of ``PATTERNS``)."""

    color: str
    pattern: str = "plain"

    def __post_init__(self) -> None:
        _check_choice(self.color, tuple(BACKGROUND_COLORS), "background color")
        _check_choice(self.pattern, PATTERNS, "pattern")


@dataclass(frozen=True)
class Obj:
    """One object: a shape of a colour and size, centred in a grid cell."""

    shape: str
    color: str
    size: str
    cell: str

    def __post_init__(self) -> None:
        _check_choice(self.shape, SHAPES, "shape")
        _check_choice(self.color, tuple(COLORS), "color")
        _check_choice(self.size, tuple(SIZES), "size")
        _check_choice(self.cell, CELLS, "cell")


@dataclass
class Scene:
    """A background and its objects, at most one per cell, kept in ``CELLS`` order."""

    background: Background
    objects: list[Obj] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.objects = sorted(self.objects, key=lambda o: CELLS.index(o.cell))
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"at most one object per cell, got cells {cells}")

    def at(self, cell: str) -> Obj | None:
        """The object in ``cell``, or None."""
        return next((o for o in self.objects if o.cell == cell), None)

    def free_cells(self) -> list[str]:
        """The empty cells, in ``CELLS`` order."""
        used = {o.cell for o in self.objects}
        return [c for c in CELLS if c not in used]


@dataclass(frozen=True)
class Edit:
    """One scene edit: with ``background``, set the background; else set the object of
    ``cell`` to ``obj`` (None removes it). Recolour, add, remove and replace are all this."""

    cell: str | None = None
    obj: Obj | None = None
    background: Background | None = None

    def apply(self, scene: Scene) -> Scene:
        """The edited scene (a new one; ``scene`` is untouched)."""
        if self.background is not None:
            return Scene(self.background, list(scene.objects))
        if self.obj is not None and self.obj.cell != self.cell:
            raise ValueError(f"edit of cell {self.cell!r} carries an object of {self.obj.cell!r}")
        kept = [o for o in scene.objects if o.cell != self.cell]
        return Scene(scene.background, kept if self.obj is None else [*kept, self.obj])

    def inverse(self, scene: Scene) -> Edit:
        """The edit that takes ``self.apply(scene)`` back to ``scene``."""
        if self.background is not None:
            return Edit(background=scene.background)
        return Edit(cell=self.cell, obj=scene.at(self.cell))


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def cell_box(cell: str, size: int) -> tuple[int, int, int, int]:
    """Pixel box ``(x0, y0, x1, y1)`` (end-exclusive) of a grid cell; edges at round(k * size / 3)."""
    i = CELLS.index(cell)
    edges = [(size * k + 1) // 3 for k in range(4)]
    row, col = divmod(i, 3)
    return edges[col], edges[row], edges[col + 1], edges[row + 1]


def cell_mask(cell: str, size: int) -> Image.Image:
    """A mode "L" mask, white (255) on the cell's box, black elsewhere."""
    x0, y0, x1, y1 = cell_box(cell, size)
    m = np.zeros((size, size), np.uint8)
    m[y0:y1, x0:x1] = 255
    return Image.fromarray(m)


def _star_points(n: int = 5, inner: float = 0.48) -> list[tuple[float, float]]:
    """Vertices of an upright star in unit coordinates (y down), rounded for portability."""
    pts = []
    for k in range(2 * n):
        r = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + k * math.pi / n
        pts.append((round(r * math.cos(a), 6), round(r * math.sin(a) + 0.08, 6)))
    return pts


_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "triangle": [(0.0, -0.95), (1.0, 0.75), (-1.0, 0.75)],
    "star": _star_points(),
}


def _in_polygon(u: np.ndarray, v: np.ndarray, pts: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd rule: which points (u, v) lie inside the polygon."""
    inside = np.zeros(u.shape, bool)
    for (x1, y1), (x2, y2) in zip(pts, pts[1:] + pts[:1]):
        if y1 == y2:
            continue  # a horizontal edge never crosses a horizontal ray
        crosses = (y1 > v) != (y2 > v)
        x_at = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at)
    return inside


def object_mask(obj: Obj, size: int) -> np.ndarray:
    """(size, size) bool: the pixels whose centres fall inside the object."""
    check_size(size)
    x0, y0, x1, y1 = cell_box(obj.cell, size)
    r = SIZES[obj.size] * size / 3  # half-extent in pixels
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)  # (h, w) each
    u = (xs + 0.5 - (x0 + x1) / 2) / r  # unit coordinates, y down
    v = (ys + 0.5 - (y0 + y1) / 2) / r
    au, av = np.abs(u), np.abs(v)
    if obj.shape == "circle":
        inside = u * u + v * v <= 1.0
    elif obj.shape == "square":
        inside = (au <= 0.82) & (av <= 0.82)
    elif obj.shape == "diamond":
        inside = au + av <= 1.0
    elif obj.shape == "cross":
        inside = ((au <= 0.34) & (av <= 1.0)) | ((av <= 0.34) & (au <= 1.0))
    else:
        inside = _in_polygon(u, v, _POLYGONS[obj.shape])
    mask = np.zeros((size, size), bool)
    mask[y0:y1, x0:x1] = inside
    return mask


def _background(bg: Background, size: int) -> np.ndarray:
    """(size, size, 3) uint8 background: colour plus pattern marks, integer arithmetic only."""
    color = np.array(BACKGROUND_COLORS[bg.color], np.int32)
    p = max(8, size // 8)  # pattern period
    ys, xs = np.mgrid[0:size, 0:size]  # (S, S) each
    if bg.pattern == "stripes":
        marks = (ys // (p // 2)) % 2 == 1
    elif bg.pattern == "checker":
        marks = (xs // p + ys // p) % 2 == 1
    elif bg.pattern == "dots":
        dx, dy = 2 * (xs % p) + 1 - p, 2 * (ys % p) + 1 - p  # twice the offset from the tile centre
        marks = dx * dx + dy * dy <= (p // 2) ** 2
    else:
        marks = np.zeros((size, size), bool)
    out = np.broadcast_to(color, (size, size, 3)).copy()
    out[marks] = np.maximum(color - PATTERN_DARKEN, 0)
    return out.astype(np.uint8)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size`` (a multiple of 16, >= 32)."""
    check_size(size)
    arr = _background(scene.background, size)
    for obj in scene.objects:
        arr[object_mask(obj, size)] = COLORS[obj.color]
    return Image.fromarray(arr)


def segmentation_map(scene: Scene, size: int = 64) -> Image.Image:
    """Each object's pixels in the ``SEG_COLORS`` colour of its shape, on black."""
    check_size(size)
    arr = np.zeros((size, size, 3), np.uint8)
    for obj in scene.objects:
        arr[object_mask(obj, size)] = SEG_COLORS[obj.shape]
    return Image.fromarray(arr)


def edge_map(image: Image.Image) -> Image.Image:
    """OpenCV Canny (``EDGE_THRESHOLDS``, on all three channels) of an RGB image, white on black."""
    edges = cv2.Canny(np.asarray(image.convert("RGB")), *EDGE_THRESHOLDS)  # (H, W) 0/255
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))  # (H, W) -> (H, W, 3)


def grayscale(image: Image.Image) -> Image.Image:
    """ITU-R 601 luma, rounded in integers, repeated on the three RGB channels."""
    a = np.asarray(image.convert("RGB")).astype(np.int32)
    luma = (299 * a[..., 0] + 587 * a[..., 1] + 114 * a[..., 2] + 500) // 1000  # (H, W)
    return Image.fromarray(np.repeat(luma[:, :, None], 3, axis=2).astype(np.uint8))


def changed(a: Image.Image, b: Image.Image) -> np.ndarray:
    """(H, W) bool: the pixels where two RGB images differ in any channel."""
    return np.any(np.asarray(a) != np.asarray(b), axis=2)


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------


@dataclass
class ToySample:
    """One toy request with its exact answer."""

    lcu: LCU
    """History and current turns (RGB PIL images, "L" masks or None), the target (RGB PIL),
    its mask (the repaint mask for "repaint", else None) and the task family name."""
    change_mask: np.ndarray
    """(size, size) bool: the pixels that should change from the current turn's first
    input image to the target (for multi-turn, what the last edit changes); all True
    without an input image, where everything changes (maps), or where the target is a new
    image rather than an edit of the input (reference: pixels that happen to share the
    input's colour count as changed too)."""


def make_sample(task: str, rng: np.random.Generator, size: int = 64) -> ToySample:
    """One sample of the task family ``task``, drawn with ``rng``."""
    from ace.data.toy_tasks import GENERATORS  # the generators import this module

    _check_choice(task, TASKS, "task")
    check_size(size)
    return GENERATORS[task](rng, size)


def sample_stream(
    n: int,
    seed: int,
    split: str = "train",
    tasks: Sequence[str] | None = None,
    weights: dict[str, float] | None = None,
    size: int = 64,
    balanced: bool = False,
) -> Iterator[ToySample]:
    """``n`` samples; sample i draws everything from ``default_rng([SPLIT_IDS[split], seed, i])``.

    ``tasks`` (names, or one name) restricts the families, picked in proportion to
    ``weights`` (missing entries default to ``DEFAULT_WEIGHTS``); with ``balanced`` sample
    i is of family ``tasks[i % len(tasks)]`` instead (every family equally often, for
    evaluation; ``weights`` must then be None). Arguments are checked at call time, not at
    the first ``next``.
    """
    _check_choice(split, tuple(SPLIT_IDS), "split")
    check_size(size)
    # each is one 32-bit word of the seed sequence: a larger one would take two, and numpy
    # pads with zeros, so seed a + b * 2**32 would replay seed a's sample b
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= 2**32:
        raise ValueError(f"n must be an int in [0, 2**32], got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if isinstance(tasks, str):
        tasks = [tasks]
    names = list(dict.fromkeys(TASKS if tasks is None else tasks))
    for t in [*names, *(weights or {})]:
        _check_choice(t, TASKS, "task")
    if not names:
        raise ValueError(f"tasks is empty; valid tasks: {', '.join(TASKS)}")
    if balanced and weights is not None:
        raise ValueError("give weights or balanced=True, not both")
    w = {**DEFAULT_WEIGHTS, **(weights or {})}
    probs = np.array([float(w[t]) for t in names])
    if np.any(probs < 0) or not np.isfinite(probs).all() or probs.sum() <= 0:
        raise ValueError(
            f"weights must be finite, >= 0 and not all zero, got {dict(zip(names, probs.tolist()))}"
        )
    cum = np.cumsum(probs / probs.sum())

    def stream() -> Iterator[ToySample]:
        for i in range(n):
            rng = np.random.default_rng([SPLIT_IDS[split], int(seed), i])
            if balanced:
                k = i % len(names)
            else:
                k = min(int(np.searchsorted(cum, rng.random(), side="right")), len(names) - 1)
            yield make_sample(names[k], rng, size)

    return stream()
