"""ace.eval: PSNR against hand-computed values, the baselines on constructed cases, the
contact sheet, and scripts/evaluate.py end to end on the tiny pipeline and the toy world."""

import json
import math
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from _scripts import run_script
from PIL import Image

from ace.eval import METRICS, PSNR_CAP, EvalReport, contact_sheet, evaluate, psnr
from ace.eval.harness import MEAN_SET, SEPARATOR
from ace.lcu import LCU, ConditionUnit

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "evaluate.py"

# ---------------------------------------------------------------------------------- psnr


def test_psnr_hand_computed():
    a = np.zeros((4, 4, 3))
    assert psnr(a, a + 0.1) == pytest.approx(20.0)  # MSE 0.01
    assert psnr(a, a + 0.5) == pytest.approx(10 * math.log10(4))  # MSE 0.25: 6.02 dB
    # uint8 is divided by 255: an error of 51 is 0.2, MSE 0.04
    z = np.zeros((2, 3, 3), np.uint8)
    assert psnr(z, z + 51) == pytest.approx(10 * math.log10(25))
    assert psnr(z, (z + 51) / 255.0) == pytest.approx(10 * math.log10(25))


def test_psnr_over_a_region():
    a = np.zeros((4, 4, 3))
    b = np.full((4, 4, 3), 0.5)
    b[:2, :2] = 0.1  # error 0.1 on the 4 top-left pixels, 0.5 on the other 12
    region = np.zeros((4, 4), bool)
    region[:2, :2] = True
    assert psnr(a, b, region) == pytest.approx(20.0)
    assert psnr(a, b, ~region) == pytest.approx(10 * math.log10(1 / 0.25))
    whole = (4 * 0.01 + 12 * 0.25) / 16  # the mean over every pixel
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / whole))
    assert psnr(a, b, np.ones((4, 4), bool)) == psnr(a, b)
    # grayscale images work too
    assert psnr(a[..., 0], b[..., 0], region) == pytest.approx(20.0)


def test_psnr_cap_nan_and_errors():
    a = np.random.default_rng(0).random((8, 8, 3)) * 0.8  # room for + 0.1 inside [0, 1]
    assert psnr(a, a) == PSNR_CAP == 100.0
    assert psnr(a, a + 1e-9) == PSNR_CAP  # 180 dB, capped
    assert math.isnan(psnr(a, a + 0.1, np.zeros((8, 8), bool)))
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, a[:4])
    with pytest.raises(ValueError, match="region shape"):
        psnr(a, a, np.ones((4, 8), bool))
    bad = a.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        psnr(bad, a)  # it scored the 100 dB cap
    with pytest.raises(ValueError, match=r"0-255 images must be uint8"):
        psnr(a * 255, a * 255)  # it gave a negative dB figure


# ---------------------------------------------------------------------- constructed cases


@dataclass
class FakeSample:
    lcu: LCU
    change_mask: np.ndarray


class EchoPipe:
    """Returns the current turn's first input image unchanged (black without inputs)."""

    def __init__(self):
        self.calls = []

    def __call__(self, instruction, images=None, masks=None, history=None, **kwargs):
        self.calls.append({"instruction": instruction, "images": images, "history": history, **kwargs})  # fmt: skip
        size = (kwargs["width"], kwargs["height"])
        return types.SimpleNamespace(images=[images[0] if images else Image.new("RGB", size)])


def rgb(a: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8))


def scene(seed: int, size: int = 16) -> np.ndarray:
    return np.round(np.random.default_rng(seed).random((size, size, 3)) * 255) / 255


def constructed_samples(size: int = 16) -> list[FakeSample]:
    """keep: a square of the input changes; full: the whole input inverts; t2i: no input;
    empty: nothing should change (the change region is empty)."""
    out = []
    for k in range(2):
        x = scene(k, size)
        y = x.copy()
        y[4:8, 4:8] = 1 - y[4:8, 4:8]
        m = np.zeros((size, size), bool)
        m[4:8, 4:8] = True
        lcu = LCU(ConditionUnit("edit {image}", [rgb(x)]), target=rgb(y), task="keep")
        out.append(FakeSample(lcu, m))
    for k in range(2):
        x = scene(10 + k, size)
        lcu = LCU(ConditionUnit("invert {image}", [rgb(x)]), target=rgb(1 - x), task="full")
        out.append(FakeSample(lcu, np.ones((size, size), bool)))
    for k in range(3):
        lcu = LCU(ConditionUnit("a scene"), target=rgb(scene(20 + k, size)), task="t2i")
        out.append(FakeSample(lcu, np.ones((size, size), bool)))
    # a two-turn LCU: copy takes the history's image, the pipe echoes the current one
    x, x2 = scene(30, size), scene(31, size)
    lcu = LCU(
        ConditionUnit("again {image}", [rgb(x2)]),
        history=[ConditionUnit("edit {image}", [rgb(x)])],
        target=rgb(x),
        task="empty",
    )
    out.append(FakeSample(lcu, np.zeros((size, size), bool)))
    return out


@pytest.fixture
def fake_toy(monkeypatch):
    """Stand in for ace.data.toy with the constructed samples."""
    samples = constructed_samples()
    module = types.ModuleType("ace.data.toy")
    module.TASKS = ("t2i", "keep", "full", "empty")
    seen, mean_sets = {}, []

    def sample_stream(n, seed, split="train", tasks=None, weights=None, size=64, balanced=False):
        # the evaluated set; the mean baseline's training targets are the same samples here
        if split == "eval":
            seen.update(n=n, seed=seed, split=split, tasks=tasks, size=size, balanced=balanced)
        else:
            mean_sets.append({"n": n, "seed": seed, "split": split, "tasks": tasks, "size": size})
        picked = [s for s in samples if tasks is None or s.lcu.task in tasks]
        return iter(picked[:n])

    module.sample_stream = sample_stream
    module.check_size = lambda size: None  # the constructed images are 16 px
    monkeypatch.setitem(sys.modules, "ace.data.toy", module)
    return types.SimpleNamespace(samples=samples, seen=seen, mean_sets=mean_sets)


def test_baselines_on_constructed_cases(fake_toy):
    pipe = EchoPipe()
    report = evaluate(pipe, n=100, steps=3, seed=7, size=16, progress=False)
    assert fake_toy.seen == {
        "n": 100, "seed": 7, "split": "eval", "tasks": None, "size": 16, "balanced": True
    }  # fmt: skip
    assert list(report.tasks) == ["t2i", "keep", "full", "empty"]  # the order of TASKS
    # the pipe got the current turn, the history, the size and a seed per sample
    assert [c["generator"].initial_seed() for c in pipe.calls] == [7 + i for i in range(8)]
    assert all(c["height"] == c["width"] == 16 and c["num_inference_steps"] == 3 for c in pipe.calls)  # fmt: skip
    assert pipe.calls[-1]["instruction"] == "again {image}" and len(pipe.calls[-1]["history"]) == 1
    assert [c["task"] for c in pipe.calls] == [s.lcu.task for s in fake_toy.samples]

    keep, full, t2i, empty = (report.tasks[t] for t in ("keep", "full", "t2i", "empty"))
    # identity-like: copy == output, perfect where nothing should change, bad where it should
    assert keep["copy_keep"] == keep["psnr_keep"] == 100.0
    assert keep["copy_change"] == keep["psnr_change"] < 10.0
    assert keep["n"] == 2 and keep["keep_is_whole"] is False
    # a full change: copy scores badly everywhere, keep is the whole image and flagged
    assert full["copy_change"] == full["copy_keep"] < 10.0 and full["keep_is_whole"] is True
    # no input image: copy is mid-grey
    targets = [np.asarray(s.lcu.target) / 255 for s in fake_toy.samples[4:7]]
    grey = np.full_like(targets[0], 128 / 255)
    assert t2i["copy_change"] == pytest.approx(np.mean([psnr(grey, t) for t in targets]))
    # the mean baseline: each target against the per-pixel mean of MEAN_SET training targets
    # of its task, asked for each task in order (the fake's training targets: the same ones)
    assert fake_toy.mean_sets == [
        {"n": MEAN_SET, "seed": 7, "split": "train", "tasks": [t], "size": 16}
        for t in ("t2i", "keep", "full", "empty")
    ]
    mean = np.mean(targets, axis=0)
    assert t2i["mean_change"] == pytest.approx(np.mean([psnr(mean, t) for t in targets]))
    assert t2i["mean_keep"] == t2i["mean_change"]
    assert np.isfinite(t2i["mean_change"]) and t2i["mean_change"] < 100.0
    a, b = (np.asarray(s.lcu.target) / 255 for s in fake_toy.samples[2:4])
    assert full["mean_change"] == pytest.approx((psnr((a + b) / 2, a) + psnr((a + b) / 2, b)) / 2)
    # a task with one sample has its mean baseline too (here its own target: a perfect score)
    assert empty["mean_keep"] == 100.0
    # copy is what a model that changes nothing returns: the current turn's image, as the echo
    # does, not the history's (which is the target here)
    assert empty["copy_keep"] == empty["psnr_keep"] < 100.0
    assert math.isnan(empty["psnr_change"])  # nothing should change: no region

    # the margins' standard errors, by hand from the per-sample records
    for task, m in report.tasks.items():
        recs = [r for r in report.samples if r["task"] == task]
        for b in ("copy", "mean"):
            d = [r["psnr_change"] - r[f"{b}_change"] for r in recs]
            d = [x for x in d if not math.isnan(x)]
            want = np.std(d, ddof=1) / math.sqrt(len(d)) if len(d) > 1 else math.nan
            assert m[f"{b}_margin_se"] == pytest.approx(want, nan_ok=True), (task, b)
    assert report.tasks["t2i"]["mean_margin_se"] > 0  # 3 samples, margins that differ
    assert math.isnan(report.tasks["empty"]["copy_margin_se"])  # one sample, no region
    # the echo has no VAE: no ceiling
    assert all(math.isnan(m["vae_change"]) and math.isnan(m["vae_keep"]) for m in report.tasks.values())  # fmt: skip
    # overall: the mean over the tasks with a mean baseline (all but empty), NaN ignored
    assert report.overall["tasks"] == 3 and report.overall["n"] == 7  # 8 samples, empty's 1 out
    for k in METRICS:
        vals = [m[k] for t, m in report.tasks.items() if t != "empty" and not math.isnan(m[k])]
        if vals:
            assert report.overall[k] == pytest.approx(np.mean(vals))
        else:
            assert math.isnan(report.overall[k])


def test_vae_ceiling_is_the_target_through_the_pipelines_vae():
    import torch

    from ace.data.toy import sample_stream
    from ace.testing import tiny_pipeline

    pipe = tiny_pipeline()
    report = evaluate(pipe, n=3, steps=1, size=32, tasks="recolor,text_to_image", progress=False)
    samples = sample_stream(3, 0, split="eval", tasks=["recolor", "text_to_image"], size=32, balanced=True)  # fmt: skip
    for rec, sample in zip(report.samples, samples):
        target = np.array(sample.lcu.target.convert("RGB"))  # (H, W, 3) uint8
        x = torch.from_numpy(target).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():  # diffusers directly: encode, posterior mode, decode
            y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample[0]
        y = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        region = np.asarray(sample.change_mask)
        assert rec["vae_change"] == pytest.approx(psnr(y, target, region), abs=0.02)
        if not region.all():
            assert rec["vae_keep"] == pytest.approx(psnr(y, target, ~region), abs=0.02)
    assert report.tasks["recolor"]["vae_change"] < PSNR_CAP  # a random VAE is no identity


def test_batched_sampling_scores_what_one_call_per_sample_scores():
    """batch_size > 1 runs ACEPipeline.generate, sample i still with seed + i: the same
    outputs as one call each, up to float rounding, in the same order."""
    from ace.testing import tiny_pipeline

    pipe = tiny_pipeline()
    kw = dict(n=5, steps=2, size=32, seed=3, progress=False)
    one = evaluate(pipe, batch_size=1, **kw)
    for batch_size in (2, 16):
        many = evaluate(pipe, batch_size=batch_size, **kw)
        assert [r["task"] for r in many.samples] == [r["task"] for r in one.samples]
        for a, b in zip(many.samples, one.samples):
            assert a["psnr_change"] == pytest.approx(b["psnr_change"], abs=1e-3)
    # sample i reads seed + i wherever it sits in a batch: not all equal
    assert len({round(r["psnr_change"], 3) for r in one.samples}) > 1


def test_report_json_and_save(fake_toy, tmp_path):
    report = evaluate(EchoPipe(), n=8, steps=1, size=16, tasks="keep,empty", progress=False)
    assert fake_toy.seen["tasks"] == ["keep", "empty"]
    data = report.to_json()
    assert set(data) == {"tasks", "overall", "config"}
    assert set(data["tasks"]) == {"keep", "empty"}
    for m in data["tasks"].values():
        assert set(m) == {*METRICS, "n", "keep_is_whole", "copy_margin_se", "mean_margin_se"}
        assert isinstance(m["n"], int)
    assert data["tasks"]["empty"]["psnr_change"] is None  # NaN -> null: strict JSON
    assert data["config"]["tasks"] == ["keep", "empty"] and data["config"]["split"] == "eval"
    path = report.save(tmp_path / "sub" / "report.json")
    assert json.loads(path.read_text()) == data
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temp file left


def test_bad_arguments(fake_toy):
    for kwargs, match in [
        ({"tasks": "keep,nonsense"}, "unknown task.*nonsense"),
        ({"n": 0}, "n must be"),
        ({"seed": 2**32, "n": 2}, "seed must be < 2\\*\\*32 \\(the toy world's seed\\)"),
        ({"steps": 0}, "steps must be"),
        ({"seed": -1}, "seed must be"),
        ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            evaluate(EchoPipe(), progress=False, **kwargs)


def test_contact_sheet_rows_and_padding(fake_toy, tmp_path):
    report = evaluate(EchoPipe(), size=16, progress=False, max_rows=5)
    # 5 rows, round-robin over the 4 tasks, in sample order
    assert [label.split()[1] for label in report.labels] == ["keep", "keep", "full", "t2i", "empty"]  # fmt: skip
    assert [len(r) for r in report.rows] == [3, 3, 3, 2, 4]  # inputs | output | target
    cell = 16
    path = contact_sheet(report.rows, tmp_path / "sheet.png", cell=cell)
    sheet = np.asarray(Image.open(path))
    step = cell + SEPARATOR
    assert sheet.shape == (5 * step + SEPARATOR, 4 * step + SEPARATOR, 3)
    # t2i (row 3) has no inputs: two grey cells, then output (black) and target
    y = SEPARATOR + 3 * step
    for c in range(2):
        x = SEPARATOR + c * step
        assert (sheet[y : y + cell, x : x + cell] == 128).all()
    x = SEPARATOR + 3 * step
    assert np.array_equal(sheet[y : y + cell, x : x + cell], np.asarray(report.rows[3][-1]))
    # labels go in a column on the left; the height is unchanged
    labelled = Image.open(contact_sheet(report.rows, tmp_path / "l.png", cell, report.labels))
    assert labelled.height == sheet.shape[0] and labelled.width > sheet.shape[1]
    with pytest.raises(ValueError):
        contact_sheet([], tmp_path / "none.png")


def test_bad_size_is_refused_before_any_sample():
    pipe = EchoPipe()
    for size in (16, 20):
        with pytest.raises(ValueError, match=f"impossible image size {size}"):
            evaluate(pipe, n=2, size=size, progress=False)
    assert pipe.calls == []


def test_overall_averages_the_model_and_baselines_over_the_same_tasks(fake_toy, monkeypatch):
    """The constructed set, with empty's training targets missing: it has no mean
    baseline, and the overall row averages the other three tasks, for the model and both
    baselines alike (it averaged the model over four tasks and the mean baseline over
    three). With no mean baseline anywhere the row falls back to every task."""
    import ace.eval.harness as harness

    real = harness.mean_targets
    monkeypatch.setattr(
        harness, "mean_targets", lambda tasks, *a: {**real(tasks, *a), "empty": None}
    )
    report = evaluate(EchoPipe(), n=8, size=16, progress=False)
    complete = [t for t, m in report.tasks.items() if not math.isnan(m["mean_change"])]
    assert sorted(complete) == ["full", "keep", "t2i"] and report.overall["tasks"] == 3
    for k in METRICS:
        vals = [report.tasks[t][k] for t in complete if not math.isnan(report.tasks[t][k])]
        want = np.mean(vals) if vals else math.nan
        assert report.overall[k] == pytest.approx(want, nan_ok=True), k
    one = evaluate(EchoPipe(), n=1, size=16, tasks="empty", progress=False)
    assert one.overall["tasks"] == 1 and math.isnan(one.overall["mean_change"])


def test_report_is_plain_data():
    r = EvalReport({"a": {"psnr_change": float("nan"), "n": 1}}, {"n": 1})
    assert r.to_json() == {"tasks": {"a": {"psnr_change": None, "n": 1}}, "overall": {"n": 1}, "config": {}}  # fmt: skip


# ------------------------------------------------------------------------ scripts/evaluate.py


def script(argv, capsys):
    return run_script(SCRIPT, argv, capsys)


def test_script_mix_train_draws_the_training_mix(fake_toy, tmp_path, capsys):
    argv = ["--pipeline", "tiny", "--suite", "toy", "--n", 2, "--steps", 1, "--size", 32]
    code, out, _ = script(
        [*argv, "--mix", "train", "--quiet", "--out", tmp_path / "r.json"], capsys
    )
    assert code == 0, out
    assert fake_toy.seen["balanced"] is False
    assert json.loads((tmp_path / "r.json").read_text())["config"]["balanced"] is False


def test_size_check_counts_a_factor_4_vaes_tokens():
    """With the toy VAE (8 px tokens, rope_max_len 256) 128 px fits; the check must count
    tokens against rope_max_len, not against the resize budget (64 for that geometry)."""
    from diffusers import AutoencoderKL

    from ace.eval.harness import check_fits
    from ace.testing import tiny_pipeline
    from ace.train.vae import toy_vae_config

    pipe = tiny_pipeline()
    pipe.vae = AutoencoderKL(**toy_vae_config(latent_channels=4))
    check_fits(pipe, 128)  # 16 x 16 tokens
    with pytest.raises(ValueError, match="at most 128 px"):
        check_fits(pipe, 136)


def test_the_default_size_is_the_one_the_pipelines_vae_records(tmp_path, capsys, monkeypatch):
    from ace.eval import toy_size_of
    from ace.testing import tiny_pipeline

    pipe = tiny_pipeline()
    assert pipe.vae.config.sample_size == 64 and toy_size_of(pipe) == 64
    for recorded, size in [(32, 32), (48, 48), ((32, 32), 32), (40, 64), (512, 64), (None, 64)]:
        pipe.vae.register_to_config(sample_size=recorded)  # 512 px is past rope_max_len here
        assert toy_size_of(pipe) == size, recorded
    pipe.transformer.register_to_config(rope_max_len=4096)  # the released 1024 px geometry
    for recorded, size in [(512, 64), (128, 128)]:  # a released VAE's 512 is no toy size
        pipe.vae.register_to_config(sample_size=recorded)
        assert toy_size_of(pipe) == size, recorded
    pipe = tiny_pipeline()
    # evaluate.py scores a pipeline whose VAE records 32 px at 32 px, unless told otherwise
    pipe.vae.register_to_config(sample_size=32)
    pipe.save_pretrained(tmp_path / "pipe")
    monkeypatch.chdir(tmp_path)
    for extra, size in [([], 32), (["--size", "48"], 48)]:
        code, _, _ = script(["--pipeline", "pipe", "--suite", "toy", "--n", 1, "--steps", 1, "--tasks", "recolor", "--quiet", "--out", "r.json", *extra], capsys)  # fmt: skip
        report = json.loads((tmp_path / "r.json").read_text())
        assert code == 0 and report["config"]["size"] == size


@pytest.mark.parametrize(
    "args, match",
    [
        (["--pipeline", "tiny", "--suite", "coco"], "unknown suite 'coco'"),
        (["--pipeline", "tiny", "--suite", "toy", "--n", "0"], "--n must be >= 1"),
        (["--pipeline", "tiny", "--suite", "toy", "--batch-size", "0"], "--batch-size must be"),
        (["--pipeline", "no/such/dir", "--suite", "toy"], "not an ACEPipeline directory"),
        (["--pipeline", "tiny", "--suite", "toy", "--n", "x"], "invalid int value"),
        (["--pipeline", "tiny", "--suite", "toy", "--tasks", "nonsense"], "unknown task"),
        (["--pipeline", "tiny", "--suite", "toy", "--mix", "even"], "invalid choice: 'even'"),
        (["--pipeline", "tiny", "--suite", "toy", "--size", "16"], "at least 32"),
        (["--pipeline", "tiny", "--suite", "toy", "--rescale", "5"], "--guidance / --rescale"),
        (["--pipeline", "tiny", "--suite", "toy", "--guidance", "nan"], "--guidance / --rescale"),
        (
            ["--pipeline", "tiny", "--suite", "toy", "--seed", str(2**32), "--n", "2"],
            "--seed must be < 2**32 (the toy world's seed)",
        ),
        (
            ["--pipeline", "tiny", "--suite", "toy", "--size", "512"],
            "more than this pipeline's rope_max_len=256",
        ),
    ],
)
def test_script_bad_input(args, match, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = script([*args, "--out", "tmp/report.json"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("evaluate.py: error: ") and err.count("\n") == 1 and match in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_script_names_a_broken_pipeline_and_a_bare_json_name(tmp_path, capsys, monkeypatch):
    """A pipeline directory whose model_index.json diffusers cannot use is one line naming
    it, not a KeyError traceback; --out .json (no name before the suffix) says what it
    wants. Nothing is written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    for args, match in [
        (["--pipeline", "pipe", "--out", "tmp/r.json"], r"--pipeline pipe: cannot load it \(KeyError"),
        (["--pipeline", "tiny", "--out", "tmp/.json"], "--out must be a file name ending in .json, got tmp/.json"),
    ]:  # fmt: skip
        code, _, err = script([*args, "--suite", "toy", "--n", "1", "--steps", "1"], capsys)
        assert code == 2 and err.count("\n") == 1 and re.search(match, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_tasks_named_twice_are_scored_once_and_max_rows_is_checked():
    from ace.eval.harness import check_tasks

    assert check_tasks("recolor, recolor,grayscale,recolor") == ["recolor", "grayscale"]
    with pytest.raises(ValueError, match=r"max_rows must be an int >= 1 \(contact sheet rows\), got 0"):  # fmt: skip
        evaluate(None, n=1, max_rows=0)


def test_script_end_to_end_on_tiny(tmp_path, capsys, monkeypatch):
    from ace.data.toy import sample_stream

    monkeypatch.chdir(tmp_path)
    code, out, _ = script(["--pipeline", "tiny", "--suite", "toy", "--n", 6, "--steps", 2, "--quiet", "--out", "tmp/report.json"], capsys)  # fmt: skip
    assert code == 0, out
    data = json.loads((tmp_path / "tmp" / "report.json").read_text())
    expected = {s.lcu.task for s in sample_stream(6, 0, split="eval", size=64, balanced=True)}
    assert set(data["tasks"]) == expected
    for name, m in data["tasks"].items():
        assert (
            set(m) == {*METRICS, "n", "keep_is_whole", "copy_margin_se", "mean_margin_se"}
            and m["n"] >= 1
        )
        assert name in out  # the table names every task
        assert m["copy_keep"] is None or m["copy_keep"] > 0
    assert sum(m["n"] for m in data["tasks"].values()) == data["overall"]["n"] == 6
    assert data["config"]["pipeline"] == "tiny" and data["config"]["steps"] == 2
    assert data["config"]["balanced"] is True
    sheet = Image.open(tmp_path / "tmp" / "report.png")
    assert sheet.height == 6 * (64 + SEPARATOR) + SEPARATOR  # one row per sample
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == ["report.json", "report.png"]


@pytest.mark.parametrize("where", ["file_parent", "out_is_dir", "png_is_dir", "png_out", "dot"])
def test_script_unwritable_out_is_refused_before_the_run(where, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = {"file_parent": "afile/r.json", "out_is_dir": "d/r.json", "png_is_dir": "d/r.json", "png_out": "r.png", "dot": "."}[where]  # fmt: skip
    # r.png: the sheet would have overwritten the report; ".": a traceback from with_suffix
    Path("afile").write_text("x")
    Path("d/r.json" if where == "out_is_dir" else "d/r.png").mkdir(parents=True)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, out_text, err = script(["--pipeline", "tiny", "--suite", "toy", "--n", 1, "--steps", 1, "--quiet", "--out", out], capsys)  # fmt: skip
    assert code == 2 and out_text == "" and err.count("\n") == 1, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_leave_one_out_means_by_hand():
    from ace.eval.metrics import leave_one_out_means

    means = leave_one_out_means([np.zeros(2), np.ones(2), np.full(2, 2.0)])
    assert [m.tolist() for m in means] == [[1.5, 1.5], [1.0, 1.0], [0.5, 0.5]]
    assert leave_one_out_means([np.ones(2)]) == [None]  # no other image to average
    # mixed sizes: each image against the others of its own size
    mixed = leave_one_out_means(
        [np.zeros((2, 2)), np.ones(3), np.full((2, 2), 4.0), np.ones((2, 2))]
    )
    assert mixed[1] is None
    np.testing.assert_array_equal(mixed[0], np.full((2, 2), 2.5))  # (4 + 1) / 2
    np.testing.assert_array_equal(mixed[2], np.full((2, 2), 0.5))  # (0 + 1) / 2
    np.testing.assert_array_equal(mixed[3], np.full((2, 2), 2.0))  # (0 + 4) / 2


def test_a_samples_mean_baseline_does_not_depend_on_how_many_are_scored():
    """The mean baseline is the mean of MEAN_SET training targets of the task, so sample i
    faces the same one at --n 16 (one sample a family) as at --n 32. It was the mean of
    the family's other evaluated targets: none at 16 (NaN), one other image at 32. And it
    is that mean: recomputed here from the toy world's training split by hand."""
    from ace.data.toy import sample_stream

    small = evaluate(EchoPipe(), n=16, size=32, progress=False).samples
    large = evaluate(EchoPipe(), n=32, size=32, progress=False).samples
    for a, b in zip(small, large):
        assert a["mean_change"] == b["mean_change"] and np.isfinite(a["mean_change"])
    targets = [
        np.asarray(s.lcu.target, dtype=np.float64) / 255
        for s in sample_stream(MEAN_SET, 0, split="train", tasks=["text_to_image"], size=32)
    ]
    mean = sum(targets) / len(targets)
    first = next(r for r in small if r["task"] == "text_to_image")
    truth = next(iter(sample_stream(16, 0, split="eval", size=32, balanced=True)))
    assert truth.lcu.task == "text_to_image"
    want = 10 * np.log10(1 / np.mean((mean - np.asarray(truth.lcu.target) / 255) ** 2))
    assert first["mean_change"] == pytest.approx(min(want, PSNR_CAP), abs=1e-9)
