"""Atomic file writes: a temporary file in the target's directory, then ``os.replace``.

A reader never sees a half-written file and an interrupted write leaves the previous version in
place. The new file gets the usual permissions (``0666`` less the umask), not the ``0600`` of a
temporary file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write: Callable[[str], None], create_dirs: bool = True) -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file, then move it onto ``path``."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if create_dirs:
        directory.mkdir(parents=True, exist_ok=True)
    elif not directory.is_dir():
        raise UserError(f"cannot write {path}: directory {directory} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path, text: str, create_dirs: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return atomic_write(path, write, create_dirs)
