"""The README's examples run as written: every Python block, and the infer.py shell block."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
SHELL_BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_readme_has_examples():
    assert len(PYTHON_BLOCKS) >= 5
    assert any("scripts/infer.py" in b for b in SHELL_BLOCKS)


def test_readme_python_examples_run_in_order(capsys):
    scope: dict = {}
    for i, block in enumerate(PYTHON_BLOCKS):
        try:
            exec(compile(block, f"README.md[python block {i}]", "exec"), scope)
        except Exception as e:  # pragma: no cover - the message is the point
            pytest.fail(f"README python block {i} failed: {e!r}\n{block}")
    out = capsys.readouterr().out
    assert "(64, 64) (64, 64) (64, 64)" in out
    assert "['make {image} blue', 'add a circle to {image1}', 'and a star']" in out
    assert "'put the hat in {image1} on the dog'" in out
    assert "[2, 0, 1]" in out
    assert "[(4, 8, 8), (4, 6, 6)]" in out
    assert "16 recolor " in out
    assert "(64, 64) True" in out
    assert "3 True" in out


def run_block(marker: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the README shell block that contains ``marker`` with bash -e in ``cwd``, where
    ``scripts/`` and ``configs/`` link to the repository's; it must succeed."""
    (block,) = [b for b in SHELL_BLOCKS if marker in b]
    for name in ("scripts", "configs"):
        if not (cwd / name).exists():
            (cwd / name).symlink_to(ROOT / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", "-ec", block], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_readme_toy_data_and_evaluation_commands_run_as_written(tmp_path):
    result = run_block("make_toy_data.py", tmp_path)
    assert "200 LCUs, all valid" in result.stdout
    assert (tmp_path / "outputs" / "eval" / "report.json").is_file()
    assert (tmp_path / "outputs" / "eval" / "report.png").is_file()


def test_readme_training_commands_run_as_written(tmp_path):
    run_block("train.resume=latest", tmp_path)
    rows = (tmp_path / "outputs" / "try" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 40
    assert (tmp_path / "outputs" / "try" / "pipeline" / "model_index.json").is_file()
    # then the shards block, on the toy data the config generated
    run_block("make_shards.py", tmp_path)
    assert len((tmp_path / "outputs" / "sharded" / "metrics.jsonl").read_text().splitlines()) == 10


def test_readme_infer_commands_run_as_written(tmp_path):
    run_block("outputs/tiny-pipeline", tmp_path)
    assert Image.open(tmp_path / "outputs" / "circle.png").size == (64, 64)
    assert Image.open(tmp_path / "outputs" / "blue.png").size == (64, 64)
    batch = tmp_path / "outputs" / "batch"
    assert sorted(p.name for p in batch.iterdir()) == ["00000.png", "green.png"]
    assert Image.open(batch / "green.png").size == (64, 64)


def test_readme_probe_command_runs_as_written(tmp_path):
    result = run_block("scripts/probe.py", tmp_path)
    assert "copy attn" in result.stdout
    assert (tmp_path / "outputs" / "eval" / "probe.json").is_file()
