"""Multi-turn editing: a session that keeps the history of an ACEPipeline's turns.

from ace.testing import tiny_pipeline
chat = tiny_pipeline().chat(height=64, width=64, num_inference_steps=4)
first = chat("a red circle")
second = chat("make {image} blue")  # {image} is the previous output
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ace.lcu import LCU, ConditionUnit

if TYPE_CHECKING:
    from ace.pipeline import ACEPipeline


class ChatSession:
    """Multi-turn editing that keeps the history.

    A turn without images edits the previous output, which it names ``{image}``. After
    each turn its CU (instruction, input images, masks) joins the history, so later
    instructions are read in the context of all earlier turns, as the released chat does.
    """

    def __init__(self, pipe: ACEPipeline, **defaults):
        if defaults.get("output_type", "pil") != "pil":
            raise ValueError(
                "a chat session returns PIL images: each output is the next turn's input"
            )
        self.pipe = pipe
        self.defaults = {"num_inference_steps": pipe.config.default_steps, **defaults}
        self.history: list[ConditionUnit] = []
        self.outputs: list = []

    def lcu(self, instruction: str, images=None, masks=None) -> LCU:
        """The LCU the next turn would run."""
        # only None or an empty list means "no images"; anything else build_lcu checks
        if self.outputs and (images is None or (isinstance(images, (list, tuple)) and not images)):
            images = [self.outputs[-1]]
        return self.pipe.build_lcu(instruction, images, masks, self.history)

    def __call__(self, instruction: str, images=None, masks=None, **kwargs):
        if kwargs.get("output_type", "pil") != "pil":
            raise ValueError(
                "a chat session returns PIL images: each output is the next turn's input"
            )
        lcu = self.lcu(instruction, images, masks)
        out = self.pipe(
            instruction,
            lcu.current.images,
            lcu.current.masks,
            history=self.history,
            **{**self.defaults, **kwargs},
        )
        self.history.append(lcu.current)
        self.outputs.append(out.images[0])
        return out.images[0]
