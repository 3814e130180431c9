"""scripts/demo.py (make demo): every step on tiny sizes, and how it judges the report."""

import importlib.util
import json
import math
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "demo.py"


def load_demo():
    spec = importlib.util.spec_from_file_location("demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_demo_runs_every_step(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # 1. train made its data, VAE and cache, then the pipeline
    assert (out / "data" / "manifest.jsonl").is_file()
    vae = json.loads((out / "vae" / "training.json").read_text())
    assert vae["steps"] == 2 and vae["train_images"] == 16  # at most steps x batch images
    assert (out / "cache" / "cache.json").is_file()
    index = json.loads((out / "train" / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "ACEPipeline"
    # 2. the evaluation, 3. the edits, 4. the summary
    report = json.loads((out / "report.json").read_text())
    assert set(report["tasks"]) and report["config"]["size"] == 32  # scored at data.toy_size
    assert vae["size"] == 32  # the VAE trained on images of that size too
    assert (out / "report.png").is_file()
    for name in ("recolor", "remove", "add", "edge-map"):
        assert Image.open(out / "edits" / f"{name}.png").size == (32, 32)  # data.toy_size
        assert (out / "edits" / f"{name}-target.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    edits = {f"edit {name}" for name in ("recolor", "remove", "add", "edge-map")}
    assert {"train", "evaluate", "total", *edits} <= summary["seconds"].keys()
    assert summary["seconds"]["total"] >= summary["seconds"]["train"]
    assert "| task | n |" in (out / "summary.md").read_text()
    # the logged commands run as printed: an instruction is one quoted argument
    logged = [line for line in result.stdout.splitlines() if line.startswith("== edit recolor: ")]
    argv = shlex.split(logged[0].split(": ", 1)[1])
    assert argv[:2] == ["python", "scripts/infer.py"]
    assert " " in argv[argv.index("--instruction") + 1]


def test_side_by_side_jobs_print_in_order_and_the_first_failure_stops_the_demo(capsys):
    demo = load_demo()
    timings = {}
    jobs = [
        ("slow", ["-c", "import time; time.sleep(0.5); print('slow done')"]),
        ("fast", ["-c", "print('fast done')"]),
    ]
    demo.run_side_by_side(jobs, timings)
    out = capsys.readouterr().out
    assert out.index("== slow:") < out.index("slow done") < out.index("== fast:")
    assert set(timings) == {"slow", "fast"} and timings["slow"] >= 0.5
    failing = [("ok", ["-c", "pass"]), ("bad", ["-c", "import sys; print('oops'); sys.exit(3)"])]
    with pytest.raises(SystemExit) as stop:
        demo.run_side_by_side(failing, {})
    assert stop.value.code == 3
    captured = capsys.readouterr()
    assert "oops" in captured.out and "bad failed with exit status 3" in captured.err


def test_rerun_keeps_data_only_when_made_in_the_same_mode(tmp_path):
    demo = load_demo()
    out = tmp_path / "demo"

    def made():  # every directory a run leaves, with a file in it
        for name in ("data", "vae", "cache", "train", "edits"):
            (out / name).mkdir(parents=True, exist_ok=True)
            (out / name / "f").write_text(name)

    def left():
        return sorted(p.name for p in out.iterdir() if p.is_dir())

    made()  # the demo's folders without made.json (a train.py run of configs/toy.yaml)
    with pytest.raises(SystemExit, match=r"holds files demo\.py did not make"):
        demo.prepare_out(out, quick=True, fresh=False)
    assert left() == ["cache", "data", "edits", "train", "vae"]  # nothing deleted
    shutil.rmtree(out)
    demo.prepare_out(out, quick=True, fresh=False)
    made()
    (out / "summary.md").write_text("the last run's")
    demo.prepare_out(out, quick=True, fresh=False)  # same mode: the DiT only
    assert not (out / "summary.md").exists()  # an interrupted rerun shows none
    assert left() == ["cache", "data", "vae"]
    demo.prepare_out(out, quick=False, fresh=False)  # a --quick run's data is no full run's
    assert left() == []
    made()
    demo.prepare_out(out, quick=False, fresh=False)
    assert left() == ["cache", "data", "vae"]
    made()
    demo.prepare_out(out, quick=False, fresh=True)
    assert left() == []
    made()  # a cache of an older format (a newer ace): the cache alone is remade
    marker = json.loads((out / "made.json").read_text())
    (out / "made.json").write_text(json.dumps({**marker, "cache": marker["cache"] - 1}))
    demo.prepare_out(out, quick=False, fresh=False)
    assert left() == ["data", "vae"]
    # a folder the demo did not make is refused, untouched (a --quick run shared the
    # default folder, and any --out lost its data, vae and cache folders)
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(SystemExit, match=r"holds files demo.py did not make \(notes.txt\)"):
        demo.prepare_out(mine, quick=True, fresh=False)
    assert (mine / "data").is_dir() and (mine / "notes.txt").is_file()


def test_bad_counts_stop_before_out_is_cleared(capsys):
    """--n 0 used to clear OUT and train for 15 minutes before evaluate.py refused it."""
    demo = load_demo()
    for argv in (["--n", "0"], ["--steps", "-1"]):
        with pytest.raises(SystemExit) as info:
            demo.parse_args(argv)
        assert info.value.code == 2 and "must be >= 1" in capsys.readouterr().err


def test_verdicts_use_the_baseline_each_family_faces():
    demo = load_demo()

    def task(model, copy, mean):
        return {"psnr_change": model, "copy_change": copy, "mean_change": mean,
                "psnr_keep": 30.0, "n": 4}  # fmt: skip

    report = {
        "tasks": {
            "recolor": {**task(20.0, 15.0, 25.0), "vae_change": 22.0},  # an edit: copy only
            "text_to_image": task(12.0, 5.0, 13.0),  # mean: loses
            "edge_map": task(14.0, 20.0, 13.0),  # mean: beats it, whatever copy is
            "edge_to_image": task(16.0, 17.0, 10.0),  # the stronger of both: copy wins
            "reference": task(14.0, 13.0, 14.5),  # the stronger of both: the mean wins
        }
    }
    rows = {r["task"]: r for r in demo.verdicts(report)}
    assert (rows["recolor"]["baseline"], rows["recolor"]["beats"]) == ("copy", True)
    assert rows["recolor"]["ceiling"] == 22.0 and math.isnan(rows["text_to_image"]["ceiling"])
    assert (rows["text_to_image"]["baseline"], rows["text_to_image"]["beats"]) == ("mean", False)
    assert (rows["edge_map"]["baseline"], rows["edge_map"]["beats"]) == ("mean", True)
    assert rows["edge_to_image"]["baseline"] == "copy"
    assert rows["edge_to_image"]["baseline_psnr"] == 17.0 and not rows["edge_to_image"]["beats"]
    assert (rows["reference"]["baseline"], rows["reference"]["beats"]) == ("mean", False)
    # the margin's standard error is the judged baseline's; the summary prints both
    report["tasks"]["reference"].update(copy_margin_se=0.9, mean_margin_se=0.25)
    row = {r["task"]: r for r in demo.verdicts(report)}["reference"]
    assert row["se"] == 0.25
    text = demo.summary([row], {"x": 1.0}, {"machine": "m", "seconds": 1.0})
    assert "| reference | 4 | 14.00 | mean | 14.50 | -0.50 ± 0.25 | NO | nan | 30.00 |" in text


def test_verdicts_skip_missing_baselines():
    demo = load_demo()
    report = {"tasks": {
        "grayscale": {"psnr_change": 12.0, "copy_change": None, "mean_change": None, "psnr_keep": 1.0, "n": 1},
        "edge_to_image": {"psnr_change": 12.0, "copy_change": 3.0, "mean_change": None, "psnr_keep": 1.0, "n": 1},
    }}  # fmt: skip
    rows = {r["task"]: r for r in demo.verdicts(report)}
    assert rows["grayscale"]["beats"] is None and rows["grayscale"]["baseline"] == "n/a"
    assert (rows["edge_to_image"]["baseline"], rows["edge_to_image"]["beats"]) == ("copy", True)
    text = demo.summary(list(rows.values()), {"x": 1.0}, {"machine": "m", "seconds": 1.0})
    assert "| grayscale | 1 | 12.00 | n/a | nan | n/a | n/a | nan | 1.00 |" in text
    # one sample: no standard error, so the verdict says what it rests on
    assert "| edge_to_image | 1 | 12.00 | copy | 3.00 | +9.00 ± nan | yes (1 sample) |" in text
