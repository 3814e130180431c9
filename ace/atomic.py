"""Atomic file writes: a file appears whole or not at all.

atomic_write(Path("report.json"), lambda tmp: Path(tmp).write_text(text))

A rename is atomic against a process that dies; against a machine that goes down, the
renamed file's data may not have reached the disk yet. What must survive that too (the
trainer's checkpoints and export) is flushed first: ``fsync_tree(tmp)``, the rename, then
``fsync_dir(parent)``.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by
    setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` (made absolute) if it exists, else its nearest existing ancestor: where a
    ``mkdir -p`` of it would start. Callers check it is a directory before any work."""
    path = Path(os.path.abspath(path))
    return next(p for p in (path, *path.parents) if p.exists())  # "/" exists


def atomic_write(path: Path, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it: never half a file.

    The file gets the permissions a plain ``open`` would give it (0666 less the umask), or
    those of the file it replaces; not ``mkstemp``'s owner-only 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush ``path`` to disk: a file, or a directory with every file and directory under
    it (directories too, so that their entries are durable)."""
    path = Path(path)
    if path.is_file():
        _fsync(path, os.O_RDONLY)
        return
    for root, _, files in os.walk(path):
        for name in files:
            _fsync(Path(root) / name, os.O_RDONLY)
        fsync_dir(root)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename in it) to disk; a no-op where directories
    cannot be opened (Windows) or synced (some FUSE and CIFS mounts)."""
    if os.name == "nt":
        return
    try:
        _fsync(Path(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:  # some FUSE and CIFS mounts cannot sync a directory: best effort
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
