"""Loader of the local lm-evaluation-harness tasks of langneurons (offline, no hub access).

``load_local(data_file=..., lang=None)`` reads a JSON-lines file (a path relative to this folder
or absolute) into a ``datasets.DatasetDict`` with one ``test`` split. Records:

    {"lang": "en", "context": "The capital of France is", "choices": [" Paris", " Rome", " Berlin"], "label": 0}

``context`` is scored as the prompt, each of ``choices`` as a continuation (the harness adds no
separator: put the leading space in the choice), ``label`` is the 0-based gold index. ``lang``
keeps only the records of that language (``--metadata '{"lang": "fr"}'``).
"""

from __future__ import annotations

from pathlib import Path

from langneurons.errors import UserError
from langneurons.jsonl import iter_jsonl

HERE = Path(__file__).resolve().parent


def load_local(data_file: str = "langneurons_mc.jsonl", lang=None, **_ignored):
    import datasets
    path = Path(data_file)
    if not path.is_absolute():
        path = HERE / path
    records = []
    for where, rec in iter_jsonl(path, 'each line must be {"context": ..., "choices": [...], "label": N}'):
        missing = [k for k in ("context", "choices", "label") if k not in rec]
        if missing:
            raise UserError(f"{where}: missing field(s) {', '.join(missing)}; add them")
        if not 0 <= int(rec["label"]) < len(rec["choices"]):
            raise UserError(f"{where}: label {rec['label']} is not an index of choices; fix the label")
        if lang is None or rec.get("lang") == lang:
            records.append({"lang": rec.get("lang", ""), "context": rec["context"],
                            "choices": list(rec["choices"]), "label": int(rec["label"])})
    if not records:
        raise UserError(f"{path}: no records{'' if lang is None else f' for lang {lang!r}'}")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})
