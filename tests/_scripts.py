"""One helper for the tests that run a script in-process: ``run_script(path, argv, capsys)``."""

import runpy
import sys

import pytest


def run_script(script, argv, capsys):
    """Run ``script`` as __main__ with ``argv``; return (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = [str(script), *map(str, argv)]
    try:
        with pytest.raises(SystemExit) as info:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return info.value.code, out.out, out.err
