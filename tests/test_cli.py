"""ace.cli: the scripts' one-line errors and text tables, against hand-written output."""

from pathlib import Path

import pytest

from ace.cli import HelpFormatter, OneLineParser, text_table
from tests._scripts import run_script

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_text_table_aligns_and_rules_by_hand():
    got = text_table(["task", "n"], [["recolor", "8"], ["add", "12"]], footer=["overall", "20"])
    assert got == "\n".join(
        [
            "task      n",
            "-----------",
            "recolor   8",
            "add      12",
            "-----------",
            "overall  20",
        ]
    )
    assert text_table(["a", "bb"], [["x", "1"]]) == "a  bb\n-----\nx   1"


def test_parser_errors_in_one_line_with_exit_2(capsys):
    p = OneLineParser(prog="tool.py")
    p.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--n", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "tool.py: error: argument --n: invalid int value: 'x'\n"


def test_help_names_each_default_once():
    p = OneLineParser(prog="tool.py", formatter_class=HelpFormatter, description="a\n  b")
    p.add_argument("--n", type=int, default=64, help="samples")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--size", type=int, default=64, help="side (default 64)")
    p.add_argument("--out", required=True, help="where")
    p.add_argument("--tag", default=None, help="a tag")
    p.add_argument("--image", action="append", default=[], help="an image")
    p.add_argument("--quiet", action="store_true", help="no bar")
    text = " ".join(p.format_help().split())  # argparse wraps at the terminal width
    assert "a\n  b" in p.format_help()  # the description as written
    assert "samples (default: 64)" in text and "seed (default: 0)" in text
    assert "side (default 64) " in text and text.count("default") == 3
    for bare in ("where", "a tag", "an image", "no bar"):
        assert f"{bare} " in text or text.endswith(bare)


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("*.py")))
def test_every_script_has_help(script, capsys):
    code, out, _ = run_script(SCRIPTS / script, ["--help"], capsys)
    assert code == 0 and out.startswith("usage:"), out


@pytest.mark.parametrize(
    "script",
    [
        "evaluate.py",
        "probe.py",
        "infer.py",
        "convert_official.py",
        "annotate.py",
        "write_instructions.py",
    ],
)
def test_every_script_reports_a_bad_flag_in_one_line(script, capsys):
    """The scripts share OneLineParser: a bad flag is one line naming the script, exit 2."""
    code, _, err = run_script(SCRIPTS / script, ["--no-such-flag"], capsys)
    assert code == 2
    assert err.startswith(f"{script}: error: ") and err.count("\n") == 1, err


def test_pick_device_defaults_and_refuses_unknown_or_absent_devices(monkeypatch):
    import torch

    from ace.cli import UserError, pick_device

    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the default is the first accelerator the machine has: cuda, then xpu, then mps
    for cuda, xpu, mps, expected in [
        (True, True, True, "cuda"),
        (False, True, True, "xpu"),
        (False, False, True, "mps"),
        (False, False, False, "cpu"),
    ]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda v=cuda: v)
        monkeypatch.setattr(torch.xpu, "is_available", lambda v=xpu: v)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda v=mps: v)
        assert pick_device(None) == torch.device(expected)
    monkeypatch.undo()
    with pytest.raises(UserError, match="'nonsense' is not a torch device"):
        pick_device("nonsense")
    for name in ("meta", "hpu"):  # torch knows the names; this machine has no such device
        with pytest.raises(UserError, match=f"this machine has no {name} device"):
            pick_device(name)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="this machine has no cuda device"):
            pick_device("cuda:0")
    # a machine with one GPU has no cuda:5 (from_pretrained would fail after the load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(UserError, match="cuda:5: this machine has 1 cuda device"):
        pick_device("cuda:5")


def test_check_out_refuses_what_cannot_be_written(tmp_path, monkeypatch):
    import os

    from ace.cli import UserError, check_out

    (tmp_path / "afile").write_text("x")
    check_out(tmp_path / "new" / "out.png", "--output")  # made at the write
    for path, message in [
        (tmp_path, "is a directory"),
        (tmp_path / "afile" / "out.png", "is a file, not a directory"),
    ]:
        with pytest.raises(UserError, match=message):
            check_out(path, "--output")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root may write anywhere
    with pytest.raises(UserError, match="no permission to write in"):
        check_out(tmp_path / "out.png", "--output")


def test_text_table_refuses_rows_of_another_width():
    with pytest.raises(ValueError, match="row 0 has 1 cells for 2 columns"):
        text_table(["a", "b"], [["x"]])
    with pytest.raises(ValueError, match="row 1 has 3 cells"):
        text_table(["a", "b"], [["x", "1"]], footer=["all", "1", "extra"])


@pytest.mark.parametrize(
    ("script", "argv"),
    [
        ("evaluate.py", ["--suite", "toy", "--n", "1", "--steps", "1"]),
        ("probe.py", ["--n", "1"]),
    ],
)
def test_scripts_report_a_bad_device_in_one_line(script, argv, tmp_path, capsys):
    out = tmp_path / "report.json"
    argv = ["--pipeline", "tiny", "--device", "nonsense", "--out", out, *argv]
    code, _, err = run_script(SCRIPTS / script, argv, capsys)
    assert not out.exists()
    assert code == 2 and err == f"{script}: error: --device 'nonsense' is not a torch device (cpu, cuda, cuda:1, xpu, mps ...)\n"  # fmt: skip


@pytest.mark.parametrize("script", ["toy_budget_run.sh", "benchmark_suite.sh"])
def test_shell_scripts_answer_help_and_refuse_an_option_as_outdir(script, tmp_path):
    """--help printed mkdir's help and then ran every step with '--help' as OUTDIR."""
    import subprocess

    run = lambda *a: subprocess.run(["bash", str(SCRIPTS / script), *a], cwd=tmp_path, capture_output=True, text=True, timeout=60)  # noqa: E731  # fmt: skip
    shown = run("--help")
    assert shown.returncode == 0 and f"scripts/{script} OUTDIR" in shown.stdout, shown.stderr
    refused = run("--bogus")
    assert refused.returncode == 2 and "unknown option --bogus" in refused.stderr
    assert list(tmp_path.iterdir()) == []  # no OUTDIR named after the option
