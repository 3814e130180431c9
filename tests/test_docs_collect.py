"""docs/COLLECT.md runs as written: its bash blocks, then its Python blocks, in one directory."""

import os
import re
import subprocess
import sys
from pathlib import Path

from ace.data.manifest import LCUManifest

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "COLLECT.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", DOC, flags=re.S)
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", DOC, flags=re.S)


def test_collect_doc_runs_as_written(tmp_path, monkeypatch, capsys):
    assert len(BASH_BLOCKS) == 2 and len(PYTHON_BLOCKS) == 4
    for name in ("scripts", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for i, block in enumerate(BASH_BLOCKS):
        result = subprocess.run(
            ["bash", "-ec", block], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, f"bash block {i}:\n{result.stderr[-3000:]}"
    for name in ("toy-pairs", "toy-maps", "toy-templated"):
        assert (
            len(LCUManifest(tmp_path / name)) > 0 and LCUManifest(tmp_path / name).validate() == []
        )
    assert (tmp_path / "outputs" / "toy-pairs-run" / "pipeline" / "model_index.json").is_file()

    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(PYTHON_BLOCKS):
        exec(compile(block, f"COLLECT.md[python block {i}]", "exec"), {})
    out = capsys.readouterr().out
    assert (
        "['features-00000.safetensors', 'features-00001.safetensors'] ['set1/0.png', 'set1/1.png'] (6, 32)"
        in out
    )
    assert (
        "(['paint {image} red'], {'duplicate of the instruction': 1, 'image references differ': 1})"
        in out
    )
    assert "(64, 64) draw the Canny edge map of {image}" in out
    assert len(LCUManifest(tmp_path / "toy-pairs-bg")) > 0
