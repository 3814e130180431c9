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


def test_bad_arguments_are_reported(capsys):
    code, out = run(["--configs", "giant"], capsys)
    assert code == 2 and "unknown config 'giant'" in out.err


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
