"""Multiple choice answered by letter (Belebele, INCLUDE, or any file in the format below).

Prompt (the Belebele prompt of lm-evaluation-harness; the ``P:`` line only when there is a
passage):

    P: {passage}
    Q: {question}
    A: {choice 1}
    B: {choice 2}
    ...
    Answer:

The prediction is the letter whose token (``" A"``, ``" B"``, ...) has the largest next-token
log-probability after ``Answer:``, among as many letters as the item has choices (2 to 10).

File format (JSON lines, one item per line; ``DIR/LANG.jsonl`` or one FILE for all languages):

    {"question": "...", "choices": ["...", "...", "...", "..."], "answer": 2,
     "passage": "... (optional)", "lang": "en (optional)"}

``answer`` is the 0-based index of the correct choice or its letter (``"C"``). When the records
carry ``lang``, only those of the language asked for are kept. Field names of the published
datasets are accepted as well: Belebele (``flores_passage``, ``mc_answer1..4``,
``correct_answer_num`` 1-based) and INCLUDE (``option_a..option_d``, ``answer`` 0-based).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..jsonl import read_jsonl
from ..languages import ENGLISH_NAMES
from .common import LETTERS, LetterTask, flores_code


def _choices(r: dict) -> Optional[list[str]]:
    if isinstance(r.get("choices"), list):
        return [str(c) for c in r["choices"]]
    for keys in (["mc_answer1", "mc_answer2", "mc_answer3", "mc_answer4"],
                 ["option_a", "option_b", "option_c", "option_d"], ["A", "B", "C", "D"]):
        if all(k in r for k in keys):
            return [str(r[k]) for k in keys]
    return None


def _answer(r: dict, n: int) -> Optional[int]:
    if "correct_answer_num" in r:  # Belebele: 1-based, a string
        try:
            return int(r["correct_answer_num"]) - 1
        except (TypeError, ValueError):
            return None
    a = r.get("answer", r.get("label"))
    if isinstance(a, str) and len(a.strip()) == 1 and a.strip().upper() in LETTERS[:n]:
        return LETTERS.index(a.strip().upper())
    try:
        return int(a) if not isinstance(a, bool) else None
    except (TypeError, ValueError):
        return None


class MultipleChoice(LetterTask):
    name = "mcq"
    description = "multiple choice accuracy by answer letter (A-D next-token argmax)"
    languages = ()
    splits = ("test",)

    def __init__(self, name: str = "mcq", hf: Optional[str] = None, hf_config_kind: str = "flores",
                 description: str = ""):
        self.name, self.hf, self._cfg = name, hf, hf_config_kind
        if description:
            self.description = description

    def hf_config(self, lang):
        if self._cfg == "flores":
            return flores_code(lang)
        if self._cfg == "name":
            return ENGLISH_NAMES.get(lang, lang)
        return lang

    def local_file(self, directory: Path, lang, split):
        p = directory / f"{lang}.jsonl"
        return p if p.is_file() else directory / f"{flores_code(lang)}.jsonl"

    def _docs(self, records, lang, where):
        codes = {lang}
        try:
            codes.add(flores_code(lang))
        except UserError:
            pass
        docs = []
        for i, r in enumerate(records):
            w = f"{where} record {i + 1}"
            rl = r.get("lang", r.get("language"))
            if rl is not None and str(rl) not in codes and str(rl) != ENGLISH_NAMES.get(lang):
                continue
            question = r.get("question")
            if not isinstance(question, str) or not question.strip():
                raise UserError(f"{w}: needs a non-empty 'question'; fix the record")
            choices = _choices(r)
            if not choices or not 2 <= len(choices) <= len(LETTERS):
                raise UserError(f"{w}: needs 'choices', a list of 2 to {len(LETTERS)} strings; fix the record")
            label = _answer(r, len(choices))
            if label is None or not 0 <= label < len(choices):
                raise UserError(f"{w}: 'answer' must be a 0-based choice index or a letter A-"
                                f"{LETTERS[len(choices) - 1]}, got {r.get('answer', r.get('correct_answer_num'))!r}")
            passage = r.get("passage", r.get("flores_passage", r.get("context")))
            docs.append({"passage": str(passage).strip() if passage else "", "question": question.strip(),
                         "choices": choices, "label": label})
        return docs

    def read_file(self, path, lang, split):
        return self._docs(read_jsonl(path), lang, str(path))

    def from_records(self, records, lang, where):
        return self._docs(records, lang, where)

    def prompt(self, doc, lang, **options):
        lines = [f"P: {doc['passage']}"] if doc["passage"] else []
        lines.append(f"Q: {doc['question']}")
        lines += [f"{LETTERS[k]}: {c}" for k, c in enumerate(doc["choices"])]
        lines.append("Answer:")
        return "\n".join(lines)


TASK = MultipleChoice()
BELEBELE = MultipleChoice("belebele", "hf:facebook/belebele", "flores",
                          "Belebele reading comprehension accuracy (A-D next-token argmax)")
INCLUDE = MultipleChoice("include", "hf:CohereLabs/include-base-44", "name",
                         "INCLUDE exam accuracy (A-D next-token argmax)")
