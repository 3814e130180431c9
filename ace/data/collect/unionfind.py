"""The two union-find turns of pair mining: connected components of thresholded pairs.

A union-find over the edges "similarity >= t" gives the connected components of that
graph; ``scipy.sparse.csgraph.connected_components`` computes the same partition in C.
Turn 1 thresholds feature cosines, computed in tiles so that memory stays bounded in a
large cluster; turn 2 thresholds any ``PairScorer`` over every pair of a turn-1 set.

>>> import numpy as np
>>> x = np.array([[1.0, 0.0], [0.99, 0.141], [0.0, 1.0]], np.float32)
>>> similarity_components(x, 0.9).tolist()
[0, 0, 1]
>>> score_components(["a", "b", "c"], lambda i, j: float({i, j} == {"b", "c"}), 0.5).tolist()
[0, 1, 1]
>>> set_pairs(3).tolist()
[[0, 1], [0, 2], [1, 2]]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ace.data.collect.scorers import PairScorer, score_pairs

# Letters: M nodes (images of one cluster or set), D feature dim, P pairs.

COSINE_TOL = 1e-5
"""How far below 1 float32 rounding can put the cosine of two exact copies (unit rows of up
to a few thousand dims measure ~1e-6): a turn-1 threshold above ``1 - COSINE_TOL`` counts as
``1 - COSINE_TOL``, so that t = 1 joins exact copies."""


def groups(labels: np.ndarray) -> list[np.ndarray]:
    """Indices of each label, labels ascending, indices ascending within a group."""
    order = np.argsort(labels, kind="stable")
    cuts = np.flatnonzero(np.diff(labels[order])) + 1
    return np.split(order, cuts) if len(order) else []


def components(m: int, rows: list[np.ndarray], cols: list[np.ndarray]) -> np.ndarray:
    """(M,) int64 connected-component label of each node of an undirected edge list."""
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(len(r), np.int8), (r, c)), shape=(m, m)).tocsr()
    return connected_components(graph, directed=False)[1].astype(np.int64)


def star_edges(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A spanning forest of the components: each node to the first node of its component."""
    first = np.full(labels.max() + 1, -1, np.int64)
    first[labels[::-1]] = np.arange(len(labels))[::-1]  # the last write wins: the smallest
    rep = first[labels]
    keep = rep != np.arange(len(labels))
    return rep[keep], np.flatnonzero(keep)


class _Edges:
    """The edges of an M-node graph, added a block at a time; whenever they exceed
    ``max_edges`` (default 4 M + 1e6) they are replaced by a spanning forest of their
    components (< M edges), so at most max(max_edges, M) + one block are held at once."""

    def __init__(self, m: int, max_edges: int | None = None) -> None:
        self.m = m
        self.max_edges = 4 * m + 1_000_000 if max_edges is None else max_edges
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.n = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        self.rows.append(a)
        self.cols.append(b)
        self.n += len(a)
        if self.n > self.max_edges:
            r, c = star_edges(components(self.m, self.rows, self.cols))
            self.rows, self.cols, self.n = [r], [c], len(r)

    def components(self) -> np.ndarray:
        return components(self.m, self.rows, self.cols)


def similarity_components(
    x: np.ndarray, t: float, block: int = 2048, max_edges: int | None = None
) -> np.ndarray:
    """Turn 1: (M,) int64 connected components of the graph "cosine >= t" of unit rows (M, D).

    A ``t`` above ``1 - COSINE_TOL`` counts as ``1 - COSINE_TOL`` (exact copies join at 1).
    Tiles of ``block`` x ``block`` similarities; whenever the edges held exceed
    ``max_edges`` (default 4 M + 1e6), checked after every tile, they are replaced by a
    spanning forest (< M edges), so at most max(``max_edges``, M) + block^2 edges are held
    at once: memory stays O(M + block^2) however dense the cluster.
    """
    m = len(x)
    t = min(t, 1.0 - COSINE_TOL)
    edges = _Edges(m, max_edges)
    for i0 in range(0, m, block):
        xi = x[i0 : i0 + block]  # (b, D)
        for j0 in range(i0, m, block):
            s = xi @ x[j0 : j0 + block].T  # (b, b') cosines
            a, b = np.nonzero(s >= t)
            a, b = a + i0, b + j0
            keep = a < b
            edges.add(a[keep], b[keep])  # per tile: a dense cluster never holds a row of tiles
    return edges.components()


def pairs_from_linear(m: int, lin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair (i, j), i < j, at row-major position ``lin`` of the upper triangle of M x M."""
    i_all = np.arange(m, dtype=np.int64)
    starts = i_all * m - i_all * (i_all + 1) // 2  # (M,) first position of row i
    i = np.searchsorted(starts, lin, side="right") - 1
    return i, lin - starts[i] + i + 1


def score_components(
    ids: Sequence[str],
    scorer: PairScorer,
    t: float,
    chunk: int = 65536,
    max_edges: int | None = None,
) -> np.ndarray:
    """Turn 2: (M,) int64 connected components of the graph "score >= t" over all pairs;
    a ``t`` above ``1 - COSINE_TOL`` counts as that, as in turn 1 (a feature scorer's
    cosine of exact copies can round below 1). Edges are compacted to a spanning forest
    as in ``similarity_components`` whenever they exceed ``max_edges`` (default
    4 M + 1e6), so a large set holds O(M + chunk) edges, not M^2 / 2."""
    m = len(ids)
    t = min(t, 1.0 - COSINE_TOL)
    total = m * (m - 1) // 2
    edges = _Edges(m, max_edges)
    for s0 in range(0, total, chunk):
        a, b = pairs_from_linear(m, np.arange(s0, min(s0 + chunk, total), dtype=np.int64))
        keep = score_pairs(scorer, [ids[i] for i in a], [ids[i] for i in b]) >= t
        edges.add(a[keep], b[keep])
    return edges.components()


def set_pairs(m: int, cap: int | None = None, seed: Sequence[int] = (0,)) -> np.ndarray:
    """(P, 2) int64 pairs (i, j), i < j, of a set of ``m``: all, or ``cap`` of them drawn
    with ``np.random.default_rng(seed)`` (row-major order either way)."""
    total = m * (m - 1) // 2
    if cap is None or cap >= total:
        lin = np.arange(total, dtype=np.int64)
    else:
        lin = np.sort(np.random.default_rng(list(seed)).choice(total, size=cap, replace=False))
    return np.stack(pairs_from_linear(m, lin), axis=1)
