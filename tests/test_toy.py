"""The toy world: targets right by construction, determinism, valid LCUs, bad input."""

import hashlib
import io
import re

import cv2
import numpy as np
import pytest
from PIL import Image

from ace.data.toy import (
    CELLS,
    COLORS,
    EDGE_THRESHOLDS,
    PATTERNS,
    SEG_COLORS,
    SHAPES,
    SPLIT_IDS,
    TASKS,
    Background,
    Edit,
    Obj,
    Scene,
    ToySample,
    cell_box,
    make_sample,
    render,
    sample_stream,
    segmentation_map,
)
from ace.data.toy_tasks import make_chain, random_scene
from ace.lcu import LCU, ConditionUnit

SEEDS = range(12)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([7, seed])


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im)


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def sample_pngs(s: ToySample) -> list[bytes]:
    ims = [*s.lcu.images, *(m for m in s.lcu.masks if m is not None), s.lcu.target]
    if s.lcu.target_mask is not None:
        ims.append(s.lcu.target_mask)
    return [png(im) for im in ims]


def apply(scene: Scene, edit: Edit) -> Scene:
    """The test's own reading of an edit."""
    if edit.background is not None:
        return Scene(edit.background, list(scene.objects))
    objs = [o for o in scene.objects if o.cell != edit.cell]
    return Scene(scene.background, objs + ([edit.obj] if edit.obj is not None else []))


# ---------------------------------------------------------------------------
# Targets right by construction
# ---------------------------------------------------------------------------


def test_remove_then_add_restores_the_scene():
    for seed in SEEDS:
        scene = random_scene(rng(seed), 1, 9)
        before = arr(render(scene))
        for o in scene.objects:
            removed = Edit(o.cell, None).apply(scene)
            assert o not in removed.objects
            assert not np.array_equal(arr(render(removed)), before)
            restored = Edit(o.cell, o).apply(removed)
            assert restored == scene
            assert np.array_equal(arr(render(restored)), before)


def test_objects_stay_inside_their_cell():
    for seed in SEEDS:
        scene = random_scene(rng(seed), 1, 9)
        for o in scene.objects:
            emptied = arr(render(Edit(o.cell, None).apply(scene)))
            diff = np.any(arr(render(scene)) != emptied, axis=2)
            ys, xs = np.nonzero(diff)
            x0, y0, x1, y1 = cell_box(o.cell, 64)
            assert (
                x0 < xs.min() and xs.max() < x1 - 1 and y0 < ys.min() and ys.max() < y1 - 1
            )  # a gap


def canny(im: Image.Image) -> np.ndarray:
    return cv2.Canny(np.asarray(im), *EDGE_THRESHOLDS)


def test_edge_maps_are_opencv_canny_of_the_source():
    for seed in SEEDS:
        s = make_sample("edge_map", rng(seed))
        edges = arr(s.lcu.target)
        assert edges.shape == (64, 64, 3) and (edges == canny(s.lcu.images[0])[:, :, None]).all()
        assert set(np.unique(edges)) <= {0, 255} and edges.any()
        s = make_sample("edge_to_image", rng(seed))
        assert (arr(s.lcu.images[0]) == canny(s.lcu.target)[:, :, None]).all()


def colours(im: Image.Image) -> set[tuple[int, ...]]:
    return {tuple(c) for c in arr(im).reshape(-1, 3)}


def test_segmentation_maps_hold_exactly_the_scene_classes():
    black = (0, 0, 0)
    for seed in SEEDS:
        scene = random_scene(rng(seed), 1, 9)
        expected = {SEG_COLORS[o.shape] for o in scene.objects} | {black}
        assert colours(segmentation_map(scene)) == expected
    for seed in SEEDS:  # the task's map against the shapes its instruction names
        s = make_sample("segmentation_to_image", rng(seed))
        named = set(re.findall("|".join(SHAPES), s.lcu.current.instruction))
        assert colours(s.lcu.images[0]) == {SEG_COLORS[n] for n in named} | {black}
        s = make_sample("segmentation_map", rng(seed))
        assert colours(s.lcu.target) - {black} <= set(SEG_COLORS.values())


def test_repaint_keeps_the_masked_complement():
    for seed in range(30):
        s = make_sample("repaint", rng(seed))
        mask = arr(s.lcu.current.masks[0]) > 0
        source, target = arr(s.lcu.images[0]), arr(s.lcu.target)
        assert s.lcu.task == "repaint" and s.lcu.current.masks[0].mode == "L"
        assert (target[~mask] == source[~mask]).all()
        assert np.array_equal(arr(s.lcu.target_mask) > 0, mask)
        assert s.change_mask.any() and not s.change_mask[~mask].any()
        assert mask.sum() in (21 * 21, 21 * 22, 22 * 22)  # one grid cell


def test_multi_turn_target_is_the_turns_applied_one_by_one():
    kinds = set()
    for seed in range(40):
        chain = make_chain(rng(seed))
        s = make_sample("multi_turn", rng(seed))
        kinds.add(chain.kind)
        states = [chain.start]
        for edit in chain.edits:
            states.append(apply(states[-1], edit))
        assert s.lcu.instructions()[-1] == chain.instructions[-1].replace(
            "{image}", f"{{image{len(chain.edits) - 1}}}"
        )
        assert [cu.instruction for cu in s.lcu.turns] == chain.instructions
        assert len(s.lcu.history) == len(chain.edits) - 1 in (1, 2)
        for cu, state in zip(s.lcu.turns, states):  # turn k shows the state before edit k
            assert cu.images[0].tobytes() == render(state).tobytes()
        assert s.lcu.target.tobytes() == render(states[-1]).tobytes()
        # what should change is what the last edit changes, from the current turn's image
        assert np.array_equal(
            s.change_mask, np.any(arr(render(states[-2])) != arr(s.lcu.target), 2)
        )
        assert s.change_mask.any()
        if chain.kind == "undo":  # the answer is in the history, not the current turn
            assert s.lcu.target.tobytes() == s.lcu.history[1].images[0].tobytes()
        if chain.kind != "edit":
            assert s.lcu.target.tobytes() != s.lcu.current.images[0].tobytes()
    assert kinds == {"edit", "undo", "restore_color", "bring_back"}


# ---------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------


def test_render_is_pinned():
    """Raw pixels of a fixed scene, so a change in rendering (or a platform) shows up."""
    objs = [
        Obj(s, c, z, cell)
        for s, c, z, cell in zip(SHAPES * 2, [*COLORS, "red"], ["small", "large"] * 5, CELLS)
    ]
    h = hashlib.sha256()
    for size in (32, 64):
        for pattern in PATTERNS:
            h.update(render(Scene(Background("cream", pattern), objs), size).tobytes())
    assert h.hexdigest()[:16] == "617d07dd7af16ad5"


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_bytes_different_seed_different(task):
    a, b = make_sample(task, rng(3)), make_sample(task, rng(3))
    assert sample_pngs(a) == sample_pngs(b)
    assert a.lcu.instructions() == b.lcu.instructions()
    assert np.array_equal(a.change_mask, b.change_mask)
    c = make_sample(task, rng(4))
    assert sample_pngs(a) != sample_pngs(c)


def test_streams_are_deterministic_and_splits_differ():
    def stream_bytes(**kw):
        return [(s.lcu.task, sample_pngs(s)) for s in sample_stream(6, **kw)]

    train = stream_bytes(seed=0)
    assert train == stream_bytes(seed=0, split="train")
    assert train != stream_bytes(seed=1)
    evals = stream_bytes(seed=0, split="eval")
    assert all(t != e for t, e in zip(train, evals))


def test_stream_tasks_and_weights():
    picked = [s.lcu.task for s in sample_stream(30, 0, tasks=["add", "grayscale"])]
    assert set(picked) == {"add", "grayscale"}
    picked = [s.lcu.task for s in sample_stream(20, 0, weights={t: 0.0 for t in TASKS[1:]})]
    assert set(picked) == {TASKS[0]}
    assert [s.lcu.task for s in sample_stream(3, 5, tasks="remove")] == ["remove"] * 3


def test_balanced_stream_cycles_the_families():
    picked = [s.lcu.task for s in sample_stream(2 * len(TASKS) + 3, 0, balanced=True)]
    assert picked == [*TASKS, *TASKS, *TASKS[:3]]
    picked = [s.lcu.task for s in sample_stream(5, 0, tasks=["add", "grayscale"], balanced=True)]
    assert picked == ["add", "grayscale", "add", "grayscale", "add"]
    # sample i is still drawn from its own seed alone
    i = 4
    rng = np.random.default_rng([SPLIT_IDS["eval"], 2, i])
    got = list(sample_stream(i + 1, 2, split="eval", balanced=True))[i]
    assert sample_pngs(got) == sample_pngs(make_sample(TASKS[i], rng))


def test_bring_back_names_only_the_object_of_the_first_removal():
    """When the second edit removed an object too, "the object removed earlier" would fit
    both, and "the {shape} I deleted" both when they share a shape: the instruction then
    names the colour, or says "two steps ago"."""
    seen = set()
    for seed in range(1600):
        chain = make_chain(rng(seed))
        if chain.kind != "bring_back":
            continue
        start, s1, s2 = chain.scenes()[:3]
        o = start.at(chain.edits[0].cell)  # what the first edit removed
        removed = [g for g in s1.objects if s2.at(g.cell) is None]  # what the second did
        text = chain.instructions[-1]
        if "two steps ago" in text:
            seen.add("two steps ago, after a removal" if removed else "two steps ago")
        elif f"the {o.color} {o.shape} I deleted" in text:
            assert not [g for g in removed if (g.color, g.shape) == (o.color, o.shape)]
            seen.add("colour and shape")
        elif f"the {o.shape} I deleted" in text:
            assert not [g for g in removed if g.shape == o.shape], (seed, text, removed)
            seen.add("shape")
        else:
            assert "removed earlier" in text and not removed, (seed, text, removed)
    assert seen == {"two steps ago, after a removal", "two steps ago", "colour and shape", "shape"}


# ---------------------------------------------------------------------------
# Valid LCUs
# ---------------------------------------------------------------------------

DIFF_TASKS = {"recolor", "background", "grayscale", "add", "remove", "replace", "repaint"}
DIFF_TASKS |= {"extract", "merge", "multi_turn"}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("size", [32, 64, 96])
def test_every_task_builds_a_valid_lcu(task, size):
    instructions = set()
    for seed in range(8):
        s = make_sample(task, rng(seed), size)
        lcu = s.lcu
        assert lcu.task == task
        turns = [ConditionUnit(cu.instruction, list(cu.images), list(cu.masks)) for cu in lcu.turns]
        LCU(turns[-1], turns[:-1], lcu.target, lcu.target_mask, lcu.task)  # validates
        for cu in lcu.turns:  # every image is referenced by its turn's instruction
            refs = {int(d or 0) for d in re.findall(r"\{image(\d*)\}", cu.instruction)}
            assert refs == set(range(len(cu.images))), cu.instruction
            assert all(im.mode == "RGB" and im.size == (size, size) for im in cu.images)
            assert all(m is None or m.mode == "L" for m in cu.masks)
        assert lcu.target.mode == "RGB" and lcu.target.size == (size, size)
        assert (lcu.target_mask is not None) == (task == "repaint")
        assert s.change_mask.shape == (size, size) and s.change_mask.dtype == bool
        if task in DIFF_TASKS:
            first = arr(lcu.current.images[0])
            assert np.array_equal(s.change_mask, np.any(first != arr(lcu.target), axis=2))
            assert s.change_mask.any()
        else:
            assert s.change_mask.all()
        instructions.add(lcu.current.instruction)
    assert len(instructions) >= 3


def test_extract_always_changes_something():
    """A one-object scene on a plain background of the colour drawn for the target was its
    own target (seeds 259, 340, 356, ... before): an identity edit to train on and an empty
    region to score."""
    for seed in range(1000):
        sample = make_sample("extract", np.random.default_rng(seed), 32)
        assert sample.change_mask.any(), seed


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def test_bad_input_raises_naming_it():
    g = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"unknown task 'inpaint'.*text_to_image, edge_map"):
        make_sample("inpaint", g)
    with pytest.raises(ValueError, match=r"unknown task 'bogus'.*multi_turn"):
        sample_stream(3, 0, tasks=["add", "bogus"])
    with pytest.raises(ValueError, match=r"unknown task 'bogus'"):
        sample_stream(3, 0, weights={"bogus": 1.0})
    with pytest.raises(ValueError, match=r"unknown split 'test'; valid splits: train, eval"):
        sample_stream(3, 0, split="test")
    for size in (16, 40, 50, 0):
        with pytest.raises(ValueError, match=rf"impossible image size {size}"):
            make_sample("add", g, size)
        with pytest.raises(ValueError, match=rf"impossible image size {size}"):
            sample_stream(3, 0, size=size)
    with pytest.raises(ValueError, match=r"impossible image size 48\.5"):
        render(Scene(Background("white")), 48.5)
    with pytest.raises(ValueError, match="unknown shape 'blob'"):
        Obj("blob", "red", "small", "top")
    with pytest.raises(ValueError, match="at most one object per cell"):
        Scene(Background("white"), [Obj("star", "red", "small", "top")] * 2)
    with pytest.raises(ValueError, match="weights must be"):
        sample_stream(3, 0, weights={t: 0.0 for t in TASKS})
    with pytest.raises(ValueError, match="tasks is empty"):
        sample_stream(3, 0, tasks=[])
    with pytest.raises(ValueError, match="weights or balanced"):
        sample_stream(3, 0, weights={"add": 1.0}, balanced=True)


def test_seeds_past_one_word_are_refused():
    """default_rng([split, seed, i]) splits a seed of 2**32 or more into two words, and
    numpy pads the shorter sequence with zeros: seed 5 + 3 * 2**32 replayed seed 5's
    sample 3. Seeds and counts are kept to one word."""
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*32\), got 4294967301"):
        sample_stream(1, 5 + 2**32, size=32)
    with pytest.raises(ValueError, match=r"n must be an int in \[0, 2\*\*32\]"):
        sample_stream(2**32 + 1, 0, size=32)
    assert len(list(sample_stream(1, 2**32 - 1, size=32))) == 1
