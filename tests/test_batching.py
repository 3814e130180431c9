"""Token-budget batching: token counts, budget invariants, determinism, resume over shards."""

import doctest
import itertools
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from ace.data import batching
from ace.data.batching import (
    TokenBudgetBatcher,
    budget_batches,
    dataset_costs,
    frame_tokens,
    lcu_tokens,
)
from ace.data.manifest import LCUManifest, write_manifest
from ace.data.shards import ShardStream, write_shards
from ace.lcu import LCU, ConditionUnit

SIDES = [(64, 64), (128, 64), (128, 128), (256, 128)]  # PIL (W, H): 16, 32, 64, 128 tokens


def lcus(n: int, seed: int = 0) -> list[LCU]:
    """LCUs named "lcu i" of 0-2 input images with sizes drawn from SIDES."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        sizes = [SIDES[j] for j in rng.integers(0, len(SIDES), 1 + i % 3)]
        images = [Image.new("RGB", s) for s in sizes[1:]]
        refs = " ".join(["{image}", "{image1}"][: len(images)])
        out.append(LCU(ConditionUnit(f"lcu {i} {refs}", images), target=Image.new("RGB", sizes[0])))
    return out


def name(item) -> str:
    lcu = item[1] if isinstance(item, tuple) else item
    return " ".join(lcu.current.instruction.split()[:2])


def check_batches(batches, costs: dict, max_tokens: int, expected: list, max_samples=None):
    """Each batch within budget (or one oversized item), every item exactly once."""
    for b in batches:
        total = sum(costs[x] for x in b)
        assert b and (total <= max_tokens or len(b) == 1), (b, total)
        assert max_samples is None or len(b) <= max_samples
    assert sorted(x for b in batches for x in b) == sorted(expected)


# ---------------------------------------------------------------------------------- costs


@pytest.mark.parametrize(
    "hw, max_seq_len, tokens",
    [
        ((512, 512), 1024, 1024),  # exactly the budget
        ((64, 64), 1024, 16),  # small images are not enlarged
        ((1024, 1024), 1024, 1024),  # 1024 px -> 512 px
        ((1024, 1024), 4096, 4096),
        ((512, 1024), 1024, 990),  # scale sqrt(1/2): 362 x 724 -> 352 x 720 = 22 x 45
        ((70, 70), 1024, 16),  # 70 -> 64: sides are cut down to multiples of 16
        ((16, 128), 1024, 4),  # aspect 8 is centre-cropped to 16 x 64
        ((100, 20), 1024, 5),  # (H, W) cropped to 80 x 20 -> 80 x 16 -> 5 x 1 tokens
    ],
)
def test_frame_tokens_by_hand(hw, max_seq_len, tokens):
    assert frame_tokens(*hw, max_seq_len) == tokens


def test_lcu_tokens_counts_target_and_every_input():
    target, small = Image.new("RGB", (512, 512)), Image.new("RGB", (64, 64))
    assert lcu_tokens(LCU(ConditionUnit("a cat"), target=target), 1024) == 1024
    two = LCU(
        ConditionUnit("put {image1} in {image}", [small, torch.rand(3, 128, 64)]),
        history=[ConditionUnit("make {image} red", [small])],
        target=target,
    )
    assert lcu_tokens(two, 1024) == 1024 + 16 + 16 + 32
    assert lcu_tokens(LCU(ConditionUnit("{image}", [small])), 1024) == 16  # no target
    assert lcu_tokens(LCU(ConditionUnit("a cat"), target=target), 256) == 256
    assert doctest.testmod(batching).failed == 0


def test_dataset_costs_read_headers_only(tmp_path, monkeypatch):
    items = lcus(8)
    write_manifest(items, tmp_path / "ds", progress=False)
    ds = LCUManifest(tmp_path / "ds")

    def no_decoding(self):
        raise AssertionError("decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    costs = dataset_costs(ds, 1024)
    monkeypatch.undo()
    assert costs == [lcu_tokens(x, 1024) for x in items] == dataset_costs(items, 1024)
    (tmp_path / "ds" / "images" / "000003_target.png").unlink()
    with pytest.warns(UserWarning, match="left out") as caught:
        costs = dataset_costs(ds, 1024)
    assert "item 3 left out" in str(caught[0].message)
    assert costs[3] is None and None not in costs[:3] + costs[4:]
    # an image past PIL's decompression-bomb guard is left out too, not the run stopped
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 32 x 32 image is then a "bomb"
    with pytest.warns(UserWarning, match="left out"):
        assert dataset_costs(ds, 1024) == [None] * len(ds)


# ---------------------------------------------------------------------------------- map-style


@pytest.mark.parametrize("buffer", [0, 6])
@pytest.mark.parametrize("max_samples", [None, 3])
def test_budget_batches_invariants(buffer, max_samples):
    rng = np.random.default_rng(0)
    costs = rng.choice([16, 32, 64, 128, 300], 101).tolist()
    kw = {"buffer": buffer, "max_samples": max_samples}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = budget_batches(costs, 256, seed=1, epoch=2, **kw)
        assert len([w for w in caught if "over the batch budget" in str(w.message)]) == 1
        check_batches(batches, dict(enumerate(costs)), 256, list(range(101)), max_samples)
        assert budget_batches(costs, 256, 1, 2, **kw) == batches
        assert budget_batches(costs, 256, 1, 3, **kw) != batches
        assert budget_batches(costs, 256, 2, 2, **kw) != batches


def test_manifest_batches_read_the_epochs_back_to_back_keeping_one(tmp_path):
    """The trainer's token-budget batches: global step s, rank r is batch s * world + r of
    every epoch's packing laid end to end (a by-hand concatenation), and only the latest
    epoch's packing is held, not all of them."""
    from ace.train.config import DataConfig
    from ace.train.data import ManifestBatches

    write_manifest(lcus(8), tmp_path / "ds", progress=False)
    ds = LCUManifest(tmp_path / "ds")
    cfg = DataConfig(manifest=str(tmp_path / "ds"), max_tokens=512, batch_size=3)
    costs = dataset_costs(ds, 1024)
    laid = [b for e in range(6) for b in budget_batches(costs, 512, 5, e, max_samples=3)]
    for world in (1, 2):
        ranks = [ManifestBatches(ds, cfg, 5, r, world, 1024) for r in range(world)]
        steps = len(laid) // world
        got = [ranks[r].indices(s) for s in range(steps) for r in range(world)]
        assert got == laid[: steps * world]
        assert len(ranks[0]._counts) >= 5 and ranks[0]._packed[0] == len(ranks[0]._counts) - 1
    late = ManifestBatches(ds, cfg, 5, 0, 1, 1024)  # a resumed run starts at a late step
    assert late.indices(len(laid) - 1) == laid[-1]


@pytest.mark.filterwarnings("ignore:an LCU of 300 tokens")
def test_budget_batches_by_hand():
    costs = [100, 100, 60, None, 300, 50, 50]
    assert budget_batches(costs, 200, shuffle=False) == [[0, 1], [2], [4], [5, 6]]
    assert budget_batches(costs, 200, shuffle=False, max_samples=1) == [
        [0],
        [1],
        [2],
        [4],
        [5],
        [6],
    ]
    assert budget_batches(costs, 200, shuffle=False, indices=[6, 5, 2, 0]) == [[6, 5, 2], [0]]
    # buffer 4: chunks [0, 1, 2, 4] and [5, 6], each sorted by cost before packing
    assert budget_batches(costs, 200, shuffle=False, buffer=4) == [[2, 0], [1], [4], [5, 6]]


def test_bucketing_gives_fewer_distinct_shapes():
    rng = np.random.default_rng(0)
    costs = rng.choice([16, 64, 256], 300).tolist()

    def mixed(batches):  # batches holding more than one size
        return sum(len({costs[i] for i in b}) > 1 for b in batches)

    plain = budget_batches(costs, 512, seed=0)
    bucketed = budget_batches(costs, 512, seed=0, buffer=100)
    assert mixed(bucketed) < mixed(plain) / 3


# ---------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("buffer", [0, 5])
def test_batcher_invariants_and_pairs(buffer):
    items = lcus(40)
    costs = {name(x): lcu_tokens(x, 1024) for x in items}
    with pytest.warns(UserWarning, match="over the batch budget") as caught:
        batches = list(TokenBudgetBatcher(items, 150, 1024, buffer=buffer, max_samples=4))
    assert len([w for w in caught if "over the batch budget" in str(w.message)]) == 1
    check_batches([[name(x) for x in b] for b in batches], costs, 150, list(costs), 4)
    pairs = list(enumerate(items))
    with pytest.warns(UserWarning):
        paired = list(TokenBudgetBatcher(pairs, 150, 1024, buffer=buffer, max_samples=4))
    assert [[i for i, _ in b] for b in paired] == [
        [int(name(x).split()[1]) for x in b] for b in batches
    ]
    if buffer == 0:  # greedy in order: the same rule as budget_batches without shuffling
        costs_list = [lcu_tokens(x, 1024) for x in items]
        with pytest.warns(UserWarning):
            expected = budget_batches(costs_list, 150, shuffle=False, max_samples=4)
        assert [[i for i, _ in b] for b in paired] == expected


@pytest.fixture
def shard_urls(tmp_path) -> str:
    write_manifest(lcus(24), tmp_path / "ds", progress=False)
    write_shards(tmp_path / "ds", tmp_path / "shards", samples_per_shard=4, progress=False)
    return f"{tmp_path}/shards/shard-{{000000..000005}}.tar"


@pytest.mark.parametrize("buffer, workers", [(0, 0), (6, 0), (0, 2), (6, 2)])
def test_batcher_over_shards_resumes_exactly(shard_urls, buffer, workers):
    def make():
        stream = ShardStream(shard_urls, seed=5, shuffle_buffer=4, repeat=True)
        return TokenBudgetBatcher(stream.loader(workers), 200, 1024, buffer=buffer)

    def run(batcher, n):
        return [[name(x) for x in b] for b in itertools.islice(batcher, n)]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # oversized LCUs
        full = run(make(), 30)
        for k in (1, 4, 13):
            batcher = make()
            it = iter(batcher)
            first = [[name(x) for x in next(it)] for _ in range(k)]
            state = batcher.state_dict()
            del it
            fresh = make()
            fresh.load_state_dict(state)
            assert fresh.state_dict() == state  # saved before iterating: unchanged
            assert first + run(fresh, 30 - k) == full, k


def test_batcher_without_stateful_source_has_no_state():
    with pytest.raises(TypeError, match="no state_dict"):
        TokenBudgetBatcher(lcus(3), 100, 1024).state_dict()
    with pytest.raises(ValueError, match="max_tokens"):
        TokenBudgetBatcher(lcus(3), 0, 1024)
