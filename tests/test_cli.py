"""ace.cli: the scripts' one-line errors and text tables, against hand-written output."""

import pytest

from ace.cli import OneLineParser, text_table


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
