"""The one JSON-lines reader behind corpora, task files, cloze data, MRC data and lm-eval tasks."""

from __future__ import annotations

import pytest

from langneurons.corpus import iter_documents
from langneurons.errors import UserError
from langneurons.jsonl import iter_jsonl, read_jsonl


def test_records_and_locations(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"x": 1}\n\n   \n{"x": 2, "y": "é"}\n', encoding="utf-8")
    assert read_jsonl(f) == [{"x": 1}, {"x": 2, "y": "é"}]
    assert [w for w, _ in iter_jsonl(f)] == [f"{f}:1", f"{f}:4"]


@pytest.mark.parametrize("text, words", [
    ('{"x": 1}\n{not json}\n', ":2 is not valid JSON"),
    ('[1, 2]\n', ":1 is not a JSON object"),
])
def test_bad_lines_name_file_and_line(tmp_path, text, words):
    f = tmp_path / "b.jsonl"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=words) as e:
        read_jsonl(f, hint="each line must be an object with a 'text' field")
    assert "'text' field" in str(e.value) and "\n" not in str(e.value)


def test_not_utf8(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_bytes(b'{"x": "\xff\xfe"}\n')
    with pytest.raises(UserError, match="not UTF-8"):
        read_jsonl(f)


def test_jsonl_corpus_uses_the_text_field(tmp_path):
    f = tmp_path / "en.jsonl"
    f.write_text('{"text": " one "}\n{"text": ""}\n{"text": "two", "id": 3}\n', encoding="utf-8")
    assert list(iter_documents([str(f)], code="en")) == ["one", "two"]
    f.write_text('{"text": "one"}\n{"body": "two"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"en.jsonl:2 has no string field 'text'"):
        list(iter_documents([str(f)], code="en"))
