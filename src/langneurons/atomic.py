"""Atomic, verified file writes: a temporary file in the target's directory, then ``os.replace``.

A reader never sees a half-written file and an interrupted write leaves the previous version in
place. The new file gets the usual permissions (``0666`` less the umask), not the ``0600`` of a
temporary file. Before the rename the temporary file is flushed to disk (``fsync``) and, for text,
its size is compared with what was written, so a full disk cannot pass for success; the directory
entry is synced after the rename. An ``OSError`` while writing becomes one
:class:`~langneurons.errors.UserError` naming the path. A target that is a device, FIFO or socket
(``/dev/full``, ``/dev/null``) is refused: ``os.replace`` would swap the device node for a file.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Callable, Optional

from .errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _why(exc: OSError) -> str:
    return exc.strerror or exc.__class__.__name__


def _sync(path: str) -> int:
    """fsync ``path``; return its size."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _sync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass            # some file systems cannot sync a directory; the rename itself is done
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[str], None], create_dirs: bool = True,
                 expected_size: Optional[int] = None) -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file, then move it onto ``path``.

    ``expected_size``: the number of bytes ``write`` must have written (checked after ``fsync``).
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise UserError(f"cannot write {path}: it is {kind}; choose a regular file in a directory of yours")
    if create_dirs:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create directory {directory} for {path} ({_why(e)}); "
                            "choose a location inside a writable directory") from None
    elif not directory.is_dir():
        raise UserError(f"cannot write {path}: directory {directory} does not exist; create it first")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise UserError(f"cannot write {path} ({_why(e)}); choose a writable directory") from None
    os.close(fd)
    try:
        try:
            write(tmp)
            size = _sync(tmp)
            if expected_size is not None and size != expected_size:
                raise UserError(f"cannot write {path}: {size} of {expected_size} bytes reached the disk; "
                                "free disk space and run the command again")
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except OSError as e:
            raise UserError(f"cannot write {path} ({_why(e)}); free disk space or choose another location, "
                            "then run the command again") from None
        _sync_dir(directory)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path, text: str, create_dirs: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, and check every byte reached the disk."""
    data = text.encode("utf-8")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return atomic_write(path, write, create_dirs, expected_size=len(data))
