"""The README's Python examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


def test_readme_examples_run_in_order(capsys):
    scope: dict = {}
    for i, block in enumerate(BLOCKS):
        try:
            exec(compile(block, f"README.md[python block {i}]", "exec"), scope)
        except Exception as e:  # pragma: no cover - the message is the point
            pytest.fail(f"README python block {i} failed: {e!r}\n{block}")
    out = capsys.readouterr().out
    assert "'put the hat in {image1} on the dog'" in out
    assert "[2, 0, 1]" in out
    assert "[(4, 8, 8), (4, 6, 6)]" in out
