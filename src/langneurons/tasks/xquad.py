"""XQuAD: extractive question answering in 12 languages, answered by greedy generation.

Prompt: ``"Context: {context}\\nQuestion: {question}\\nAnswer:"``; the answer is the generated
text up to the first newline (at most 32 new tokens by default).

Metrics (option ``qa_metric``):

* ``squad`` (default): SQuAD v1.1 exact match and F1 on normalised words, best over the gold
  answers. ``normalise(s)`` = lower-case, drop punctuation (every Unicode punctuation mark and
  the ASCII ``string.punctuation`` symbols), drop the English articles a/an/the as words, split
  on whitespace. ``F1 = 2 P R / (P + R)`` with ``P = |pred ∩ gold| / |pred|``,
  ``R = |pred ∩ gold| / |gold|`` over word multisets (0 when nothing is shared). Words are
  whitespace tokens, so for Chinese, Japanese and Thai F1 is close to EM.
* ``token``: the same two scores on the model tokenizer's token ids of the stripped strings
  ([M25]'s variant): EM = identical id sequences, F1 over id multisets.

Local files: ``DIR/xquad.LANG.json`` in SQuAD format (``data[].paragraphs[].qas[]``), read by
:func:`read_squad` (which also reads the SQuAD training file of fine-tuning).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import UserError
from .common import GenerateTask, read_json

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = set(string.punctuation)
#: characters of scripts written without spaces (CJK, kana, Hangul, Thai, Lao, Myanmar)
_NOSPACE = re.compile("([\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\u3040-\u30ff\u0e00-\u0e7f\u0e80-\u0eff\u1000-\u109f])")


def normalize_answer(text: str) -> str:
    """Lower-case, remove punctuation, remove a/an/the, collapse whitespace (SQuAD v1.1 order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _ASCII_PUNCT and not unicodedata.category(ch).startswith("P"))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_words(text: str, mixed: bool = False) -> list[str]:
    """Words of a normalised answer: whitespace tokens, or with ``mixed`` (MLQA's "mixed
    segmentation") every character of a script written without spaces as a word of its own."""
    text = normalize_answer(text)
    return (_NOSPACE.sub(r" \1 ", text) if mixed else text).split()


def _f1(pred: Sequence, gold: Sequence) -> float:
    if not pred or not gold:
        return float(len(pred) == len(gold))
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    p, r = same / len(pred), same / len(gold)
    return 2 * p * r / (p + r)


def squad_em_f1(prediction: str, answers: Iterable[str], mixed: bool = False) -> tuple[float, float]:
    """``(EM, F1)`` of one prediction against its gold answers (max over answers); ``mixed``: see
    :func:`answer_words`."""
    pred = answer_words(prediction, mixed)
    em = f1 = 0.0
    for a in answers:
        gold = answer_words(a, mixed)
        em = max(em, float(pred == gold))
        f1 = max(f1, _f1(pred, gold))
    return em, f1


def token_em_f1(prediction: str, answers: Iterable[str], tokenizer) -> tuple[float, float]:
    """``(EM, F1)`` on token ids of the stripped strings (no special tokens), max over answers."""
    def ids(s):
        return list(tokenizer(s.strip(), add_special_tokens=False).input_ids)
    pred = ids(prediction)
    em = f1 = 0.0
    for a in answers:
        gold = ids(a)
        em = max(em, float(pred == gold))
        f1 = max(f1, _f1(pred, gold))
    return em, f1


def read_squad(path: Path, skip_unanswered: bool = False) -> list[dict]:
    """Questions of a SQuAD v1.1-format JSON file (``data[].paragraphs[] -> {context, qas[] -> {id,
    question, answers[].text}}``: SQuAD, XQuAD), one dict ``{id, context, question, answers}`` per
    question in file order; ``answers`` holds every gold answer text. A question without answers is
    an error, or is left out with ``skip_unanswered``; a question without ``id`` gets the number of
    questions kept before it."""
    if not Path(path).is_file():
        raise UserError(f"data file {path} does not exist; give a SQuAD-format JSON file")
    obj = read_json(Path(path))
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise UserError(f"{path}: not SQuAD format (a JSON object with a 'data' list); fix the file")
    docs = []
    try:
        for art in obj["data"]:
            for para in art["paragraphs"]:
                for qa in para["qas"]:
                    answers = [str(a["text"]) for a in qa.get("answers", [])]
                    if not answers:
                        if skip_unanswered:
                            continue
                        raise UserError(f"{path}: question {qa.get('id')!r} has no answers; fix the file")
                    docs.append({"id": str(qa.get("id", len(docs))), "context": str(para["context"]),
                                 "question": str(qa["question"]), "answers": answers})
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not SQuAD format (missing or bad {e}); each article needs paragraphs "
                        "with context and qas (question, answers[].text)") from None
    return docs


class XQuAD(GenerateTask):
    name = "xquad"
    description = "XQuAD exact match / F1 (greedy answer generation)"
    languages = ("ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh")
    splits = ("test",)
    hf = "hf:google/xquad"
    metrics = ("f1", "em")
    max_new_tokens = 32
    options = {"qa_metric": ("squad", "squad: EM/F1 on normalised words; token: EM/F1 on token ids ([M25])",
                             ("squad", "token"))}

    def hf_config(self, lang):
        return f"xquad.{lang}"

    def hf_split(self, split):
        return "validation"

    def local_file(self, directory: Path, lang, split):
        return directory / f"xquad.{lang}.json"

    def read_file(self, path, lang, split):
        return read_squad(path)

    def from_records(self, records, lang, where):
        docs = []
        for i, r in enumerate(records):
            try:
                answers = r["answers"]["text"] if isinstance(r["answers"], dict) else [a["text"] for a in r["answers"]]
                docs.append({"id": str(r.get("id", i)), "context": str(r["context"]), "question": str(r["question"]),
                             "answers": [str(a) for a in answers]})
            except (KeyError, TypeError):
                raise UserError(f"{where} record {i}: needs context, question and answers.text") from None
        return docs

    def prompt(self, doc, lang, **options):
        return f"Context: {doc['context']}\nQuestion: {doc['question']}\nAnswer:"

    def reference(self, doc):
        return doc["answers"][0]

    def solved(self, doc, lang, **options):
        return self.prompt(doc, lang) + " " + doc["answers"][0]

    def score(self, predictions, docs, lang, scorer, qa_metric: str = "squad", **options):
        if qa_metric == "token":
            pairs = [token_em_f1(p, d["answers"], scorer.tokenizer) for p, d in zip(predictions, docs)]
        else:
            pairs = [squad_em_f1(p, d["answers"]) for p, d in zip(predictions, docs)]
        n = max(1, len(pairs))
        return {"f1": sum(f for _, f in pairs) / n, "em": sum(e for e, _ in pairs) / n}

    def options_info(self, lang, qa_metric: str = "squad", **options):
        return {"qa_metric": qa_metric}


TASK = XQuAD()
