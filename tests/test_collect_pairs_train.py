"""End to end: scripts/collect_pairs.py mines pairs from toy-world images into a manifest
that scripts/train.py trains on (the tiny config, three steps)."""

import json
import subprocess
import sys

from test_collect_pairing import CLI, ROOT, SCRIPTS, collection, script, write_features

from ace.data.manifest import LCUManifest

__all__ = ["collection"]  # the fixture, shared with test_collect_pairing


def test_mined_pairs_train(collection, tmp_path, capsys):
    feats, out = write_features(collection, tmp_path / "feats"), tmp_path / "pairs"
    argv = ["--images", collection[0], "--out", out, "--features", feats, *CLI]
    code, _, stderr = script("collect_pairs.py", argv, capsys)
    assert code == 0, stderr
    assert len(LCUManifest(out)) > 30

    run = tmp_path / "run"
    cmd = [
        sys.executable,
        str(SCRIPTS / "train.py"),
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        f"data.manifest={out}",
        "train.max_steps=3",
        f"train.output_dir={run}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 3 and (run / "pipeline").is_dir()
