"""ace.eval.probe and scripts/probe.py: copy and text diagnostics of a trained pipeline."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ace.conditioning import preprocess_image
from ace.data.toy import TASKS, sample_stream
from ace.diffusion import DDPMEpsilon, objective_for_scheduler
from ace.eval.probe import _AttentionTap, probe
from ace.lcu import LCU, ConditionUnit
from ace.testing import tiny_pipeline
from tests._scripts import run_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "probe.py"


def edit_lcus(n):
    return [s.lcu for s in sample_stream(4 * n, 0, split="eval") if s.lcu.images][:n]


def copying_model(pipe):
    """A stand-in network that answers "the target is the first input", in the
    objective's own output units, written from the noising equations by hand."""
    obj = objective_for_scheduler(pipe.scheduler)

    def predict(frames, masks, texts, timesteps, indicators=None):
        # the image the request starts from: the current turn's first (the frames that
        # share the target's text), else the latest history image
        own = [k for k in range(1, len(frames[0])) if texts[0][k] is texts[0][0]]
        x_t, x1 = frames[0][0], frames[0][own[0] if own else -1]
        if isinstance(obj, DDPMEpsilon):  # x_t = sqrt(abar) x1 + sqrt(1 - abar) eps
            abar = obj.alphas_cumprod()[timesteps.long()].float()
            return [(x_t - abar.sqrt() * x1) / (1 - abar).sqrt()]
        s = timesteps / obj.num_train_timesteps  # x_t = x1 + s v
        return [(x_t - x1) / s]

    return predict


@pytest.mark.parametrize("objective", ["ddpm-eps", "rectified-flow"])
def test_a_copying_model_scores_the_copy_error_and_no_text_effect(objective, monkeypatch):
    pipe = tiny_pipeline(objective=objective)
    monkeypatch.setattr(pipe.transformer, "predict", copying_model(pipe))
    report = probe(pipe, edit_lcus(6), levels=(0.3, 0.9), progress=False)
    for task, m in report.per_task.items():
        for level in ("0.3", "0.9"):
            assert m[f"x0_mse@{level}"] == pytest.approx(m["copy_mse"], rel=1e-4, abs=1e-6), task
            assert m[f"text_effect@{level}"] == 0.0
    assert sum(m["n"] for m in report.per_task.values()) == 6


def test_pixel_scores_by_hand(monkeypatch):
    """x0_psnr of a copying model is the input's decoded latent scored against the target;
    mean_psnr is each target against the mean of its family's other targets; vae_psnr the
    target's own round trip. Each computed here from the PIL images with numpy."""
    pipe = tiny_pipeline(objective="rectified-flow")
    monkeypatch.setattr(pipe.transformer, "predict", copying_model(pipe))
    lcus = [s.lcu for s in sample_stream(48, 0, split="eval", tasks=["recolor"])][:3]
    report = probe(pipe, lcus, levels=(0.5,), progress=False)
    m = report.per_task["recolor"]

    def db(a, b):  # PSNR of two uint8 arrays, by the textbook formula
        mse = np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2)
        return 10 * np.log10(1.0 / mse)

    def round_trip(image):  # image -> VAE mode -> decoded uint8, as the pipeline renders
        size = pipe.max_seq_len
        lat = pipe.conditioner.encode_images([preprocess_image(image, size)], sample=False)[0]
        x = pipe.conditioner.decode(lat[None])[0].clamp(-1, 1)
        return ((x.permute(1, 2, 0).numpy() + 1) / 2 * 255 + 0.5).astype(np.uint8)

    targets = [np.asarray(lcu.target) for lcu in lcus]
    loo = []
    for i, t in enumerate(targets):
        others = np.mean([u.astype(np.float64) for j, u in enumerate(targets) if j != i], axis=0)
        loo.append(10 * np.log10(1.0 / np.mean((others / 255 - t / 255) ** 2)))
    assert m["mean_psnr"] == pytest.approx(np.mean(loo), abs=1e-9)
    copy = [db(round_trip(lcu.images[0]), t) for lcu, t in zip(lcus, targets)]
    assert m["x0_psnr@0.5"] == pytest.approx(np.mean(copy), abs=0.05)
    ceiling = [db(round_trip(lcu.target), t) for lcu, t in zip(lcus, targets)]
    assert m["vae_psnr"] == pytest.approx(np.mean(ceiling), abs=0.05)


def test_text_to_image_lcus_are_probed_without_copy_scores():
    pipe = tiny_pipeline(objective="rectified-flow")
    lcus = [s.lcu for s in sample_stream(2, 0, split="eval", tasks=["text_to_image"])]
    m = probe(pipe, lcus, levels=(0.9,), progress=False).per_task["text_to_image"]
    assert np.isnan(m["copy_mse"]) and m["copy_attention"] == []
    assert np.isfinite(m["x0_mse@0.9"]) and np.isfinite(m["x0_psnr@0.9"])
    assert np.isfinite(m["mean_psnr"]) and m["n"] == 2


def test_the_attention_tap_is_the_attention_the_layer_applies():
    """softmax weights from the tap, times the layer's own v and output projection, give
    back the layer's output; every row sums to 1."""
    pipe = tiny_pipeline(objective="rectified-flow")
    model = pipe.transformer
    for p in model.parameters():  # wake the zero-initialised layers
        p.data.add_(torch.randn_like(p) * 0.2)
    seen = []
    hook = model.blocks[0].attn.register_forward_hook(lambda m, a, o: seen.append((a[0], o)))
    tap = _AttentionTap(model.blocks)
    lat = [torch.randn(4, 8, 8), torch.randn(4, 8, 8)]
    with torch.no_grad():
        model.predict(
            [lat], None, [[torch.randn(3, 32), torch.randn(3, 32)]], torch.tensor([500.0])
        )
    tap.remove()
    hook.remove()
    attn, (x, out) = tap.maps[0], seen[0]  # (H, T, T); (T, d), (T, d)
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:2]))
    module = model.blocks[0].attn
    v = module.qkv(x).chunk(3, dim=-1)[2].unflatten(-1, (module.num_heads, -1))  # (T, H, D)
    mixed = torch.einsum("hts,shd->thd", attn, v).flatten(1)  # (T, d)
    torch.testing.assert_close(module.proj(mixed), out, rtol=1e-4, atol=1e-5)
    assert len(tap.maps) == len(model.blocks)


def test_script_prints_and_writes_a_report(tmp_path, capsys):
    out = tmp_path / "probe.json"
    args = ["--pipeline", "tiny", "--n", "4", "--levels", "0.5,1", "--quiet", "--out", out]
    code, stdout, _ = run_script(SCRIPT, args, capsys)
    assert code == 0
    assert "copy attn" in stdout
    report = json.loads(out.read_text())
    assert report["config"]["levels"] == [0.5, 1.0]
    assert list(report["tasks"]) == list(TASKS[:4])  # balanced: one of each of the first four
    for task, m in report["tasks"].items():
        assert {"copy_mse", "x0_mse@0.5", "x0_mse@1", "text_effect@1", "x0_psnr@1"} <= set(m)
        # one LCU per family, yet a mean target: the evaluation's (256 training targets)
        assert m["mean_psnr"] is not None and m["mean_psnr"] < 100
        if task == "text_to_image":  # no input image: nothing to copy
            assert m["copy_mse"] is None and m["copy_attention"] == []
            continue
        assert len(m["copy_attention"]) == 2  # the tiny model's two layers
        assert all(0 < a <= 1 for a in m["copy_attention"])
    assert report["config"]["size"] == 64


def test_script_probes_toy_lcus_at_the_size_asked(tmp_path, capsys, monkeypatch):
    import ace.eval.probe

    seen = []
    real = ace.eval.probe.probe

    def spy(pipe, items, *args, **kwargs):
        seen.append(([lcu.target.size for lcu in items], kwargs["means"]))
        return real(pipe, items, *args, **kwargs)

    monkeypatch.setattr(ace.eval.probe, "probe", spy)
    out = tmp_path / "probe.json"
    args = ["--pipeline", "tiny", "--n", "2", "--levels", "1", "--size", "32", "--quiet", "--out", out]  # fmt: skip
    assert run_script(SCRIPT, args, capsys)[0] == 0
    sizes, means = seen[0]
    assert sizes == [(32, 32)] * 2 and {m.shape for m in means.values()} == {(32, 32, 3)}
    assert json.loads(out.read_text())["config"]["size"] == 32
    # without --size: the size the pipeline's VAE records, as evaluate.py reads it
    from ace.testing import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.vae.register_to_config(sample_size=32)
    pipe.save_pretrained(tmp_path / "pipe")
    args = ["--pipeline", tmp_path / "pipe", "--n", "2", "--levels", "1", "--quiet", "--out", out]
    assert run_script(SCRIPT, args, capsys)[0] == 0
    assert seen[1][0] == [(32, 32)] * 2 and json.loads(out.read_text())["config"]["size"] == 32


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--levels", "0,0.5"], r"--levels must lie in \(0, 1\]"),
        (["--levels", "a,b"], "--levels must be numbers"),
        (["--n", "0"], "--n must be >= 1"),
        (["--out", "x.txt"], "--out must end with .json"),
        (["--data", "nowhere"], "no LCU manifest"),
        (["--levels", "0.5,0.50"], "--levels must be distinct"),
        (["--size", "40"], "--size must be a multiple of 16"),
        (["--size", "32", "--data", "d"], "--size sets the toy LCUs' size"),
        (["--size", "512"], "more than this pipeline's rope_max_len=256"),
        (["--seed", str(2**64)], r"--seed must lie in \[0, 2\*\*64\)"),
        (["--out", "a_file/p.json"], "a_file is a file, not a directory"),
    ],
)
def test_script_bad_arguments_exit_2_in_one_line(tmp_path, capsys, monkeypatch, extra, match):
    monkeypatch.chdir(tmp_path)
    if "a_file/p.json" in extra:
        (tmp_path / "a_file").write_text("x")
    code, _, err = run_script(SCRIPT, ["--pipeline", "tiny", "--quiet", *extra], capsys)
    assert code == 2
    assert err.count("\n") == 1
    assert __import__("re").search(match, err)
    assert [p.name for p in tmp_path.iterdir()] == (["a_file"] if "a_file/p.json" in extra else [])


def test_multi_turn_copy_scores_start_from_the_current_turn(monkeypatch):
    """copy_mse is the error of the image the last edit starts from (the harness's copy
    baseline), not of the chain's first image; a model that copies that image matches it."""
    pipe = tiny_pipeline(objective="rectified-flow")
    monkeypatch.setattr(pipe.transformer, "predict", copying_model(pipe))
    lcus = [s.lcu for s in sample_stream(40, 0, split="eval", tasks=["multi_turn"])][:2]
    assert all(len(lcu.history) >= 1 for lcu in lcus)
    m = probe(pipe, lcus, levels=(0.5,), progress=False).per_task["multi_turn"]
    assert m["x0_mse@0.5"] == pytest.approx(m["copy_mse"], rel=1e-4, abs=1e-6)


def test_mixed_target_sizes_get_a_mean_baseline_per_size():
    """Targets of two sizes in one family: each size is its own mean baseline (here one
    target each, so NaN), not a crash after every network call."""
    pipe = tiny_pipeline()
    lcus = [next(iter(sample_stream(1, i, split="eval", size=size, tasks=["recolor"]))).lcu for i, size in enumerate((32, 64))]  # fmt: skip
    report = probe(pipe, lcus, levels=(0.5,), progress=False)
    assert report.per_task["recolor"]["n"] == 2
    assert np.isnan(report.per_task["recolor"]["mean_psnr"])
    assert (
        json.loads(json.dumps(report.to_json(), allow_nan=False))["tasks"]["recolor"]["mean_psnr"]
        is None
    )


def test_probe_rejects_lcus_it_cannot_probe():
    pipe = tiny_pipeline()
    no_target = LCU(ConditionUnit("a red circle"), task="text_to_image")
    with pytest.raises(ValueError, match="needs an LCU with a target"):
        probe(pipe, [no_target], progress=False)
    with pytest.raises(ValueError, match=r"levels must be .* in \(0, 1\]"):
        probe(pipe, edit_lcus(1), levels=(0.5, 1.5), progress=False)
    with pytest.raises(ValueError, match="levels must be"):
        probe(pipe, edit_lcus(1), levels=(), progress=False)
    with pytest.raises(ValueError, match="levels must be distinct"):
        probe(pipe, edit_lcus(1), levels=(0.5, 0.50), progress=False)


def test_a_given_mean_target_is_the_probes_baseline():
    """means: per family a mean-target image (the evaluation's, for toy LCUs) replaces the
    mean of the other probed targets; one of another size is not used."""
    pipe = tiny_pipeline()
    lcus = [s.lcu for s in sample_stream(32, 0, split="eval", tasks=["recolor"])][:2]
    grey = np.full((64, 64, 3), 0.5)
    report = probe(pipe, lcus, levels=(0.5,), progress=False, means={"recolor": grey})
    targets = [np.asarray(lcu.target, dtype=np.float64) / 255 for lcu in lcus]
    want = np.mean([10 * np.log10(1 / np.mean((grey - t) ** 2)) for t in targets])
    assert report.per_task["recolor"]["mean_psnr"] == pytest.approx(want, abs=1e-9)
    other = probe(pipe, lcus, levels=(0.5,), progress=False, means={"recolor": grey[:32]})
    a, b = targets
    loo = np.mean([10 * np.log10(1 / np.mean((x - y) ** 2)) for x, y in ((b, a), (a, b))])
    assert other.per_task["recolor"]["mean_psnr"] == pytest.approx(loo, abs=1e-9)
