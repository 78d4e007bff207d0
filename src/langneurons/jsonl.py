"""JSON-lines reading shared by every file format of the toolkit (corpora, tasks, cloze data, MRC).

One rule everywhere: blank lines are skipped, every other line must be one JSON object, and a bad
line or a file that is not UTF-8 is a one-line :class:`~langneurons.errors.UserError` naming the file,
the line and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from .errors import UserError


def iter_jsonl(path, hint: str = "") -> Iterator[tuple[str, dict]]:
    """Yield ``(where, record)`` for every non-blank line of ``path``; ``where`` is ``"FILE:LINE"``.

    ``hint`` (e.g. ``"each line must be an object with a 'text' field"``) is added to the error of a
    line that is not a JSON object.
    """
    path = Path(path)
    tail = f"; {hint}" if hint else "; fix or remove that line"
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where} is not valid JSON ({e.msg}){tail}") from None
                if not isinstance(rec, dict):
                    raise UserError(f"{where} is not a JSON object{tail}")
                yield where, rec
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; convert it to UTF-8") from None


def read_jsonl(path, hint: str = "") -> list[dict]:
    """All records of a JSON-lines file (see :func:`iter_jsonl`)."""
    return [rec for _, rec in iter_jsonl(path, hint)]
