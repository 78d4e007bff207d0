"""XWinograd: Winograd schemas in en, fr, ja, pt, ru, zh, scored by partial evaluation.

For a sentence ``prefix + PRONOUN + suffix`` and candidates ``o_1, o_2`` the score of candidate
``i`` is the log-probability of the suffix alone, conditioned on the prefix with the candidate
in the pronoun's place:

    ll_i = log p(suffix | prefix + o_i)

and the prediction is ``argmax_i ll_i`` (``acc``; ``acc_norm`` equals ``acc`` since the scored
text is the same for both candidates). The suffix keeps the sentence's own spacing, so Japanese
and Chinese continuations get no inserted space (lm-evaluation-harness joins them with one).

Local file: the original release ``dataset.tsv`` (one file for all languages), tab-separated
without header: language (``jp`` = Japanese, asked for as ``ja``), source, English text or ``?``,
sentence, its tokens (JSON list), the pronoun ``[text, [start, end), tokens]`` and two candidates
``[text, [start, end), tokens, is_correct]`` (token spans). The pronoun's character offsets are
found by locating the tokens in the sentence in order (tokens that the tokenizer rewrote, such
as quote marks, are skipped); punctuation at the end of a pronoun span (one Russian row marks
``его.``) is left in the suffix. ``hf:Muennighoff/xwinograd`` (sentence with ``_``, option1,
option2, answer) is read too.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

from ..errors import UserError
from .common import ChoiceTask, need

#: our code -> the file's code
FILE_CODES = {"en": "en", "fr": "fr", "ja": "jp", "pt": "pt", "ru": "ru", "zh": "zh"}


def _locate(sentence: str, tokens: list[str], start: int, end: int) -> tuple[int, int]:
    """Character span of tokens ``[start, end)`` in ``sentence`` (greedy in-order alignment)."""
    pos, spans = 0, []
    for t in tokens:
        k = sentence.find(t, pos)
        if k < 0:
            spans.append(None)
            continue
        spans.append((k, k + len(t)))
        pos = k + len(t)
    if not (0 <= start < end <= len(tokens)) or spans[start] is None or spans[end - 1] is None:
        raise ValueError("pronoun tokens not found in the sentence")
    return spans[start][0], spans[end - 1][1]


class XWinograd(ChoiceTask):
    name = "xwinograd"
    description = "XWinograd accuracy (partial scoring of the text after the pronoun)"
    languages = tuple(FILE_CODES)
    splits = ("test",)
    hf = "hf:Muennighoff/xwinograd"

    def code(self, lang: str) -> str:
        if lang in FILE_CODES:
            return FILE_CODES[lang]
        if lang == "jp":
            return "jp"
        raise UserError(f"xwinograd has no language {lang!r}; use one of {', '.join(FILE_CODES)}")

    def hf_config(self, lang):
        return self.code(lang)

    def local_file(self, directory: Path, lang, split):
        return directory / "dataset.tsv"

    def read_file(self, path, lang, split):
        code = self.code(lang)
        docs = []
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text; convert the file to UTF-8") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 7:
                raise UserError(f"{path} line {n}: {len(fields)} tab-separated fields, expected 7 (language, source, "
                                "English, sentence, tokens, pronoun, candidates); fix that line")
            if fields[0] != code:
                continue
            try:
                sentence, tokens = fields[3], json.loads(fields[4])
                pronoun, cands = json.loads(fields[5]), json.loads(fields[6])
                s, e = pronoun[1]
                a, b = _locate(sentence, tokens, int(s), int(e))
                while b - 1 > a and unicodedata.category(sentence[b - 1]).startswith("P"):
                    b -= 1  # a span such as "его." keeps its final punctuation in the scored suffix
                options = [str(c[0]) for c in cands]
                correct = [bool(c[3]) for c in cands]
            except (ValueError, TypeError, IndexError, KeyError) as err:
                raise UserError(f"{path} line {n}: malformed XWinograd row ({err}); fix that line") from None
            if len(options) != 2 or sum(correct) != 1:
                raise UserError(f"{path} line {n}: needs two candidates with exactly one correct; fix that line")
            docs.append(self._doc(sentence[:a], options, sentence[b:], correct.index(True), f"{path} line {n}"))
        return docs

    def _doc(self, prefix, options, suffix, label, where):
        if not suffix.strip():
            raise UserError(f"{where}: nothing follows the pronoun, so partial scoring has no text to score")
        return {"prefix": prefix, "options": options, "suffix": suffix, "label": label}

    def from_records(self, records, lang, where):
        docs = []
        for i, r in enumerate(records):
            w = f"{where} record {i}"
            sentence = need(r, "sentence", w)
            if "_" not in sentence:
                raise UserError(f"{w}: sentence has no '_' marking the pronoun")
            k = sentence.index("_")
            answer = str(need(r, "answer", w)).strip()
            if answer not in ("1", "2"):
                raise UserError(f"{w}: answer must be 1 or 2, got {answer!r}")
            docs.append(self._doc(sentence[:k], [str(need(r, "option1", w)), str(need(r, "option2", w))],
                                  sentence[k + 1:], int(answer) - 1, w))
        return docs

    def requests(self, doc, lang, **options):
        return [(doc["prefix"] + o, doc["suffix"]) for o in doc["options"]]


TASK = XWinograd()
