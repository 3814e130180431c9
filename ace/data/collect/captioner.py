"""Pair captioners: a vision-language model describes the change from a source image to a
target image, and the description becomes an instruction on ``{image}`` (the source), as
ACE's fine-tuned multimodal captioner does (paper, section 3).

Any object with ``describe(source, target) -> str`` is a ``PairCaptioner``;
``VLMPairCaptioner`` runs a transformers vision-language model from a local directory.

>>> caption_to_instruction("Answer: Make the car in the left image red.")
'Make the car in {image} red.'
>>> caption_to_instruction("the car is now red")
'in {image}, the car is now red'
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch
from PIL import Image

from ace.data.collect.instructions import STRAY_BRACE, clean_generation
from ace.data.collect.local_models import check_model_dir, load_local, resolve_device, seeded

Layout = Literal["side_by_side", "two_images"]

PAIR_PROMPTS: dict[str, str] = {
    "side_by_side": "The right half of this picture is an edited version of the left half. "
    "Write the editing instruction that turns the left image into the right image.",
    "two_images": "The second image is an edited version of the first. "
    "Write the editing instruction that turns the first image into the second.",
}
"""The default prompt of each layout."""

_SOURCE = re.compile(
    r"\b(?:the\s+)?(?:(?:left|first|source|original|input|initial)\s+(?:image|picture|photo)"
    r"|(?:image|picture|photo)\s+(?:on\s+the\s+left|1|one))\b",
    re.IGNORECASE,
)
_TARGET = re.compile(
    r"\b(?:the\s+)?(?:(?:right|second|target|edited|output|final|resulting)\s+(?:image|picture|photo)"
    r"|(?:image|picture|photo)\s+(?:on\s+the\s+right|2|two))\b",
    re.IGNORECASE,
)
_NUMBERED_REF = re.compile(r"\{image(\d+)\}")


@runtime_checkable
class PairCaptioner(Protocol):
    """Anything that writes an instruction turning ``source`` into ``target``, naming the
    source ``{image}``."""

    def describe(self, source: Image.Image, target: Image.Image) -> str: ...


def side_by_side(source: Image.Image, target: Image.Image) -> Image.Image:
    """One RGB image: ``source`` on the left, ``target`` scaled to the source's height (aspect
    kept) on the right."""
    source, target = source.convert("RGB"), target.convert("RGB")
    h = source.height
    if target.height != h:
        w = max(1, round(target.width * h / target.height))
        target = target.resize((w, h), Image.Resampling.BICUBIC)
    out = Image.new("RGB", (source.width + target.width, h))
    out.paste(source, (0, 0))
    out.paste(target, (source.width, 0))
    return out


def caption_to_instruction(text: str) -> str:
    """An instruction on ``{image}`` from a captioner's raw output: cleaned
    (``clean_generation``), phrases naming the source ("the left image", "the first
    picture", "image 1") replaced by ``{image}``, braces dropped from other references
    (``{image1}`` -> ``image1``: the turn has one image), and "in {image}, " put in front
    if the source is still not named. ValueError if nothing is left, or if it names the
    target ("the right image", "the second picture", "image 2"): the LCU holds only the
    source."""
    out = _NUMBERED_REF.sub(r"image\1", _SOURCE.sub("{image}", clean_generation(text)))
    if not out:
        raise ValueError(f"the captioner's output holds no instruction: {text!r}")
    named = _TARGET.search(out)
    if named:  # "make it like the right image": the turn holds the source alone
        raise ValueError(
            f"the captioner's output names the target image ({named.group(0)!r}), which an "
            f"instruction cannot show: {text!r}"
        )
    if STRAY_BRACE.search(out):  # an unfilled "{color}" or "{{image}}": no instruction
        raise ValueError(f"the captioner's output has braces that are no image reference: {text!r}")
    if "{image}" not in out:
        lower = len(out) > 1 and out[1].islower()  # keep acronyms: "TV ..." stays
        out = "in {image}, " + (out[0].lower() + out[1:] if lower else out)
    return out


class VLMPairCaptioner:
    """A transformers vision-language model that describes image pairs, from a local path.

    Args:
        model_path: a directory with the model and its processor (``save_pretrained``),
            loaded offline with ``AutoProcessor`` and ``AutoModelForImageTextToText``
            (``AutoModelForVision2Seq`` in transformers versions that lack it).
        prompt: the question asked (default: ``PAIR_PROMPTS[layout]``).
        layout: ``"side_by_side"`` puts the pair in one image (left: source, right: target)
            for single-image models such as BLIP; ``"two_images"`` passes two images and
            needs a processor with a chat template (Qwen2-VL, LLaVA-style models).
        device, dtype: where and in which dtype the model runs.
        max_new_tokens: the longest answer.
        seed: seeds sampling if ``generate_kwargs`` asks for it (the default is greedy).
        generate_kwargs: more arguments for ``model.generate``.
    """

    def __init__(
        self,
        model_path: str | Path,
        prompt: str | None = None,
        layout: Layout = "side_by_side",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_new_tokens: int = 48,
        seed: int = 0,
        generate_kwargs: dict | None = None,
    ) -> None:
        if layout not in PAIR_PROMPTS:
            raise ValueError(f"unknown layout {layout!r}; layouts: {', '.join(PAIR_PROMPTS)}")
        import transformers

        path = check_model_dir(model_path, "VLM")
        auto = getattr(transformers, "AutoModelForImageTextToText", None)
        auto = auto or transformers.AutoModelForVision2Seq
        self.processor = load_local(transformers.AutoProcessor.from_pretrained, path, "VLM")
        self.chat = bool(getattr(self.processor, "chat_template", None))
        if layout == "two_images" and not self.chat:
            raise ValueError(
                f"VLM: layout 'two_images' needs a processor with a chat template, and {path} "
                "has none; use layout 'side_by_side'"
            )
        kwargs = {} if dtype is None else {"dtype": dtype}
        model = load_local(auto.from_pretrained, path, "VLM", **kwargs)
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.dtype = dtype
        self.layout, self.prompt = layout, prompt or PAIR_PROMPTS[layout]
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.generate_kwargs = {"do_sample": False, **(generate_kwargs or {})}

    def _inputs(self, source: Image.Image, target: Image.Image) -> dict[str, torch.Tensor]:
        """The processor's tensors for the pair, on the model's device."""
        pair = [source.convert("RGB"), target.convert("RGB")]
        images = [side_by_side(*pair)] if self.layout == "side_by_side" else pair
        text = self.prompt
        if self.chat:
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
            messages = [{"role": "user", "content": content}]
            text = self.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        inputs = self.processor(images=images, text=text, return_tensors="pt")
        inputs = inputs.to(self.device)
        if self.dtype is not None:
            inputs = inputs.to(self.dtype)  # floating tensors only (pixel values)
        return dict(inputs)

    def answer(self, source: Image.Image, target: Image.Image) -> str:
        """The model's raw answer for the pair, without the prompt."""
        inputs = self._inputs(source, target)
        with seeded(self.seed, self.device), torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, **self.generate_kwargs
            )
        prompt_ids, ids = inputs["input_ids"][0], out[0]
        n = prompt_ids.shape[0]
        if ids.shape[0] >= n and torch.equal(ids[:n].cpu(), prompt_ids.cpu()):
            ids = ids[n:]  # decoder-only models return the prompt first
        decode = self.processor.decode
        text = decode(ids, skip_special_tokens=True).strip()
        echo = decode(prompt_ids, skip_special_tokens=True).strip()
        if echo and text.startswith(echo):  # BLIP-style: prompt echoed after a new BOS
            text = text[len(echo) :]
        return text.strip()

    def describe(self, source: Image.Image, target: Image.Image) -> str:
        """An instruction turning ``source`` into ``target``, naming the source ``{image}``
        (``caption_to_instruction`` of the model's answer); ValueError for an empty answer."""
        return caption_to_instruction(self.answer(source, target))
