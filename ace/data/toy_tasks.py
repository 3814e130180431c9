"""The toy world's task generators: one ``(rng, size) -> ToySample`` per family in ``TASKS``.

Every generator draws a scene, edits it with ``Edit``s (or maps it: edges,
segmentation, grayscale) and renders input and target, so targets are exact.
Instructions come from several templates per family; ``{image}`` / ``{image1}``
name the turn's images. Randomness uses only ``rng.integers`` and
``rng.random``, whose streams numpy keeps stable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np
from PIL import Image

from ace.data.toy import (
    BACKGROUND_COLORS,
    CELLS,
    COLORS,
    PATTERNS,
    SHAPES,
    SIZES,
    TASKS,
    Background,
    Edit,
    Obj,
    Scene,
    ToySample,
    cell_mask,
    changed,
    edge_map,
    grayscale,
    render,
    segmentation_map,
)
from ace.lcu import LCU, ConditionUnit

T = TypeVar("T")

# ---------------------------------------------------------------------------
# Random draws
# ---------------------------------------------------------------------------


def pick(rng: np.random.Generator, seq: Sequence[T]) -> T:
    """One element of ``seq``, uniformly."""
    return seq[int(rng.integers(len(seq)))]


def pick_distinct(rng: np.random.Generator, seq: Sequence[T], k: int) -> list[T]:
    """``k`` distinct elements of ``seq``, in draw order."""
    pool = list(seq)
    return [pool.pop(int(rng.integers(len(pool)))) for _ in range(k)]


def random_obj(rng: np.random.Generator, cell: str) -> Obj:
    return Obj(pick(rng, SHAPES), pick(rng, tuple(COLORS)), pick(rng, tuple(SIZES)), cell)


def random_background(rng: np.random.Generator, pattern: str | None = None) -> Background:
    return Background(pick(rng, tuple(BACKGROUND_COLORS)), pattern or pick(rng, PATTERNS))


def random_scene(rng: np.random.Generator, lo: int = 1, hi: int = 4) -> Scene:
    """A random background and ``lo..hi`` random objects in distinct cells."""
    n = int(rng.integers(lo, hi + 1))
    return Scene(random_background(rng), [random_obj(rng, c) for c in pick_distinct(rng, CELLS, n)])


# ---------------------------------------------------------------------------
# Descriptions
# ---------------------------------------------------------------------------

WHERE = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
"""How an instruction places something in a cell."""


def join(parts: Sequence[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def a_obj(o: Obj, where: bool = False) -> str:
    """ "a small red circle", with ``where``: "a small red circle at the top left"."""
    return f"a {o.size} {o.color} {o.shape}" + (f" {WHERE[o.cell]}" if where else "")


def the_obj(scene: Scene, o: Obj) -> str:
    """The shortest unambiguous reference to ``o`` in ``scene``: colour and shape, plus the
    size, else the place."""
    same = [p for p in scene.objects if (p.color, p.shape) == (o.color, o.shape)]
    if len(same) == 1:
        return f"the {o.color} {o.shape}"
    if sum(p.size == o.size for p in same) == 1:
        return f"the {o.size} {o.color} {o.shape}"
    return f"the {o.color} {o.shape} {WHERE[o.cell]}"


def a_background(bg: Background) -> str:
    return {
        "plain": f"a plain {bg.color} background",
        "stripes": f"a {bg.color} background with stripes",
        "checker": f"a {bg.color} checkered background",
        "dots": f"a {bg.color} background with dots",
    }[bg.pattern]


def describe(scene: Scene) -> str:
    """The whole scene: "a small red circle at the top left ... on a plain cream background"."""
    if not scene.objects:
        return f"nothing but {a_background(scene.background)}"
    return (
        join([a_obj(o, where=True) for o in scene.objects])
        + f" on {a_background(scene.background)}"
    )


# ---------------------------------------------------------------------------
# Edit proposals: (rng, scene, cells) -> (Edit, instruction) or None; only touch ``cells``
# ---------------------------------------------------------------------------

Proposal = tuple[Edit, str] | None

RECOLOR = (
    "make {ref} in {image} {color}",
    "change the colour of {ref} in {image} to {color}",
    "in {image}, paint {ref} {color}",
    "recolor {ref} in {image} so that it is {color}",
)
BACKGROUND = (
    "change the background of {image} to {bg}",
    "give {image} {bg}",
    "replace the background in {image} with {bg}, keeping the objects",
    "put the objects of {image} on {bg}",
)
ADD = (
    "add {obj} {where} in {image}",
    "put {obj} {where} of {image}",
    "in {image}, draw {obj} {where}",
    "{image} needs {obj} {where}",
)
REMOVE = (
    "remove {ref} from {image}",
    "delete {ref} in {image}",
    "take {ref} out of {image}",
    "erase {ref} from {image}, leaving the background",
)
REPLACE = (
    "replace {ref} in {image} with {obj}",
    "swap {ref} in {image} for {obj}",
    "in {image}, turn {ref} into {obj}",
)


def propose_recolor(rng: np.random.Generator, scene: Scene, cells: Sequence[str]) -> Proposal:
    objs = [o for o in scene.objects if o.cell in cells]
    if not objs:
        return None
    o = pick(rng, objs)
    color = pick(rng, [c for c in COLORS if c != o.color])
    text = pick(rng, RECOLOR).format(ref=the_obj(scene, o), color=color, image="{image}")
    return Edit(o.cell, replace(o, color=color)), text


def propose_background(rng: np.random.Generator, scene: Scene, cells: Sequence[str]) -> Proposal:
    old = scene.background
    bg = old
    while bg == old:
        bg = random_background(rng)
    return Edit(background=bg), pick(rng, BACKGROUND).format(bg=a_background(bg), image="{image}")


def propose_add(rng: np.random.Generator, scene: Scene, cells: Sequence[str]) -> Proposal:
    free = [c for c in scene.free_cells() if c in cells]
    if not free:
        return None
    o = random_obj(rng, pick(rng, free))
    text = pick(rng, ADD).format(obj=a_obj(o), where=WHERE[o.cell], image="{image}")
    return Edit(o.cell, o), text


def propose_remove(rng: np.random.Generator, scene: Scene, cells: Sequence[str]) -> Proposal:
    objs = [o for o in scene.objects if o.cell in cells]
    if not objs:
        return None
    o = pick(rng, objs)
    return Edit(o.cell, None), pick(rng, REMOVE).format(ref=the_obj(scene, o), image="{image}")


def propose_replace(rng: np.random.Generator, scene: Scene, cells: Sequence[str]) -> Proposal:
    objs = [o for o in scene.objects if o.cell in cells]
    if not objs:
        return None
    o = pick(rng, objs)
    new = replace(random_obj(rng, o.cell), shape=pick(rng, [s for s in SHAPES if s != o.shape]))
    text = pick(rng, REPLACE).format(ref=the_obj(scene, o), obj=a_obj(new), image="{image}")
    return Edit(o.cell, new), text


PROPOSERS: dict[str, Callable[[np.random.Generator, Scene, Sequence[str]], Proposal]] = {
    "recolor": propose_recolor,
    "background": propose_background,
    "add": propose_add,
    "remove": propose_remove,
    "replace": propose_replace,
}


def propose_any(
    rng: np.random.Generator, scene: Scene, cells: Sequence[str] = CELLS
) -> tuple[Edit, str]:
    """A random applicable edit (background edits always apply)."""
    kinds = list(PROPOSERS)
    while True:
        proposal = PROPOSERS[kinds.pop(int(rng.integers(len(kinds))))](rng, scene, cells)
        if proposal is not None:
            return proposal


# ---------------------------------------------------------------------------
# Sample assembly
# ---------------------------------------------------------------------------


def _sample(
    task: str,
    cu: ConditionUnit,
    target: Image.Image,
    mask: Image.Image | None = None,
    change: np.ndarray | None = None,
) -> ToySample:
    """A one-turn sample; ``change`` defaults to the difference from the first image."""
    if change is None:
        change = changed(cu.images[0], target)
    return ToySample(LCU(current=cu, target=target, target_mask=mask, task=task), change)


def _all(size: int) -> np.ndarray:
    return np.ones((size, size), bool)


def _edit_task(kind: str) -> Callable[[np.random.Generator, int], ToySample]:
    lo = 0 if kind == "add" else 1

    def generate(rng: np.random.Generator, size: int) -> ToySample:
        scene = random_scene(rng, lo, 4)
        edit, text = PROPOSERS[kind](rng, scene, CELLS)
        return _sample(
            kind, ConditionUnit(text, [render(scene, size)]), render(edit.apply(scene), size)
        )

    generate.__doc__ = f"One {kind!r} edit of a random scene."
    return generate


TEXT_TO_IMAGE = ("{desc}", "a picture of {desc}", "draw {desc}", "an image showing {desc}")
EDGE_MAP = (
    "draw the edge map of {image}",
    "detect the edges in {image}",
    "turn {image} into a Canny edge map",
    "extract the outlines of {image} as white lines on black",
)
SEG_MAP = (
    "make a segmentation map of {image}",
    "segment the shapes in {image}",
    "label every shape in {image} with its class colour",
)
EDGE_TO_IMAGE = (
    "turn the edge map {image} into a picture: {desc}",
    "{desc}, following the edges in {image}",
    "use the outlines in {image} to draw {desc}",
)
SEG_TO_IMAGE = (
    "render the segmentation map {image} as {desc}",
    "{desc}, laid out like {image}",
    "fill in the segmentation {image}: {desc}",
)
GRAYSCALE = (
    "make {image} black and white",
    "convert {image} to grayscale",
    "remove all colour from {image}",
    "desaturate {image} completely",
)


def text_to_image(rng: np.random.Generator, size: int) -> ToySample:
    scene = random_scene(rng)
    cu = ConditionUnit(pick(rng, TEXT_TO_IMAGE).format(desc=describe(scene)))
    return _sample("text_to_image", cu, render(scene, size), change=_all(size))


def _map_task(task: str) -> Callable[[np.random.Generator, int], ToySample]:
    """Image -> map (analysis) or map + description -> image (controllable generation)."""

    def generate(rng: np.random.Generator, size: int) -> ToySample:
        scene = random_scene(rng)
        image = render(scene, size)
        edges = task.startswith("edge")
        the_map = edge_map(image) if edges else segmentation_map(scene, size)
        if task.endswith("_map"):
            cu = ConditionUnit(pick(rng, EDGE_MAP if edges else SEG_MAP), [image])
            return _sample(task, cu, the_map, change=_all(size))
        text = pick(rng, EDGE_TO_IMAGE if edges else SEG_TO_IMAGE).format(
            desc=describe(scene), image="{image}"
        )
        return _sample(task, ConditionUnit(text, [the_map]), image, change=_all(size))

    generate.__doc__ = f"One {task!r} sample."
    return generate


def grayscale_task(rng: np.random.Generator, size: int) -> ToySample:
    image = render(random_scene(rng), size)
    return _sample("grayscale", ConditionUnit(pick(rng, GRAYSCALE), [image]), grayscale(image))


REPAINT = (
    "fill the masked region of {image} with {obj}",
    "repaint the masked area of {image}: draw {obj} there",
    "inside the mask on {image}, paint {obj}",
)
REPAINT_CLEAR = (
    "fill the masked region of {image} with just the background",
    "erase everything inside the mask on {image}",
    "repaint the masked area of {image} so that only the background shows",
)


def repaint(rng: np.random.Generator, size: int) -> ToySample:
    """Mask one cell's box; fill it with a new object or clear it. Outside the mask nothing moves."""
    scene = random_scene(rng)
    cell = pick(rng, CELLS)
    old = scene.at(cell)
    if old is not None and rng.random() < 0.3:
        new, text = None, pick(rng, REPAINT_CLEAR)
    else:
        new = old
        while new == old:
            new = random_obj(rng, cell)
        text = pick(rng, REPAINT).format(obj=a_obj(new), image="{image}")
    mask = cell_mask(cell, size)
    cu = ConditionUnit(text, [render(scene, size)], [mask])
    return _sample(
        "repaint", cu, render(Edit(cell, new).apply(scene), size), mask=cell_mask(cell, size)
    )


EXTRACT = (
    "extract {ref} from {image} onto {bg}",
    "cut {ref} out of {image} and place it on {bg}",
    "keep only {ref} from {image}, on {bg}",
)
MERGE = (
    "merge the object of {image1} into {image}",
    "put the {color} {shape} from {image1} into {image} at the same place",
    "paste the {shape} of {image1} onto {image}, keeping its position",
    "add the object in {image1} to {image}",
)


def extract(rng: np.random.Generator, size: int) -> ToySample:
    scene = random_scene(rng)
    o = pick(rng, scene.objects)
    bg = random_background(rng, "plain")
    while Scene(bg, [o]) == scene:  # the input itself: nothing to extract, or to score
        bg = random_background(rng, "plain")
    text = pick(rng, EXTRACT).format(ref=the_obj(scene, o), bg=a_background(bg), image="{image}")
    return _sample(
        "extract", ConditionUnit(text, [render(scene, size)]), render(Scene(bg, [o]), size)
    )


def merge(rng: np.random.Generator, size: int) -> ToySample:
    """{image1} holds one object on a plain background; it joins {image} in its own cell."""
    scene = random_scene(rng, 0, 3)
    o = random_obj(rng, pick(rng, scene.free_cells()))
    layer = render(Scene(random_background(rng, "plain"), [o]), size)
    text = pick(rng, MERGE).format(color=o.color, shape=o.shape, image="{image}", image1="{image1}")
    cu = ConditionUnit(text, [render(scene, size), layer])
    return _sample("merge", cu, render(Edit(o.cell, o).apply(scene), size))


REFERENCE = (
    "using the objects of {image} and {image1}, draw {placement} on {bg}",
    "compose a new picture on {bg}: {placement}",
    "{placement}, all on {bg}",
)


def reference(rng: np.random.Generator, size: int) -> ToySample:
    """Two source scenes of 1-2 objects (distinct colour-shape pairs); the target puts every
    object, same shape, colour and size, in a new cell on a new background."""
    kinds = pick_distinct(rng, [(s, c) for s in SHAPES for c in COLORS], 4)
    counts = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    sources, placed, parts = [], [], []
    new_cells = pick_distinct(rng, CELLS, sum(counts))
    for k, name in enumerate(("{image}", "{image1}")):
        objs = []
        for j, cell in enumerate(pick_distinct(rng, CELLS, counts[k])):
            shape, color = kinds[2 * k + j]
            o = Obj(shape, color, pick(rng, tuple(SIZES)), cell)
            objs.append(o)
            placed.append(replace(o, cell=new_cells[len(placed)]))
            parts.append(f"the {color} {shape} from {name} {WHERE[placed[-1].cell]}")
        sources.append(render(Scene(random_background(rng), objs), size))
    bg = random_background(rng)
    text = pick(rng, REFERENCE).format(
        placement=join(parts), bg=a_background(bg), image="{image}", image1="{image1}"
    )
    target = render(Scene(bg, placed), size)
    return _sample("reference", ConditionUnit(text, sources), target, change=_all(size))


# ---------------------------------------------------------------------------
# Multi-turn chains
# ---------------------------------------------------------------------------

UNDO = (
    "undo the previous edit of {image}",
    "revert {image} to how it was before the last change",
    "that last change to {image} was a mistake, take it back",
)
RESTORE_COLOR = (
    "give {ref} in {image} its original colour back",
    "make {ref} in {image} the colour it had at the start",
    "restore the first colour of {ref} in {image}",
)
BRING_BACK = (
    "put the object that was removed earlier back into {image}",
    "bring back the {shape} I deleted before, in {image}",
    "{image}: restore the object removed two steps ago, where it was",
)


@dataclass
class Chain:
    """A multi-turn request: a start scene and its edits, one instruction per edit."""

    start: Scene
    edits: list[Edit]
    instructions: list[str]
    kind: str
    """"edit" (the last turn is a plain edit), or a last turn that needs the history:
    "undo", "restore_color" (of a recoloured object), "bring_back" (a removed object)."""

    def scenes(self) -> list[Scene]:
        """The states: start, then after each edit."""
        out = [self.start]
        for e in self.edits:
            out.append(e.apply(out[-1]))
        return out


def make_chain(rng: np.random.Generator) -> Chain:
    """2-3 edits; three quarters of the 3-edit chains (45% of all) end with a turn that only
    the history explains."""
    start = random_scene(rng)
    n = 3 if rng.random() < 0.6 else 2
    kind = (
        pick(rng, ("undo", "restore_color", "bring_back"))
        if n == 3 and rng.random() < 0.75
        else "edit"
    )
    first = {"restore_color": "recolor", "bring_back": "remove"}.get(kind)
    e1, t1 = PROPOSERS[first](rng, start, CELLS) if first else propose_any(rng, start)
    s1 = e1.apply(start)
    edits, texts = [e1], [t1]
    if kind == "edit":
        for _ in range(n - 1):
            while True:  # a chain that returns to the start would have nothing to change
                e, t = propose_any(rng, s1)
                if e.apply(s1) != start:
                    break
            edits.append(e)
            texts.append(t)
            s1 = e.apply(s1)
        return Chain(start, edits, texts, kind)
    # e2 leaves e1's cell alone, so the last turn can still refer to what e1 did.
    e2, t2 = propose_any(rng, s1, [c for c in CELLS if c != e1.cell])
    s2 = e2.apply(s1)
    if kind == "undo":
        e3, t3 = e2.inverse(s1), pick(rng, UNDO)
    elif kind == "restore_color":
        o = s2.at(e1.cell)
        e3 = Edit(o.cell, replace(o, color=start.at(o.cell).color))
        t3 = pick(rng, RESTORE_COLOR).format(ref=the_obj(s2, o), image="{image}")
    else:
        o = start.at(e1.cell)
        e3, t3 = Edit(o.cell, o), _bring_back(pick(rng, BRING_BACK), o, s1, s2)
    return Chain(start, [e1, e2, e3], [t1, t2, t3], kind)


def _bring_back(template: str, o: Obj, before: Scene, after: Scene) -> str:
    """A ``BRING_BACK`` instruction that fits only ``o``, the object of the first removal,
    when the second edit (``before`` -> ``after``) removed an object too: "removed
    earlier" then fits both, and "the {shape}" both when they share a shape (then the
    colour is named too). Where nothing else tells them apart, "two steps ago" does."""
    removed = [g for g in before.objects if after.at(g.cell) is None]
    two_steps_ago = BRING_BACK[2]
    if "{shape}" in template:
        twins = [g for g in removed if g.shape == o.shape]
        if any(g.color == o.color for g in twins):
            template = two_steps_ago
        elif twins:
            template = template.replace("{shape}", f"{o.color} {{shape}}")
    elif removed and template != two_steps_ago:
        template = two_steps_ago
    return template.format(shape=o.shape, image="{image}")


def multi_turn(rng: np.random.Generator, size: int) -> ToySample:
    """History turn k holds the state before edit k; the current turn the state before the
    last edit; the target is the final state. What should change is what the last edit
    changes: earlier edits are already in the current turn's image."""
    chain = make_chain(rng)
    states = [render(s, size) for s in chain.scenes()]
    turns = [ConditionUnit(t, [im]) for t, im in zip(chain.instructions, states)]
    lcu = LCU(current=turns[-1], history=turns[:-1], target=states[-1], task="multi_turn")
    return ToySample(lcu, changed(states[-2], states[-1]))


GENERATORS: dict[str, Callable[[np.random.Generator, int], ToySample]] = {
    "text_to_image": text_to_image,
    "edge_map": _map_task("edge_map"),
    "segmentation_map": _map_task("segmentation_map"),
    "edge_to_image": _map_task("edge_to_image"),
    "segmentation_to_image": _map_task("segmentation_to_image"),
    "recolor": _edit_task("recolor"),
    "background": _edit_task("background"),
    "grayscale": grayscale_task,
    "add": _edit_task("add"),
    "remove": _edit_task("remove"),
    "replace": _edit_task("replace"),
    "repaint": repaint,
    "extract": extract,
    "merge": merge,
    "reference": reference,
    "multi_turn": multi_turn,
}
"""The generator of every family; its keys are exactly ``TASKS``."""

assert tuple(GENERATORS) == TASKS, "every task needs exactly one generator"
