"""Loader of the local lm-evaluation-harness tasks of langneurons (offline, no hub access).

``load_local(data_file=..., lang=None)`` reads a JSON-lines file (a path relative to this folder
or absolute) into a ``datasets.DatasetDict`` with one ``test`` split. Records:

    {"lang": "en", "context": "The capital of France is", "choices": [" Paris", " Rome", " Berlin"], "label": 0}

``context`` is scored as the prompt, each of ``choices`` as a continuation (the harness adds no
separator: put the leading space in the choice), ``label`` is the 0-based gold index. ``lang``
keeps only the records of that language (``--metadata '{"lang": "fr"}'``).
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_local(data_file: str = "langneurons_mc.jsonl", lang=None, **_ignored):
    import datasets
    path = Path(data_file)
    if not path.is_absolute():
        path = HERE / path
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            missing = [k for k in ("context", "choices", "label") if k not in rec]
            if missing:
                raise ValueError(f"{path} line {n}: missing field(s) {', '.join(missing)}")
            if not 0 <= int(rec["label"]) < len(rec["choices"]):
                raise ValueError(f"{path} line {n}: label {rec['label']} is not an index of choices")
            if lang is None or rec.get("lang") == lang:
                records.append({"lang": rec.get("lang", ""), "context": rec["context"],
                                "choices": list(rec["choices"]), "label": int(rec["label"])})
    if not records:
        raise ValueError(f"{path}: no records{'' if lang is None else f' for lang {lang!r}'}")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})
