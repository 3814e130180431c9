"""Instructions for collected pairs: templates per task family, and the text rules that LLM
rewrites and captioner outputs must pass.

Three sources of instructions, as in the ACE paper (section 3):

- **templates** (this module): ``TEMPLATES[task]`` holds phrasings of a task family with
  image references (``{image}``, ``{image1}``, as in ``ace.lcu``) and named slots
  (``{object}``, ``{color}``, ...; see ``SLOTS``); ``template_instruction`` picks one with a
  seeded generator and fills it;
- **LLM rewrites** (``ace.data.collect.rewriter.LLMRewriter``): paraphrases of an
  instruction by a local text-generation model, kept only if they pass
  ``rejection_reason`` (same image references, not a near-duplicate);
- **pair captions** (``ace.data.collect.captioner.VLMPairCaptioner``): a vision-language
  model describes the change from a source image to a target image.

The model classes are importable from here too (loaded lazily, so templates need no
transformers import).

>>> template_instruction("recolor", 0, object="car", color="red")
'recolor the car in {image} so that it is red'
>>> template_instruction("add", 1, object="apple")
'put an apple in {image}'
>>> normalize_instruction("Make {image}   RED!")
'make {image} red'
>>> rejection_reason("make {image} red", "Make {image} red.")
'duplicate of the instruction'
>>> rejection_reason("paint the picture red", "make {image} red")
'image references differ: {image} missing'
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

import numpy as np

from ace.lcu import MAX_INPUT_IMAGES, image_name

# ---------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------

SLOTS: dict[str, str] = {
    "object": "the thing edited, a noun phrase without article: 'red car', 'dog'",
    "new_object": "what replaces the object, a noun phrase without article: 'bicycle'",
    "color": "a colour: 'red', 'dark green'",
    "background": "a new background with its article: 'a snowy street', 'the beach'",
    "style": "an art style: 'watercolor', 'Van Gogh'",
    "caption": "a description of the picture: 'a red car on a snowy street'",
    "change": "an imperative edit: 'make the man smile'",
    "where": "a place in the picture: 'on the left', 'at the top'",
}
"""Every slot a template may use, with the form its value should take. A template field
``{a_NAME}`` is slot ``NAME`` with "a" or "an" in front (unless it starts with a determiner)."""

TASK_IMAGES: dict[str, int] = {
    "text_to_image": 0,
    "semantic_edit": 1,
    "recolor": 1,
    "background": 1,
    "add": 1,
    "remove": 1,
    "replace": 1,
    "repaint": 1,
    "inpainting": 1,
    "style": 1,
    "edge_map": 1,
    "edge_to_image": 1,
    "segmentation_map": 1,
    "segmentation_to_image": 1,
    "soft_edge_map": 1,
    "soft_edge_to_image": 1,
    "depth_map": 1,
    "depth_to_image": 1,
    "grayscale": 1,
    "colorize": 1,
    "extract": 1,
    "merge": 2,
    "reference": 2,
    "multi_turn": 1,
}
"""How many images the current turn of each task holds; every template of the task names
each of them (``{image}`` first, then ``{image1}``)."""

# Templates without slots exist only where they are true of every pair of the task (a
# generic "remove the main object" would often be wrong); the others need their slots.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "text_to_image": (
        "{caption}",
        "a picture of {caption}",
        "draw {caption}",
        "generate an image of {caption}",
    ),
    "semantic_edit": (
        "{change} in {image}",
        "edit {image}: {change}",
        "in {image}, {change}",
        "take {image} and {change}",
    ),
    "recolor": (
        "make the {object} in {image} {color}",
        "change the colour of the {object} in {image} to {color}",
        "in {image}, paint the {object} {color}",
        "recolor the {object} in {image} so that it is {color}",
        "make the main object in {image} {color}",
        "change the colour of the main subject of {image} to {color}",
    ),
    "background": (
        "change the background of {image} to {background}",
        "replace the background in {image} with {background}, keeping the foreground",
        "put the subject of {image} in front of {background}",
        "give {image} {background} as its background",
    ),
    "add": (
        "add {a_object} to {image}",
        "put {a_object} in {image}",
        "in {image}, draw {a_object}",
        "{image} needs {a_object}",
        "add {a_object} {where} in {image}",
        "in {image}, draw {a_object} {where}",
    ),
    "remove": (
        "remove the {object} from {image}",
        "delete the {object} in {image}",
        "take the {object} out of {image}",
        "erase the {object} from {image}, leaving the background",
    ),
    "replace": (
        "replace the {object} in {image} with {a_new_object}",
        "swap the {object} in {image} for {a_new_object}",
        "in {image}, turn the {object} into {a_new_object}",
        "replace the main object of {image} with {a_new_object}",
    ),
    "repaint": (
        "fill the masked region of {image} with {a_object}",
        "repaint the masked area of {image}: draw {a_object} there",
        "inside the mask on {image}, paint {a_object}",
    ),
    "inpainting": (
        "fill in the masked region of {image}",
        "inpaint the masked area of {image}",
        "complete the missing part of {image} naturally",
        "fill the masked region of {image} with {caption}",
        "inpaint the masked area of {image} with {caption}",
    ),
    "style": (
        "redraw {image} in the style of {style}",
        "render {image} in {style} style",
        "apply the {style} style to {image}",
        "turn {image} into {style} art",
    ),
    "edge_map": (
        "draw the edge map of {image}",
        "detect the edges in {image}",
        "turn {image} into a Canny edge map",
        "extract the outlines of {image} as white lines on black",
    ),
    "edge_to_image": (
        "turn the edge map {image} into a realistic picture",
        "generate an image that follows the edges in {image}",
        "turn the edge map {image} into a picture: {caption}",
        "{caption}, following the edges in {image}",
        "use the outlines in {image} to draw {caption}",
    ),
    "segmentation_map": (
        "make a segmentation map of {image}",
        "segment the objects in {image}",
        "label every region of {image} with its class colour",
    ),
    "segmentation_to_image": (
        "turn the segmentation map {image} into a realistic picture",
        "generate an image laid out like the segmentation map {image}",
        "render the segmentation map {image} as {caption}",
        "{caption}, laid out like {image}",
        "fill in the segmentation {image}: {caption}",
    ),
    "soft_edge_map": (
        "draw the soft edge map of {image}",
        "extract the soft edges of {image}",
        "turn {image} into a soft edge map",
    ),
    "soft_edge_to_image": (
        "turn the soft edge map {image} into a realistic picture",
        "generate an image that follows the soft edges in {image}",
        "turn the soft edge map {image} into a picture: {caption}",
        "{caption}, following the soft edges in {image}",
    ),
    "depth_map": (
        "estimate the depth of {image}",
        "make a depth map of {image}",
        "turn {image} into a depth map",
    ),
    "depth_to_image": (
        "turn the depth map {image} into a realistic picture",
        "generate an image with the depth layout of {image}",
        "turn the depth map {image} into a picture: {caption}",
        "{caption}, with the depth layout of {image}",
    ),
    "grayscale": (
        "make {image} black and white",
        "convert {image} to grayscale",
        "remove all colour from {image}",
        "desaturate {image} completely",
    ),
    "colorize": (
        "colorize {image}",
        "add natural colours to the black-and-white picture {image}",
        "restore the colours of the grayscale photo {image}",
        "turn {image} into a colour picture",
    ),
    "extract": (
        "extract the {object} from {image}",
        "cut the {object} out of {image}",
        "keep only the {object} from {image}",
        "extract the {object} from {image} onto {background}",
        "cut the {object} out of {image} and place it on {background}",
    ),
    "merge": (
        "merge the object of {image1} into {image}",
        "paste the layer {image1} onto {image}",
        "add the object in {image1} to {image}",
        "put the {object} from {image1} into {image} at the same place",
        "paste the {object} of {image1} onto {image}, keeping its position",
    ),
    "reference": (
        "combine the subjects of {image} and {image1} in one new picture",
        "draw the objects of {image} and {image1} together in a new scene",
        "{caption}, using the subjects of {image} and {image1}",
        "using the objects of {image} and {image1}, draw {caption}",
    ),
    "multi_turn": (
        "now {change} in {image}",
        "next, {change} in {image}",
        "and then, in {image}, {change}",
    ),
}
"""Phrasings per task family; the current turn of a task holds ``TASK_IMAGES[task]`` images."""

_IMAGE_FIELD = re.compile(r"image\d*")
_DETERMINERS = frozenset((
    "a", "an", "the", "some", "any", "this", "that", "these", "those", "my", "your", "his",
    "her", "its", "our", "their", "one", "two", "three", "four", "five", "six", "seven",
    "eight", "nine", "ten", "several", "many",
))  # fmt: skip


@cache
def template_slots(template: str) -> frozenset[str]:
    """The slots a template fills: ``{a_object}`` counts as ``object``; image fields do not."""
    names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    return frozenset(
        n[2:] if n.startswith("a_") else n for n in names if not _IMAGE_FIELD.fullmatch(n)
    )


_VOWEL_SOUND = re.compile(r"^(?:hour|honest|honou?r|heir)|^[aeiou]")
"""Words spoken with a vowel first: a vowel letter, or a silent h ("an hour")."""
_CONSONANT_SOUND = re.compile(r"^(?:uni(?![dmnr])|use|usu|uku|ur[ai]|eu|ewe|one(?!r)|once|ufo)")
"""Vowel letters spoken as a consonant: "a unicorn", "a European car", "a one-way sign"."""


def with_article(phrase: str) -> str:
    """``phrase`` with "a" or "an" in front, by how its first word sounds (its first letter,
    and the common exceptions: "an hour", "a unicorn"), unless it starts with a
    determiner or a digit: "apple" -> "an apple", "two cats" -> "two cats"."""
    first = phrase.split()[0].lower() if phrase.split() else ""
    if first in _DETERMINERS or first[:1].isdigit():
        return phrase
    vowel = bool(_VOWEL_SOUND.match(first)) and not _CONSONANT_SOUND.match(first)
    return ("an " if vowel else "a ") + phrase


def _check_slots(task: str, slots: dict[str, Any]) -> dict[str, str]:
    if task not in TEMPLATES:
        raise ValueError(f"unknown task {task!r}; tasks with templates: {', '.join(TEMPLATES)}")
    given = {}
    for name, value in slots.items():
        if name not in SLOTS:
            raise ValueError(f"unknown slot {name!r}; slots: {', '.join(SLOTS)}")
        if value is None:
            continue  # absent
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"slot {name!r} must be a non-empty string, got {value!r}")
        if image_refs(value):
            raise ValueError(f"slot {name!r} contains an image reference: {value!r}")
        if "{" in value or "}" in value:  # "{ Image }", "{x}": the LCU check refuses them
            raise ValueError(f"slot {name!r} contains a brace: {value!r}")
        given[name] = " ".join(value.split())
    return given


def templates_for(task: str, **slots: str | None) -> tuple[str, ...]:
    """The templates of ``task`` that the given slots fill best: those whose slots are all
    given, using as many of them as any such template does. Slots no template of the task
    uses are ignored, ``None`` counts as absent.

    ValueError for an unknown task or slot name, or when no template can be filled (naming
    the missing slots).

    >>> templates_for("extract", object="cat")
    ('extract the {object} from {image}', 'cut the {object} out of {image}', 'keep only the {object} from {image}')
    """
    given = set(_check_slots(task, slots))
    fits = [t for t in TEMPLATES[task] if template_slots(t) <= given]
    if not fits:
        missing = min((sorted(template_slots(t) - given) for t in TEMPLATES[task]), key=len)
        names = ", ".join(repr(m) for m in missing)
        have = ", ".join(sorted(given)) or "none"
        raise ValueError(f"task {task!r} needs slot(s) {names} (given: {have})")
    most = max(len(template_slots(t)) for t in fits)
    return tuple(t for t in fits if len(template_slots(t)) == most)


def fill_template(template: str, **slots: str | None) -> str:
    """Fill a template's slots (and ``{a_NAME}`` forms); image fields stay as they are."""
    values = {k: " ".join(v.split()) for k, v in slots.items() if v is not None}
    if missing := sorted(template_slots(template) - set(values)):
        raise ValueError(f"template {template!r} needs slot(s) {', '.join(map(repr, missing))}")
    fields = {image_name(i)[1:-1]: image_name(i) for i in range(10)}  # image -> "{image}"
    fields |= values | {f"a_{k}": with_article(v) for k, v in values.items()}
    return template.format(**fields)


def template_instruction(task: str, rng: np.random.Generator | int, **slots: str | None) -> str:
    """One instruction for ``task``: a template of ``templates_for(task, **slots)`` chosen
    with ``rng`` (a numpy Generator, or an int seed) and filled.

    >>> template_instruction("grayscale", np.random.default_rng(3))
    'desaturate {image} completely'
    """
    candidates = templates_for(task, **slots)
    rng = np.random.default_rng(rng) if isinstance(rng, (int, np.integer)) else rng
    return fill_template(candidates[int(rng.integers(len(candidates)))], **slots)


# ---------------------------------------------------------------------------
# Text rules: references, normalisation, near-duplicates, cleaning model output
# ---------------------------------------------------------------------------

_REF = re.compile(r"\{image\d*\}")
_LOOSE_REF = re.compile(r"\{\s*image\s*(\d*)\s*\}", re.IGNORECASE)
_TOKEN = re.compile(r"\{image\d*\}|[^\W_]+")


def image_refs(text: str) -> frozenset[str]:
    """The set of image references in ``text``: ``{"{image}", "{image1}"}``."""
    return frozenset(_REF.findall(text))


def normalize_instruction(text: str) -> str:
    """Lowercase words and image references, punctuation and extra spaces dropped."""
    return " ".join(_TOKEN.findall(text.lower()))


def token_jaccard(a: str, b: str) -> float:
    """Jaccard similarity of the normalised word sets of two texts (1.0 for two empty ones)."""
    x, y = set(normalize_instruction(a).split()), set(normalize_instruction(b).split())
    return len(x & y) / len(x | y) if x | y else 1.0


def is_near_duplicate(a: str, b: str, threshold: float = 0.8, char_threshold: float = 0.95) -> bool:
    """Equal after ``normalize_instruction``, or word-set Jaccard at least ``threshold``
    (word order and one word in five do not make a new instruction), or character
    similarity (difflib ratio) of the normalised texts at least ``char_threshold``
    (spelling variants: "colour"/"color", "car"/"cars").

    >>> is_near_duplicate("in {image}, make the car red", "make the car in {image} red")
    True
    >>> is_near_duplicate("make the car in {image} red", "paint the car in {image} red")
    False
    """
    na, nb = normalize_instruction(a), normalize_instruction(b)
    if na == nb:
        return True
    ratio = difflib.SequenceMatcher(None, na, nb, autojunk=False).ratio()
    return token_jaccard(a, b) >= threshold or ratio >= char_threshold


_PREFIX = re.compile(
    r"^(?:(?:here\s+is|here's)\b[^:]*:"  # "Here is a rewrite: ..."
    r"|(?:the\s+)?(?:new\s+|rewritten\s+|paraphrased\s+)?"
    r"(?:instruction|rewrite|rewritten|paraphrase|answer|output|edit|caption|response)"
    r"\s*(?:\d+\s*)?(?::|-(?=\s)))\s*",  # "Rewrite:", "Instruction 2 -"; not "output-oriented"
    re.IGNORECASE,
)
_BULLET = re.compile(r"^(?:[-*\u2022]|\d+[.)])\s+")
_QUOTES = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb"}


def clean_generation(text: str) -> str:
    """One instruction from a model's raw output: the first line that is not a preamble
    ("Here are some rewrites:"), with bullets, prefixes ("Rewrite:", "Instruction 2 -") and
    surrounding quotes removed, spaces collapsed, and loose references (``{ Image }``,
    ``{image 2}``) respelled ``{image}``, ``{image2}``. A reference past the last image
    name (``{ image 12 }``) is respelled ``{image12}`` too, never raises: it is no image of
    any instruction, so ``rejection_reason`` rejects the candidate. Pure; "" when nothing
    is left.

    >>> clean_generation('Sure! Here is a rewrite:\\n  1. "Rewrite: paint { Image } red"\\nmore')
    'paint {image} red'
    >>> clean_generation("paint { image 12 } red")
    'paint {image12} red'
    """
    lines = [" ".join(line.split()) for line in text.splitlines()]
    lines = [line for line in lines if line]
    while len(lines) > 1 and lines[0].endswith(":"):
        lines.pop(0)  # a preamble that announces the answer on the next line
    out = lines[0] if lines else ""
    for _ in range(4):  # layered wrappers: 1. "Rewrite: '...'"
        before = out
        out = _BULLET.sub("", out)
        out = _PREFIX.sub("", out)
        if len(out) >= 2 and _QUOTES.get(out[0]) == out[-1]:
            out = out[1:-1].strip()
        elif out[:1] in _QUOTES and _QUOTES[out[0]] not in out[1:]:
            out = out[1:].strip()  # an opening quote whose closing one was cut off
        if out == before:
            break
    return _LOOSE_REF.sub(lambda m: _respell(m.group(1)), out).strip()


def _respell(digits: str) -> str:
    """A loose reference's digits as a reference: "" or "0" -> {image}, "02" -> {image2},
    "12" -> {image12} (no image has that name: the candidate is then rejected)."""
    i = int(digits or 0)
    return image_name(i) if i <= MAX_INPUT_IMAGES else f"{{image{i}}}"


STRAY_BRACE = re.compile(r"\{\{|\}\}|\{(?!image\d*\})|(?<!\{image)(?<!\{image\d)\}")
"""A brace that is not part of a single ``{image}`` / ``{imageN}`` reference."""
_CHATTER = (
    re.compile(r"^\W*(?:sure|certainly|of course|okay|ok)\b\s*[,!.:]", re.IGNORECASE),
    re.compile(r"\bhere(?:'s| is| are)\b", re.IGNORECASE),
    re.compile(
        r"\b(?:rewritten|paraphrased|revised)\s+(?:instruction|version|sentence|text)s?\b",
        re.IGNORECASE,
    ),
    re.compile(r"\bi(?:'ve| have)?\s+(?:kept|rewrote|rewritten|changed|replaced)\b", re.IGNORECASE),
)
"""Phrases of a model talking about the task rather than doing it ("Sure! Here is the
rewritten instruction: ...", "I kept the placeholder"); English only. A candidate with
one the original lacks is rejected; plain words such as "make sure" or "rewrite the sign"
are not chatter."""


def _chatter(text: str) -> list[str]:
    return [m.group(0).strip(" ,!.:").lower() for p in _CHATTER if (m := p.search(text))]


def rejection_reason(
    candidate: str, original: str, accepted: Sequence[str] = (), threshold: float = 0.8
) -> str | None:
    """Why a cleaned ``candidate`` cannot be a rewrite of ``original``, or None if it can:
    it is empty, its set of image references differs from the original's (a reference
    dropped or added), it has braces that are no image reference and not in the original
    (an unfilled ``{color}``), it talks about the task (``_CHATTER``), or it is a
    near-duplicate (``is_near_duplicate``) of the original or of an ``accepted`` rewrite."""
    if not normalize_instruction(candidate):
        return "empty"
    want, got = image_refs(original), image_refs(candidate)
    if want != got:
        missing = ", ".join(sorted(want - got))
        extra = ", ".join(sorted(got - want))
        return "image references differ: " + "; ".join(
            p for p in (missing and f"{missing} missing", extra and f"{extra} added") if p
        )
    if Counter(STRAY_BRACE.findall(candidate)) - Counter(STRAY_BRACE.findall(original)):
        return "braces that are no image reference"  # an unfilled "{color}", "{{image}}"
    chatter = [c for c in _chatter(candidate) if c not in _chatter(original)]
    if chatter:  # "Sure! Here is the rewritten instruction: ..." in one line
        return "talks about the task: " + ", ".join(chatter)
    if is_near_duplicate(candidate, original, threshold):
        return "duplicate of the instruction"
    if any(is_near_duplicate(candidate, a, threshold) for a in accepted):
        return "duplicate of an earlier rewrite"
    return None


def select_rewrites(
    original: str,
    candidates: Iterable[str],
    n: int,
    accepted: Sequence[str] = (),
    threshold: float = 0.8,
) -> tuple[list[str], dict[str, int]]:
    """Clean raw ``candidates`` (``clean_generation``) and keep those that pass
    ``rejection_reason`` until ``n`` rewrites are held, ``accepted`` ones included (they come
    first). Returns the rewrites and the count of each rejection reason (the reference
    details folded into "image references differ").

    >>> select_rewrites("make {image} red", ["Make {image} red.", "paint {image} red",
    ...                 "paint {image}  red!", "turn it red", "colour {image} in red"], 5)
    (['paint {image} red', 'colour {image} in red'], {'duplicate of the instruction': 1, 'duplicate of an earlier rewrite': 1, 'image references differ': 1})
    """
    kept, reasons = list(accepted), {}
    for raw in candidates:
        if len(kept) >= n:
            break
        text = clean_generation(raw)
        reason = rejection_reason(text, original, kept, threshold)
        if reason is None:
            kept.append(text)
        else:
            key = reason.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    return kept, reasons


def __getattr__(name: str) -> Any:
    """The model classes, imported on first use (they import torch and transformers)."""
    if name == "LLMRewriter":
        from ace.data.collect.rewriter import LLMRewriter

        return LLMRewriter
    if name in ("PairCaptioner", "VLMPairCaptioner", "caption_to_instruction", "side_by_side"):
        from ace.data.collect import captioner

        return getattr(captioner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
