"""Pair scores for the second union-find turn of ``ace.data.collect.pairing``, and thumbnails.

Turn 1 joins images whose features are close; turn 2 re-splits each joined set with a
task-specific score of two images. A scorer is anything with

    scorer(id_a, id_b) -> float in [0, 1]                       (``PairScorer``)

and, optionally, a batched method used instead when present (``BatchPairScorer``):

    scorer.score_batch(ids_a, ids_b) -> (P,) float array in [0, 1]

Ids are the image ids of the feature shards (paths relative to the image root). A face-
or object-consistency scorer maps ids to images, runs its own detector or embedder (cached
by id: each image appears in many pairs) and returns, e.g., the cosine of the two face
embeddings clipped to [0, 1]: ``EmbeddingScorer(embed)`` does this for any
``embed(image_id) -> vector or None``; see docs/COLLECT.md.

Built in: ``FeatureScorer`` (feature cosine), ``PixelScorer`` (the share of thumbnail
pixels that stay the same: high for an edit of part of an image), ``EmbeddingScorer``
(cosine of any per-image embedder: faces, objects) and ``MinScorer`` (all must agree).
``pixel_features`` is a model-free embedding for exact and near-exact copies, tests and
demos.

>>> import numpy as np
>>> s = FeatureScorer(["a", "b"], np.array([[1.0, 0.0], [0.6, 0.8]]))
>>> round(s("a", "b"), 3), score_pairs(lambda a, b: 0.5, ["a"], ["b"]).tolist()
(0.6, [0.5])
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np
from PIL import Image

from ace.images import to_mode

# Letters: N images, D feature dim, P pairs, S thumbnail side.


@runtime_checkable
class PairScorer(Protocol):
    """A task-specific score of two images, by id: 1 = consistent, 0 = not."""

    def __call__(self, id_a: str, id_b: str) -> float: ...


@runtime_checkable
class BatchPairScorer(PairScorer, Protocol):
    """A ``PairScorer`` that also scores many pairs at once (used when present)."""

    def score_batch(self, ids_a: Sequence[str], ids_b: Sequence[str]) -> np.ndarray: ...


def score_pairs(scorer: PairScorer, ids_a: Sequence[str], ids_b: Sequence[str]) -> np.ndarray:
    """(P,) float64 scores of pairs (ids_a[p], ids_b[p]); ValueError unless all are in [0, 1]."""
    if hasattr(scorer, "score_batch"):
        s = np.asarray(scorer.score_batch(ids_a, ids_b), dtype=np.float64).reshape(-1)
    else:
        s = np.array([float(scorer(a, b)) for a, b in zip(ids_a, ids_b)], dtype=np.float64)
    if s.shape != (len(ids_a),):
        raise ValueError(f"pair scorer {scorer!r} gave {s.shape[0]} scores for {len(ids_a)} pairs")
    bad = ~((s >= 0) & (s <= 1))  # NaN included
    if bad.any():
        p = int(np.argmax(bad))
        raise ValueError(
            f"pair scorer {scorer!r} gave {s[p]} for ({ids_a[p]!r}, {ids_b[p]!r}); "
            "scores must be in [0, 1]"
        )
    return s


class FeatureScorer:
    """Cosine of two images' features, clipped to [0, 1]."""

    def __init__(
        self, ids: Sequence[str], features: np.ndarray, *, normalized: bool = False
    ) -> None:
        x = np.asarray(features, dtype=np.float32)  # (N, D)
        if not normalized:  # rows already of unit length are used as they are (no copy)
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        self.x = x
        self.row = {i: k for k, i in enumerate(ids)}

    def __call__(self, id_a: str, id_b: str) -> float:
        return float(self.score_batch([id_a], [id_b])[0])

    def score_batch(self, ids_a: Sequence[str], ids_b: Sequence[str]) -> np.ndarray:
        a = self.x[[self.row[i] for i in ids_a]]  # (P, D)
        b = self.x[[self.row[i] for i in ids_b]]
        return np.clip(np.einsum("pd,pd->p", a, b), 0.0, 1.0)

    def __repr__(self) -> str:
        return "FeatureScorer()"


class Thumbnails:
    """Small RGB copies (S, S, 3) uint8 of the images under ``root``, and their sizes, by id.

    Images are squashed to S x S with area averaging. An image that cannot be decoded
    (missing, corrupt, or truncated: a good header is not enough) gets size (0, 0) and a
    black thumbnail (the resolution filter then drops its pairs) and is listed in
    ``unreadable``; ``size`` and ``get`` decode it the same way, so whichever comes first
    tells the same. The last ``cache`` thumbnails are kept in memory (3 KiB each at
    S = 32); sizes are kept for every image seen.
    """

    def __init__(self, root: str | os.PathLike, size: int = 32, cache: int = 100_000) -> None:
        if size < 1:
            raise ValueError(f"thumbnail size must be positive, got {size}")
        self.root, self.side, self.cache = Path(root), int(size), int(cache)
        self._thumbs: OrderedDict[str, np.ndarray] = OrderedDict()
        self._sizes: dict[str, tuple[int, int]] = {}
        self.unreadable: set[str] = set()
        """Ids whose image could not be read."""

    def _load(self, image_id: str) -> np.ndarray:
        try:
            with Image.open(self.root / image_id) as im:
                full = im.size  # before draft(), which shrinks a JPEG while decoding
                im.draft("RGB", (2 * self.side, 2 * self.side))
                rgb = np.asarray(to_mode(im, "RGB"))  # (h, w, 3): upright, 16-bit scaled
            self._sizes[image_id] = (int(full[0]), int(full[1]))
            return cv2.resize(rgb, (self.side, self.side), interpolation=cv2.INTER_AREA)
        except Exception:  # a corrupt or missing file: counted, never fatal at scale
            self._sizes[image_id] = (0, 0)
            self.unreadable.add(image_id)
            return np.zeros((self.side, self.side, 3), np.uint8)

    def get(self, image_id: str) -> np.ndarray:
        """(S, S, 3) uint8 thumbnail."""
        t = self._thumbs.get(image_id)
        if t is None:
            t = self._thumbs[image_id] = self._load(image_id)
            if len(self._thumbs) > self.cache:
                self._thumbs.popitem(last=False)
        else:
            self._thumbs.move_to_end(image_id)
        return t

    def stack(self, ids: Sequence[str]) -> np.ndarray:
        """(P, S, S, 3) uint8 thumbnails of ``ids``."""
        if not len(ids):
            return np.zeros((0, self.side, self.side, 3), np.uint8)
        return np.stack([self.get(i) for i in ids])

    def size(self, image_id: str) -> tuple[int, int]:
        """(width, height) of the full image; (0, 0) if it cannot be decoded. The first call
        decodes the image (its thumbnail is cached), so a truncated file whose header reads
        is (0, 0) too."""
        if image_id not in self._sizes:
            self.get(image_id)  # sets the size, or (0, 0) and ``unreadable``
        return self._sizes[image_id]


BLOCK = 65536
"""Pairs scored at once by ``pixel_difference`` (and the pairing's cosines): the arrays
of a block, not of every pair, are held in memory (24 KiB a pair at S = 32)."""


def pixel_difference(thumbs: Thumbnails, ids_a: Sequence[str], ids_b: Sequence[str]) -> np.ndarray:
    """(P,) mean absolute difference of the thumbnails, in [0, 1] (0 = identical)."""
    out = np.zeros(len(ids_a), np.float64)  # (P,)
    for s in range(0, len(ids_a), BLOCK):
        a = thumbs.stack(ids_a[s : s + BLOCK]).astype(np.int16)  # (B, S, S, 3)
        b = thumbs.stack(ids_b[s : s + BLOCK]).astype(np.int16)
        out[s : s + len(a)] = np.abs(a - b).mean(axis=(1, 2, 3)) / 255.0
    return out


class PixelScorer:
    """Share of thumbnail pixels that stay the same (every channel within ``tol``, in [0, 1]).

    An edit of part of an image (an object added, moved or recoloured) keeps most pixels
    and scores high; two views of one subject from other angles score low, so for
    subject-consistency tasks plug in a face or object scorer instead.
    """

    def __init__(self, thumbs: Thumbnails, tol: float = 0.1) -> None:
        if not 0 <= tol <= 1:
            raise ValueError(f"pixel tolerance tol must be in [0, 1], got {tol}")
        self.thumbs, self.tol = thumbs, float(tol)

    def __call__(self, id_a: str, id_b: str) -> float:
        return float(self.score_batch([id_a], [id_b])[0])

    def score_batch(self, ids_a: Sequence[str], ids_b: Sequence[str]) -> np.ndarray:
        a = self.thumbs.stack(ids_a).astype(np.int16)  # (P, S, S, 3)
        b = self.thumbs.stack(ids_b).astype(np.int16)
        same = np.abs(a - b).max(axis=3) <= round(self.tol * 255)  # (P, S, S)
        # an unreadable image's black stand-in must not join it to dark images (or to
        # another unreadable one) in turn 2
        bad = self.thumbs.unreadable
        readable = [i not in bad and j not in bad for i, j in zip(ids_a, ids_b)]
        return same.mean(axis=(1, 2)) * np.asarray(readable, np.float64)

    def __repr__(self) -> str:
        return f"PixelScorer(tol={self.tol})"


class EmbeddingScorer:
    """Cosine of two per-image embeddings, clipped to [0, 1]: the shape of a face- or
    object-consistency score. ``embed(image_id)`` returns a 1-D vector (say, the face
    embedding of the largest face) or None when there is nothing to compare (no face),
    which scores 0. Each image is embedded once (cached by id).

    >>> e = EmbeddingScorer({"a": np.array([1.0, 0.0]), "b": np.array([1.0, 1.0]), "c": None}.get)
    >>> round(e("a", "b"), 3), e("a", "c")
    (0.707, 0.0)
    """

    def __init__(self, embed: Callable[[str], np.ndarray | None]) -> None:
        self.embed = embed
        self.cache: dict[str, np.ndarray | None] = {}

    def _unit(self, image_id: str) -> np.ndarray | None:
        if image_id not in self.cache:
            v = self.embed(image_id)
            if v is not None:
                v = np.asarray(v, np.float64).reshape(-1)
                n = float(np.linalg.norm(v))
                v = v / n if n > 0 else None
            self.cache[image_id] = v
        return self.cache[image_id]

    def __call__(self, id_a: str, id_b: str) -> float:
        a, b = self._unit(id_a), self._unit(id_b)
        return 0.0 if a is None or b is None else float(np.clip(a @ b, 0.0, 1.0))

    def __repr__(self) -> str:
        return f"EmbeddingScorer({getattr(self.embed, '__name__', self.embed)!r})"


class MinScorer:
    """The smallest score of several scorers: a pair must satisfy all of them."""

    def __init__(self, *scorers: PairScorer) -> None:
        if not scorers:
            raise ValueError("MinScorer needs at least one scorer")
        self.scorers = scorers

    def __call__(self, id_a: str, id_b: str) -> float:
        return float(self.score_batch([id_a], [id_b])[0])

    def score_batch(self, ids_a: Sequence[str], ids_b: Sequence[str]) -> np.ndarray:
        return np.min([score_pairs(s, ids_a, ids_b) for s in self.scorers], axis=0)

    def __repr__(self) -> str:
        return f"MinScorer{self.scorers!r}"


def pixel_features(images: Iterable[Image.Image | np.ndarray], size: int = 16) -> np.ndarray:
    """(N, 3 * size * size) float32 unit rows: area-downsampled RGB minus its mean.

    A model-free embedding: cosine close to 1 for copies that were resized, re-encoded or
    slightly edited; it knows nothing of content, so use a SigLIP model for real pairs.

    >>> x = pixel_features([Image.new("RGB", (64, 48), (200, 10, 10))] * 2, size=4)
    >>> x.shape
    (2, 48)
    """
    rows = []
    for im in images:
        a = np.asarray(to_mode(im, "RGB") if isinstance(im, Image.Image) else im, np.float32)
        if a.ndim == 2:  # a greyscale array: its grey in each channel
            a = np.repeat(a[..., None], 3, axis=-1)
        if a.ndim != 3 or a.shape[-1] != 3:
            raise ValueError(
                f"pixel_features: an array image must be (H, W) or (H, W, 3), got {a.shape}"
            )
        t = cv2.resize(a / 255.0, (size, size), interpolation=cv2.INTER_AREA).reshape(-1)
        t = t - t.mean()  # a flat image becomes 0 and then the constant direction below
        n = float(np.linalg.norm(t))
        rows.append(t / n if n > 1e-6 else np.full_like(t, 1 / np.sqrt(t.size)))
    return np.stack(rows).astype(np.float32) if rows else np.zeros((0, 3 * size * size), np.float32)
