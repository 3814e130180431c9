"""scripts/benchmark.py runs and checks correctness before it times (timings are not tested)."""

import json
import runpy
import sys
from pathlib import Path

import pytest

from tests._scripts import run_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def run(argv, capsys):
    old = sys.argv
    sys.argv = [str(SCRIPT), *argv]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        sys.argv = old
    return exit_info.value.code, capsys.readouterr()


def test_tiny_config_json(capsys):
    code, out = run(
        ["--configs", "tiny", "--repeats", "1", "--warmup", "0", "--size", "64", "--json"], capsys
    )
    assert code == 0
    report = json.loads(out.out)
    (row,) = report["rows"]
    assert row["config"] == "tiny" and row["rel_err"] <= 1e-5
    assert row["tokens"] == 2 * 2 * (64 // 16) ** 2
    assert row["forward_ace_ms"] > 0 and row["fwd_bwd_ref_ms"] > 0
    assert report["rows"][0]["peak_tflops"] > 0 and row["peak_dtype"] == "fp32"
    for kind in ("forward", "fwd_bwd", "denoise"):
        assert 0 < row[f"{kind}_ace_pct_peak"] < 100
        assert row[f"{kind}_ace_peak_gib"] is None  # memory is measured on CUDA only
    assert row["fwd_bwd_tflop"] == pytest.approx(3 * row["forward_tflop"])
    assert row["fwd_bwd_ace_saved_mib"] > 0 and row["fwd_bwd_ref_saved_mib"] > 0


def test_saved_for_backward_counts_each_storage_once():
    """By hand: x * w with only x needing a gradient keeps w (1 MiB), however many times,
    and a view of it is the same storage; x * x keeps x once."""
    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import benchmark
    finally:
        sys.path.pop(0)
    x = torch.randn(1024, 256, requires_grad=True)  # 1 MiB each
    w = torch.randn(1024, 256)
    assert benchmark.saved_for_backward_mib(lambda: (x * w).sum()) == 1.0
    assert benchmark.saved_for_backward_mib(lambda: (x * w + x * w[:, :1]).sum()) == 1.0
    assert benchmark.saved_for_backward_mib(lambda: (x * x).sum()) == 1.0
    assert benchmark.saved_for_backward_mib(lambda: (x * w).exp().sum()) == 2.0  # + exp's out
    # a model's own weights are there anyway: only the input a linear layer keeps counts
    linear = torch.nn.Linear(256, 1024)  # 1 MiB of weight
    assert benchmark.saved_for_backward_mib(lambda: linear(x).sum(), linear) == 1.0
    assert benchmark.saved_for_backward_mib(lambda: linear(x).sum()) == 2.0


def test_bad_arguments_are_reported(capsys):
    code, out = run(["--configs", "giant"], capsys)
    assert code == 2 and "unknown config 'giant'" in out.err
    code, out = run(["--pipeline-only"], capsys)
    assert code == 2 and "--pipeline-only needs --pipeline" in out.err
    code, out = run(["--pipeline", "released"], capsys)  # the default first config is tiny
    assert code == 2 and "must read T5-XXL" in out.err
    code, out = run(["--cuda-graph"], capsys)  # the default device is the CPU
    assert code == 2 and "--cuda-graph needs --device cuda" in out.err


def test_flop_count_of_one_block_matches_the_hand_count():
    """counted_flops (torch's FlopCounterMode on the reference) against the matmuls by hand."""
    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import benchmark
    finally:
        sys.path.remove(str(SCRIPT.parent))
    from torch.utils.flop_counter import FlopCounterMode

    from ace.models import PRESETS
    from ace.reference import ReferenceDiT

    cfg = PRESETS["tiny"]
    args = benchmark.parse_args(
        ["--size", "64", "--batch", "2", "--frames", "3", "--text-len", "7"]
    )
    ref = ReferenceDiT(**cfg)
    inputs = benchmark.make_batch(cfg, args, "cpu", torch.float32, torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        ref(*inputs)
    block = sum(counter.get_flop_counts()["ReferenceDiT.blocks.0"].values())

    d, B, F, n, m = cfg["hidden_size"], 2, 3, (64 // 16) ** 2, 7  # n tokens, m text per frame
    N, M = B * F * n, B * F * m  # image and text tokens of the batch
    linear = 2 * N * d * d * (4 + 2 + 2 * 4) + 2 * M * d * d * 2  # self qkvo, cross q o, mlp; k v
    attention = 4 * d * B * (F * n) ** 2 + 4 * d * B * F * n * m  # QK^T and AV, self and cross
    assert block == linear + attention
    with torch.no_grad():
        total = benchmark.counted_flops(lambda: ref(*inputs))
    assert cfg["depth"] * block < total < 1.2 * cfg["depth"] * block  # + embedders, final layer


def test_t5_xxl_config_has_the_released_size():
    """4,762,310,656 parameters: 32128 x 4096 embedding, 24 layers of attention (4 x 4096^2),
    gated FF (3 x 4096 x 10240) and 2 norms, 32 x 64 relative buckets, a final norm."""
    import torch
    from transformers import T5EncoderModel

    from ace.testing import t5_xxl_encoder_config

    with torch.device("meta"):
        model = T5EncoderModel(t5_xxl_encoder_config())
    per_layer = 4 * 4096**2 + 3 * 4096 * 10240 + 2 * 4096
    expected = 32128 * 4096 + 24 * per_layer + 32 * 64 + 4096
    assert sum(p.numel() for p in model.parameters()) == expected == 4_762_310_656


ATTENTION = SCRIPT.with_name("benchmark_attention.py")


def test_attention_benchmark_checks_every_backend(capsys):
    argv = ["--scale", "0.02", "--repeats", "1", "--warmup", "0", "--backends", "sdpa,flex"]
    code, out, err = run_script(ATTENTION, [*argv, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    names = [r["layout"] for r in report["rows"]]
    assert names[:4] == ["self 8x2048", "self 2x8192", "self 2x2048", "self ragged"]
    assert names[4:] == ["cross 16x1024:120", "cross ragged"]
    for r in report["rows"]:
        assert r["sdpa_err"] <= 1e-5 and r["flex_err"] <= 1e-5  # against the dense oracle
        assert r["sdpa_fwd_bwd_ms"] > 0 and r["flex_fwd_bwd_ms"] is None  # no flex bwd on CPU
        assert r["auto"] == "sdpa" and "varlen_fwd_ms" not in r  # varlen is CUDA-only
    assert report["failed"] == []


def test_attention_benchmark_fails_a_wrong_backend(capsys, monkeypatch):
    """The oracle check must be able to fail: sdpa without its segment mask reads every
    token, and the script says so and exits 1 after printing its table."""
    from ace.models import attention

    def unmasked(q, k, v, layout):
        return attention.dense_attention(
            q, k, v, attention.SegmentLayout.build([len(q)], [len(k)], q.device)
        )

    monkeypatch.setitem(attention._IMPLS, "sdpa", unmasked)
    argv = ["--scale", "0.02", "--repeats", "1", "--warmup", "0", "--backends", "sdpa", "--layouts", "self ragged"]  # fmt: skip
    code, out, err = run_script(ATTENTION, argv, capsys)
    assert code == 1 and "self ragged" in out
    assert "check failed: self ragged, sdpa: relative error" in err
    code, _, err = run_script(ATTENTION, ["--backends", "varlen", "--scale", "0.02"], capsys)
    assert code == 2 and "none of --backends varlen runs on cpu" in err


def test_attention_benchmark_bad_arguments(capsys):
    code, _, err = run_script(ATTENTION, ["--layouts", "self 3x3"], capsys)
    assert code == 2 and "unknown layout 'self 3x3'" in err
    code, _, err = run_script(ATTENTION, ["--scale", "2"], capsys)
    assert code == 2 and "--scale must be in (0, 1]" in err


def test_summary_of_a_suite_run(tmp_path, capsys):
    """summarize_benchmarks.py prints the tables it finds and says which steps gave nothing."""
    code, out = run(
        ["--configs", "tiny", "--repeats", "1", "--warmup", "0", "--size", "64", "--json"], capsys
    )
    (tmp_path / "dit_512.json").write_text(out.out)
    (tmp_path / "attention.json").write_text("")  # a step that was killed
    code, out, err = run_script(SCRIPT.with_name("summarize_benchmarks.py"), [tmp_path], capsys)
    assert code == 0, err
    dit = out.split("## dit_512")[1].split("##")[0]
    assert "tiny" in dit and "fwd_bwd" in dit and "denoise" in dit
    assert "no result" in out.split("## attention")[1].split("##")[0]


VAE_SCRIPT = SCRIPT.with_name("benchmark_vae.py")


def test_vae_benchmark_measures_whole_and_tiled(tmp_path, capsys):
    """Each way runs in its own process; the tiled one really tiles (tile < image side)."""
    from ace.testing import tiny_vae

    tiny_vae().save_pretrained(tmp_path / "vae")  # sample_size 64: tiles of 64 px
    argv = ["--vae", str(tmp_path / "vae"), "--size", "128", "--json"]
    code, out, err = run_script(VAE_SCRIPT, argv, capsys)
    assert code == 0, err
    report = json.loads(out)
    whole, tiled = report["rows"]
    assert (whole["mode"], whole["tile_px"], tiled["mode"], tiled["tile_px"]) == (
        "whole", None, "tiled", 64,
    )  # fmt: skip
    assert whole["decode_s"] > 0 and tiled["peak_gib"] >= 0
    assert 0 < tiled["psnr_vs_whole"] < 100  # tiles are normalised apart: close, not equal


def test_vae_benchmark_bad_arguments(tmp_path, capsys):
    code, _, err = run_script(VAE_SCRIPT, ["--size", "100"], capsys)
    assert code == 2 and "--size must be a multiple of 8" in err
    code, _, err = run_script(VAE_SCRIPT, ["--vae", str(tmp_path / "none"), "--size", "64"], capsys)
    assert code == 2 and "is not a directory" in err


TRAIN_STEP = SCRIPT.parent / "benchmark_train_step.py"


@pytest.fixture(scope="module")
def tiny_manifest(tmp_path_factory):
    from ace.data.manifest import write_manifest
    from ace.data.toy import sample_stream

    root = tmp_path_factory.mktemp("data") / "set"
    write_manifest((s.lcu for s in sample_stream(8, seed=0, size=64)), root, progress=False)
    return root


def test_train_step_benchmark_times_both_paths(tiny_manifest, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    code, out, err = run_script(TRAIN_STEP, [
        "--config", tiny, f"data.manifest={tiny_manifest}", "data.batch_size=2",
        "--steps", "1", "--warmup", "0", "--vae-steps", "2", "--repeats", "1", "--json",
    ], capsys)  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert set(report["runs"]) == {"dit_plain", "dit_fused", "vae_plain", "vae_fast"}
    assert all(len(v) == 1 and v[0] > 0 for v in report["runs"].values())
    assert report["preset"] == "tiny" and report["dit_ratio"] > 0 and report["vae_ratio"] > 0
    assert not any(tmp_path.iterdir())  # the runs' output went to temporary directories
    import torch

    assert torch.channels_last is not torch.contiguous_format  # the plain path is undone


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--vae-size", "30"], "--vae-size must be a multiple of 8, got 30"),
        (["data.manifest=nowhere"], "data.manifest nowhere does not exist"),
        (["optim.lrr=1"], "optim.lrr"),
    ],
)
def test_train_step_benchmark_bad_input_is_one_line(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_script(TRAIN_STEP, extra, capsys)
    assert code == 2 and not out
    assert err.startswith("benchmark_train_step.py: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())
