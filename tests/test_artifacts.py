"""The artifact registry: one tag per kind, defined once; loaders that round-trip and fail in one line."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from artifact_docs import checkpoint_doc, hand_made, write_run_dir
from langneurons import artifacts as A
from langneurons.errors import UserError

SRC = Path(A.__file__).resolve().parent


def test_every_kind_has_its_own_well_formed_tag_and_a_section():
    import importlib
    tags = [A.tag_of(k) for k in A.kinds()]
    assert len(set(tags)) == len(tags)
    for kind in A.kinds():
        assert A.tag_of(kind) == f"langneurons.{kind}.v1"
        assert re.fullmatch(r"langneurons\.[a-z_.]+\.v[0-9]+", A.tag_of(kind))
        module, function = A.KINDS[kind].section.rsplit(".", 1)
        section = getattr(importlib.import_module(f"langneurons.report.sections.{module}"), function)
        assert callable(A.renderer(kind)) and A.renderer(kind) is section
        assert A.python_loader(kind)


def test_tags_are_defined_only_in_the_registry():
    """No module spells a tag as a string literal (docstrings aside): they import it from artifacts."""
    tag = re.compile(r"^langneurons\.[a-z_.]+\.v[0-9]+$")
    offenders = []
    for f in sorted(SRC.rglob("*.py")):
        if f.name == "artifacts.py":
            continue
        tree = ast.parse(f.read_text(encoding="utf-8"))
        docstrings = {id(n.value) for n in ast.walk(tree)
                      if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        offenders += [f"{f.relative_to(SRC)}:{n.lineno} {n.value}" for n in ast.walk(tree)
                      if isinstance(n, ast.Constant) and isinstance(n.value, str) and tag.match(n.value)
                      and id(n) not in docstrings]
    assert offenders == []


def test_registry_imports_nothing_heavy():
    code = ("import sys, langneurons.artifacts; "
            "print(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


@pytest.fixture(scope="module")
def every_kind(tmp_path_factory):
    """``{kind: path}``: one file of every JSON kind (real writers where cheap, see artifact_docs)."""
    return write_run_dir(tmp_path_factory.mktemp("artifacts") / "run")


def test_real_writers_tag_their_files(every_kind):
    assert set(every_kind) == {k for k in A.kinds() if not A.KINDS[k].binary}
    for kind, p in every_kind.items():
        assert A.kind_of(p) == kind, p
    # bridge select writes two more neuron sets beside its ranking and selection
    for name in ("language_neurons.json", "overlap_neurons.json"):
        assert A.kind_of(every_kind["bridge.ranking"].parent / name) == "neuronset"


@pytest.mark.parametrize("kind", A.kinds())
def test_every_kind_round_trips(kind, every_kind, tmp_path):
    if kind == "finetune.checkpoint":       # the one torch file
        path = tmp_path / "checkpoint.pt"
        torch.save(checkpoint_doc(), path)
        assert A.load(path, kind)["step"] == 10 and A.kind_of(path) == kind
        return
    doc = A.load(every_kind[kind], kind)
    assert doc["format"] == A.tag_of(kind) and A.load(every_kind[kind]) == doc
    copy = tmp_path / "copy.json"
    copy.write_text(json.dumps(doc))
    assert A.load(copy) == doc and A.kind_of(copy) == A.kind_of(doc) == kind


def test_older_finetune_tag_is_read_as_run_record_or_checkpoint(tmp_path):
    rec = dict(hand_made(tmp_path)["finetune.run"], format=A.LEGACY_FINETUNE_FORMAT)
    assert A.kind_of(rec) == "finetune.run" and A.validate(rec, "finetune.run") is rec
    ck = dict(checkpoint_doc(), format=A.LEGACY_FINETUNE_FORMAT)
    assert A.kind_of(ck) == "finetune.checkpoint"


@pytest.mark.parametrize("text,kind,needle", [
    ("{not json", None, "not readable JSON"),
    ("[1, 2]", None, "JSON list, not a langneurons artifact"),
    ('{"rows": []}', None, "no format tag"),
    ('{"format": "langneurons.ppl.v9"}', None, "does not know"),
    ('{"format": "langneurons.ppl.v1", "rows": [], "columns": []}', None, "lacks 'ppl' (list)"),
    ('{"format": "langneurons.ppl.v1", "rows": [], "columns": [], "ppl": []}', "steer", "not steer"),
])
def test_bad_files_raise_one_line_naming_the_file(tmp_path, text, kind, needle):
    p = tmp_path / "x.json"
    p.write_text(text)
    with pytest.raises(UserError) as e:
        A.load(p, kind)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and needle in msg
    with pytest.raises(UserError, match="does not exist"):
        A.load(tmp_path / "missing.json")
    with pytest.raises(UserError, match="unknown artifact kind"):
        A.load(p, "nope")
