"""Mined pairs as an LCU dataset (docs/DATA.md): one one-turn LCU per pair, source -> target.

Each record names the two images by their paths relative to the manifest's directory
(the images stay where they are; keep the image and output directories together when
moving them), carries the caller's ``task`` tag, a placeholder instruction from ``PLACEHOLDERS``
(``scripts/write_instructions.py`` writes real ones) and ``meta``:

    {"source_id": "a/x.jpg", "target_id": "a/y.jpg", "cluster": 12, "component": 40,
     "set": 3, "scores": {"cosine": 0.93, "turn2": 0.81, "pixel_diff": 0.07},
     "instruction_source": "placeholder"}

>>> PLACEHOLDERS["style"], placeholder_instruction("my_task")
('change the style of {image}', 'edit {image}')
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ace.atomic import atomic_write
from ace.data.collect.pairing import PairingResult
from ace.data.manifest import MANIFEST

PLACEHOLDERS: dict[str, str] = {
    "semantic_edit": "edit {image}",
    "style": "change the style of {image}",
    "background": "change the background of {image}",
    "repaint": "repaint part of {image}",
}
"""Placeholder instruction per task; any other task gets ``DEFAULT_PLACEHOLDER``."""

DEFAULT_PLACEHOLDER = "edit {image}"


def placeholder_instruction(task: str) -> str:
    """The placeholder instruction of ``task``."""
    return PLACEHOLDERS.get(task, DEFAULT_PLACEHOLDER)


def _rounded(v: float) -> float | None:
    return None if math.isnan(v) else round(float(v), 4)


def pair_records(
    result: PairingResult,
    out_dir: str | os.PathLike,
    image_root: str | os.PathLike,
    task: str,
    *,
    instruction: str | None = None,
    both_directions: bool = False,
) -> Iterator[dict[str, Any]]:
    """The manifest records of ``result``'s pairs, one at a time, paths relative to
    ``out_dir``.

    Pair (i, j) becomes source i -> target j (and j -> i too with ``both_directions``).
    ``instruction`` replaces the task's placeholder for every record.
    """
    out = Path(os.path.abspath(out_dir))
    root = Path(os.path.abspath(image_root))
    text = placeholder_instruction(task) if instruction is None else instruction
    rel = {}

    def path(i: int) -> str:
        if i not in rel:
            rel[i] = Path(os.path.relpath(root / result.ids[i], out)).as_posix()
        return rel[i]

    for p, (i, j) in enumerate(result.pairs.tolist()):
        scores = {
            "cosine": _rounded(result.cosine[p]),
            "turn2": _rounded(result.score[p]),
            "pixel_diff": _rounded(result.pixel_diff[p]),
        }
        for src, tgt in [(i, j), (j, i)] if both_directions else [(i, j)]:
            meta = {
                "source_id": result.ids[src],
                "target_id": result.ids[tgt],
                "cluster": int(result.cluster[src]),
                "component": int(result.component[src]),
                "set": int(result.pair_set[p]),
                "scores": scores,
                "instruction_source": "placeholder" if instruction is None else "given",
            }
            turn = {"instruction": text, "images": [path(src)], "masks": [None]}
            yield {
                "turns": [turn],
                "target": path(tgt),
                "target_mask": None,
                "task": task,
                "meta": meta,
            }


def write_pair_manifest(
    result: PairingResult,
    out_dir: str | os.PathLike,
    image_root: str | os.PathLike,
    task: str,
    *,
    instruction: str | None = None,
    both_directions: bool = False,
) -> Path:
    """Write ``out_dir/manifest.jsonl`` atomically (temporary file, then rename); its path.

    An existing manifest there is replaced. Validate it with
    ``ace.data.manifest.LCUManifest(out_dir).validate()``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:  # record by record: no list of every pair in memory
        records = pair_records(
            result, out, image_root, task, instruction=instruction, both_directions=both_directions
        )
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    return atomic_write(out / MANIFEST, write)
