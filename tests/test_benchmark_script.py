"""scripts/benchmark.py runs and checks correctness before it times (timings are not tested)."""

import json
import runpy
import sys
from pathlib import Path

import pytest

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
