#!/usr/bin/env python
"""The README demo (``make demo``): train a small ACE on the toy world, score it, edit with it.

    python scripts/demo.py                  # about 15-20 minutes on 2 CPU cores
    python scripts/demo.py --out outputs/demo-quick --quick   # a smoke run of every step (about a minute)

It runs the user-facing commands one after the other, each as its own process:

1. ``scripts/train.py --config configs/toy.yaml``: makes 8192 toy LCUs of 32 px, trains
   the toy VAE, builds the embedding cache, trains the DiT, exports ``OUT/train/pipeline``;
2. ``scripts/evaluate.py --suite toy``: scores the pipeline on held-out toy LCUs of the
   same size against the copy and mean baselines (``OUT/report.json``, ``OUT/report.png``);
3. ``scripts/infer.py``: a few edits of held-out toy images (``OUT/edits/``), two at a
   time on one thread each (mostly Python starting and the pipeline loading);

then writes ``OUT/summary.md``: the per-task table, whether each task family beats its
baseline on the pixels that should change (editing families: copy; text-to-image and the
analysis tasks: mean; controllable and reference generation: the stronger of the two),
the margin with its standard error over the family's samples, and the time of every
step. Everything lands under OUT.
A step that fails stops the demo with its exit status. A rerun retrains the DiT and
keeps OUT's toy data, VAE and embedding cache (they are deterministic; ``--fresh``
remakes them, and so does a switch between ``--quick`` and a full run, recorded in
``OUT/made.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ace.cli import HelpFormatter, OneLineParser

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "toy.yaml"

# The baselines each family must beat on the pixels that should change. Text-to-image
# and analysis (image -> map) make a whole new image, so copying the input is no baseline
# at all: they face the mean target (the mean of 256 training targets of the family).
# Controllable generation (map -> image) faces both. Every other family edits, and faces
# copy.
JUDGED_BY = {
    "text_to_image": ("mean",),
    "edge_map": ("mean",),
    "segmentation_map": ("mean",),
    "edge_to_image": ("copy", "mean"),
    "segmentation_to_image": ("copy", "mean"),
    # a new scene from parts of its sources: copying one source is no stronger a baseline
    # than the mean scene, so it faces the stronger of the two (a review's finding)
    "reference": ("copy", "mean"),
}

# (name, toy task, seed of the held-out sample): the edits step 3 makes
EDITS = (
    ("recolor", "recolor", 0),
    ("remove", "remove", 0),
    ("add", "add", 0),
    ("edge-map", "edge_map", 0),
)

MADE_VERSION = 6
"""Of what a run makes and keeps (data, VAE, cache): a change remakes them on the next
run (2: the toy model's resize budget, part of the cache's fingerprint, became 64; 3: the
toy world at 32 px, 8192 LCUs; 4: the toy VAE trains 4000 steps; 5: data.toy_weights;
6: reference 2.0 in them)."""

MADE = {"data", "vae", "cache", "train", "edits", "report.json", "report.png", "summary.md",
        "summary.json", "made.json"}  # fmt: skip
"""What a run writes in OUT."""

QUICK = [  # every step runs, on almost nothing
    "data.toy_n=16",
    "model.vae_toy_steps=2",
    "train.max_steps=2",
    "train.checkpoint_every=2",
    "data.batch_size=4",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog="demo.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--out", type=Path, default=None,
        help="where all goes (default outputs/demo, or outputs/demo-quick with --quick)",
    )  # fmt: skip
    # 16 LCUs a family in about the time 8 took at 20 steps (4-8% more): on two pipelines'
    # 512 LCUs 10 steps scored as 20 did (overall within 0.02 dB, every family within 0.7
    # of its standard error, the same verdicts; BENCHMARKS.md, session 18)
    p.add_argument("--n", type=int, default=256, help="held-out LCUs to evaluate (default 256)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps (default 10)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: every step, tiny sizes (it evaluates 4 LCUs at 2 steps, whatever "
        "--n and --steps)",
    )
    p.add_argument(
        "--fresh", action="store_true", help="also remake the toy data, VAE and cache of OUT"
    )
    args = p.parse_args(argv)
    for flag, value in (("--n", args.n), ("--steps", args.steps)):
        if value < 1:  # before OUT is cleared and 15 minutes of training
            p.error(f"{flag} must be >= 1, got {value}")
    return args


def run(name: str, cmd: list[str], timings: dict) -> None:
    print(f"\n== {name}: python {shlex.join(map(str, cmd))}", flush=True)
    start = time.perf_counter()
    code = subprocess.call([sys.executable, *map(str, cmd)], cwd=ROOT)
    timings[name] = round(time.perf_counter() - start, 1)
    if code != 0:
        print(f"demo.py: {name} failed with exit status {code}", file=sys.stderr)
        sys.exit(code)


def run_side_by_side(jobs: list[tuple[str, list]], timings: dict, workers: int = 2) -> None:
    """``run`` for independent short commands, ``workers`` at a time, one thread each: an
    infer.py of 5-7 s is mostly Python starting and loading, one core's work. Each prints
    its command and output when it ends; the first that fails stops the demo."""
    from concurrent.futures import ThreadPoolExecutor

    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def one(job):
        name, cmd = job
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, *map(str, cmd)], cwd=ROOT, env=env, capture_output=True, text=True
        )
        return name, cmd, done, round(time.perf_counter() - start, 1)

    with ThreadPoolExecutor(workers) as pool:
        for name, cmd, done, seconds in pool.map(one, jobs):
            print(f"\n== {name}: python {shlex.join(map(str, cmd))}", flush=True)
            print(done.stdout + done.stderr, end="", flush=True)
            timings[name] = seconds
            if done.returncode != 0:
                print(f"demo.py: {name} failed with exit status {done.returncode}", file=sys.stderr)
                sys.exit(done.returncode)


def toy_size(overrides: list[str]) -> int:
    """``data.toy_size`` of CONFIG with ``overrides``: the side of the toy images the demo
    trains on, and so scores and edits."""
    from ace.train.config import load_config

    return load_config(CONFIG, overrides).data.toy_size


def write_edit_inputs(out: Path, size: int) -> list[dict]:
    """The held-out toy LCUs of ``EDITS`` at ``size`` px: their input images on disk, for
    infer.py."""
    from ace.data.toy import sample_stream

    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for name, task, seed in EDITS:
        lcu = next(sample_stream(1, seed, split="eval", tasks=task, size=size)).lcu
        job = {
            "name": name,
            "instruction": lcu.current.instruction,
            "images": [],
            "output": out / f"{name}.png",
        }
        for k, image in enumerate(lcu.current.images):
            path = out / f"{name}-input{k}.png"
            image.save(path)
            job["images"].append(path)
        lcu.target.save(out / f"{name}-target.png")
        jobs.append(job)
    return jobs


def verdicts(report: dict) -> list[dict]:
    """Per task: the model's and the baseline's PSNR on the judged region, the verdict, the
    standard error of the margin between them (``se``: a margin within about two of them is
    noise at 8 samples), and the VAE's ceiling there (the best any transformer on this VAE
    can score).

    A metric the report leaves out (null: NaN, e.g. a change region that is empty, or a
    mean baseline without training targets) is skipped; with no baseline left the verdict
    is None (n/a)."""
    rows = []
    for task, m in report["tasks"].items():
        ours = _number(m["psnr_change"])
        faced = [(_number(m[f"{b}_change"]), b) for b in JUDGED_BY.get(task, ("copy",))]
        faced = [(v, b) for v, b in faced if math.isfinite(v)]
        theirs, baseline = max(faced) if faced else (math.nan, "n/a")  # the stronger one
        beats = (ours > theirs) if faced and math.isfinite(ours) else None
        se = _number(m.get(f"{baseline}_margin_se"))  # of model - baseline, over the samples
        rows.append(
            {"task": task, "n": m["n"], "model": ours, "baseline": baseline, "baseline_psnr": theirs,
             "beats": beats, "se": se, "ceiling": _number(m.get("vae_change")),
             "keep": _number(m["psnr_keep"])}
        )  # fmt: skip
    return rows


def _number(value) -> float:
    return math.nan if value is None else float(value)


VERDICT = {True: "yes", False: "NO", None: "n/a"}


def summary(rows: list[dict], timings: dict, info: dict) -> str:
    lines = [
        "# ace demo",
        "",
        f"Machine: {info['machine']}; total {info['seconds']:.0f} s.",
        "",
        "| task | n | model PSNR (change) | baseline | baseline PSNR | margin ± s.e. | beats it "
        "| VAE ceiling (change) | model PSNR (keep) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        margin = r["model"] - r["baseline_psnr"]
        margin = "n/a" if math.isnan(margin) else f"{margin:+.2f} ± {r['se']:.2f}"
        verdict = VERDICT[r["beats"]]
        if r["beats"] is not None and r["n"] < 2:  # no standard error: a hint, not a verdict
            verdict += " (1 sample)"
        lines.append(
            f"| {r['task']} | {r['n']} | {r['model']:.2f} | {r['baseline']} | "
            f"{r['baseline_psnr']:.2f} | {margin} | {verdict} | {r['ceiling']:.2f} | "
            f"{r['keep']:.2f} |"
        )
    lines += ["", "| step | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    return "\n".join(lines) + "\n"


def prepare_out(out: Path, quick: bool, fresh: bool) -> None:
    """Clear OUT for a run. A rerun retrains the DiT; the toy data, VAE and cache are
    deterministic and kept, unless ``fresh`` or they were made in the other mode (a
    ``--quick`` run's 16 LCUs and 2-step VAE must not become a full run's): ``OUT/made.json``
    records the mode that made them."""
    from ace.train.cache import FORMAT  # a newer cache format remakes the cache alone

    made = {"overrides": QUICK if quick else [], "version": MADE_VERSION, "cache": FORMAT}
    marker = out / "made.json"
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [name for name in held if name not in MADE]
    if (out.exists() and not out.is_dir()) or (held and not marker.is_file()):
        # the run deletes folders inside OUT: never in one the demo did not make (a
        # train.py run of configs/toy.yaml fills outputs/demo's folders, without made.json)
        what = ", ".join(foreign or held)
        raise SystemExit(
            f"demo.py: error: --out {out} holds files demo.py did not make ({what}); give a "
            "new or empty directory, or delete it"
        )
    before = _read_json(marker)
    before = before if isinstance(before, dict) else {}
    fresh = fresh or {**before, "cache": FORMAT} != made
    stale = ["cache"] if before.get("cache") != FORMAT else []
    for name in ["train", "edits", *(["data", "vae", "cache"] if fresh else stale)]:
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("report.json", "report.png", "summary.md", "summary.json"):
        (out / name).unlink(missing_ok=True)  # an interrupted rerun must not show the last run's
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(made) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    out = (args.out or ROOT / "outputs" / ("demo-quick" if args.quick else "demo")).absolute()
    prepare_out(out, args.quick, args.fresh)
    timings: dict[str, float] = {}
    overrides = [
        f"data.manifest={out / 'data'}",
        f"data.cache={out / 'cache'}",
        f"model.vae={out / 'vae'}",
        f"train.output_dir={out / 'train'}",
        *(QUICK if args.quick else []),
    ]
    n, steps = (4, 2) if args.quick else (args.n, args.steps)
    size = toy_size(overrides)

    # 1. train (toy data, toy VAE, embedding cache, DiT; each made only if absent)
    run("train", ["scripts/train.py", "--config", CONFIG, *overrides], timings)
    pipeline = out / "train" / "pipeline"

    # 2. evaluate on held-out toy LCUs
    report_path = out / "report.json"
    run(
        "evaluate",
        ["scripts/evaluate.py", "--pipeline", pipeline, "--suite", "toy", "--n", n,
         "--steps", steps, "--size", size, "--out", report_path],
        timings,
    )  # fmt: skip

    # 3. a few edits through infer.py, two at a time
    start = time.perf_counter()
    edits = []
    for job in write_edit_inputs(out / "edits", size):
        cmd = ["scripts/infer.py", "--pipeline", pipeline, "--instruction", job["instruction"],
               "--steps", steps, "--output", job["output"]]  # fmt: skip
        for image in job["images"]:
            cmd += ["--image", image]
        if not job["images"]:
            cmd += ["--height", size, "--width", size]
        edits.append((f"edit {job['name']}", cmd))
    run_side_by_side(edits, timings)
    timings["edits (two at a time), wall"] = round(time.perf_counter() - start, 1)

    # 4. the summary
    import platform

    report = json.loads(report_path.read_text())
    rows = verdicts(report)
    info = {
        "machine": f"{platform.processor() or platform.machine()}, {_cores()} cores",
        "seconds": time.perf_counter() - began,  # the edits overlap: not the steps' sum
    }
    text = summary(rows, timings, info)
    (out / "summary.md").write_text(text)
    clean = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        for r in rows
    ]
    seconds = {**timings, "total": round(info["seconds"], 1)}
    (out / "summary.json").write_text(json.dumps({"tasks": clean, "seconds": seconds}, indent=2))
    print("\n" + text)
    print(f"wrote {out}: report.json, report.png (inputs | output | target), edits/, summary.md")
    return 0


def _read_json(path: Path):
    """The JSON in ``path``, or None if it is absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    sys.exit(main())
