#!/usr/bin/env python
"""Write instructions into an LCU manifest (docs/DATA.md): templates, LLM rewrites or pair
captions, for the current turn of every record (docs/COLLECT.md).

    python scripts/write_instructions.py data/pairs --out data/pairs-t --mode template
    python scripts/write_instructions.py data/pairs-t --out data/pairs-r --mode rewrite \\
        --model models/qwen2.5-1.5b-instruct --variants 3
    python scripts/write_instructions.py data/pairs --out data/pairs-c --mode caption \\
        --model models/my-pair-captioner

template: a template of the record's task filled with ``meta["slots"]`` (seeded per
record). rewrite: ``--variants`` records per input, each with another rewrite of its
instruction. caption: the VLM describes the current turn's first image -> the target.

The new manifest goes to OUT/manifest.jsonl with image paths relative to OUT (no image is
copied); ``meta["instruction_source"]`` records the mode and the old instruction. Finished
inputs are appended to OUT/manifest.partial.jsonl as they are done, so a killed run started
again with the same arguments continues where it stopped; the manifest is written
atomically at the end and the partial file removed. Bad input prints one line
``write_instructions.py: error: ...`` and exits with status 2, writing nothing.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

PROG = "write_instructions.py"
PARTIAL = "manifest.partial.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from ace.cli import HelpFormatter, OneLineParser

    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("manifest", type=Path, help="an LCU dataset directory or its manifest.jsonl")
    p.add_argument("--out", type=Path, required=True, help="the directory of the new manifest")
    p.add_argument("--mode", choices=("template", "rewrite", "caption"), required=True)
    p.add_argument("--model", type=Path, help="local LLM (rewrite) or VLM (caption) directory")
    p.add_argument("--variants", type=int, default=1, help="records per input (template, rewrite)")
    p.add_argument("--seed", type=int, default=0, help="seed of templates and sampling")
    p.add_argument(
        "--device", default=None, help="model device (default: cuda, xpu or mps when available)"
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest model output")
    p.add_argument("--prompt", default=None, help="model prompt (rewrite: with {instruction})")
    p.add_argument("--layout", choices=("side_by_side", "two_images"), default="side_by_side")
    p.add_argument("--overwrite", action="store_true", help="replace OUT/manifest.jsonl")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# Checks (before anything is written)
# ---------------------------------------------------------------------------


def check_records(args: argparse.Namespace, ds: Any) -> None:
    """Every record can be processed in this mode; ValueError naming the line."""
    from ace.data.collect.instructions import TASK_IMAGES, templates_for

    for record, line in zip(ds.records, ds.lines):
        where = f"{ds.path}: line {line}"
        images = record["turns"][-1]["images"]
        if args.mode == "template":
            task, slots = record["task"], record.get("meta", {}).get("slots", {})
            if not isinstance(slots, dict):
                raise ValueError(f"{where}: meta.slots must be a JSON object, got {slots!r}")
            try:
                templates_for(task, **slots)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{where}: {e}") from e
            if len(images) != TASK_IMAGES[task]:
                raise ValueError(
                    f"{where}: task {task!r} takes {TASK_IMAGES[task]} image(s) in its "
                    f"current turn, the record has {len(images)}"
                )
        if args.mode == "caption":
            if not images:
                raise ValueError(f"{where}: caption mode needs an image in the current turn")
            for rel in (images[0], record["target"]):
                if not (ds.root / rel).is_file():
                    raise ValueError(f"{where}: missing file {rel!r} (looked in {ds.root})")


def check_args(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The input manifest and the run's header (what a resumed run must match)."""
    from ace.data.manifest import MANIFEST, LCUManifest

    if args.variants < 1:
        raise ValueError(f"--variants must be at least 1, got {args.variants}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.mode == "caption" and args.variants != 1:
        raise ValueError("--variants applies to the template and rewrite modes")
    if args.mode == "template" and args.model is not None:
        raise ValueError("--model is for the rewrite and caption modes")
    if args.mode != "template" and args.max_new_tokens < 1:  # not after the model loads
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.mode != "template" and args.device is not None:
        from ace.cli import UserError, pick_device

        try:
            pick_device(args.device)  # a bad name or an absent device: before the model loads
        except UserError as e:
            raise ValueError(str(e)) from None
    if args.mode != "template":
        if args.model is None:
            raise ValueError(f"--mode {args.mode} needs --model (a local model directory)")
        if not args.model.is_dir():
            raise ValueError(f"--model {args.model}: no such directory")
    try:
        ds = LCUManifest(args.manifest)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from e
    if not ds.records:
        raise ValueError(f"{ds.path}: no records")
    out = args.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if (out / MANIFEST).exists() and not args.overwrite:
        raise ValueError(f"--out {out} already holds a {MANIFEST} (--overwrite replaces it)")
    check_records(args, ds)
    header = {
        "input": str(ds.path.resolve()),
        "input_sha256": hashlib.sha256(ds.path.read_bytes()).hexdigest(),
        "mode": args.mode,
        "seed": args.seed,
        "variants": args.variants,
        "model": None if args.model is None else str(args.model.resolve()),
        "prompt": args.prompt,
        "layout": args.layout if args.mode == "caption" else None,
        "max_new_tokens": None if args.mode == "template" else args.max_new_tokens,
    }
    return ds, header


# ---------------------------------------------------------------------------
# The partial file: a header line, then {"line": L, "records": [...]} per finished input
# ---------------------------------------------------------------------------


def read_partial(path: Path, header: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Finished inputs of an earlier run by input line; a cut-off last line is dropped."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines[-1]:  # no newline at the end: the run died while writing it
        data = data[: len(data) - len(lines[-1])]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    rows = []
    for i, text in enumerate(data.decode("utf-8").splitlines(), start=1):
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i} is not JSON ({e}); delete the file") from e
    if not rows:
        return {}
    if rows[0].get("header") != header:
        raise ValueError(
            f"{path} is from a run with other arguments ({rows[0].get('header')}); "
            "run again with those, or delete it"
        )
    return {row["line"]: row for row in rows[1:]}


def rebase(rel: str | None, src: Path, dst: Path) -> str | None:
    """A manifest path relative to ``src`` as one relative to ``dst`` (absolute paths stay)."""
    if rel is None or os.path.isabs(rel):
        return rel
    return Path(os.path.relpath(src / rel, dst)).as_posix()


def output_record(
    record: dict[str, Any], instruction: str, source: dict[str, Any], src: Path, dst: Path
) -> dict[str, Any]:
    """``record`` with paths relative to ``dst`` and a new current instruction."""
    out = copy.deepcopy(record)
    for turn in out["turns"]:
        turn["images"] = [rebase(p, src, dst) for p in turn["images"]]
        if turn.get("masks") is not None:
            turn["masks"] = [rebase(p, src, dst) for p in turn["masks"]]
    out["turns"][-1]["instruction"] = instruction
    out["target"] = rebase(out["target"], src, dst)
    if "target_mask" in out:
        out["target_mask"] = rebase(out["target_mask"], src, dst)
    out["meta"] = {**out.get("meta", {}), "instruction_source": source}
    return out


# ---------------------------------------------------------------------------
# The modes: (record, line) -> new instructions, or a reason for none
# ---------------------------------------------------------------------------


def make_writer(args: argparse.Namespace, root: Path) -> Any:
    """A function ``(record, line) -> (instructions, note)`` for the mode."""
    import numpy as np
    import torch

    from ace.data.collect import instructions as ins

    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    if args.mode == "template":

        def from_template(record: dict[str, Any], line: int) -> tuple[list[str], str | None]:
            slots = record.get("meta", {}).get("slots", {})
            candidates = ins.templates_for(record["task"], **slots)
            rng = np.random.default_rng([args.seed, line])
            order = rng.permutation(len(candidates))[: args.variants]
            return [ins.fill_template(candidates[i], **slots) for i in order], None

        return from_template
    if args.mode == "rewrite":
        from ace.data.collect.local_models import derive_seed
        from ace.data.collect.rewriter import REWRITE_PROMPT, LLMRewriter, PromptTooLong

        rewriter = LLMRewriter(
            args.model,
            device=args.device,
            dtype=dtype,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            prompt=args.prompt or REWRITE_PROMPT,
        )

        def from_rewrite(record: dict[str, Any], line: int) -> tuple[list[str], str | None]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # counted in the summary
                text = record["turns"][-1]["instruction"]
                try:
                    return rewriter.rewrite(
                        text, args.variants, seed=derive_seed(args.seed, line)
                    ), None
                except PromptTooLong as e:  # this input's prompt: no record for it
                    return [], str(e)

        return from_rewrite
    from ace.data.collect.captioner import VLMPairCaptioner
    from ace.images import open_image

    captioner = VLMPairCaptioner(
        args.model,
        prompt=args.prompt,
        layout=args.layout,
        device=args.device,
        dtype=dtype,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )

    def from_caption(record: dict[str, Any], line: int) -> tuple[list[str], str | None]:
        source, target = root / record["turns"][-1]["images"][0], root / record["target"]
        pair = open_image(source, "RGB"), open_image(target, "RGB")  # as training reads them
        try:
            return [captioner.describe(*pair)], None
        except ValueError as e:  # an empty answer: no record for this input
            return [], str(e)

    return from_caption


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def write_instructions(args: argparse.Namespace) -> tuple[Path, dict[str, int]]:
    """Check, load the model, process the inputs not yet done, write the manifest."""
    from tqdm import tqdm

    from ace.atomic import atomic_write
    from ace.data.manifest import MANIFEST

    ds, header = check_args(args)
    out = args.out.resolve()
    partial = out / PARTIAL
    done = read_partial(partial, header)
    writer = make_writer(args, ds.root)  # model errors come before anything is written
    out.mkdir(parents=True, exist_ok=True)
    todo = [(r, line) for r, line in zip(ds.records, ds.lines) if line not in done]
    with open(partial, "a", encoding="utf-8", newline="\n") as f:
        if not done and f.tell() == 0:
            f.write(json.dumps({"header": header}, ensure_ascii=False) + "\n")
        for record, line in tqdm(todo, disable=args.quiet, unit="LCU", desc=args.mode):
            texts, note = writer(record, line)
            old = record["turns"][-1]["instruction"]
            rows = [
                output_record(
                    record, t, {"mode": args.mode, "original": old, "variant": v}, ds.root, out
                )
                for v, t in enumerate(texts)
            ]
            row = {"line": line, "records": rows, "note": note}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            done[line] = row
    stats = {"inputs": len(ds.records), "records": 0, "short": 0, "missing": 0, "notes": []}

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for line in ds.lines:
                for rec in done[line]["records"]:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    atomic_write(out / MANIFEST, write)  # an interrupt leaves no temporary file
    for line in ds.lines:
        n = len(done[line]["records"])
        stats["records"] += n
        stats["short"] += n < args.variants
        stats["missing"] += args.variants - n
        if done[line].get("note"):
            stats["notes"].append((line, done[line]["note"]))
    partial.unlink()
    return out / MANIFEST, stats


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest, stats = write_instructions(args)
    except (ValueError, OSError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"wrote {stats['records']} records from {stats['inputs']} inputs to {manifest}")
    if stats["short"]:
        print(
            f"{stats['short']} input(s) got fewer than {args.variants} instruction(s) "
            f"({stats['missing']} missing)"
        )
    if stats["notes"]:  # why inputs got none: the first reason, and how many there are
        line, note = stats["notes"][0]
        more = len(stats["notes"]) - 1
        print(
            f"no instruction for input line {line}: {note}"
            + (f" (and {more} more)" if more else "")
        )
    return 0 if stats["records"] else 1


if __name__ == "__main__":
    sys.exit(main())
