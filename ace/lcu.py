"""Condition Units and Long-context Condition Units: the inputs of ACE.

A **Condition Unit** (CU) is one turn of a request: an instruction plus the
images it talks about and one optional mask per image. The instruction names
its images ``{image}`` (the first), ``{image1}`` (the second), ...,
``{image9}``.

A **Long-context Condition Unit** (LCU) is the current CU plus the CUs of
earlier turns (``history``, oldest first) and, for training, the target image
and its mask.

Frames. The model sees one frame per image: frame 0 is the target (the image
being denoised), frames 1..F-1 are the condition images of all turns, history
first (oldest turn first), then the current turn. So ``F = 1 + len(images)``
and at most ``MAX_INPUT_IMAGES`` (9) condition images fit the 10-row
indicator table.

Naming. Inside a CU, names are local: ``{image}`` is that turn's first image.
Over the whole LCU they are renamed to global names, the position of the image
in ``LCU.images``: in a turn whose first image has global index g, ``{image}``
becomes ``image_name(g)`` and ``{imageJ}`` becomes ``image_name(g + J)``.

Each frame is paired with one text: the target with the current turn's
(renamed) instruction, condition frame k with the instruction of the turn its
image belongs to. Frame k >= 1 and its text get indicator row k - 1 (the row of
``image_name(k - 1)``); the target gets row F - 1, the next free name.

>>> from PIL import Image
>>> cat, dog, hat = (Image.new("RGB", (64, 64)) for _ in range(3))
>>> lcu = LCU(
...     current=ConditionUnit("put {image1} on the dog in {image}", [dog, hat]),
...     history=[ConditionUnit("make the cat in {image} a dog", [cat])],
... )
>>> lcu.instructions()
['make the cat in {image} a dog', 'put {image2} on the dog in {image1}']
>>> lcu.frame_texts()  # target, cat, dog, hat
['put {image2} on the dog in {image1}', 'make the cat in {image} a dog', 'put {image2} on the dog in {image1}', 'put {image2} on the dog in {image1}']
>>> lcu.indicator_rows()
[3, 0, 1, 2]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

MAX_INPUT_IMAGES = 9
"""Most condition images one LCU (all turns together) or one CU may hold."""

MAX_FRAMES = MAX_INPUT_IMAGES + 1
"""Most frames per sample: the condition images plus the target."""

ImageLike = Image.Image | torch.Tensor
"""An RGB PIL image or a float tensor shaped (3, H, W)."""

MaskLike = Image.Image | torch.Tensor
"""A PIL image of mode "L" or "1", or a tensor shaped (1, H, W) or (H, W); white (> 128)
= the region to edit. Tensors: bool, float in [0, 1], integer 0-255, or integer 0/1 when
the mask's maximum is 1."""

# One pattern for every image reference: "" -> {image}, "2" -> {image2}.
_IMAGE_REF = re.compile(r"\{image(\d*)\}")
# what a mistyped image name looks like: {Image}, { image }, {image_1}, {img2} ...
_LOOKALIKE = re.compile(r"\{\s*(?:image|img)\s*[_-]?\s*\d*\s*\}", re.IGNORECASE)

_IMAGE_EXPECTED = "an RGB PIL image or a float torch tensor shaped (3, H, W)"
_MASK_EXPECTED = 'a PIL image of mode "L" or "1", or a torch tensor shaped (1, H, W) or (H, W)'


def image_name(i: int) -> str:
    """The name of image ``i``: 0 -> ``"{image}"``, n -> ``"{imagen}"`` (n <= 9)."""
    if not 0 <= i <= MAX_INPUT_IMAGES:
        raise ValueError(f"image index {i} has no name: names exist for 0..{MAX_INPUT_IMAGES}")
    return "{image}" if i == 0 else f"{{image{i}}}"


INDICATOR_NAMES: tuple[str, ...] = tuple(image_name(i) for i in range(MAX_FRAMES))
"""The strings whose T5 encodings form the indicator table, row r = ``image_name(r)``."""


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------


def _describe(x: Any) -> str:
    """A short description of a wrong input for error messages."""
    if isinstance(x, Image.Image):
        return f"a PIL image of mode {x.mode!r}"
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    if hasattr(x, "shape"):
        return f"a {type(x).__module__}.{type(x).__qualname__} of shape {tuple(x.shape)}"
    if isinstance(x, (str, bytes)):
        return f"a {type(x).__name__} {x!r}"
    return f"a {type(x).__module__}.{type(x).__qualname__}"


def _check_image(x: Any, what: str) -> tuple[int, int]:
    """Check an image and return its (H, W)."""
    if isinstance(x, Image.Image) and x.mode == "RGB":
        return x.height, x.width
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim == 3 and x.shape[0] == 3:
        return int(x.shape[1]), int(x.shape[2])
    raise ValueError(f"{what}: expected {_IMAGE_EXPECTED}, got {_describe(x)}")


def _check_mask(x: Any, what: str, image_size: tuple[int, int]) -> None:
    """Check a mask and that its (H, W) equals its image's."""
    if isinstance(x, Image.Image) and x.mode in ("L", "1"):
        size = (x.height, x.width)
    elif isinstance(x, torch.Tensor) and (x.ndim == 2 or (x.ndim == 3 and x.shape[0] == 1)):
        size = (int(x.shape[-2]), int(x.shape[-1]))
    else:
        raise ValueError(f"{what}: expected {_MASK_EXPECTED}, got {_describe(x)}")
    if size != image_size:
        raise ValueError(
            f"{what}: size (H, W) = {size} differs from its image's size (H, W) = {image_size}"
        )


def _ref_index(digits: str) -> int:
    """Local image index of a reference: "" -> 0, "J" -> J."""
    return int(digits) if digits else 0


def _as_list(x: Any, what: str, expected: str = "a list") -> list:
    if isinstance(x, (list, tuple)):
        return list(x)
    raise ValueError(f"{what}: expected {expected}, got {_describe(x)}")


# ---------------------------------------------------------------------------
# Condition Unit
# ---------------------------------------------------------------------------


@dataclass
class ConditionUnit:
    """One turn: an instruction, its images and one mask (or None) per image.

    Names in ``instruction`` are local to this turn: ``{image}`` is
    ``images[0]``, ``{imageJ}`` is ``images[J]``. A text-to-image request has
    no images and no references.
    """

    instruction: str
    """The instruction; may reference ``{image}``, ``{image1}``, ..., ``{image9}``."""
    images: list[ImageLike] | None = field(default_factory=list)
    """RGB PIL images or float tensors (3, H, W); at most ``MAX_INPUT_IMAGES`` (None: none)."""
    masks: list[MaskLike | None] | None = None
    """One mask or None per image, the image's size; None means no masks at all. A mask
    (``MaskLike``) marks the region to edit: PIL "L" or integer 0-255 (> 128, the released
    rule) or 0/1 (maximum 1), bool, or float [0, 1] (``conditioning.preprocess_mask``)."""
    task: str = ""
    """A history turn's task tag: its images are filled as that task's were (an inpainting
    tag blanks them where masked, as the released code's per-image task list does). The
    current turn's tag is ``LCU.task`` (taken from here when the LCU gives none); chat
    sessions record each turn's here."""

    def __post_init__(self) -> None:
        if not isinstance(self.instruction, str):
            raise ValueError(f"instruction: expected a str, got {_describe(self.instruction)}")
        if not isinstance(self.task, str):
            raise ValueError(f"task: expected a str, got {_describe(self.task)}")
        images = [] if self.images is None else self.images  # None: none, as for masks
        self.images = _as_list(
            images, "images", "a list of RGB PIL images or (3, H, W) float tensors"
        )
        n = len(self.images)
        if n > MAX_INPUT_IMAGES:
            raise ValueError(f"a condition unit holds at most {MAX_INPUT_IMAGES} images, got {n}")
        sizes = [_check_image(im, f"images[{i}]") for i, im in enumerate(self.images)]

        self.masks = [None] * n if self.masks is None else _as_list(self.masks, "masks")
        if len(self.masks) != n:
            raise ValueError(
                f"need one mask (or None) per image: got {len(self.masks)} masks for {n} images"
            )
        for i, (mask, size) in enumerate(zip(self.masks, sizes)):
            if mask is not None:
                _check_mask(mask, f"masks[{i}]", size)

        for m in _LOOKALIKE.finditer(self.instruction):
            if not _IMAGE_REF.fullmatch(m.group(0)):  # T5 would read it as plain text
                raise ValueError(
                    f"instruction has {m.group(0)}, which is not an image name (the names "
                    "are {image}, {image1}, ..., {image9}: lower case, no spaces)"
                )
        for m in _IMAGE_REF.finditer(self.instruction):
            digits = m.group(1)
            if digits.startswith("0"):
                raise ValueError(
                    f"instruction references {m.group(0)}, which is not an image name "
                    "(the names are {image}, {image1}, ..., {image9})"
                )
            if _ref_index(digits) >= n:
                raise ValueError(
                    f"instruction references {m.group(0)} but the condition unit has {n} image(s)"
                )

    def renamed_instruction(self, first: int) -> str:
        """The instruction with local names made global, this turn's first image being ``first``.

        One ``re.sub`` pass, so a renamed reference is never renamed again.
        """
        return _IMAGE_REF.sub(
            lambda m: image_name(first + _ref_index(m.group(1))), self.instruction
        )


TURN_KEYS = ("instruction", "images", "masks", "task")
TURN_EXPECTED = "a ConditionUnit or a dict with keys instruction, images, masks, task"


def as_condition_unit(turn: Any, what: str) -> ConditionUnit:
    """``turn`` (a ConditionUnit, or a dict with key instruction and optional images,
    masks) as a ConditionUnit; ValueErrors name ``what`` (e.g. "history[2]")."""
    if isinstance(turn, ConditionUnit):
        return turn
    if not isinstance(turn, dict):
        raise ValueError(f"{what}: expected {TURN_EXPECTED}, got {_describe(turn)}")
    unknown = sorted(map(str, set(turn) - set(TURN_KEYS)))
    if unknown or "instruction" not in turn:
        problem = f"unknown keys {unknown}" if unknown else "no 'instruction'"
        raise ValueError(f"{what}: {problem}; expected {TURN_EXPECTED}")
    try:
        return ConditionUnit(**turn)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from e


def as_history(history: Any) -> list[ConditionUnit]:
    """None or a list of turns (``as_condition_unit``) as ConditionUnits, oldest first."""
    turns = _as_list(
        [] if history is None else history, "history", f"a list of turns ({TURN_EXPECTED})"
    )
    return [as_condition_unit(h, f"history[{i}]") for i, h in enumerate(turns)]


# ---------------------------------------------------------------------------
# Long-context Condition Unit
# ---------------------------------------------------------------------------


@dataclass
class LCU:
    """The current turn, earlier turns (oldest first) and, for training, the target.

    Frame 0 is the target; frames 1..F-1 are ``images`` (history first, then
    the current turn).
    """

    current: ConditionUnit
    """The turn being answered."""
    history: list[ConditionUnit] = field(default_factory=list)
    """Earlier turns, oldest first."""
    target: ImageLike | None = None
    """The image to produce (training): an RGB PIL image or a float tensor (3, H, W)."""
    target_mask: MaskLike | None = None
    """The target frame's mask channel in training, the target's size: a model input, not
    a loss weight (the loss covers the whole target, as released). None: the first input
    image's mask, as inference feeds it."""
    task: str = ""
    """A free task tag (the dataset's ``task`` field). One tag changes the inputs:
    ``"inpainting"`` sets the masked pixels of the input images to -1, as the released
    inpainting requests do; every other task reads its masks only as a mask channel. Left
    empty, it is ``current.task``; the two may not differ."""

    def __post_init__(self) -> None:
        if not isinstance(self.task, str):
            raise ValueError(f"task: expected a str, got {_describe(self.task)}")
        if not isinstance(self.current, ConditionUnit):
            raise ValueError(f"current: expected a ConditionUnit, got {_describe(self.current)}")
        # the current turn's tag is the LCU's: one given on the turn alone is taken (it
        # was ignored, and an inpainting request ran without its fill), two must agree
        if self.current.task and not self.task:
            self.task = self.current.task
        elif self.current.task and self.current.task != self.task:
            raise ValueError(
                f"task: the LCU's task is {self.task!r} but its current turn's is "
                f"{self.current.task!r}; give one (the current turn's tag is the LCU's task)"
            )
        self.history = [] if self.history is None else _as_list(self.history, "history")
        for i, cu in enumerate(self.history):
            if not isinstance(cu, ConditionUnit):
                raise ValueError(f"history[{i}]: expected a ConditionUnit, got {_describe(cu)}")
        total = sum(len(cu.images) for cu in self.turns)
        if total > MAX_INPUT_IMAGES:
            raise ValueError(
                f"an LCU holds at most {MAX_INPUT_IMAGES} input images over all turns "
                f"({MAX_FRAMES} frames with the target), got {total}"
            )
        if self.target is not None:
            size = _check_image(self.target, "target")
            if self.target_mask is not None:
                _check_mask(self.target_mask, "target_mask", size)
        elif self.target_mask is not None:
            raise ValueError("target_mask given without a target")

    # -- turns and images ----------------------------------------------------

    @property
    def turns(self) -> list[ConditionUnit]:
        """All turns, oldest first: ``history + [current]``."""
        return [*self.history, self.current]

    @property
    def images(self) -> list[ImageLike]:
        """All condition images, oldest turn first; image k is frame k + 1."""
        return [im for cu in self.turns for im in cu.images]

    @property
    def masks(self) -> list[MaskLike | None]:
        """One mask (or None) per entry of ``images``."""
        return [mk for cu in self.turns for mk in cu.masks]

    @property
    def num_frames(self) -> int:
        """F = 1 (target) + number of condition images."""
        return 1 + sum(len(cu.images) for cu in self.turns)

    def _first_images(self) -> list[int]:
        """Global index of each turn's first image (cumulative image counts)."""
        firsts, g = [], 0
        for cu in self.turns:
            firsts.append(g)
            g += len(cu.images)
        return firsts

    # -- texts and indicators ------------------------------------------------

    def instructions(self) -> list[str]:
        """One instruction per turn (oldest first) with references renamed to global names.

        In a turn whose first image has global index g, ``{image}`` becomes
        ``image_name(g)`` and ``{imageJ}`` becomes ``image_name(g + J)``, in one
        regex pass. When each history turn holds one image, turn I starts at
        g = I, so this equals the released rule (``{image}`` in the I-th prompt,
        I > 0, becomes ``{imageI}``). The released rule leaves ``{imageJ}`` in
        the current prompt untouched and miscounts after history turns with
        zero or several images; this rule does not.
        """
        return [cu.renamed_instruction(g) for cu, g in zip(self.turns, self._first_images())]

    def frame_turns(self) -> list[int]:
        """Index into ``turns`` of the instruction paired with each frame.

        Frame 0 (target) -> the current turn; frame k >= 1 -> the turn that
        ``images[k - 1]`` belongs to. Lets a caller encode each instruction once.
        """
        owners = [t for t, cu in enumerate(self.turns) for _ in cu.images]
        return [len(self.history), *owners]

    def frame_texts(self) -> list[str]:
        """The (renamed) instruction paired with each frame; ``len == num_frames``."""
        texts = self.instructions()
        return [texts[t] for t in self.frame_turns()]

    def indicator_rows(self) -> list[int]:
        """Indicator-table row of each frame: target -> F - 1, condition frame k -> k - 1."""
        f = self.num_frames
        return [f - 1, *range(f - 1)]
