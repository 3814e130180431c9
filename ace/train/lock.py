"""One run at a time per output directory.

Two training runs in one ``train.output_dir`` (a resume started while the first run still
trains, or the same command in two terminals) would interleave their metrics rows, delete
each other's temporary checkpoints and rotate away each other's checkpoints. The main
process holds an advisory lock on ``OUTPUT/.lock`` for as long as ``Trainer.train`` runs:

    with run_lock(Path("outputs/run")):
        ...  # a second run_lock on the same directory raises ValueError here

The lock is ``fcntl.flock``: the kernel drops it when the process ends, however it ends
(a SIGKILL leaves no stale lock behind). Where there is no ``fcntl`` (Windows) nothing is
locked; network file systems may not honour it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


def _busy(out: Path, fd: int, what: str = "train.output_dir") -> ValueError:
    """The refusal, naming the pid the holder wrote into the lock file ``fd``."""
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    return ValueError(
        f"{what} {out} is in use by another run (pid {holder}); wait for it to "
        f"finish, or give another {what}"
    )


def check_free(out: Path) -> None:
    """ValueError now if a run holds ``out/.lock``: before a second run reads what the first
    is writing there (and, say, takes a run before its first checkpoint for a dead one).
    A shared, non-blocking probe: probes do not block each other."""
    if fcntl is None or not (out / LOCK_NAME).is_file():
        return
    try:
        fd = os.open(out / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise _busy(out, fd) from None
    finally:
        os.close(fd)


@contextmanager
def run_lock(out: Path, what: str = "train.output_dir") -> Iterator[None]:
    """Hold ``out/.lock`` (``out`` is created); ValueError at once if another process, or
    another ``run_lock`` of this one, holds it, naming ``out`` as the setting ``what``. The
    file keeps the holder's pid, for the message. (An embedding cache's build holds one
    too: ``data.cache``.)"""
    if fcntl is None:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(out, fd, what) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
