"""Finished parts of an interrupted run, kept in ``OUT/.partial/NAME.json`` until the run completes.

A long command (``ppl`` per column, ``eval`` per row) records each finished part under a key: a
digest of everything that determines the results (model fingerprint, inputs, options). A rerun of
the same command reads the parts back when the key matches and recomputes only the rest; a changed
command (another key) or a corrupt file starts afresh. Files are written atomically, by rank 0 only
under torchrun, and removed (with an empty ``.partial``) once the final result is written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .atomic import atomic_write_text


class Partial:
    """``parts``: the finished ``{name: result}`` of an earlier run of the same command (or ``{}``)."""

    def __init__(self, out: Path, name: str, key_doc: dict, fmt: str, field: str, write: bool = True):
        self.path = Path(out) / ".partial" / f"{name}.json"
        self.key = hashlib.sha256(json.dumps(key_doc, sort_keys=True, default=str).encode()).hexdigest()[:20]
        self.fmt, self.field, self.write = fmt, field, write
        self.parts: dict = {}
        if self.path.is_file():
            try:
                saved = json.loads(self.path.read_text(encoding="utf-8"))
                if saved.get("key") == self.key and isinstance(saved.get(field), dict):
                    self.parts = saved[field]
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                self.parts = {}

    def add(self, name: str, result) -> None:
        """Record one finished part (and checkpoint every part so far)."""
        self.parts[name] = result
        if self.write:
            atomic_write_text(self.path, json.dumps({"format": self.fmt, "key": self.key, self.field: self.parts},
                                                    ensure_ascii=False))

    def clear(self) -> None:
        """The run is complete: drop the file (and ``.partial`` when nothing else is in it)."""
        if not self.write:
            return
        self.path.unlink(missing_ok=True)
        if self.path.parent.is_dir() and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()
