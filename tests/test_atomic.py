"""Atomic writes: readable permissions, no partial file, previous version kept on failure."""

from __future__ import annotations

import os

import pytest

from langneurons.atomic import atomic_write, atomic_write_text
from langneurons.errors import UserError


def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path / "sub" / "a.json", "{}\n")
    finally:
        os.umask(old)
    assert p.read_text() == "{}\n"
    assert (p.stat().st_mode & 0o777) == 0o644


def test_failed_write_keeps_previous_version_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "first")

    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert p.read_text() == "first"
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_missing_directory_is_a_user_error_when_not_created(tmp_path):
    with pytest.raises(UserError, match="does not exist; create it first"):
        atomic_write_text(tmp_path / "nope" / "a.txt", "x", create_dirs=False)


def test_a_full_disk_is_one_user_error_and_keeps_the_previous_version(tmp_path, monkeypatch):
    import errno
    p = tmp_path / "a.txt"
    atomic_write_text(p, "first")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match=r"cannot write .*a\.txt \(No space left on device\)"):
        atomic_write_text(p, "second")
    monkeypatch.undo()
    assert p.read_text() == "first" and sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_a_short_write_is_never_reported_as_success(tmp_path):
    p = tmp_path / "a.bin"

    def short(tmp):
        with open(tmp, "wb") as f:
            f.write(b"12345")
    with pytest.raises(UserError, match="5 of 10 bytes"):
        atomic_write(p, short, expected_size=10)
    assert not p.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("target", ["fifo", "/dev/full", "/dev/null"])
def test_devices_and_fifos_are_refused_and_left_alone(target, tmp_path):
    import stat
    if target == "fifo":
        target = str(tmp_path / "fifo")
        os.mkfifo(target)
    mode = os.stat(target).st_mode
    with pytest.raises(UserError, match="not a regular file"):
        atomic_write_text(target, "x")
    assert os.stat(target).st_mode == mode and not stat.S_ISREG(mode)


def test_a_file_where_a_directory_should_be_is_a_user_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="cannot create directory"):
        atomic_write_text(tmp_path / "f" / "sub" / "a.txt", "x")
