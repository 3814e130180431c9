"""Multi-turn editing: a session that keeps the history of an ACEPipeline's turns.

from ace.testing import tiny_pipeline
chat = tiny_pipeline().chat(height=64, width=64, num_inference_steps=4)
first = chat("a red circle")
second = chat("make {image} blue")  # {image} is the previous output
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import TYPE_CHECKING

from ace.lcu import LCU, MAX_INPUT_IMAGES, ConditionUnit
from ace.request import check_inputs, check_size

if TYPE_CHECKING:
    from ace.pipeline import ACEPipeline


class ChatSession:
    """Multi-turn editing that keeps the history.

    A turn without images edits the previous output, which it names ``{image}``; a turn
    that passes its own ``images`` reads those alone (pass ``chat.outputs[-1]`` among them
    to keep the previous output). After each turn its CU (instruction, input images, masks)
    joins the history, so later instructions are read in the context of earlier turns, as
    the released chat does. The model reads a history turn's instruction only beside its
    images, so a turn without images (text-to-image) is left out of later LCUs, as the
    released chat leaves it out of its history. The target's mask (and its size, unless the
    session sets ``height`` and ``width``) is that of the first image of the combined list
    (history first), as released: after an inpainting turn its region stays the target's
    mask until that turn leaves the history.

    An LCU holds at most ``MAX_INPUT_IMAGES`` (9) images over all its turns, so a turn
    reads the most recent history turns that fit beside its own images, and at most
    ``max_history`` of them (None: as many as fit; 0: none). Dropping the oldest turns
    renames the remaining images, which the model reads through the instructions, and
    can change the output size when the first image of the combined list goes.
    ``undo()`` forgets the last turn; ``reset()`` all of them.
    """

    def __init__(self, pipe: ACEPipeline, max_history: int | None = None, **defaults):
        _check_settings(pipe, defaults, "the session")
        per_turn = sorted(set(PER_TURN) & set(defaults))
        if per_turn:
            raise ValueError(
                f"{', '.join(per_turn)} belong to a turn, not to the session's defaults: "
                "pass them to each call (the session keeps the history itself)"
            )
        if max_history is not None and (
            isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 0
        ):
            raise ValueError(f"max_history must be None or an int >= 0, got {max_history!r}")
        params = inspect.signature(type(pipe).__call__).parameters
        self.pipe = pipe
        self.max_history = max_history
        self.defaults = {"num_inference_steps": pipe.config.default_steps, **defaults}
        # the settings, checked now rather than at the first turn
        d = {k: v.default for k, v in params.items() if k != "self"} | self.defaults
        check_inputs(
            d["num_inference_steps"], d["height"], d["width"], d["guidance_scale"],
            d["guidance_rescale"],
        )  # fmt: skip
        check_size(d["height"], d["width"], pipe.max_seq_len)
        self.history: list[ConditionUnit] = []
        self.outputs: list = []

    def lcu(self, instruction: str, images=None, masks=None, task: str | None = None) -> LCU:
        """The LCU the next turn would run (its history: the turns that fit)."""
        # only None or an empty list means "no images"; anything else build_lcu checks
        if self.outputs and (images is None or (isinstance(images, (list, tuple)) and not images)):
            images = [self.outputs[-1]]
        if task is None:
            task = self.defaults.get("task", "")
        n_current = len(images) if isinstance(images, (list, tuple)) else 0
        return self.pipe.build_lcu(instruction, images, masks, self._history(n_current), task)

    def _history(self, n_current: int) -> list[ConditionUnit]:
        """The most recent history turns with images (at most ``max_history``) whose images
        fit an LCU beside ``n_current`` images of the current turn."""
        read = [cu for cu in self.history if cu.images]  # no image, no frame to read its text
        if self.max_history is None:
            history = read
        else:  # the latest max_history turns ([-0:] would be all of them)
            history = read[-self.max_history :] if self.max_history else []
        while history and sum(len(cu.images) for cu in history) + n_current > MAX_INPUT_IMAGES:
            history = history[1:]
        return list(history)

    def __call__(self, instruction: str, images=None, masks=None, **kwargs):
        _check_settings(self.pipe, kwargs, "a turn")
        if "history" in kwargs:
            raise ValueError("a chat session keeps its own history: use the pipeline for one")
        lcu = self.lcu(instruction, images, masks, kwargs.get("task"))
        out = self.pipe(
            instruction,
            lcu.current.images,
            lcu.current.masks,
            history=lcu.history,
            **{**self.defaults, **kwargs},
        )
        # the turn's own task, and copies: drawing on an image passed in, or on the one
        # returned, must not change what later turns read
        own = replace(lcu.current, images=[_copy(x) for x in lcu.current.images], task=lcu.task)
        own.masks = [_copy(m) for m in own.masks]
        self.history.append(own)
        self.outputs.append(out.images[0].copy())
        return out.images[0]

    def undo(self) -> None:
        """Forget the last turn: its CU and its output (ValueError if there is none)."""
        if not self.history:
            raise ValueError("nothing to undo: the session has no turns")
        self.history.pop()
        self.outputs.pop()

    def reset(self) -> None:
        """Forget every turn; the defaults stay."""
        self.history.clear()
        self.outputs.clear()


PER_TURN = ("history", "images", "masks", "instruction")
"""Pipeline arguments that belong to a turn, not to the session's defaults."""


def _check_settings(pipe: ACEPipeline, settings: dict, where: str) -> None:
    """ValueError for an output other than PIL (each output is the next turn's input) and
    for a setting the pipeline does not take (a TypeError at the call otherwise)."""
    if settings.get("output_type", "pil") != "pil":
        raise ValueError("a chat session returns PIL images: each output is the next turn's input")
    known = set(inspect.signature(type(pipe).__call__).parameters) - {"self"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(
            f"unknown setting(s) {unknown} for {where}; the pipeline takes "
            f"{sorted(known - set(PER_TURN))}"
        )


def _copy(x):
    """A PIL image's ``copy()``, a tensor's ``clone()``; None stays None."""
    if x is None:
        return None
    return x.clone() if hasattr(x, "clone") else x.copy()
