"""Tests for ace.lcu: naming, frame pairing, indicator rows and validation."""

import doctest
import re

import numpy as np
import pytest
import torch
from PIL import Image

import ace.lcu
from ace.lcu import INDICATOR_NAMES, LCU, MAX_INPUT_IMAGES, ConditionUnit, image_name


def rgb(w: int = 32, h: int = 32) -> Image.Image:
    return Image.new("RGB", (w, h))


def mask(w: int = 32, h: int = 32, mode: str = "L") -> Image.Image:
    return Image.new(mode, (w, h))


def released_rename(prompts: list[str]) -> list[str]:
    """The released rule, literally: in prompt I > 0, "{image}" -> "{imageI}"."""
    out = []
    for i, p in enumerate(prompts):
        if i > 0:
            p = p.replace("{image}", f"{{image{i}}}")
        out.append(p)
    return out


# ---------------------------------------------------------------------------
# Names and renaming
# ---------------------------------------------------------------------------


def test_image_name():
    assert image_name(0) == "{image}"
    assert image_name(1) == "{image1}"
    assert image_name(9) == "{image9}"
    assert INDICATOR_NAMES == (
        "{image}",
        "{image1}",
        "{image2}",
        "{image3}",
        "{image4}",
        "{image5}",
        "{image6}",
        "{image7}",
        "{image8}",
        "{image9}",
    )
    with pytest.raises(ValueError, match="no name"):
        image_name(10)
    with pytest.raises(ValueError, match="no name"):
        image_name(-1)


def test_renaming_one_image_per_turn_equals_released_rule():
    prompts = [
        "a cat in {image}",
        "make {image} blue",
        "add a hat to {image}",
        "compare {image} with the original",
    ]
    turns = [ConditionUnit(p, [rgb()]) for p in prompts]
    lcu = LCU(current=turns[-1], history=turns[:-1])
    assert lcu.instructions() == released_rename(prompts)
    assert lcu.instructions() == [
        "a cat in {image}",
        "make {image1} blue",
        "add a hat to {image2}",
        "compare {image3} with the original",
    ]


def test_renaming_one_pass_does_not_rename_twice():
    # {image} -> {image1} in turn 1 must not become {image2} through {image1} -> {image2}.
    lcu = LCU(
        current=ConditionUnit("{image} {image1}", [rgb(), rgb()]),
        history=[ConditionUnit("{image}", [rgb()])],
    )
    assert lcu.instructions() == ["{image}", "{image1} {image2}"]


def test_renaming_multi_image_current_turn_with_history():
    lcu = LCU(
        current=ConditionUnit("put {image2} and {image1} onto {image}", [rgb(), rgb(), rgb()]),
        history=[
            ConditionUnit("draw a room", []),
            ConditionUnit("blend {image1} into {image}", [rgb(), rgb()]),
            ConditionUnit("brighten {image}", [rgb()]),
        ],
    )
    # Global images: 0, 1 (turn 1), 2 (turn 2), 3, 4, 5 (current).
    assert lcu.instructions() == [
        "draw a room",
        "blend {image1} into {image}",
        "brighten {image2}",
        "put {image5} and {image4} onto {image3}",
    ]


def test_no_history_keeps_names():
    cu = ConditionUnit("swap {image1} and {image}", [rgb(), rgb()])
    assert LCU(cu).instructions() == ["swap {image1} and {image}"]
    assert LCU(cu, history=None).history == []  # None is no history, as images=None is none


# ---------------------------------------------------------------------------
# Frames, texts, indicator rows
# ---------------------------------------------------------------------------


def test_two_turn_frames_by_hand():
    a, b, c = rgb(16, 16), rgb(32, 16), rgb(16, 32)
    ma = mask(16, 16)
    hist = ConditionUnit("turn {image} red", [a], [ma])
    cur = ConditionUnit("copy the colour of {image} to {image1}", [b, c])
    lcu = LCU(current=cur, history=[hist])

    assert lcu.turns == [hist, cur]
    assert lcu.images == [a, b, c]
    assert lcu.masks == [ma, None, None]
    assert lcu.num_frames == 4
    assert lcu.instructions() == ["turn {image} red", "copy the colour of {image1} to {image2}"]
    assert lcu.frame_turns() == [1, 0, 1, 1]
    assert lcu.frame_texts() == [
        "copy the colour of {image1} to {image2}",  # target
        "turn {image} red",  # a
        "copy the colour of {image1} to {image2}",  # b
        "copy the colour of {image1} to {image2}",  # c
    ]
    assert lcu.indicator_rows() == [3, 0, 1, 2]


def test_no_history_pairs_every_image_with_current_instruction():
    lcu = LCU(ConditionUnit("merge {image} and {image1}", [rgb(), rgb()]))
    assert lcu.frame_texts() == ["merge {image} and {image1}"] * 3
    assert lcu.indicator_rows() == [2, 0, 1]


def test_text_to_image_is_one_frame_row_zero():
    lcu = LCU(ConditionUnit("a red fox in snow"))
    assert lcu.images == [] and lcu.masks == []
    assert lcu.num_frames == 1
    assert lcu.frame_texts() == ["a red fox in snow"]
    assert lcu.indicator_rows() == [0]


def test_nine_images_fill_the_indicator_table():
    hist = [ConditionUnit("{image}", [rgb()]) for _ in range(5)]
    lcu = LCU(ConditionUnit("{image3}", [rgb()] * 4), history=hist)
    assert lcu.num_frames == 10
    assert lcu.indicator_rows() == [9, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert lcu.instructions()[-1] == "{image8}"


def test_tensor_inputs_and_target():
    img = torch.rand(3, 24, 40)
    cu = ConditionUnit("edit {image}", (img,), (torch.ones(1, 24, 40),))
    assert isinstance(cu.images, list) and isinstance(cu.masks, list)
    cu2 = ConditionUnit("edit {image}", [img], [torch.ones(24, 40, dtype=torch.bool)])
    lcu = LCU(cu2, target=torch.rand(3, 8, 8), target_mask=torch.ones(8, 8))
    assert lcu.num_frames == 2
    lcu = LCU(cu, target=rgb(40, 24), target_mask=mask(40, 24, "1"))
    assert lcu.target.size == (40, 24)


def test_module_docstring_example():
    result = doctest.testmod(ace.lcu, verbose=False)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def test_instruction_must_be_str():
    with pytest.raises(ValueError, match=r"instruction: expected a str"):
        ConditionUnit(b"bytes", [])
    with pytest.raises(ValueError, match=r"instruction: expected a str"):
        ConditionUnit(None)


@pytest.mark.parametrize(
    ("bad", "got"),
    [
        (Image.new("L", (8, 8)), "mode 'L'"),
        (Image.new("RGBA", (8, 8)), "mode 'RGBA'"),
        (torch.rand(1, 8, 8), r"shape \(1, 8, 8\)"),
        (torch.rand(1, 3, 8, 8), r"shape \(1, 3, 8, 8\)"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), "torch.uint8"),
        (np.zeros((8, 8, 3), dtype=np.uint8), r"numpy.ndarray of shape \(8, 8, 3\)"),
        ("cat.png", "str 'cat.png'"),
    ],
)
def test_bad_image_is_refused(bad, got):
    with pytest.raises(ValueError, match=rf"images\[1\]: expected an RGB PIL image .*{got}"):
        ConditionUnit("x", [rgb(8, 8), bad])


def test_images_must_be_a_list():
    with pytest.raises(ValueError, match="images: expected a list"):
        ConditionUnit("{image}", rgb())


def test_mask_count_mismatch():
    with pytest.raises(ValueError, match="got 1 masks for 2 images"):
        ConditionUnit("x", [rgb(), rgb()], [None])
    with pytest.raises(ValueError, match="got 2 masks for 0 images"):
        ConditionUnit("x", [], [None, None])


@pytest.mark.parametrize(
    ("bad", "got"),
    [
        (Image.new("RGB", (32, 32)), "mode 'RGB'"),
        (torch.ones(3, 32, 32), r"shape \(3, 32, 32\)"),
        (torch.ones(1, 1, 32, 32), r"shape \(1, 1, 32, 32\)"),
        (np.ones((32, 32)), "numpy.ndarray"),
    ],
)
def test_bad_mask_kind_is_refused(bad, got):
    with pytest.raises(
        ValueError, match=rf'masks\[0\]: expected a PIL image of mode "L" or "1".*{got}'
    ):
        ConditionUnit("x", [rgb()], [bad])


@pytest.mark.parametrize(
    "bad",
    [mask(32, 16), mask(32, 16, "1"), torch.ones(1, 16, 32), torch.ones(16, 32)],
)
def test_mask_size_mismatch(bad):
    # Image 1 is 16 wide, 32 high: (H, W) = (32, 16). Each mask is (H, W) = (16, 32).
    with pytest.raises(
        ValueError, match=r"masks\[1\]: size \(H, W\) = \(16, 32\) differs .* \(32, 16\)"
    ):
        ConditionUnit("x", [rgb(32, 16), rgb(16, 32)], [None, bad])


def test_reference_to_missing_image():
    with pytest.raises(
        ValueError, match=r"references \{image2\} but the condition unit has 1 image"
    ):
        ConditionUnit("put {image2} here", [rgb()])
    with pytest.raises(
        ValueError, match=r"references \{image\} but the condition unit has 0 image"
    ):
        ConditionUnit("edit {image}")
    with pytest.raises(
        ValueError, match=r"references \{image12\} but the condition unit has 2 image"
    ):
        ConditionUnit("{image12}", [rgb(), rgb()])


def test_reference_with_leading_zero_is_not_a_name():
    with pytest.raises(ValueError, match=r"\{image0\}, which is not an image name"):
        ConditionUnit("{image0}", [rgb()])


@pytest.mark.parametrize(
    "typo", ["{Image}", "{ image }", "{image_1}", "{img}", "{IMAGE1}", "{image 2}"]
)
def test_a_mistyped_image_name_is_refused(typo):
    """T5 would read it as plain text and no indicator would tie it to an image."""
    with pytest.raises(
        ValueError, match=rf"instruction has {re.escape(typo)}, which is not an image name"
    ):
        ConditionUnit(f"make {typo} blue", [rgb(), rgb()])
    ConditionUnit("make {image} and {image1} blue, as the images show", [rgb(), rgb()])


def test_too_many_images_in_a_cu():
    with pytest.raises(ValueError, match=f"at most {MAX_INPUT_IMAGES} images, got 10"):
        ConditionUnit("x", [rgb(4, 4)] * 10)


def test_too_many_images_in_an_lcu():
    hist = [ConditionUnit("{image}", [rgb(4, 4)] * 5)]
    with pytest.raises(ValueError, match=r"at most 9 input images over all turns .* got 10"):
        LCU(ConditionUnit("{image}", [rgb(4, 4)] * 5), history=hist)


def test_lcu_parts_must_be_condition_units():
    with pytest.raises(ValueError, match="current: expected a ConditionUnit"):
        LCU("a prompt")
    with pytest.raises(ValueError, match=r"history\[1\]: expected a ConditionUnit"):
        LCU(ConditionUnit("x"), history=[ConditionUnit("y"), "z"])


def test_a_task_on_the_current_turn_is_the_lcus():
    """The current turn's tag is LCU.task: one set on the ConditionUnit alone was ignored,
    and an inpainting request ran without its fill (checked on the preprocessed pixels)."""
    from ace.request import prepare_lcu

    grey = Image.new("RGB", (32, 32), (128, 128, 128))
    half = Image.fromarray(np.pad(np.full((32, 16), 255, np.uint8), ((0, 0), (0, 16))))
    on_turn = LCU(ConditionUnit("fill {image}", [grey], [half], task="inpainting"))
    on_lcu = LCU(ConditionUnit("fill {image}", [grey], [half]), task="inpainting")
    assert on_turn.task == "inpainting"
    a, b = (prepare_lcu(x, 1024).images[0] for x in (on_turn, on_lcu))  # (3, 32, 32)
    assert torch.equal(a, b) and a[:, :, :16].eq(-1).all() and a[:, :, 16:].gt(0).all()
    assert LCU(ConditionUnit("x", task="recolor"), task="recolor").task == "recolor"
    with pytest.raises(ValueError, match="the LCU's task is 'recolor' but its current turn's is 'inpainting'"):  # fmt: skip
        LCU(ConditionUnit("x {image}", [grey], task="inpainting"), task="recolor")


@pytest.mark.parametrize(
    ("bad", "got"),
    [(Image.new("L", (8, 8)), "mode 'L'"), (torch.rand(8, 8), r"shape \(8, 8\)")],
)
def test_bad_target(bad, got):
    with pytest.raises(ValueError, match=rf"target: expected an RGB PIL image .*{got}"):
        LCU(ConditionUnit("x"), target=bad)


def test_target_mask_checks():
    with pytest.raises(
        ValueError, match=r"target_mask: size \(H, W\) = \(8, 16\) differs .* \(16, 8\)"
    ):
        LCU(ConditionUnit("x"), target=rgb(8, 16), target_mask=mask(16, 8))
    with pytest.raises(ValueError, match='target_mask: expected a PIL image of mode "L"'):
        LCU(ConditionUnit("x"), target=rgb(8, 8), target_mask=rgb(8, 8))
    with pytest.raises(ValueError, match="target_mask given without a target"):
        LCU(ConditionUnit("x"), target_mask=mask(8, 8))
