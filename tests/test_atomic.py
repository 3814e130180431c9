"""ace.atomic.atomic_write: whole or nothing, with the permissions a plain open gives."""

import os
import stat
from pathlib import Path

import pytest

from ace.atomic import atomic_write


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_file_gets_the_umask_permissions_not_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "plain.txt") == 0o644


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    os.chmod(path, 0o640)
    atomic_write(path, lambda tmp: Path(tmp).write_text("new"))
    assert path.read_text() == "new" and mode(path) == 0o640


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def fail(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_nearest_existing_is_where_mkdir_p_would_start(tmp_path):
    from ace.atomic import nearest_existing

    (tmp_path / "a").mkdir()
    (tmp_path / "f").write_text("")
    assert nearest_existing(tmp_path / "a") == tmp_path / "a"
    assert nearest_existing(tmp_path / "a" / "b" / "c") == tmp_path / "a"
    assert nearest_existing(tmp_path / "f" / "x") == tmp_path / "f"  # a file: callers refuse it


def test_fsync_tree_tolerates_a_mount_that_cannot_sync_directories(tmp_path, monkeypatch):
    """Some FUSE and CIFS mounts answer EINVAL to fsync on a directory: a checkpoint there
    is still saved (its files are synced); a real I/O error still raises."""
    import errno
    import stat

    from ace.atomic import fsync_tree

    (tmp_path / "ckpt" / "sub").mkdir(parents=True)
    (tmp_path / "ckpt" / "sub" / "w.bin").write_bytes(b"x")
    synced = []

    def fsync(fd, code=errno.EINVAL):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        synced.append(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fsync_tree(tmp_path / "ckpt")
    assert len(synced) == 1  # the file
    monkeypatch.setattr(os, "fsync", lambda fd: fsync(fd, errno.EIO))
    with pytest.raises(OSError, match="Input/output error"):
        fsync_tree(tmp_path / "ckpt")
