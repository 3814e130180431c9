"""Pair mining (ace.data.collect.pairing, scripts/collect_pairs.py): planted toy-world groups
are recovered, turn 1 equals a plain union-find, turn 2 follows its scorer, each filter
drops what it should, the output is a valid LCU dataset, bad input fails cleanly.
Training on the output: tests/test_collect_pairs_train.py (kept apart: it takes ~30 s)."""

import doctest
import json
import re
import runpy
import shlex
import shutil
import sys
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ace.data.collect.pair_manifest import write_pair_manifest
from ace.data.collect.pairing import PairingConfig, pair_images
from ace.data.collect.scorers import EmbeddingScorer, FeatureScorer, pixel_features, score_pairs
from ace.data.collect.store import save_feature_shard
from ace.data.collect.unionfind import pairs_from_linear, set_pairs, similarity_components
from ace.data.manifest import LCUManifest
from ace.data.toy import COLORS, Edit, render
from ace.data.toy_tasks import pick, random_obj, random_scene

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def script(name, argv, capsys):
    """Run scripts/NAME.py as __main__; return (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = [str(SCRIPTS / name), *map(str, argv)]
    try:
        with pytest.raises(SystemExit) as info:
            runpy.run_path(str(SCRIPTS / name), run_name="__main__")
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def partition(labels, members=None):
    """A labelling as a set of frozensets of indices (only groups of >= 2)."""
    members = range(len(labels)) if members is None else members
    out = {}
    for i in members:
        out.setdefault(labels[i], set()).add(i)
    return {frozenset(g) for g in out.values() if len(g) > 1}


def union_find(n, edges):
    """The obvious reference: path-halving union-find over an edge list."""
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in edges:
        parent[find(i)] = find(j)
    return [find(i) for i in range(n)]


# ------------------------------------------------------------------ the toy-world collection


def variant(rng, scene):
    """The scene with one small change: a small object recoloured or moved, or one added."""
    small = [o for o in scene.objects if o.size == "small"]
    free = scene.free_cells()
    kind = int(rng.integers(3))
    if kind == 0 and small:
        o = pick(rng, small)
        color = pick(rng, [c for c in COLORS if c != o.color])
        return Edit(o.cell, replace(o, color=color)).apply(scene)
    if kind == 1 and small and free:
        o, cell = pick(rng, small), pick(rng, free)
        return Edit(o.cell, None).apply(Edit(cell, replace(o, cell=cell)).apply(scene))
    cell = pick(rng, free)
    return Edit(cell, replace(random_obj(rng, cell), size="small")).apply(scene)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """12 planted groups of 2-5 distinct variants of a scene, and 60 unrelated scenes,
    64 x 64 PNGs in shuffled order: (root, ids, group label per id, -1 = unrelated)."""
    root = tmp_path_factory.mktemp("collection")
    rng = np.random.default_rng(0)
    scenes, labels = [], []
    for g in range(12):
        group = [random_scene(rng, 5, 7)]
        while len(group) < int(rng.integers(2, 6)) or len(group) < 2:
            v = variant(rng, group[0])
            if v not in group:
                group.append(v)
        scenes += group
        labels += [g] * len(group)
    scenes += [random_scene(rng, 5, 7) for _ in range(60)]
    labels += [-1] * 60
    order = rng.permutation(len(scenes))
    ids = []
    for k, i in enumerate(order):
        ids.append(f"img{k:03d}.png")
        render(scenes[i], 64).save(root / ids[-1])
    return root, ids, np.array(labels)[order]


def features_of(root, ids):
    return pixel_features([Image.open(root / i) for i in ids])  # (N, 768)


# Variants sit at pixel-feature cosine >= ~0.8 of their base, unrelated scenes mostly below
# 0.75; turn 2 (share of unchanged pixels >= 0.75) splits off what t1 lets through. The
# near-duplicate filter is set to exact copies only: the planted variants differ a little.
RECOVERY = PairingConfig(
    clusters=2, t1=0.75, t2=0.75, t_dup=0.9999, min_pixel_diff=0.0005, t_min=0.3, min_side=64
)


def test_planted_groups_are_recovered(collection):
    root, ids, labels = collection
    r = pair_images(ids, features_of(root, ids), RECOVERY, image_root=root, progress=False)
    found = {tuple(sorted(p)) for p in r.pairs.tolist()}
    truth = {(i, j) for i, j in combinations(range(len(ids)), 2) if labels[i] == labels[j] >= 0}
    hits = len(found & truth)
    precision, recall = hits / max(len(found), 1), hits / len(truth)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall, r.counts)
    c = r.counts
    assert c["images"] == len(ids) and c["clusters"] == 2
    assert c["turn1_sets"] >= c["turn2_sets"] >= 10
    assert c["pairs_in_sets"] >= c["pairs_after_too_different"] == len(r.pairs)
    # every kept pair lies in one final set, which lies in one turn-1 set and one cluster
    a, b = r.pairs.T
    assert (r.set_of[a] == r.pair_set).all() and (r.set_of[b] == r.pair_set).all()
    assert (r.component[a] == r.component[b]).all() and (r.cluster[a] == r.cluster[b]).all()


def test_same_inputs_same_pairs(collection):
    root, ids, _ = collection
    x = features_of(root, ids)
    r1 = pair_images(ids, x, RECOVERY, image_root=root, progress=False)
    r2 = pair_images(ids, x.copy(), RECOVERY, image_root=root, progress=False)
    assert np.array_equal(r1.pairs, r2.pairs) and r1.counts == r2.counts


# ------------------------------------------------------------------ turn 1 and turn 2


def clustered_vectors(n=240, d=12, centres=25, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d))
    x = c[rng.integers(centres, size=n)] + 0.3 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("block,max_edges", [(2048, None), (17, None), (16, 5)])
def test_turn1_equals_union_find_over_all_pairs(block, max_edges):
    x, t = clustered_vectors(), 0.9
    s = x @ x.T
    assert np.abs(s - t).min() > 1e-5  # no pair on the edge of the threshold
    edges = [(i, j) for i, j in combinations(range(len(x)), 2) if s[i, j] >= t]
    want = partition(union_find(len(x), edges))
    assert len(want) > 10  # the test means something
    assert partition(similarity_components(x, t, block, max_edges)) == want


def test_turn1_holds_a_bounded_number_of_edges_in_a_dense_cluster(monkeypatch):
    import ace.data.collect.unionfind as uf

    held = []
    real = uf.components

    def spy(m, rows, cols):  # every compaction (and the end) sees all the edges held
        held.append(sum(len(r) for r in rows))
        return real(m, rows, cols)

    monkeypatch.setattr(uf, "components", spy)
    m, block, max_edges = 400, 16, 100
    x = np.full((m, 4), 0.5, np.float32)  # one image posted 400 times: every pair an edge
    assert uf.similarity_components(x, 0.9, block, max_edges).tolist() == [0] * m
    assert len(held) > 1 and max(held) <= max(max_edges, m) + block * block


@pytest.mark.parametrize("chunk,max_edges", [(65536, None), (7, 5)])
def test_turn2_equals_union_find_and_holds_a_bounded_number_of_edges(monkeypatch, chunk, max_edges):
    """Turn 2 kept every edge of a set (M^2 / 2 for a set of copies); it compacts as turn 1."""
    import ace.data.collect.unionfind as uf

    x, t = clustered_vectors(), 0.9
    ids = [f"i{k}" for k in range(len(x))]
    s = x @ x.T
    edges = [(i, j) for i, j in combinations(range(len(x)), 2) if s[i, j] >= t]
    want = partition(union_find(len(x), edges))
    scorer = FeatureScorer(ids, x)
    assert partition(uf.score_components(ids, scorer, t, chunk, max_edges)) == want

    held = []
    real = uf.components
    monkeypatch.setattr(
        uf, "components", lambda m, r, c: held.append(sum(map(len, r))) or real(m, r, c)
    )
    m = 300
    copies = [f"c{k}" for k in range(m)]  # one image posted 300 times: every pair an edge
    same = FeatureScorer(copies, np.full((m, 4), 0.5, np.float32))
    assert uf.score_components(copies, same, 0.9, 64, 100).tolist() == [0] * m
    assert len(held) > 1 and max(held) <= max(100, m) + 64


def test_pair_images_turn1_is_union_find_within_each_cluster():
    x, t = clustered_vectors(seed=1), 0.85
    ids = [f"v{i}" for i in range(len(x))]
    cfg = PairingConfig(clusters=5, t1=t, t2=0.0, t_dup=1.0, t_min=0.0)
    r = pair_images(ids, x, cfg, progress=False)
    s = x @ x.T
    edges = [
        (i, j)
        for i, j in combinations(range(len(x)), 2)
        if s[i, j] >= t and r.cluster[i] == r.cluster[j]
    ]
    assert partition(r.component) == partition(union_find(len(x), edges))
    assert r.counts["turn1_sets"] == len(partition(r.component)) > 5
    # t2 = 0 joins everything again: the final sets are the turn-1 sets
    assert {frozenset(s.tolist()) for s in r.sets} == partition(r.component)


def test_turn2_splits_a_set_as_the_scorer_says():
    ids = ["a", "b", "c", "d", "e", "f"]
    x = np.ones((6, 4)) + 0.01 * np.random.default_rng(0).standard_normal((6, 4))
    high = {("a", "b"): 0.9, ("b", "c"): 0.8, ("d", "e"): 0.7}
    calls = []

    def scorer(i, j):  # a per-pair PairScorer: a plain function
        calls.append((i, j))
        return high.get((i, j), high.get((j, i), 0.1))

    cfg = PairingConfig(clusters=1, t1=0.9, t2=0.6, t_dup=1.0, t_min=0.0)
    r = pair_images(ids, x, cfg, scorer=scorer, progress=False)
    assert r.counts["turn1_sets"] == 1 and r.counts["turn2_sets"] == 2
    assert {frozenset(ids[i] for i in s) for s in r.sets} == {frozenset("abc"), frozenset("de")}
    assert ["".join(ids[i] for i in p) for p in r.pairs.tolist()] == ["ab", "ac", "bc", "de"]
    assert r.score.tolist() == pytest.approx([0.9, 0.1, 0.8, 0.7])
    assert len(set(calls)) == 15  # turn 2 scored every pair of the turn-1 set

    class Batched:  # a BatchPairScorer: score_batch is used instead of __call__
        def __call__(self, i, j):
            raise AssertionError("score_batch should be used")

        def score_batch(self, a, b):
            return np.array([scorer(i, j) for i, j in zip(a, b)])

    r2 = pair_images(ids, x, cfg, scorer=Batched(), progress=False)
    assert np.array_equal(r.pairs, r2.pairs)

    # a face/object-consistency scorer: cosine of per-image embeddings ("f" has no face)
    faces = {"a": [1, 0, 0], "b": [1, 0.2, 0], "c": [0.9, 0.5, 0], "d": [0, 1, 0], "e": [0, 1, 1]}
    r3 = pair_images(ids, x, cfg, scorer=EmbeddingScorer(faces.get), progress=False)
    assert {frozenset(ids[i] for i in s) for s in r3.sets} == {frozenset("abc"), frozenset("de")}

    with pytest.raises(ValueError, match=r"scores must be in \[0, 1\]"):
        pair_images(ids, x, cfg, scorer=lambda i, j: 1.5, progress=False)


def test_set_pairs_all_or_a_seeded_sample():
    assert set_pairs(4).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    i, j = pairs_from_linear(9, np.arange(36))
    assert np.array_equal(np.stack([i, j]), np.stack(np.triu_indices(9, 1)))
    some = set_pairs(50, cap=30, seed=(0, 7))
    assert len(some) == 30 and len({tuple(p) for p in some.tolist()}) == 30
    assert (some[:, 0] < some[:, 1]).all() and (some < 50).all()
    assert np.array_equal(some, set_pairs(50, cap=30, seed=(0, 7)))
    assert not np.array_equal(some, set_pairs(50, cap=30, seed=(0, 8)))
    assert len(set_pairs(5, cap=100)) == 10 and len(set_pairs(1)) == 0


# ------------------------------------------------------------------ cleaning filters


@pytest.fixture
def filter_case(tmp_path):
    """Five images in one set: big1, big2 (big1 with a patch changed), dup (big1's exact
    pixels), small (40 x 40), wide (260 x 80). Features at angles in a plane: big2 -25 deg,
    big1 0, dup +25 (so big2-dup is 50 deg apart, joined through big1), small and wide
    5 deg off big1."""
    rng = np.random.default_rng(0)
    big1 = rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)
    big2 = big1.copy()
    big2[10:50, 10:50] = 255 - big2[10:50, 10:50]
    images = {
        "big1.png": big1,
        "big2.png": big2,
        "dup.png": big1,
        "small.png": rng.integers(0, 256, (40, 40, 3), dtype=np.uint8),
        "wide.png": rng.integers(0, 256, (80, 260, 3), dtype=np.uint8),
    }
    for name, a in images.items():
        Image.fromarray(a).save(tmp_path / name)

    def at(deg, z=0.0):
        r = np.radians(deg)
        return [np.cos(r), np.sin(r), z]

    x = np.array([at(0), at(-25), at(25), at(0, 0.09), at(0, -0.09)])
    cfg = PairingConfig(clusters=1, t1=0.9, t2=0.0, t_dup=0.999, min_pixel_diff=0.002)
    cfg = replace(cfg, t_min=0.85, min_side=64, max_aspect=3.0)
    return tmp_path, list(images), x, cfg


def test_each_filter_drops_what_it_should(filter_case):
    root, ids, x, cfg = filter_case
    r = pair_images(ids, x, cfg, image_root=root, progress=False)
    c = r.counts
    assert c["pairs_in_sets"] == c["pairs_sampled"] == 10
    assert c["pairs_after_resolution"] == 6  # the 4 pairs with small.png
    assert c["pairs_after_aspect"] == 3  # the 3 others with wide.png (3.25 : 1)
    assert c["pairs_after_near_duplicate"] == 2  # big1-dup: identical pixels
    assert c["pairs_after_too_different"] == 1  # big2-dup: cosine cos(50 deg) < t_min
    assert [[ids[i] for i in p] for p in r.pairs.tolist()] == [["big1.png", "big2.png"]]
    assert r.pixel_diff[0] > 0.01 and r.cosine[0] == pytest.approx(np.cos(np.radians(25)), abs=1e-5)

    # the cosine side of the near-duplicate filter, and every filter off
    strict = replace(cfg, t_dup=0.9)
    assert len(pair_images(ids, x, strict, image_root=root, progress=False).pairs) == 0
    off = replace(
        cfg, min_side=0, max_aspect=float("inf"), t_dup=1.0, min_pixel_diff=0.0, t_min=0.0
    )
    assert len(pair_images(ids, x, off, image_root=root, progress=False).pairs) == 10


def test_an_unreadable_image_drops_its_pairs(filter_case):
    root, ids, x, cfg = filter_case
    (root / "big2.png").write_bytes(b"not a png")
    off = replace(cfg, max_aspect=float("inf"), t_dup=1.0, min_pixel_diff=0.0, t_min=0.0, t2=0.0)
    r = pair_images(ids, x, replace(off, min_side=0), image_root=root, progress=False)
    assert r.counts["unreadable_images"] == 1 and r.counts["pairs_after_resolution"] == 6


@pytest.mark.parametrize("scorer", ["pixel", "feature", "embedding", "constant"])
def test_a_truncated_image_is_unreadable_whatever_the_scorer(tmp_path, scorer):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
    b = a.copy()
    b[:50, :50] = 0
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")
    data = (tmp_path / "b.png").read_bytes()
    (tmp_path / "b.png").write_bytes(data[: len(data) // 3])  # the header reads, the pixels not
    ids, x = ["a.png", "b.png"], np.array([[1.0, 0.0], [0.95, 0.312]], np.float32)
    scorers = {"pixel": None, "feature": FeatureScorer(ids, x), "constant": lambda i, j: 1.0,
               "embedding": EmbeddingScorer(lambda i: np.ones(3))}  # fmt: skip
    cfg = PairingConfig(clusters=1, t1=0.5, t2=0.0)
    r = pair_images(ids, x, cfg, image_root=tmp_path, scorer=scorers[scorer], progress=False)
    assert r.counts["pairs_sampled"] == 1 and r.counts["unreadable_images"] == 1
    assert r.counts["pairs_after_resolution"] == 0 and len(r.pairs) == 0


def test_sixteen_bit_and_rotated_files_read_as_everywhere(tmp_path):
    """The collect tools read files as ace.images does: a 16-bit greyscale PNG is scaled
    (PIL's convert clips it to almost all white), and an EXIF-rotated photo is turned
    upright, so each equals its plain 8-bit, pre-rotated copy."""
    from ace.data.collect.features import load_image
    from ace.data.collect.scorers import Thumbnails

    ramp = np.tile(np.linspace(0, 65535, 96).astype(np.uint16), (64, 1))  # (64, 96)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    Image.fromarray((ramp / 257).round().astype(np.uint8)).save(tmp_path / "g8.png")
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    photo.save(tmp_path / "tagged.png", exif=exif)
    photo.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")

    for a, b in [("g16.png", "g8.png"), ("tagged.png", "upright.png")]:
        x, y = (np.asarray(load_image(tmp_path / n), np.int16) for n in (a, b))
        assert x.shape == y.shape and np.abs(x - y).max() <= 1, a
        thumbs = Thumbnails(tmp_path, size=16)
        assert np.abs(thumbs.get(a).astype(int) - thumbs.get(b)).max() <= 1, a
        f = pixel_features([Image.open(tmp_path / a), Image.open(tmp_path / b)])
        assert float(f[0] @ f[1]) > 0.999, a
    grey = np.asarray(Image.open(tmp_path / "g8.png"))  # (64, 96): a 2-D array is grey
    assert np.allclose(pixel_features([grey]), pixel_features([Image.open(tmp_path / "g8.png")]))
    with pytest.raises(ValueError, match=r"\(H, W\) or \(H, W, 3\)"):
        pixel_features([np.zeros((8, 8, 4))])


def test_pixel_scorer_scores_an_unreadable_image_0(tmp_path):
    """Its black stand-in thumbnail scored 1.0 against a dark image and against another
    unreadable one, which could join them in turn 2."""
    from ace.data.collect.scorers import PixelScorer, Thumbnails

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "dark.png")
    for name in ("broken.jpg", "broken2.jpg"):
        (tmp_path / name).write_bytes(b"not an image")
    s = PixelScorer(Thumbnails(tmp_path))
    pairs = [("broken.jpg", "dark.png"), ("broken.jpg", "broken2.jpg"), ("dark.png", "dark.png")]
    assert s.score_batch(*zip(*pairs)).tolist() == [0.0, 0.0, 1.0]


def test_no_pair_is_an_empty_result(filter_case):
    root, ids, x, cfg = filter_case
    for apart in (np.eye(5), x):  # nothing joined; pairs, all filtered out
        r = pair_images(ids, apart, replace(cfg, min_side=10_000), image_root=root, progress=False)
        assert r.pairs.shape == (0, 2) and len(r.cosine) == len(r.score) == 0
        assert r.counts["pairs_after_too_different"] == 0


def test_thresholds_at_their_limits_keep_and_join_exact_copies():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((50, 64)).astype(np.float32)
    x = np.concatenate([base, base])  # row i + 50 is an exact copy of row i
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    self_cos = np.einsum("nd,nd->n", u, u)
    assert (self_cos > 1).any() and (np.diag(u @ u.T) < 1).any()  # float32 rounding both ways
    ids = [f"v{i}" for i in range(100)]
    cfg = PairingConfig(clusters=1, t1=1.0, t2=0.0, t_dup=1.0, t_min=0.0)
    r = pair_images(ids, x, cfg, progress=False)  # t1 = 1 joins copies, t_dup = 1 is off
    assert sorted(map(tuple, r.pairs.tolist())) == [(i, i + 50) for i in range(50)]
    assert (r.cosine <= 1).all() and r.cosine.min() > 0.9999
    # t2 = 1 with the feature scorer too: its cosines of copies round both ways as well
    r = pair_images(ids, x, replace(cfg, t2=1.0), scorer=FeatureScorer(ids, x), progress=False)
    assert sorted(map(tuple, r.pairs.tolist())) == [(i, i + 50) for i in range(50)]
    # t_min = 0 is off too: a pair joined through a chain keeps a negative cosine
    chain = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    r = pair_images(["a", "b", "c"], chain, replace(cfg, t1=0.0, t_dup=0.999), progress=False)
    assert [tuple(p) for p in r.pairs.tolist()] == [(0, 1), (0, 2), (1, 2)]
    assert r.cosine.tolist() == [0.0, -1.0, 0.0]


# ------------------------------------------------------------------ bad input


def test_seed_out_of_range():
    for seed in (-1, 2**31):  # faiss's k-means takes a C int: an OverflowError traceback
        with pytest.raises(ValueError, match=rf"seed must be an int in \[0, 2\*\*31\), got {seed}"):
            PairingConfig(seed=seed)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("block", 2.5, "block must be an int >= 1, got 2.5"),
        ("cluster_size", "10", "cluster_size must be an int >= 1, got '10'"),
        ("clusters", 2.5, "clusters must be an int >= 1 or None, got 2.5"),
        ("max_pairs_per_set", 0, "max_pairs_per_set must be an int >= 1 or None, got 0"),
        ("seed", 1.5, "seed must be an int in [0, 2**31), got 1.5"),
        ("min_side", float("nan"), "min_side must be a number >= 0, got nan"),  # dropped all
        ("min_side", "256", "min_side must be a number >= 0, got '256'"),
    ],
)
def test_config_fields_of_the_wrong_kind(field, value, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        PairingConfig(**{field: value})


def test_config_takes_numpy_numbers():
    cfg = PairingConfig(min_side=np.int64(256), cluster_size=np.int64(5), clusters=np.int32(3))
    assert cfg.min_side == 256 and cfg.n_clusters(2) == 2 and cfg.n_clusters(100) == 3
    assert PairingConfig(min_side=np.float32(64.0)).n_clusters(1499) == 1  # round(1.499)


@pytest.mark.parametrize("name", ["t1", "t2", "t_dup", "t_min", "min_pixel_diff", "pixel_tol"])
@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_thresholds_outside_unit_interval(name, value):
    with pytest.raises(ValueError, match=rf"threshold {name} must be in \[0, 1\]"):
        PairingConfig(**{name: value})


@pytest.mark.parametrize(
    "features,ids,match",
    [
        (np.zeros(4), ["a", "b", "c", "d"], "shape"),
        (np.ones((3, 4)), ["a", "b"], "2 image ids for 3 feature rows"),
        (np.array([[1.0, np.nan], [1.0, 0.0]]), ["a", "b"], "NaN"),
        (np.array([[1.0, 0.0], [0.0, 0.0]]), ["a", "b"], "row 1 is zero"),
        (np.eye(2), ["a", "a"], "unique: 'a' appears more than once"),
    ],
)
def test_bad_features(features, ids, match):
    with pytest.raises(ValueError, match=match):
        pair_images(ids, features, PairingConfig(clusters=1), progress=False)


def test_score_pairs_checks_the_scorer():
    s = FeatureScorer(["a", "b"], np.array([[1.0, 0.0], [-1.0, 0.0]]))
    assert score_pairs(s, ["a", "a"], ["a", "b"]).tolist() == [1.0, 0.0]  # clipped to [0, 1]
    with pytest.raises(ValueError, match="gave 1 scores for 2 pairs"):
        score_pairs(
            type("S", (), {"score_batch": lambda self, a, b: [0.5]})(), ["a", "b"], ["b", "a"]
        )


# ------------------------------------------------------------------ output and scripts


def write_features(collection, path):
    root, ids, _ = collection
    save_feature_shard(path / "features-00000.safetensors", ids, features_of(root, ids))
    return path


CLI = shlex.split("--clusters 2 --t1 0.75 --t2 0.75 --t-dup 0.9999 --min-pixel-diff 0.0005")
CLI += shlex.split("--t-min 0.3 --min-side 64 --quiet")


def test_cli_writes_a_valid_manifest(collection, tmp_path, capsys):
    root, ids, labels = collection
    feats, out = write_features(collection, tmp_path / "feats"), tmp_path / "out"
    argv = ["--images", root, "--out", out, "--features", feats, *CLI, "--task", "semantic_edit"]
    code, stdout, stderr = script("collect_pairs.py", argv, capsys)
    assert code == 0, stderr
    ds = LCUManifest(out)
    summary = json.loads((out / "pairs.json").read_text())
    assert len(ds) == summary["records"] == summary["counts"]["pairs_after_too_different"] > 30
    assert ds.validate() == [] and ds.tasks == {"semantic_edit": len(ds)}
    rec = ds.records[0]
    turn = rec["turns"][0]
    assert turn["images"][0].startswith("../") and turn["instruction"] == "edit {image}"
    meta = rec["meta"]
    assert labels[ids.index(meta["source_id"])] == labels[ids.index(meta["target_id"])] >= 0
    assert set(meta) == {"source_id", "target_id", "cluster", "component", "set", "scores",
                         "instruction_source"}  # fmt: skip
    assert 0 <= meta["scores"]["turn2"] <= 1 and meta["scores"]["cosine"] >= 0.3
    assert summary["counts"]["clusters"] == 2 and summary["config"]["t1"] == 0.75
    assert f"wrote {len(ds)} LCUs" in stdout
    lcu = ds[0]
    assert lcu.target.size == (64, 64) and len(lcu.current.images) == 1 and lcu.history == []

    # a rerun replaces the outputs with the same content
    before = (out / "manifest.jsonl").read_bytes()
    assert script("collect_pairs.py", argv, capsys)[0] == 0
    assert (out / "manifest.jsonl").read_bytes() == before


def test_write_pair_manifest_both_directions(collection, tmp_path):
    root, ids, _ = collection
    r = pair_images(ids, features_of(root, ids), RECOVERY, image_root=root, progress=False)
    smile = "make {image} smile"
    path = write_pair_manifest(r, tmp_path / "both", root, "facial_edit", instruction=smile,
                               both_directions=True)  # fmt: skip
    ds = LCUManifest(path)
    assert len(ds) == 2 * len(r.pairs) and ds.records[0]["meta"]["instruction_source"] == "given"
    a, b = ds.records[0], ds.records[1]
    assert a["target"] == b["turns"][0]["images"][0] and b["target"] == a["turns"][0]["images"][0]
    assert a["turns"][0]["instruction"] == smile and ds.tasks == {"facial_edit": len(ds)}


def test_cli_pixel_features(collection, tmp_path, capsys):
    root, _, _ = collection
    out = tmp_path / "px"
    code, _, stderr = script(
        "collect_pairs.py", ["--images", root, "--out", out, "--pixel-features", *CLI], capsys
    )
    assert code == 0, stderr
    assert json.loads((out / "pairs.json").read_text())["features"] == "pixels"
    assert LCUManifest(out).validate() == []


def test_cli_a_run_that_fails_leaves_no_earlier_result(collection, tmp_path, capsys):
    """An unreadable image stops the feature stage, naming it; the earlier run's manifest
    and counts in --out are gone, not left to pass for this run's result."""
    root = tmp_path / "images"
    shutil.copytree(collection[0], root)
    out = tmp_path / "px"
    argv = ["--images", root, "--out", out, "--pixel-features", *CLI]
    assert script("collect_pairs.py", argv, capsys)[0] == 0 and (out / "manifest.jsonl").exists()
    (root / "zz.png").write_bytes(b"not a png")
    code, _, stderr = script("collect_pairs.py", argv, capsys)
    assert code == 2 and re.search(r"unreadable image .*zz.png", stderr), stderr
    assert not (out / "manifest.jsonl").exists() and not (out / "pairs.json").exists()


def test_cli_with_a_tiny_siglip_model(tmp_path, capsys):
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    tiny = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    tiny["intermediate_size"] = 37
    config = SiglipConfig(
        text_config={**tiny, "vocab_size": 99, "max_position_embeddings": 16},
        vision_config={**tiny, "image_size": 32, "patch_size": 8},
    )
    model_dir = tmp_path / "siglip"
    SiglipModel(config).save_pretrained(model_dir)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(model_dir)
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(8):
        render(random_scene(rng, 3, 6), 64).save(images / ("sub" if k % 2 else "") / f"s{k}.png")
    out = tmp_path / "out"
    argv = ["--images", images, "--out", out, "--model", model_dir, "--quiet"]
    argv += shlex.split("--clusters 1 --t1 0 --t2 0 --t-min 0 --t-dup 1 --min-pixel-diff 0")
    argv += shlex.split("--min-side 64 --shard-size 3 --batch-size 2")
    code, _, stderr = script("collect_pairs.py", argv, capsys)
    assert code == 0, stderr
    shards = sorted((out / "features").glob("features-*.safetensors"))
    assert len(shards) == 3
    ds = LCUManifest(out)
    assert len(ds) == 28 and ds.validate() == []  # one set of all 8 images: 8 * 7 / 2 pairs
    assert any(r["meta"]["source_id"].startswith("sub/") for r in ds.records)

    stamps = [p.stat().st_mtime_ns for p in shards]  # a rerun resumes: no shard rewritten
    assert script("collect_pairs.py", argv, capsys)[0] == 0
    assert [p.stat().st_mtime_ns for p in shards] == stamps


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--t1", 1.5], r"--t1 must be in \[0, 1\], got 1.5"),
        (["--t2", -0.2], r"--t2 must be in \[0, 1\]"),
        (["--t-dup", 2], r"--t-dup must be in \[0, 1\]"),
        (["--t-min", -1], r"--t-min must be in \[0, 1\]"),
    ],
)
def test_cli_bad_thresholds(collection, tmp_path, capsys, extra, match):
    feats, out = write_features(collection, tmp_path / "feats"), tmp_path / "out"
    argv = ["--images", collection[0], "--out", out, "--features", feats, *CLI, *extra]
    code, _, stderr = script("collect_pairs.py", argv, capsys)
    assert code == 2 and not out.exists()
    (line,) = stderr.strip().splitlines()
    assert line.startswith("collect_pairs.py: error: ")
    assert re.search(match, line), line


def test_cli_missing_image_dir_and_corrupt_features(collection, tmp_path, capsys):
    feats, out = write_features(collection, tmp_path / "feats"), tmp_path / "out"
    missing = tmp_path / "nowhere"
    code, _, stderr = script(
        "collect_pairs.py", ["--images", missing, "--out", out, "--features", feats], capsys
    )
    assert code == 2 and not out.exists()
    assert stderr.strip() == f"collect_pairs.py: error: --images {missing} is not a directory"

    shard = feats / "features-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:200])  # truncated
    code, _, stderr = script(
        "collect_pairs.py", ["--images", collection[0], "--out", out, "--features", feats], capsys
    )
    assert code == 2 and not out.exists()
    (line,) = stderr.strip().splitlines()
    assert (
        line.startswith("collect_pairs.py: error: unreadable feature shard") and str(shard) in line
    )

    other = tmp_path / "other"
    other.mkdir()
    feats2 = write_features(collection, tmp_path / "f2")
    argv = ["--images", other, "--out", out, "--features", feats2]
    code, _, stderr = script("collect_pairs.py", argv, capsys)
    assert code == 2 and not out.exists() and "are not images under --images" in stderr


def test_cli_without_faiss_says_so_before_any_feature(collection, tmp_path, capsys, monkeypatch):
    """faiss is an optional extra: k-means without it was a traceback with exit status 1
    (the status of "found 0 pairs") after every feature had been computed. A run whose K
    is 1 (--clusters 1, or the default for under 1500 images) needs no faiss."""
    import ace.data.collect.features as features

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    decoded = []
    real = features.load_image
    monkeypatch.setattr(features, "load_image", lambda p: decoded.append(p) or real(p))
    out = tmp_path / "out"
    argv = ["--images", collection[0], "--out", out, "--pixel-features", "--quiet"]
    code, _, stderr = script("collect_pairs.py", [*argv, "--clusters", "2"], capsys)
    assert code == 2 and not out.exists() and decoded == []  # refused before any image
    (line,) = stderr.strip().splitlines()
    assert "k-means needs faiss" in line and "pip install 'ace[collect]'" in line
    for k in (["--clusters", "1"], []):  # one cluster, by the flag or by the default
        code, _, stderr = script("collect_pairs.py", [*argv, *k], capsys)
        assert code in (0, 1) and decoded, stderr


@pytest.mark.parametrize("ids", [[0, 1], 2, ["a.png", 1]])
def test_a_shard_with_other_ids_is_refused(tmp_path, ids):
    """Shards written by other tools: ids that are not a JSON list of str were a TypeError."""
    from safetensors.torch import save_file

    from ace.data.collect.store import load_features

    path = tmp_path / "features-00000.safetensors"
    save_file({"features": torch.zeros(2, 4)}, path, metadata={"ids": json.dumps(ids)})
    with pytest.raises(ValueError, match=r'metadata "ids" must be a JSON list of str'):
        load_features(tmp_path)
    with pytest.raises(ValueError, match="float32 or float16"):  # the format's dtypes only
        save_feature_shard(tmp_path / "x.safetensors", ["a", "b"], np.zeros((2, 4)))


def test_pairs_are_scored_in_blocks_with_the_same_result(filter_case, monkeypatch):
    """Cosines and thumbnail differences go a block of pairs at a time (memory); a block
    of 2 pairs gives what one block of all of them gives."""
    import ace.data.collect.pairing as pairing
    import ace.data.collect.scorers as scorers

    root, ids, x, cfg = filter_case
    cfg = replace(cfg, min_side=0, max_aspect=float("inf"), t_dup=1.0, min_pixel_diff=0.0, t_min=0)
    whole = pair_images(ids, x, cfg, image_root=root, progress=False)
    monkeypatch.setattr(pairing, "BLOCK", 2)
    monkeypatch.setattr(scorers, "BLOCK", 2)
    blocks = pair_images(ids, x, cfg, image_root=root, progress=False)
    assert len(whole.pairs) == 10
    for name in ("pairs", "cosine", "score", "pixel_diff"):
        assert np.array_equal(getattr(whole, name), getattr(blocks, name)), name


def test_cli_with_no_pair_writes_counts_and_no_manifest(collection, tmp_path, capsys):
    feats, out = write_features(collection, tmp_path / "feats"), tmp_path / "out"
    argv = ["--images", collection[0], "--out", out, "--features", feats, *CLI]
    assert script("collect_pairs.py", argv, capsys)[0] == 0 and (out / "manifest.jsonl").exists()
    code, stdout, stderr = script("collect_pairs.py", [*argv, "--min-side", 10_000], capsys)
    assert code == 1 and stderr == "" and "found 0 pairs: no manifest written" in stdout
    assert not (out / "manifest.jsonl").exists()  # the first run's is not this run's result
    summary = json.loads((out / "pairs.json").read_text())
    assert summary["records"] == 0 and summary["manifest"] is None
    assert summary["counts"]["pairs_sampled"] > 0 == summary["counts"]["pairs_after_resolution"]


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--instruction", "put {image1} into {image}"], "--instruction 'put {image1} into"),
        (["--instruction", "make {image01} red"], "{image01}, which is not an image name"),
        (["--seed", -1], r"--seed must be in \[0, 2\*\*31\), got -1"),
        (["--seed", 5000000000], r"--seed must be in \[0, 2\*\*31\), got 5000000000"),
        (["--out", "{tmp}/file.png/pairs"], "--out .*/file.png/pairs: .*/file.png is not a dir"),
    ],
)
def test_cli_checks_before_any_feature_is_read(collection, tmp_path, capsys, extra, match):
    (tmp_path / "file.png").write_bytes(b"")
    out = tmp_path / "out"
    extra = [str(a).replace("{tmp}", str(tmp_path)) for a in extra]
    argv = ["--images", collection[0], "--out", out, "--features", tmp_path / "no-features"]
    code, _, stderr = script("collect_pairs.py", [*argv, *CLI, *extra], capsys)
    (line,) = stderr.strip().splitlines()  # the check, not the missing features
    assert code == 2 and re.search(match, line) and line.startswith("collect_pairs.py: error: ")
    assert not out.exists()


def test_cli_a_failed_write_is_one_line(collection, tmp_path, capsys):
    feats, out = write_features(collection, tmp_path / "feats"), tmp_path / "out"
    (out / "pairs.json").mkdir(parents=True)  # the summary cannot replace a directory
    argv = ["--images", collection[0], "--out", out, "--features", feats, *CLI]
    code, _, stderr = script("collect_pairs.py", argv, capsys)
    (line,) = stderr.strip().splitlines()
    assert code == 2 and line.startswith("collect_pairs.py: error: ") and "pairs.json" in line


def test_docstring_examples():
    from ace.data.collect import pair_manifest, pairing, scorers, unionfind

    for module in (pairing, scorers, unionfind, pair_manifest):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_benchmark_script_runs(capsys):
    code, stdout, _ = script(
        "benchmark_pairing.py", ["--n", 3000, "--dim", 32, "--clusters", 3, "--json"], capsys
    )
    assert code == 0
    report = json.loads(stdout)
    assert report["counts"]["images"] == 3000 and report["peak_rss_mib"] > 0
    assert report["planted_recall"] > 0.8
    for stage in ("kmeans_train", "kmeans_assign", "turn1", "turn2", "pairs", "filters"):
        assert report["seconds"][stage] >= 0


@pytest.mark.parametrize(
    "flag,value,rule",
    [("--n", 0, ">= 1"), ("--n", -5, ">= 1"), ("--group-size", 0, ">= 2"),
     ("--dup-fraction", 2.5, "in [0, 1]"), ("--t1", 1.5, "in [0, 1]")],
)  # fmt: skip
def test_benchmark_script_refuses_bad_arguments_in_one_line(capsys, flag, value, rule):
    code, _, stderr = script("benchmark_pairing.py", [flag, value], capsys)
    assert code == 2
    assert stderr == f"benchmark_pairing.py: error: {flag} must be {rule}, got {value}\n"
