#!/usr/bin/env python
"""Annotate a folder of images with maps (edges, soft edges, grayscale, depth, segmentation)
and write the LCU dataset of the analysis and controllable-generation tasks.

    python scripts/annotate.py --images photos --out data/maps
    python scripts/annotate.py --images photos --out data/maps \\
        --annotators canny,depth,segmentation --depth-model models/dpt-large \\
        --seg-model models/segformer-b0-ade --device cuda --lcu generation

Writes OUT/maps/ANNOTATOR/PATH.png (PATH: the image's path below --images, suffix
replaced by .png) and, unless ``--lcu none``, OUT/manifest.jsonl (docs/DATA.md): per image
and annotator one analysis LCU (image -> map) and/or one generation LCU (map -> image).
Paths in the manifest are relative to OUT; the images are referred to where they are
(``../photos/a.jpg``) unless ``--copy-images`` copies them to OUT/images/PATH.

Resumable: maps already on disk are skipped (each is written to a temporary name and
renamed, so a map on disk is complete) and the manifest is written at the end, atomically.
OUT/annotate.json records each annotator's settings; a rerun with other settings for an
annotator already there (another --depth-model, ...) is refused. Bad input prints one line
``annotate.py: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from ace.atomic import atomic_write
from ace.cli import HelpFormatter, OneLineParser

PROG = "annotate.py"
SETTINGS = "annotate.json"
LCU_CHOICES = {"both": ("analysis", "generation"), "analysis": ("analysis",)}
LCU_CHOICES |= {"generation": ("generation",), "none": ()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    fmt = HelpFormatter
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=fmt)
    p.add_argument("--images", type=Path, required=True, help="the folder of images (recursive)")
    p.add_argument("--out", type=Path, required=True, help="the dataset directory to write")
    p.add_argument(
        "--annotators",
        default="canny,soft_edges,grayscale",
        help="comma-separated: canny, soft_edges, grayscale, depth, segmentation "
        "(default canny,soft_edges,grayscale)",
    )
    p.add_argument("--depth-model", type=Path, help="local depth-estimation model (for depth)")
    p.add_argument("--seg-model", type=Path, help="local image-segmentation model")
    p.add_argument("--lcu", choices=tuple(LCU_CHOICES), default="both", help="LCUs to write")
    p.add_argument("--device", default=None, help="device of the model annotators (cpu, cuda)")
    p.add_argument("--copy-images", action="store_true", help="copy the images into OUT/images")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> tuple[list[str], list[Path], list[str], dict]:
    """Check everything that needs no model: (annotators, images, ids, settings).

    ValueError naming the first problem; nothing is written.
    """
    from ace.data.collect.annotators import ANNOTATORS
    from ace.data.collect.features import image_ids, list_images

    names = [n.strip() for n in args.annotators.split(",") if n.strip()]
    unknown = [n for n in names if n not in ANNOTATORS]
    if not names or unknown:
        raise ValueError(f"unknown annotator(s) {unknown}; known: {', '.join(ANNOTATORS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--annotators names one twice: {args.annotators}")
    settings: dict[str, dict] = {n: dict(ANNOTATORS[n].settings) for n in names}
    models = [("depth", "--depth-model", args.depth_model)]
    models.append(("segmentation", "--seg-model", args.seg_model))
    for name, option, path in models:
        if name in names and path is None:
            raise ValueError(f"the {name} annotator needs {option}")
        if path is not None and name not in names:
            raise ValueError(f"{option} is given but {name} is not in --annotators")
        if path is not None and not path.exists():
            raise ValueError(f"{option} {path} does not exist")
        if path is not None:
            settings[name]["model"] = str(path.resolve())
    if not args.images.is_dir():
        raise ValueError(f"--images {args.images} is not a directory")
    src, out = args.images.resolve(), args.out.resolve()
    if out == src or src in out.parents:
        raise ValueError(f"--out {args.out} is inside --images {args.images}")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a directory")
    images = list_images(args.images)
    if not images:
        raise ValueError(f"no images (.png, .jpg, .jpeg, .webp) under {args.images}")
    ids = image_ids(images, args.images)
    stems: dict[str, str] = {}
    for i in ids:
        other = stems.setdefault(Path(i).with_suffix(".png").as_posix(), i)
        if other != i:
            raise ValueError(f"images {other!r} and {i!r} would share a map name")
    old_path = args.out / SETTINGS
    old = json.loads(old_path.read_text(encoding="utf-8")) if old_path.is_file() else {}
    for name in names:
        made = args.out / "maps" / name  # recorded before its first map: maybe none yet
        if name in old and old[name] != settings[name] and any(made.rglob("*.png")):
            raise ValueError(
                f"{args.out} holds {name} maps made with {old[name]}, not {settings[name]}; "
                "use another --out or delete its maps"
            )
    return names, images, ids, {**old, **settings}


def annotate(args: argparse.Namespace) -> tuple[int, int, int]:
    """Check, write the maps and the manifest; (maps written, maps skipped, LCUs)."""
    names, images, ids, settings = plan(args)
    from tqdm import tqdm  # lazy: argument errors need no heavy imports

    from ace.data.collect.annotators import ANNOTATORS, lcu_records
    from ace.data.collect.features import load_image

    out = args.out
    maps = {n: [f"maps/{n}/{Path(i).with_suffix('.png').as_posix()}" for i in ids] for n in names}
    missing = {n: [k for k, rel in enumerate(maps[n]) if not (out / rel).is_file()] for n in names}
    fns = {  # built once; only those with maps to make
        n: ANNOTATORS[n].build(settings[n].get("model"), args.device) for n in names if missing[n]
    }
    atomic_write(
        out / SETTINGS, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2) + "\n")
    )

    todo = sorted({k for n in names for k in missing[n]})
    written = 0
    for k in tqdm(todo, disable=args.quiet, unit="img", desc="annotating"):
        image = load_image(images[k])
        for n in names:
            target = out / maps[n][k]
            if not target.is_file():
                try:
                    the_map = fns[n](image)
                except Exception as e:  # a model that cannot read this image (1 x 1, say)
                    raise ValueError(f"{n} failed on {images[k]}: {e}") from e
                atomic_write(target, lambda tmp, m=the_map: m.save(tmp, format="PNG"))
                written += 1

    directions = LCU_CHOICES[args.lcu]
    if not directions:
        return written, len(ids) * len(names) - written, 0
    if args.copy_images:
        sources = [f"images/{i}" for i in ids]
        for src, rel in zip(images, sources):
            if not (out / rel).is_file():
                atomic_write(out / rel, lambda tmp, src=src: shutil.copyfile(src, tmp))
    else:
        base = os.path.abspath(out)
        sources = [Path(os.path.relpath(os.path.abspath(p), base)).as_posix() for p in images]
    lines = [
        json.dumps(record, ensure_ascii=False)
        for k in range(len(ids))
        for n in names
        for record in lcu_records(sources[k], maps[n][k], n, directions, {"id": ids[k]})
    ]
    text = "".join(line + "\n" for line in lines)
    atomic_write(out / "manifest.jsonl", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return written, len(ids) * len(names) - written, len(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        written, skipped, lcus = annotate(args)
    except (ValueError, OSError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"wrote {written} maps ({skipped} already there) to {args.out / 'maps'}")
    if lcus:
        print(f"wrote {lcus} LCUs to {args.out / 'manifest.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
