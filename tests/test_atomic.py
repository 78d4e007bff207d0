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
