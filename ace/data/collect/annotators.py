"""Maps for the analysis and controllable-generation tasks: edges, soft edges, grayscale,
depth and segmentation, each a function from an RGB PIL image to an RGB PIL map.

Every annotator of ``ANNOTATORS`` gives two kinds of LCU per image: **analysis** (image ->
map, e.g. "draw the Canny edge map of {image}", task ``edge_map``) and **controllable
generation** (map -> image, "generate an image from the edge map {image}", task
``edge_to_image``). Task names follow the toy world (``ace.data.toy.TASKS``) where it has
them. The low-level maps use OpenCV; depth and segmentation run a transformers pipeline
from a LOCAL model directory (``DepthAnnotator``, ``SegmentationAnnotator``, built once).

>>> import numpy as np
>>> from PIL import Image
>>> im = Image.new("RGB", (64, 48), (245, 245, 245))
>>> im.paste((220, 40, 40), (16, 12, 40, 36))
>>> edges = canny(im)
>>> edges.mode, edges.size, sorted(np.unique(np.asarray(edges)).tolist())
('RGB', (64, 48), [0, 255])
>>> np.asarray(grayscale(im))[0, 0].tolist(), np.asarray(soft_edges(im)).max()
([245, 245, 245], np.uint8(255))
>>> spec = ANNOTATORS["canny"]
>>> spec.analysis_task, spec.generation_task
('edge_map', 'edge_to_image')
>>> [r["task"] for r in lcu_records("photo.png", "maps/canny/photo.png", "canny")]
['edge_map', 'edge_to_image']
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ace.data.toy import EDGE_THRESHOLDS

ImageFn = Callable[[Image.Image], Image.Image]
"""An annotator: an RGB PIL image -> an RGB PIL map of the same size."""

DIRECTIONS: tuple[str, ...] = ("analysis", "generation")
"""The two LCUs per (image, annotator): image -> map, and map -> image."""


def _rgb(gray: np.ndarray) -> Image.Image:
    """(H, W) uint8 -> an RGB PIL image with the value on all three channels."""
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))  # (H, W) -> (H, W, 3)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Min-max scale to 0..255, rounded (all zeros for a constant map)."""
    x = x.astype(np.float64)
    lo, hi = x.min(), x.max()
    if not hi > lo:
        return np.zeros(x.shape, np.uint8)
    return np.rint((x - lo) / (hi - lo) * 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# Low-level maps (OpenCV)
# ---------------------------------------------------------------------------


def canny(
    image: Image.Image, low: int = EDGE_THRESHOLDS[0], high: int = EDGE_THRESHOLDS[1]
) -> Image.Image:
    """OpenCV Canny, white edges on black, as the toy world draws them (``toy.edge_map``).

    It runs on the three RGB channels (OpenCV takes the strongest channel's gradient),
    with hysteresis thresholds ``low`` <= ``high`` (default ``toy.EDGE_THRESHOLDS``).
    """
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds need 0 <= low <= high, got {low}, {high}")
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)  # (H, W) 0/255
    return _rgb(edges)


def soft_edges(image: Image.Image, sigma: float = 1.0) -> Image.Image:
    """A soft edge map: Sobel gradient magnitude of the Gaussian-smoothed gray image.

    Gray is the float ITU-R 601 luma; the Gaussian has standard deviation ``sigma`` and
    radius round(4 sigma); borders are mirrored without repeating the edge pixel
    (OpenCV's default, numpy's "reflect"). The magnitude is scaled so that its maximum is
    255, rounded, and repeated on RGB (a flat image gives black).
    """
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    a = np.asarray(image.convert("RGB"), np.float32)  # (H, W, 3)
    gray = a @ np.array([0.299, 0.587, 0.114], np.float32)  # (H, W)
    k = 2 * int(4 * sigma + 0.5) + 1
    smooth = cv2.GaussianBlur(gray, (k, k), sigmaX=sigma, sigmaY=sigma)
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3)
    magnitude = np.hypot(gx, gy).astype(np.float64)  # (H, W)
    peak = magnitude.max()
    if not peak > 0:
        return _rgb(np.zeros(gray.shape, np.uint8))
    return _rgb(np.rint(magnitude / peak * 255).astype(np.uint8))


def grayscale(image: Image.Image) -> Image.Image:
    """ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B, rounded half up), repeated on RGB."""
    a = np.asarray(image.convert("RGB")).astype(np.int32)
    luma = (299 * a[..., 0] + 587 * a[..., 1] + 114 * a[..., 2] + 500) // 1000  # (H, W)
    return _rgb(luma.astype(np.uint8))


# ---------------------------------------------------------------------------
# Model maps (transformers pipelines from local paths)
# ---------------------------------------------------------------------------


def _pipeline(task: str, model_path: str | Path, device: str | int | None) -> Any:
    from transformers import pipeline  # lazy: slow to import

    path = Path(model_path)
    if not path.exists():  # a missing local path would otherwise be read as a hub repo id
        raise ValueError(f"{task} model path {path} does not exist")
    kwargs = {} if device is None else {"device": device}
    try:
        return pipeline(task, model=str(path), **kwargs)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError ...
        article = "an" if task[0] in "aeiou" else "a"
        raise ValueError(f"cannot load {article} {task} model from {path}: {e}") from e


class DepthAnnotator:
    """Depth maps with a ``depth-estimation`` pipeline (DPT, Depth Anything, GLPN ...).

    The model's prediction at the image's size, min-max scaled to 0..255 (rounded) and
    repeated on RGB; with relative-depth models such as DPT, near is bright.
    """

    def __init__(self, model_path: str | Path, device: str | int | None = None) -> None:
        self.pipe = _pipeline("depth-estimation", model_path, device)

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        depth = self.pipe(image)["predicted_depth"].float().cpu()
        depth = depth.reshape(depth.shape[-2:])  # (1, h, w) or (h, w) -> (h, w)
        if tuple(depth.shape) != (image.height, image.width):
            size = (image.height, image.width)
            depth = F.interpolate(depth[None, None], size, mode="bilinear")[0, 0]
        return _rgb(_to_uint8(depth.numpy()))


def palette_color(index: int) -> tuple[int, int, int]:
    """The default colour of label ``index``: the PASCAL VOC colour map at index + 1.

    Distinct for every index in 0 .. 2**24 - 2 and never black, which marks unlabelled
    pixels (there are 2**24 - 1 other colours); ValueError for an index outside that range.

    >>> [palette_color(i) for i in range(3)]
    [(128, 0, 0), (0, 128, 0), (128, 128, 0)]
    """
    if not 0 <= index <= 2**24 - 2:
        raise ValueError(f"palette index must be in 0..{2**24 - 2}, got {index}")
    c, rgb = index + 1, [0, 0, 0]
    for j in range(8):
        for ch in range(3):
            rgb[ch] |= ((c >> ch) & 1) << (7 - j)
        c >>= 3
    return rgb[0], rgb[1], rgb[2]


class SegmentationAnnotator:
    """Colour segmentation maps with an ``image-segmentation`` pipeline (Segformer ...).

    Every pixel of a segment gets its label's colour: ``palette[label]`` when given, else
    ``palette_color(label id)``; pixels in no segment stay black. ``colors`` maps every
    label of the model to its colour.
    """

    def __init__(
        self,
        model_path: str | Path,
        palette: Mapping[str, Sequence[int]] | None = None,
        device: str | int | None = None,
    ) -> None:
        self.pipe = _pipeline("image-segmentation", model_path, device)
        id2label = {int(i): str(name) for i, name in self.pipe.model.config.id2label.items()}
        self.colors: dict[str, tuple[int, int, int]] = {}
        """The colour of every label."""
        for i, name in sorted(id2label.items()):
            self.colors.setdefault(name, palette_color(i))
        for name, color in (palette or {}).items():
            if name not in self.colors:
                raise ValueError(f"palette names {name!r}, not a label of the model")
            if len(color) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in color):
                raise ValueError(f"palette colour of {name!r}: need 3 ints in 0..255, got {color}")
            self.colors[name] = (color[0], color[1], color[2])

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        out = np.zeros((image.height, image.width, 3), np.uint8)
        for segment in self.pipe(image):  # later segments paint over earlier ones
            inside = np.asarray(segment["mask"].convert("L")) > 127  # (H, W)
            out[inside] = self.colors[segment["label"]]
        return Image.fromarray(out)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AnnotatorSpec:
    """One annotator: how to build it and the two LCUs it makes per image."""

    name: str
    """Its key in ``ANNOTATORS`` and its folder name under ``maps/``."""
    analysis_task: str
    """Task tag of image -> map."""
    generation_task: str
    """Task tag of map -> image."""
    analysis_instruction: str
    """Instruction of image -> map; ``{image}`` is the image."""
    generation_instruction: str
    """Instruction of map -> image; ``{image}`` is the map."""
    build: Callable[..., ImageFn]
    """``build(model_path=None, device=None)`` -> the annotator."""
    needs_model: bool = False
    """Whether ``build`` needs a model path."""
    settings: Mapping[str, Any] = field(default_factory=dict)
    """The parameters its maps are made with (``scripts/annotate.py`` records them)."""


def _fixed(fn: Callable[..., Image.Image], **params: Any) -> Callable[..., ImageFn]:
    def build(model_path: str | Path | None = None, device: str | int | None = None) -> ImageFn:
        return functools.partial(fn, **params)

    return build


ANNOTATORS: dict[str, AnnotatorSpec] = {
    spec.name: spec
    for spec in (
        AnnotatorSpec(
            "canny", "edge_map", "edge_to_image",
            "draw the Canny edge map of {image}",
            "generate an image from the edge map {image}",
            _fixed(canny, low=EDGE_THRESHOLDS[0], high=EDGE_THRESHOLDS[1]),
            settings={"low": EDGE_THRESHOLDS[0], "high": EDGE_THRESHOLDS[1]},
        ),
        AnnotatorSpec(
            "soft_edges", "soft_edge_map", "soft_edge_to_image",
            "extract the soft edges of {image}",
            "generate an image from the soft edge map {image}",
            _fixed(soft_edges, sigma=1.0),
            settings={"sigma": 1.0},
        ),
        AnnotatorSpec(
            "grayscale", "grayscale", "colorize",
            "convert {image} to grayscale",
            "colorize the grayscale image {image}",
            _fixed(grayscale),
        ),
        AnnotatorSpec(
            "depth", "depth_map", "depth_to_image",
            "estimate the depth map of {image}",
            "generate an image from the depth map {image}",
            lambda model_path=None, device=None: DepthAnnotator(model_path, device=device),
            needs_model=True,
        ),
        AnnotatorSpec(
            "segmentation", "segmentation_map", "segmentation_to_image",
            "make a segmentation map of {image}",
            "generate an image from the segmentation map {image}",
            lambda model_path=None, device=None: SegmentationAnnotator(model_path, device=device),
            needs_model=True,
        ),
    )
}  # fmt: skip
"""Every annotator by name."""


def lcu_records(
    image: str,
    map_path: str,
    name: str,
    directions: Sequence[str] = DIRECTIONS,
    meta: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Manifest records (docs/DATA.md) for one image and its map made by annotator ``name``.

    ``image`` and ``map_path`` are paths relative to the manifest's directory; ``directions``
    picks the LCUs: "analysis" (image -> map) and/or "generation" (map -> image). Each
    record's ``meta`` is ``{"annotator": name, **meta}``.
    """
    spec = ANNOTATORS[name]
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown:
        raise ValueError(f"unknown direction(s) {unknown}; known: {', '.join(DIRECTIONS)}")
    meta = {"annotator": name, **(meta or {})}
    records = []
    for d in directions:
        forward = d == "analysis"  # image -> map
        source, target = (image, map_path) if forward else (map_path, image)
        text = spec.analysis_instruction if forward else spec.generation_instruction
        task = spec.analysis_task if forward else spec.generation_task
        turn = {"instruction": text, "images": [source], "masks": [None]}
        records.append(
            {"turns": [turn], "target": target, "target_mask": None, "task": task, "meta": meta}
        )
    return records
