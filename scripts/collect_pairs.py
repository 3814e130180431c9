#!/usr/bin/env python
"""Mine image pairs from a folder of images into an LCU dataset (docs/COLLECT.md).

    python scripts/collect_pairs.py --images photos/ --out pairs/ --model siglip/ \\
        --clusters 1000 --t1 0.9 --t2 0.5 --task semantic_edit
    python scripts/collect_pairs.py --images photos/ --out pairs/ --features feats/ ...
    python scripts/collect_pairs.py --images toy/ --out pairs/ --pixel-features ...

Features come from a local image encoder (--model: written to OUT/features, a rerun
skips the finished shards), from feature shards already made (--features), or from
downsampled pixels (--pixel-features: no model; near-identical images only). Then coarse
k-means, the two union-find turns, every pair of each set and the cleaning filters
(ace.data.collect.pairing). Writes OUT/manifest.jsonl (one source -> target LCU per pair,
image paths relative to OUT) and OUT/pairs.json (counts per stage, times, settings), each
atomically; a rerun replaces them (removed once its checks pass, so a run that fails
leaves none of an earlier run's). When no pair passes, only OUT/pairs.json is written
(its counts show which stage lost them; "manifest": null), and the exit status is 1.
Bad input (the flags, --instruction and --out are checked before any feature is
computed) or a failed read or write prints one line ``collect_pairs.py: error: ...`` and
exits with status 2; bad input writes nothing. An image the feature stage cannot read
stops the run, naming it (the pairing stage counts such images instead): remove or
replace it and rerun; --model's finished feature shards are kept and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ace.cli import HelpFormatter, OneLineParser

PROG = "collect_pairs.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--images", type=Path, required=True, help="the image folder (recursive)")
    p.add_argument("--out", type=Path, required=True, help="the output folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--features", type=Path, help="a folder of feature shards (ids relative to --images)"
    )
    src.add_argument("--model", type=Path, help="a local image encoder (SigLIP) directory")
    src.add_argument("--pixel-features", action="store_true", help="downsampled pixels, no model")
    options = (  # flag, type, default, help
        ("--clusters", int, None, "k-means clusters (default: N / --cluster-size)"),
        ("--cluster-size", int, 1000, "mean images per cluster when --clusters is not given"),
        ("--t1", float, 0.9, "turn 1: join two images whose feature cosine is >= T1"),
        ("--t2", float, 0.5, "turn 2: join two images whose pair score is >= T2"),
        ("--pixel-tol", float, 0.1, "pixel scorer: how far (0-1) a pixel may move and stay the same"),
        ("--max-pairs-per-set", int, None, "keep a seeded sample of at most this many pairs per set (default: all)"),
        ("--t-dup", float, 0.995, "near-duplicate filter: drop pairs whose cosine is > this"),
        ("--min-pixel-diff", float, 0.002, "near-duplicate filter: drop pairs whose mean thumbnail difference (0-1) is < this"),
        ("--t-min", float, 0.5, "too-different filter: drop pairs whose cosine is < this"),
        ("--min-side", int, 256, "resolution filter: drop pairs with an image side < this"),
        ("--max-aspect", float, 3.0, "aspect filter: drop pairs with a long / short side > this"),
        ("--seed", int, 0, "seed of the k-means and of the pair samples"),
        ("--batch-size", int, 32, "--model: images per batch"),
        ("--shard-size", int, 4096, "--model: images per feature shard"),
    )  # fmt: skip
    for flag, kind, default, text in options:
        text = text if default is None else f"{text} (default {default})"
        p.add_argument(flag, type=kind, default=default, help=text)
    p.add_argument("--scorer", choices=("pixel", "feature"), default="pixel",
                   help="turn-2 score: share of unchanged thumbnail pixels, or feature cosine")  # fmt: skip
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="--model: stored feature dtype")  # fmt: skip
    p.add_argument("--task", default="semantic_edit", help="the task tag of every LCU")
    p.add_argument("--instruction", help="every LCU's instruction (default: a task placeholder)")
    p.add_argument("--both-directions", action="store_true", help="write each pair both ways")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _write_json(path: Path, obj: dict) -> None:
    from ace.atomic import atomic_write

    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def check_out(out: Path) -> None:
    """ValueError unless ``out`` is a directory, or can be made one, that can be written to
    (nothing is created here: bad input writes nothing)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    from ace.atomic import nearest_existing

    base = nearest_existing(out)
    if not base.is_dir():
        raise ValueError(f"--out {out}: {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {base} is not writable")


def check_instruction(text: str | None) -> None:
    """ValueError unless ``text`` names only the one image of a mined LCU, ``{image}``."""
    if text is None:
        return
    from PIL import Image

    from ace.lcu import ConditionUnit

    try:
        ConditionUnit(text, [Image.new("RGB", (1, 1))])  # the checks of ace.lcu
    except ValueError as e:
        raise ValueError(f"--instruction {text!r}: {e}; a mined LCU has one, {{image}}") from e


def collect_pairs(args: argparse.Namespace) -> dict:
    """Check the arguments, get features, pair, write; ValueError on bad input."""
    from ace.data.collect.pair_manifest import write_pair_manifest
    from ace.data.collect.pairing import (
        PairingConfig,
        normalize_features,
        pair_images,
        require_faiss,
    )
    from ace.data.collect.scorers import FeatureScorer
    from ace.data.collect.store import load_features
    from ace.data.manifest import MANIFEST

    # 1. every check that needs no features: nothing is written before these pass
    for flag in ("t1", "t2", "t_dup", "min_pixel_diff", "t_min", "pixel_tol"):
        value = getattr(args, flag)
        if not 0 <= value <= 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be in [0, 1], got {value}")
    if not 0 <= args.seed < 2**31:  # faiss's k-means takes a C int
        raise ValueError(f"--seed must be in [0, 2**31), got {args.seed}")
    cfg = PairingConfig(
        clusters=args.clusters,
        cluster_size=args.cluster_size,
        t1=args.t1,
        t2=args.t2,
        max_pairs_per_set=args.max_pairs_per_set,
        t_dup=args.t_dup,
        min_pixel_diff=args.min_pixel_diff,
        t_min=args.t_min,
        min_side=args.min_side,
        max_aspect=args.max_aspect,
        seed=args.seed,
        pixel_tol=args.pixel_tol,
    )
    check_instruction(args.instruction)
    root, out = args.images, args.out
    if not root.is_dir():
        raise ValueError(f"--images {root} is not a directory")
    check_out(out)
    progress = not args.quiet
    # the checks passed: an earlier run's results go now, so that this run, if it fails
    # (an unreadable image, a full disk), leaves none that pass for its own
    for stale in (out / MANIFEST, out / "pairs.json"):
        stale.unlink(missing_ok=True)

    def need_faiss(n: int) -> None:  # before hours of features, not after
        if cfg.n_clusters(n) > 1:
            require_faiss()

    # 2. features: computed (resumable), read, or pixels
    if args.features is not None:
        ids, x = load_features(args.features)
        need_faiss(len(ids))
        source = str(args.features)
    else:
        from ace.data.collect.features import extract_features, image_ids, list_images

        images = list_images(root)
        if not images:
            raise ValueError(f"--images {root} holds no images")
        need_faiss(len(images))
        if args.model is not None:
            feats = out / "features"
            extract_features(
                images,
                feats,
                args.model,
                root=root,
                batch_size=args.batch_size,
                shard_size=args.shard_size,
                dtype=args.dtype,
                progress=progress,
            )
            ids, x = load_features(feats)
            source = str(feats)
        else:
            from tqdm import tqdm

            from ace.data.collect.features import load_image
            from ace.data.collect.scorers import pixel_features

            ids, source = image_ids(images, root), "pixels"
            bar = tqdm(images, desc="pixel features", unit="image", disable=not progress)
            x = pixel_features(map(load_image, bar))  # one image in memory at a time
    missing = [i for i in ids if not (root / i).is_file()]
    if missing:
        n, first = len(missing), missing[0]
        raise ValueError(f"{n} feature id(s) are not images under --images {root}, e.g. {first!r}")
    x = normalize_features(x, len(ids), copy=False)

    # 3. pair, then write the manifest (none without pairs) and the stage counts
    scorer = FeatureScorer(ids, x, normalized=True) if args.scorer == "feature" else None
    result = pair_images(ids, x, cfg, image_root=root, scorer=scorer, copy=False, progress=progress)
    if len(result.pairs):
        manifest = write_pair_manifest(
            result,
            out,
            root,
            args.task,
            instruction=args.instruction,
            both_directions=args.both_directions,
        ).name
    else:  # no manifest (an earlier run's went at the start)
        out.mkdir(parents=True, exist_ok=True)
        manifest = None
    summary = {
        **result.summary(),
        "images": os.path.abspath(root),
        "features": source,
        "task": args.task,
        "records": len(result.pairs) * (2 if args.both_directions else 1),
        "manifest": manifest,
    }
    _write_json(out / "pairs.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = collect_pairs(args)
    except (ValueError, OSError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for name, n in summary["counts"].items():
        print(f"  {name:<28} {n}")
    if summary["manifest"] is None:
        print(f"found 0 pairs: no manifest written; the counts are in {args.out / 'pairs.json'}")
        return 1
    print(f"wrote {summary['records']} LCUs to {args.out / summary['manifest']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
