"""XCOPA: causal commonsense reasoning in 11 languages (two choices), lm-evaluation-harness style.

Prompt for a premise ``p``, question ``q`` (cause or effect) and choice ``c``:

    context      = p without its final punctuation mark + " " + CONNECTOR[lang][q]
    continuation = " " + c with its first letter lower-cased

e.g. Italian ``"L'uomo aprì il rubinetto quindi"`` + ``" dell'acqua fluì dal beccuccio."``.
The prediction is the choice with the larger summed log-probability (``acc``; ``acc_norm``
divides by the continuation's UTF-8 bytes).

Option ``strip``: ``punct`` (default) drops the premise's last character only when it is a
punctuation mark; ``last`` drops the last character unconditionally, as lm-evaluation-harness
does, which also cuts the last letter off the Thai and Tamil premises (they have no final period).

Local files: ``DIR/{val,test}.LANG.jsonl`` (the original release: premise, choice1, choice2,
question, label). Few-shot demonstrations come from ``val`` when evaluating ``test``.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from ..errors import UserError
from ..jsonl import read_jsonl
from .common import ChoiceTask, need

#: language -> (cause connector, effect connector), as in lm-evaluation-harness (en for COPA files).
CONNECTORS = {
    "en": ("because", "therefore"),
    "et": ("sest", "seetõttu"),
    "ht": ("poukisa", "donk sa"),
    "id": ("karena", "maka"),
    "it": ("perché", "quindi"),
    "qu": ("imataq", "chaymi"),
    "sw": ("kwa sababu", "kwa hiyo"),
    "ta": ("காரணமாக", "எனவே"),
    "th": ("เพราะ", "ดังนั้น"),
    "tr": ("çünkü", "bu yüzden"),
    "vi": ("bởi vì", "vì vậy"),
    "zh": ("因为", "所以"),
}


def lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def strip_final(text: str, mode: str = "punct") -> str:
    """Drop the final punctuation mark (``punct``) or the final character (``last``)."""
    text = text.strip()
    if mode == "last":
        return text[:-1]
    if text and unicodedata.category(text[-1]).startswith("P"):
        return text[:-1]
    return text


class XCOPA(ChoiceTask):
    name = "xcopa"
    description = "XCOPA accuracy (premise + connector, choice log-likelihood)"
    languages = tuple(c for c in CONNECTORS if c != "en")
    splits = ("test", "validation")
    hf = "hf:cambridgeltl/xcopa"
    options = {"strip": ("punct", "premise end: punct drops a final punctuation mark, last drops the last "
                                  "character (lm-eval)", ("punct", "last"))}

    def connector(self, lang: str, question: str) -> str:
        if lang not in CONNECTORS:
            raise UserError(f"xcopa has no connector words for language {lang!r}; use one of {', '.join(CONNECTORS)}")
        return CONNECTORS[lang][0 if question == "cause" else 1]

    def fewshot_split(self, split):
        return "validation" if split == "test" else None

    def local_file(self, directory: Path, lang, split):
        return directory / f"{'val' if split == 'validation' else split}.{lang}.jsonl"

    def _docs(self, records, where):
        docs = []
        for i, r in enumerate(records):
            w = f"{where} record {i + 1}"
            q = need(r, "question", w)
            if q not in ("cause", "effect"):
                raise UserError(f"{w}: question must be 'cause' or 'effect', got {q!r}; fix the record")
            label = need(r, "label", w, int)
            if label not in (0, 1):
                raise UserError(f"{w}: label must be 0 or 1, got {label}; fix the record")
            docs.append({"premise": need(r, "premise", w), "choice1": need(r, "choice1", w),
                         "choice2": need(r, "choice2", w), "question": q, "label": label})
        return docs

    def read_file(self, path, lang, split):
        return self._docs(read_jsonl(path), str(path))

    def from_records(self, records, lang, where):
        return self._docs(records, where)

    def context(self, doc, lang, strip: str = "punct", **options) -> str:
        return f"{strip_final(doc['premise'], strip)} {self.connector(lang, doc['question'])}"

    def requests(self, doc, lang, strip: str = "punct", **options):
        ctx = self.context(doc, lang, strip)
        return [(ctx, " " + lower_first(doc["choice1"])), (ctx, " " + lower_first(doc["choice2"]))]

    def options_info(self, lang, strip: str = "punct", **options):
        cause, effect = CONNECTORS.get(lang, ("?", "?"))
        return {"connectors": {"cause": cause, "effect": effect}, "strip": strip}


TASK = XCOPA()
