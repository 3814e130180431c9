"""The LCU dataset format (docs/DATA.md): a JSONL manifest, one LCU per line, and PNGs.

Writing is atomic (a temporary directory renamed into place). Reading checks the
fields of every line up front and loads images lazily; every problem is a
``ValueError`` naming the line. ``python -m ace.data.manifest DIR`` validates a
dataset: counts per task, or the errors (exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from ace.images import open_image
from ace.lcu import LCU, ConditionUnit, ImageLike, MaskLike

MANIFEST = "manifest.jsonl"
"""The manifest's file name inside a dataset directory."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _to_pil(x: ImageLike | MaskLike, mode: str) -> Image.Image:
    """A PIL image of ``mode`` ("RGB" or "L") with no metadata, from a PIL image or tensor.

    Tensors: images (3, H, W) in [0, 1] and float masks in [0, 1] are scaled by 255 and
    rounded; bool masks map to 0/255; integer masks are taken as 0-255, or as 0/1 when
    their maximum is 1 (as ``ace.lcu`` reads them: 1 is inside).
    """
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype == torch.bool:
            t = t.to(torch.uint8) * 255
        elif t.is_floating_point():
            t = (t.float().clamp(0, 1) * 255).round()
        elif mode == "L" and t.numel() and t.max() <= 1:  # a 0/1 mask: stored as 0/255
            t = t.clamp(0, 1) * 255
        t = t.clamp(0, 255).to(torch.uint8)
        if mode == "RGB":
            x = Image.fromarray(t.permute(1, 2, 0).numpy(), "RGB")  # (3, H, W) -> (H, W, 3)
        else:
            x = Image.fromarray(t.reshape(t.shape[-2:]).numpy(), "L")  # (1, H, W) -> (H, W)
    x = x.convert(mode)
    return Image.frombytes(mode, x.size, x.tobytes())  # drops .info: no metadata in the PNG


def _save(x: ImageLike | MaskLike, mode: str, root: Path, rel: str) -> str:
    _to_pil(x, mode).save(root / rel, format="PNG")
    return rel


def write_lcu(lcu: LCU, root: Path, name: str) -> dict[str, Any]:
    """Save the LCU's images as PNGs under ``root/images/`` and return its JSON record.

    Files are ``images/{name}_t{turn}_i{k}.png`` (image k of a turn), ``..._m{k}.png``
    (its mask), ``images/{name}_target.png`` and ``images/{name}_target_mask.png``.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"name {name!r}: use letters, digits, '.', '_' or '-'")
    if lcu.target is None:
        raise ValueError("an LCU in a dataset needs a target")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    turns = []
    for t, cu in enumerate(lcu.turns):
        stem = f"images/{name}_t{t}"
        images = [_save(im, "RGB", root, f"{stem}_i{k}.png") for k, im in enumerate(cu.images)]
        masks = [
            None if mk is None else _save(mk, "L", root, f"{stem}_m{k}.png")
            for k, mk in enumerate(cu.masks)
        ]
        turn = {"instruction": cu.instruction, "images": images, "masks": masks}
        turns.append({**turn, "task": cu.task} if cu.task else turn)  # a history turn's tag
    mask, stem = lcu.target_mask, f"images/{name}_target"
    return {
        "turns": turns,
        "target": _save(lcu.target, "RGB", root, f"{stem}.png"),
        "target_mask": None if mask is None else _save(mask, "L", root, f"{stem}_mask.png"),
        "task": lcu.task,
    }


def write_manifest(
    samples: Iterable[LCU],
    root: Path,
    progress: bool = True,
    *,
    overwrite: bool = False,
    total: int | None = None,
) -> Path:
    """Write every LCU and ``root/manifest.jsonl``, atomically; return the manifest's path.

    Everything is built in a temporary directory next to ``root`` and renamed into
    place at the end, so an interrupted run leaves no half-written dataset (and, on
    an exception, no temporary directory). LCU i is named ``f"{i:06d}"``.
    """
    root = Path(os.path.realpath(root))  # a symlinked root: write where it points
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise ValueError(f"{root} exists and is not empty (overwrite=True replaces it)")
    created = [p for p in (root.parent, *root.parent.parents) if not p.exists()]
    root.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # mkdtemp would make it 0700
    tmp = root.parent / f".{root.name}.tmp-{token}"
    tmp.mkdir()
    try:
        total = len(samples) if total is None and hasattr(samples, "__len__") else total
        bar = tqdm(samples, total=total, disable=not progress, unit="LCU", desc=root.name)
        with open(tmp / MANIFEST, "w", encoding="utf-8", newline="\n") as f:
            for i, lcu in enumerate(bar):
                f.write(json.dumps(write_lcu(lcu, tmp, f"{i:06d}"), ensure_ascii=False) + "\n")
        if root.exists():  # replace: move the old one aside, then swap
            old = root.parent / f".{root.name}.old-{token}"
            os.replace(root, old)
            try:
                os.replace(tmp, root)
            except BaseException:
                os.replace(old, root)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # parents this call made, innermost first
            if p.exists() and not any(p.iterdir()):
                p.rmdir()
        raise
    return root / MANIFEST


def _check_record(record: Any, line: int) -> None:
    """Fields and types of one record (no file access); ValueError naming the line."""

    def fail(msg: str) -> None:
        raise ValueError(f"line {line}: {msg}")

    def need(value: Any, types: type | tuple, what: str, expected: str) -> None:
        if not isinstance(value, types) or isinstance(value, bool):
            got = json.dumps(value)
            fail(f"{what}: expected {expected}, got {got if len(got) <= 60 else got[:57] + '...'}")

    def fields(obj: Any, what: str, required: tuple, optional: tuple) -> None:
        need(obj, dict, what, "a JSON object")
        if missing := [k for k in required if k not in obj]:
            fail(f"{what}: missing field {missing[0]!r}")
        if unknown := sorted(set(obj) - {*required, *optional}):
            fail(f"{what}: unknown field(s) {unknown}")

    fields(record, "record", ("turns", "target", "task"), ("target_mask", "meta"))
    need(record["turns"], list, "turns", "a non-empty list of turns")
    if not record["turns"]:
        fail("turns: expected a non-empty list of turns, got []")
    for t, turn in enumerate(record["turns"]):
        w = f"turns[{t}]"
        fields(turn, w, ("instruction", "images"), ("masks", "task"))
        need(turn["instruction"], str, f"{w}.instruction", "a string")
        need(turn.get("task", ""), str, f"{w}.task", "a string")
        need(turn["images"], list, f"{w}.images", "a list of paths")
        for k, p in enumerate(turn["images"]):
            need(p, str, f"{w}.images[{k}]", "a path string")
        masks = turn.get("masks")
        need(masks, (list, type(None)), f"{w}.masks", "a list of paths or nulls, or null")
        if masks is not None and len(masks) != len(turn["images"]):
            fail(f"{w}.masks: {len(masks)} masks for {len(turn['images'])} images")
        for k, p in enumerate(masks or []):
            need(p, (str, type(None)), f"{w}.masks[{k}]", "a path string or null")
    need(record["target"], str, "target", "a path string")
    need(record.get("target_mask"), (str, type(None)), "target_mask", "a path string or null")
    need(record["task"], str, "task", "a string")
    need(record.get("meta", {}), dict, "meta", "a JSON object")


def _load(root: Path, rel: str, mode: str, line: int, what: str) -> Image.Image:
    """Open ``root / rel`` fully and convert it to ``mode``; ValueError naming the line."""
    path = root / rel
    try:
        found = path.is_file()
    except OSError as e:  # a name too long, a directory it may not read: a bad sample
        raise ValueError(f"line {line}: {what}: cannot read {rel!r}: {e}") from e
    if not found:
        raise ValueError(f"line {line}: {what}: missing file {rel!r} (looked for {path})")
    try:
        return open_image(path, mode)
    except Exception as e:
        raise ValueError(f"line {line}: {what}: unreadable image {rel!r}: {e}") from e


def read_record(record: dict[str, Any], root: Path, line: int) -> LCU:
    """Load one manifest record (images RGB, masks "L") into an LCU.

    ``root`` is the manifest's directory, ``line`` its 1-based line number, named in
    every error: a missing field, a wrong type, a missing file, an unreadable image,
    or what ``ace.lcu`` validation raises.
    """
    _check_record(record, line)
    root = Path(root)
    units = []
    for t, turn in enumerate(record["turns"]):
        images = [
            _load(root, p, "RGB", line, f"turns[{t}].images[{k}]")
            for k, p in enumerate(turn["images"])
        ]
        masks = [
            None if p is None else _load(root, p, "L", line, f"turns[{t}].masks[{k}]")
            for k, p in enumerate(turn.get("masks") or [None] * len(images))
        ]
        try:
            units.append(ConditionUnit(turn["instruction"], images, masks, turn.get("task", "")))
        except ValueError as e:
            raise ValueError(f"line {line}: turns[{t}]: {e}") from e
    target = _load(root, record["target"], "RGB", line, "target")
    mask_path = record.get("target_mask")
    target_mask = None if mask_path is None else _load(root, mask_path, "L", line, "target_mask")
    try:
        return LCU(units[-1], units[:-1], target, target_mask, record["task"])
    except ValueError as e:
        raise ValueError(f"line {line}: {e}") from e


class LCUManifest(Dataset):
    """A manifest as a map-style dataset of LCUs, images loaded on ``__getitem__``.

    ``path`` is the manifest file or its directory. Every line is parsed and its
    fields checked up front (empty lines are skipped); errors name the line.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.path = path / MANIFEST if path.is_dir() else path
        """The manifest file."""
        if not self.path.is_file():
            raise FileNotFoundError(f"no LCU manifest at {self.path}")
        self.root = self.path.parent
        """The directory that paths in the records are relative to."""
        self.records: list[dict[str, Any]] = []
        """One parsed JSON object per LCU."""
        self.lines: list[int] = []
        """The 1-based line number of each record."""
        with open(self.path, encoding="utf-8-sig") as f:  # a BOM some editors write: skipped
            try:
                for line, text in enumerate(f, start=1):
                    if not text.strip():
                        continue
                    try:
                        record = json.loads(text)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{self.path}: line {line}: invalid JSON: {e}") from e
                    try:
                        _check_record(record, line)
                    except ValueError as e:
                        raise ValueError(f"{self.path}: {e}") from e
                    self.records.append(record)
                    self.lines.append(line)
            except UnicodeDecodeError as e:
                raise ValueError(f"{self.path}: not UTF-8 text (a JSONL manifest): {e}") from e
        self.tasks: Counter[str] = Counter(r["task"] for r in self.records)
        """How many records each task has."""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> LCU:
        try:
            return read_record(self.records[i], self.root, self.lines[i])
        except ValueError as e:
            raise ValueError(f"{self.path}: {e}") from e

    def validate(self, progress: bool = False) -> list[str]:
        """Load every record; return the error messages (an empty list: valid)."""
        errors = []
        for i in tqdm(range(len(self)), disable=not progress, unit="LCU", desc="validating"):
            try:
                self[i]
            except ValueError as e:
                errors.append(str(e))
        return errors


def main(argv: list[str] | None = None) -> int:
    """``python -m ace.data.manifest DIR``: print counts per task, or the errors (exit 1)."""
    p = argparse.ArgumentParser(prog="python -m ace.data.manifest", description=__doc__)
    p.add_argument("path", help="a dataset directory or its manifest.jsonl")
    args = p.parse_args(argv)
    try:
        ds = LCUManifest(args.path)
        errors = ds.validate(progress=sys.stderr.isatty())
    except (ValueError, OSError) as e:
        errors = [str(e)]
    else:
        errors = errors or ([] if len(ds) else [f"{ds.path}: no records"])
    if errors:
        shown = [f"error: {msg}" for msg in errors[:20]] + [
            f"{args.path}: INVALID, {len(errors)} error(s)"
        ]
        print("\n".join(shown), file=sys.stderr)
        return 1
    print(f"{ds.path}: {len(ds)} LCUs, all valid")
    names = {task: task or "(no task)" for task in ds.tasks}
    width = max(map(len, names.values()))
    for task, n in sorted(ds.tasks.items()):
        print(f"  {names[task]:<{width}}  {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
