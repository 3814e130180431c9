"""Mining image pairs from a large collection, as ACE did (arXiv 2410.00086, section 3).

1. **Coarse k-means** (faiss) of the L2-normalised features (SigLIP in the paper) into K
   clusters, on the GPU when faiss has one. Cosine is the inner product of unit rows;
   ``spherical`` k-means keeps the centroids unit too. With more than
   ``max_points_per_centroid * K`` images, faiss trains the centroids on a seeded random
   sample of that many and then assigns every image to its nearest centroid.
2. **Turn 1** (per cluster): an edge joins two images whose feature cosine is >= ``t1``;
   the sets are the connected components of that graph (what a union-find over the edges
   gives; ``scipy.sparse.csgraph.connected_components``). Similarities are computed in
   ``block`` x ``block`` tiles, so memory stays bounded in a large cluster.
3. **Turn 2** (per turn-1 set): the same, with a task-specific pair score >= ``t2``
   (``ace.data.collect.scorers``: pixel consistency by default; a face or object
   consistency scorer plugs in here).
4. **Pairs**: every pair of each final set (at most ``max_pairs_per_set``, a seeded
   sample), then the cleaning filters, in order: resolution (the shorter side of both
   images >= ``min_side``; an image that cannot be decoded, a truncated file included,
   never passes), aspect ratio (<= ``max_aspect``), near-duplicates (cosine > ``t_dup``
   or mean thumbnail difference < ``min_pixel_diff``) and too different (cosine <
   ``t_min``). Cosines are clipped to [-1, 1] (float32 rounding can put an exact copy's
   a little above 1); ``t_dup`` = 1 and ``t_min`` = 0 turn their filters off. No pair at
   all is a normal result (empty arrays).

Pairs near each other in feature space but cut apart by the coarse k-means are lost;
that is the price of clustering first (the paper's choice), smaller with fewer clusters.
``ace.data.collect.pair_manifest`` writes the result as an LCU dataset.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> base = rng.standard_normal((3, 64))
>>> x = np.concatenate([base, base[:1] + 0.01 * rng.standard_normal((1, 64))])
>>> r = pair_images(["a", "b", "c", "a2"], x, PairingConfig(clusters=1, t_dup=1.0),
...                 progress=False)
>>> [[r.ids[i] for i in p] for p in r.pairs.tolist()], r.counts["turn2_sets"]
([['a', 'a2']], 1)
"""

from __future__ import annotations

import math
import numbers
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from ace.data.collect.scorers import (
    BLOCK,
    FeatureScorer,
    PairScorer,
    PixelScorer,
    Thumbnails,
    pixel_difference,
    score_pairs,
)
from ace.data.collect.unionfind import groups, score_components, set_pairs, similarity_components

# Letters: N images, D feature dim, K clusters, M members of one cluster or set, P pairs.

_UNIT = ("t1", "t2", "t_dup", "t_min", "min_pixel_diff", "pixel_tol")


@dataclass
class PairingConfig:
    """Every setting of ``pair_images``; checked when made (ValueError naming the field)."""

    clusters: int | None = None
    """K of the coarse k-means; None: round(N / cluster_size), at least 1."""
    cluster_size: int = 1000
    """Mean images per cluster when ``clusters`` is None."""
    t1: float = 0.9
    """Turn 1: join two images of a cluster when their feature cosine is >= t1 (a t1 above
    ``1 - unionfind.COSINE_TOL`` counts as that: 1 joins exact copies despite rounding)."""
    t2: float = 0.5
    """Turn 2: join two images of a turn-1 set when their pair score is >= t2 (a t2 above
    ``1 - unionfind.COSINE_TOL`` counts as that, as t1 does)."""
    max_pairs_per_set: int | None = None
    """Keep at most this many pairs of each final set (a seeded sample); None: all."""
    t_dup: float = 0.995
    """Near-duplicate filter: drop a pair whose feature cosine is > t_dup (1: off, exact
    copies kept)."""
    min_pixel_diff: float = 0.002
    """Near-duplicate filter: drop a pair whose mean thumbnail difference (0-1) is below
    this, about half a grey level: re-encoded or resized copies (0: off; needs images)."""
    t_min: float = 0.5
    """Too-different filter: drop a pair whose feature cosine is < t_min (chains of turn-1
    edges can join far images). 0: off (negative cosines kept too)."""
    min_side: int = 256
    """Resolution filter: both images' shorter side >= min_side pixels (0: off)."""
    max_aspect: float = 3.0
    """Aspect filter: both images' long / short side <= max_aspect (inf: off)."""
    seed: int = 0
    """Seed (>= 0) of the k-means sample and initialisation and of the per-set pair sample."""
    niter: int = 20
    """k-means iterations."""
    max_points_per_centroid: int = 256
    """k-means trains on at most this many images per centroid (faiss samples them)."""
    block: int = 2048
    """Tile side of the turn-1 similarity products (memory: block^2 floats)."""
    thumb_size: int = 32
    """Side of the thumbnails used by the pixel scorer and the pixel-difference filter."""
    pixel_tol: float = 0.1
    """Pixel scorer: a pixel stays the same when every channel moves at most this (0-1)."""

    def __post_init__(self) -> None:
        for name in _UNIT:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
                raise ValueError(f"threshold {name} must be in [0, 1], got {v!r}")

        def is_int(v) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        for name in ("cluster_size", "niter", "max_points_per_centroid", "block", "thumb_size"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("clusters", "max_pairs_per_set"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {v!r}")
        if not is_int(self.seed) or not 0 <= self.seed < 2**31:  # faiss takes a C int
            raise ValueError(f"seed must be an int in [0, 2**31), got {self.seed!r}")
        if not isinstance(self.min_side, numbers.Real) or isinstance(self.min_side, bool):
            raise ValueError(f"min_side must be a number >= 0, got {self.min_side!r}")
        if not self.min_side >= 0:  # NaN too: it dropped every pair
            raise ValueError(f"min_side must be a number >= 0, got {self.min_side!r}")
        if not self.max_aspect >= 1:
            raise ValueError(f"max_aspect must be >= 1, got {self.max_aspect!r}")

    def n_clusters(self, n: int) -> int:
        """K of the k-means for ``n`` images: ``clusters``, or round(n / cluster_size),
        at least 1 and at most n (one cluster needs no faiss)."""
        return max(1, min(self.clusters or round(n / self.cluster_size), n))


@dataclass
class PairingResult:
    """What ``pair_images`` found, stage by stage. Pairs are index pairs into ``ids``."""

    ids: list[str]
    cluster: np.ndarray
    """(N,) int64 k-means cluster of each image."""
    component: np.ndarray
    """(N,) int64 turn-1 set of each image (singletons included), numbered globally."""
    set_of: np.ndarray
    """(N,) int64 final (turn-2) set of each image, -1 when in no set of >= 2 images."""
    sets: list[np.ndarray]
    """Image indices of each final set of >= 2 images."""
    pairs: np.ndarray
    """(P, 2) int64 kept pairs (i, j), i < j, grouped by set."""
    pair_set: np.ndarray
    """(P,) int64 final set of each kept pair."""
    cosine: np.ndarray
    """(P,) float32 feature cosine of each kept pair."""
    score: np.ndarray
    """(P,) float32 turn-2 score of each kept pair."""
    pixel_diff: np.ndarray
    """(P,) float32 mean thumbnail difference (0-1) of each kept pair; NaN without images."""
    counts: dict[str, int] = field(default_factory=dict)
    """Images, clusters, sets and pairs after each stage, in order (see ``summary``);
    with images, ``unreadable_images`` counts the images of the sampled pairs that could
    not be decoded (their pairs fail the resolution filter)."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each stage."""
    config: PairingConfig | None = None

    def summary(self) -> dict[str, Any]:
        """Counts, stage times and settings as a JSON-ready dict."""
        cfg = None if self.config is None else asdict(self.config)
        if cfg is not None and math.isinf(cfg["max_aspect"]):
            cfg["max_aspect"] = None  # JSON has no infinity
        return {"counts": dict(self.counts), "seconds": dict(self.seconds), "config": cfg}


# ---------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------


def normalize_features(features: Any, n: int | None = None, *, copy: bool = True) -> np.ndarray:
    """(N, D) float32 unit rows; ValueError for a bad shape, NaN/inf or a zero row."""
    x = np.array(features, dtype=np.float32, copy=copy or None)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"features must be a non-empty (N, D) array, got shape {x.shape}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{n} image ids for {x.shape[0]} feature rows")
    norms = np.sqrt(np.einsum("nd,nd->n", x, x))  # (N,); no (N, D) temporary, unlike norm()
    if not np.isfinite(norms).all():
        raise ValueError(f"features hold NaN or inf (row {int(np.argmin(np.isfinite(norms)))})")
    if (norms <= 1e-12).any():
        raise ValueError(f"feature row {int(np.argmax(norms <= 1e-12))} is zero")
    x /= norms[:, None]
    return x


def require_faiss():
    """The faiss module; ValueError saying how to install it when it is missing (an
    optional dependency: k-means needs it, one cluster does not)."""
    try:
        import faiss  # lazy: slow to import, and optional
    except ImportError as e:
        raise ValueError(
            f"k-means needs faiss, which is not importable ({e}): pip install 'ace[collect]' "
            "(or faiss-cpu), or use one cluster (--clusters 1)"
        ) from None
    return faiss


def kmeans_clusters(
    x: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    niter: int = 20,
    max_points_per_centroid: int = 256,
    gpu: bool | None = None,
    seconds: dict[str, float] | None = None,
) -> np.ndarray:
    """(N,) int64 cluster of each unit row of ``x`` (N, D) by spherical k-means (faiss).

    ``k`` is capped at N. Training uses at most ``max_points_per_centroid * k`` rows (a
    seeded sample drawn by faiss). ``gpu`` None: the GPU when faiss sees one.
    """
    n, d = x.shape
    k = max(1, min(int(k), n))
    if k == 1:
        return np.zeros(n, np.int64)
    faiss = require_faiss()
    if gpu is None:
        gpu = getattr(faiss, "get_num_gpus", lambda: 0)() > 0
    t0 = time.perf_counter()
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        seed=seed,
        spherical=True,
        gpu=bool(gpu),
        max_points_per_centroid=max_points_per_centroid,
        min_points_per_centroid=1,
        verbose=False,
    )
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    t1 = time.perf_counter()
    _, labels = km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)  # (N, 1)
    if seconds is not None:
        seconds["kmeans_train"] = t1 - t0
        seconds["kmeans_assign"] = time.perf_counter() - t1
    return labels[:, 0].astype(np.int64)


def clean_pairs(
    pairs: np.ndarray,
    cos: np.ndarray,
    ids: Sequence[str],
    cfg: PairingConfig,
    thumbs: Thumbnails | None,
    counts: dict[str, int],
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The cleaning filters, in order: (P,) keep mask and (P,) mean thumbnail difference.

    ``pairs`` (P, 2) index ``ids`` (P may be 0), ``cos`` (P,) is their feature cosine,
    clipped to [-1, 1]; the pairs left after each filter go to ``counts``, and the images
    of the pairs that cannot be decoded (``Thumbnails.size`` decodes each one, whatever
    the scorer) to ``counts["unreadable_images"]``. Without ``thumbs`` (no images) the
    resolution, aspect and pixel filters pass everything and the differences are NaN.
    ``t_dup`` = 1 and ``t_min`` = 0 pass everything.
    """
    a, b = pairs[:, 0], pairs[:, 1]
    keep = np.ones(len(pairs), bool)
    pdiff = np.full(len(pairs), np.nan, np.float32)
    if thumbs is not None:
        used = np.unique(pairs)  # (U,) images of the pairs
        wh = np.zeros((len(ids), 2), np.float64)  # (N, 2) width, height; 0 if not read
        for i in tqdm(used, desc="image sizes", unit="image", disable=not progress):
            wh[i] = thumbs.size(ids[i])  # decodes the image: a truncated one is (0, 0)
        short, long = wh.min(axis=1), wh.max(axis=1)
        counts["unreadable_images"] = sum(ids[i] in thumbs.unreadable for i in used)
        res_ok = short >= max(cfg.min_side, 1)  # an unreadable image (0 x 0) never passes
        keep &= res_ok[a] & res_ok[b]
        counts["pairs_after_resolution"] = int(keep.sum())
        aspect_ok = long <= cfg.max_aspect * np.maximum(short, 1e-9)
        keep &= aspect_ok[a] & aspect_ok[b]
        counts["pairs_after_aspect"] = int(keep.sum())
        live = np.flatnonzero(keep)
        pdiff[live] = pixel_difference(thumbs, [ids[i] for i in a[live]], [ids[i] for i in b[live]])
        keep &= ~(pdiff < cfg.min_pixel_diff)
    else:
        counts["pairs_after_resolution"] = counts["pairs_after_aspect"] = len(pairs)
    if cfg.t_dup < 1:  # 1: off, even for a cosine rounded above 1
        keep &= ~(cos > cfg.t_dup)
    counts["pairs_after_near_duplicate"] = int(keep.sum())
    if cfg.t_min > 0:  # 0: off, even for a negative cosine
        keep &= cos >= cfg.t_min
    counts["pairs_after_too_different"] = int(keep.sum())
    return keep, pdiff


# ---------------------------------------------------------------------------
# The whole method
# ---------------------------------------------------------------------------


def pair_images(
    ids: Sequence[str],
    features: Any,
    config: PairingConfig | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    scorer: PairScorer | None = None,
    copy: bool = True,
    progress: bool = True,
) -> PairingResult:
    """Cluster, join in two turns, take the pairs of each set and clean them.

    ``ids`` (N image ids, paths relative to ``image_root``) and ``features`` (N, D) come
    from ``ace.data.collect.store.load_features``. ``scorer`` is turn 2's pair score;
    None: ``PixelScorer`` on thumbnails of ``image_root``, or ``FeatureScorer`` without
    images. Without ``image_root`` the resolution, aspect and pixel-difference filters
    are off. ``copy=False`` normalises ``features`` in place (a float32 array) to save
    memory. Bad features (shape, NaN, zero rows, duplicate ids) raise ValueError.
    """
    cfg = config or PairingConfig()
    ids = list(ids)
    if len(set(ids)) != len(ids):
        twice = next(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(f"image ids must be unique: {twice!r} appears more than once")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + now - clock
        clock = now

    # 1. unit features, then the coarse k-means
    x = normalize_features(features, len(ids), copy=copy)  # (N, D)
    n = len(ids)
    lap("normalize")
    k = cfg.n_clusters(n)
    cluster = kmeans_clusters(
        x,
        k,
        seed=cfg.seed,
        niter=cfg.niter,
        seconds=seconds,
        max_points_per_centroid=cfg.max_points_per_centroid,
    )
    clock = time.perf_counter()
    by_cluster = groups(cluster)

    # 2. turn 1: feature similarity within each cluster
    component = np.arange(n, dtype=np.int64)
    next_id = 0
    for idx in tqdm(by_cluster, disable=not progress, unit="cluster", desc="turn 1"):
        lab = (
            similarity_components(x[idx], cfg.t1, cfg.block)
            if len(idx) > 1
            else np.zeros(1, np.int64)
        )
        component[idx] = lab + next_id
        next_id += int(lab.max()) + 1
    turn1 = [g for g in groups(component) if len(g) > 1]
    lap("turn1")

    # 3. turn 2: the task-specific score within each turn-1 set
    thumbs = None if image_root is None else Thumbnails(image_root, cfg.thumb_size)
    if scorer is None:
        scorer = (
            PixelScorer(thumbs, cfg.pixel_tol) if thumbs else FeatureScorer(ids, x, normalized=True)
        )
    set_of = np.full(n, -1, np.int64)
    sets: list[np.ndarray] = []
    for idx in tqdm(turn1, disable=not progress, unit="set", desc="turn 2"):
        for members in groups(score_components([ids[i] for i in idx], scorer, cfg.t2)):
            if len(members) > 1:
                set_of[idx[members]] = len(sets)
                sets.append(idx[members])
    lap("turn2")

    # 4. every pair of each set (or a seeded sample)
    parts = [s[set_pairs(len(s), cfg.max_pairs_per_set, (cfg.seed, j))] for j, s in enumerate(sets)]
    pairs = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)  # (P, 2)
    pair_set = np.repeat(np.arange(len(sets)), [len(p) for p in parts]).astype(np.int64)
    lap("pairs")

    # 5. cleaning filters, cheapest first
    a, b = pairs[:, 0], pairs[:, 1]
    cos = np.zeros(len(pairs), np.float32)  # (P,), a block of pairs at a time
    for s0 in range(0, len(pairs), BLOCK):
        cos[s0 : s0 + BLOCK] = np.einsum("pd,pd->p", x[a[s0 : s0 + BLOCK]], x[b[s0 : s0 + BLOCK]])
    cos = np.clip(cos, -1.0, 1.0)  # float32 rounding: an exact copy can be 1.0000001
    counts = {
        "images": n,
        "clusters": len(by_cluster),
        "turn1_sets": len(turn1),
        "turn1_images": sum(len(g) for g in turn1),
        "turn2_sets": len(sets),
        "turn2_images": sum(len(s) for s in sets),
        "pairs_in_sets": sum(len(s) * (len(s) - 1) // 2 for s in sets),
        "pairs_sampled": len(pairs),
    }
    keep, pdiff = clean_pairs(pairs, cos, ids, cfg, thumbs, counts, progress)
    kept = np.flatnonzero(keep)
    score = np.zeros(len(kept), np.float32)
    for s0 in range(0, len(kept), BLOCK):  # turn-2 scores of the kept pairs, for the record
        p = kept[s0 : s0 + BLOCK]
        score[s0 : s0 + len(p)] = score_pairs(
            scorer, [ids[i] for i in a[p]], [ids[i] for i in b[p]]
        )
    lap("filters")
    return PairingResult(
        ids=ids,
        cluster=cluster,
        component=component,
        set_of=set_of,
        sets=sets,
        pairs=pairs[kept],
        pair_set=pair_set[kept],
        cosine=cos[kept].astype(np.float32),
        score=score,
        pixel_diff=pdiff[kept],
        counts=counts,
        seconds=seconds,
        config=cfg,
    )
