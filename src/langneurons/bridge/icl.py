r"""Zero-shot cross-lingual in-context learning through a bridge language (BridgeX-ICL, METHODS.md section 6.5).

Prompts (the arrow is U+2192 ``→``; language names come from :mod:`langneurons.bridge.names`):

* word translation ``{S}:"{w}"→{T}:`` (:func:`translation_prompt`), used for the probes and as the
  no-bridge baseline of bilingual lexicon induction (BLI);
* chained translation through bridge ``B``: ``{S}:"{w}"→{B}:"{w_B}"→{T}:``
  (:func:`chained_prompt`), where ``w_B`` is the model's own translation of ``w`` into ``B``,
  generated first with ``{S}:"{w}"→{B}:``.

Answers.  Generation is greedy and stops at a newline (or after ``max_new_tokens``).  The answer
is read from the continuation by :func:`extract_answer`:

1. keep the text before the first newline and strip whitespace;
2. if it opens with a quote character, keep what lies between that quote and the next quote
   character (the quoted word; the model may go on with ``→Lang:...``); otherwise keep the
   text before the first ``→``;
3. strip whitespace and quote characters (:data:`QUOTES`) from both ends.

A prediction is correct when, after Unicode NFC normalisation and ``str.casefold``, it equals
one of the reference translations normalised the same way (:func:`is_correct`): exact match,
case-insensitive, quotes and surrounding whitespace ignored.

BLI accuracy (:func:`run_bli`) is computed over UNIQUE source words: a word with several
reference translations counts once and is correct if the prediction matches any of them.

Machine reading comprehension (MRC, Belebele-style multiple choice, :func:`run_mrc`): the
passage is first translated into the bridge language with ``{S}:"{passage}"→{B}:``
(:func:`extract_passage` reads it back), then the question is asked over the translated passage
(:data:`MRC_TEMPLATE`, question and options left in the source language), and the answer is the
letter A-D whose next-token logit is largest (:class:`HFChoiceScorer`).  Accuracy = correct / items.

Model access goes through two small callables so that everything here is testable without a model:
``generate(prompts: list[str]) -> list[str]`` (continuations, :class:`HFGenerator`) and
``choose(prompts: list[str]) -> list[int]`` (chosen option 0-3, :class:`HFChoiceScorer`).
"""

from __future__ import annotations

import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

from ..errors import UserError
from ..jsonl import iter_jsonl

__all__ = [
    "ARROW", "QUOTES", "translation_prompt", "chained_prompt", "extract_answer", "extract_passage", "normalize",
    "is_correct", "group_pairs", "run_bli", "HFGenerator", "HFChoiceScorer", "MRCItem", "load_mrc_jsonl",
    "mrc_prompt", "MRC_TEMPLATE", "LETTERS", "run_mrc",
]

ARROW = "\u2192"  # →
#: Characters treated as quotes around an answer.
QUOTES = "\"'\u201c\u201d\u201e\u201f\u00ab\u00bb\u2018\u2019\u300c\u300d\u300e\u300f\uff02"
LETTERS = ("A", "B", "C", "D")

Generate = Callable[[list[str]], list[str]]
Choose = Callable[[list[str]], list[int]]


# ------------------------------------------------------------------------------------------ prompts
def translation_prompt(src_name: str, word: str, trg_name: str) -> str:
    """``{S}:"{w}"→{T}:`` (no trailing space)."""
    return f'{src_name}:"{word}"{ARROW}{trg_name}:'


def chained_prompt(src_name: str, word: str, bridge_name: str, bridge_word: str, trg_name: str) -> str:
    """``{S}:"{w}"→{B}:"{w_B}"→{T}:``."""
    return f'{src_name}:"{word}"{ARROW}{bridge_name}:"{bridge_word}"{ARROW}{trg_name}:'


# ------------------------------------------------------------------------------------------ answers
def extract_answer(text: str) -> str:
    """The translated word in a generated continuation (rules in the module docstring)."""
    s = text.split("\n", 1)[0].strip()
    if s and s[0] in QUOTES:
        rest = s[1:]
        ends = [i for i, ch in enumerate(rest) if ch in QUOTES]
        s = rest[: ends[0]] if ends else rest
    else:
        s = s.split(ARROW, 1)[0]
    return s.strip().strip(QUOTES).strip()


def extract_passage(text: str) -> str:
    """A translated passage: the first line, without a leading quote and anything from ``"→`` on."""
    s = text.split("\n", 1)[0].strip()
    if s and s[0] in QUOTES:
        s = s[1:]
    cuts = [i for i in (s.find(q + ARROW) for q in QUOTES) if i >= 0]
    if cuts:
        s = s[: min(cuts)]
    return s.strip().rstrip(QUOTES).strip()


def normalize(word: str) -> str:
    """NFC, strip whitespace and quote characters at both ends, casefold."""
    return unicodedata.normalize("NFC", word).strip().strip(QUOTES).strip().casefold()


def is_correct(prediction: str, references: Iterable[str]) -> bool:
    """Exact match of an extracted answer with any reference, after :func:`normalize`."""
    p = normalize(prediction)
    return bool(p) and any(p == normalize(r) for r in references)


def group_pairs(pairs: Union[Mapping[str, Sequence[str]], Iterable[tuple[str, str]]]) -> "OrderedDict[str, list[str]]":
    """Word pairs -> ``{source word: [translations...]}``, source words unique, first-seen order."""
    out: "OrderedDict[str, list[str]]" = OrderedDict()
    items = pairs.items() if isinstance(pairs, Mapping) else ((s, [t]) for s, t in pairs)
    for src, trgs in items:
        lst = out.setdefault(src, [])
        for t in trgs:
            if t not in lst:
                lst.append(t)
    return out


# ------------------------------------------------------------------------------------------ BLI
def run_bli(generate: Generate, pairs, src: str, trg: str, bridges: Sequence[Optional[str]],
            names: Mapping[str, str]) -> dict:
    """BLI accuracy without a bridge (``None`` in ``bridges``) and through each bridge language.

    Args:
        generate: ``prompts -> continuations`` (greedy, see :class:`HFGenerator`).
        pairs: ``{source word: [references]}`` or ``[(source, target), ...]``; grouped by
            :func:`group_pairs` so each source word counts once.
        src, trg: language codes; ``names[code]`` is the name used in the prompt.
        bridges: conditions to run, ``None`` = baseline ``{S}:"{w}"→{T}:``.

    Returns:
        ``{"n_words": n, "conditions": {"baseline"|code: {"bridge", "accuracy", "n_correct", "n",
        "records": [{"word", "references", "bridge_word", "prompt", "output", "prediction",
        "correct"}]}}}``.  ``accuracy = n_correct / n`` over unique source words.
    """
    groups = group_pairs(pairs)
    words = list(groups)
    if not words:
        raise UserError("BLI got no word pairs; check the dictionary and --limit")
    S, T = names[src], names[trg]
    result = {"src": src, "trg": trg, "n_words": len(words), "conditions": {}}
    for bridge in bridges:
        bridge_words: list[Optional[str]] = [None] * len(words)
        if bridge is None:
            prompts = [translation_prompt(S, w, T) for w in words]
        else:
            B = names[bridge]
            first = generate([translation_prompt(S, w, B) for w in words])
            bridge_words = [extract_answer(o) for o in first]
            prompts = [chained_prompt(S, w, B, wb, T) for w, wb in zip(words, bridge_words)]
        outputs = generate(prompts)
        records = []
        for w, wb, p, o in zip(words, bridge_words, prompts, outputs):
            pred = extract_answer(o)
            records.append({"word": w, "references": groups[w], "bridge_word": wb, "prompt": p, "output": o,
                            "prediction": pred, "correct": is_correct(pred, groups[w])})
        n_ok = sum(r["correct"] for r in records)
        key = "baseline" if bridge is None else bridge
        result["conditions"][key] = {"bridge": bridge, "accuracy": n_ok / len(words), "n_correct": n_ok,
                                     "n": len(words), "records": records}
    return result


# ------------------------------------------------------------------------------------------ models
class _HealFirstToken:
    """Logits processor: at the first generated position, row ``b`` may only produce tokens whose
    text starts with ``prefixes[b]`` (the prompt's last token, taken back: token healing)."""

    def __init__(self, allowed: torch.Tensor, prompt_len: int):
        self.allowed, self.prompt_len = allowed, prompt_len      # bool [B, V]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] != self.prompt_len:
            return scores
        allowed = self.allowed[:, :scores.shape[1]].to(scores.device)
        return scores.masked_fill(~allowed, float("-inf"))


class HFGenerator:
    """Greedy generation through the runtime: ``gen(prompts) -> continuations``.

    Prompts are read as the runtime reads them (BOS when the tokenizer adds one), left-padded and
    run ``session.batch_size`` at a time (:meth:`langneurons.runtime.Session.generate`). Each row
    stops at its first newline or after ``max_new_tokens``; the returned text is the decoded
    continuation (special tokens skipped) cut before the first newline.

    ``token_healing``: a prompt that ends in ``{T}:`` stops at a token boundary the model may rarely
    see in text, when the tokenizer merges ``:`` with what usually follows (``:"`` is one token in
    many BPE vocabularies). With healing, the prompt's last token is taken back and the first
    generated token must start with its text; the returned continuation is what follows that text.
    Off by default ([X25] prompts the model as is).
    """

    def __init__(self, session, max_new_tokens: int = 8, token_healing: bool = False):
        if max_new_tokens < 1:
            raise UserError("--max-new-tokens must be at least 1")
        self.session = session
        self.max_new_tokens = int(max_new_tokens)
        self.token_healing = bool(token_healing)
        self._vocab_text: Optional[list[str]] = None

    def _healed(self, prompts: Sequence[str]):
        """Token ids without each prompt's last token, that token's text, and the allowed first tokens."""
        tok = self.session.tokenizer
        if self._vocab_text is None:
            self._vocab_text = [tok.decode([i]) for i in range(len(tok))]
        specials = set(tok.all_special_ids)
        ids, prefixes = [], []
        for p in prompts:
            x = self.session.prompt_ids(p)
            if len(x) >= 2 and x[-1] not in specials:
                prefixes.append(tok.decode(x[-1:]))
                x = x[:-1]
            else:
                prefixes.append("")
            ids.append(x)
        allowed = torch.tensor([[t.startswith(p) for t in self._vocab_text] for p in prefixes], dtype=torch.bool)
        return ids, prefixes, allowed

    def __call__(self, prompts: list[str]) -> list[str]:
        if not self.token_healing:
            return self.session.generate(list(prompts), self.max_new_tokens, stop=("\n",))
        ids, prefixes, allowed = self._healed(prompts)
        # one more token: the first one re-creates the prompt's last
        texts = self.session.generate(ids=ids, max_new_tokens=self.max_new_tokens + 1,
                                      logits_processor=lambda T, idx: [_HealFirstToken(allowed[idx], T)])
        return [(t[len(p):] if t.startswith(p) else t).split("\n", 1)[0] for t, p in zip(texts, prefixes)]


class HFChoiceScorer:
    """Multiple choice by next-token argmax over the letters A-D: ``choose(prompts) -> [0..3]``
    (:meth:`langneurons.runtime.Session.choose`, the one letter rule of every task)."""

    def __init__(self, session, letters: Sequence[str] = LETTERS):
        self.session, self.letters = session, tuple(letters)
        session.letter_ids(self.letters)      # a tokenizer that cannot tell the letters apart fails here

    def __call__(self, prompts: list[str]) -> list[int]:
        return self.session.choose(list(prompts), self.letters)


# ------------------------------------------------------------------------------------------ MRC
#: Question prompt over a (possibly translated) passage; question and options as in the data.
MRC_TEMPLATE = "{passage}\nQuestion: {question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"


@dataclass
class MRCItem:
    passage: str
    question: str
    options: list[str]   # exactly 4
    answer: int          # index 0-3 of the correct option


def _parse_answer(value, where: str) -> int:
    if isinstance(value, str) and value.strip().upper() in LETTERS:
        return LETTERS.index(value.strip().upper())
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if 1 <= n <= 4:
        return n - 1
    raise UserError(f"{where}: answer {value!r} is not A-D or 1-4; fix the record")


def load_mrc_jsonl(path) -> list[MRCItem]:
    """Read multiple-choice reading-comprehension items from a JSONL file, one object per line.

    Two record layouts are accepted:

    * Belebele's own fields: ``flores_passage``, ``question``, ``mc_answer1`` ... ``mc_answer4``,
      ``correct_answer_num`` (1-4, string or int);
    * a plain layout: ``passage``, ``question``, ``options`` (list of 4 strings), ``answer``
      (a letter ``"A"``-``"D"`` or a 1-based number 1-4, as in Belebele).
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"MRC data file {p} does not exist; give a JSONL file (see 'langneurons bridge mrc --help')")
    items = []
    for where, rec in iter_jsonl(p):
        if "flores_passage" in rec:
            opts = [rec.get(f"mc_answer{k}") for k in range(1, 5)]
            passage, ans = rec.get("flores_passage"), rec.get("correct_answer_num")
        else:
            opts, passage, ans = rec.get("options"), rec.get("passage"), rec.get("answer")
        q = rec.get("question")
        if not isinstance(passage, str) or not isinstance(q, str) or not isinstance(opts, list) or len(opts) != 4 \
                or not all(isinstance(o, str) for o in opts):
            raise UserError(f"{where} needs passage (or flores_passage), question and 4 options (options or "
                            "mc_answer1..4) as strings; fix the record")
        items.append(MRCItem(passage, q, list(opts), _parse_answer(ans, where)))
    if not items:
        raise UserError(f"MRC data file {p} holds no records; add JSONL records")
    return items


def mrc_prompt(passage: str, question: str, options: Sequence[str], template: str = MRC_TEMPLATE) -> str:
    a, b, c, d = options
    return template.format(passage=passage, question=question, a=a, b=b, c=c, d=d)


def run_mrc(items: Sequence[MRCItem], choose: Choose, src: str, bridges: Sequence[Optional[str]],
            names: Mapping[str, str], translate: Optional[Generate] = None,
            template: str = MRC_TEMPLATE) -> dict:
    """MRC accuracy on the passage as given (``None`` in ``bridges``) and translated into each bridge.

    For bridge ``B``: ``passage_B = extract_passage(translate(['{S}:"{passage}"→{B}:']))``, then
    ``choose([mrc_prompt(passage_B, question, options)])``.  Accuracy = correct / len(items).
    """
    if not items:
        raise UserError("MRC got no items; check the data file and --limit")
    result = {"src": src, "n_items": len(items), "conditions": {}}
    for bridge in bridges:
        if bridge is None:
            passages = [it.passage for it in items]
        else:
            if translate is None:
                raise UserError("MRC through a bridge needs a translation generator")
            raw = translate([translation_prompt(names[src], it.passage, names[bridge]) for it in items])
            passages = [extract_passage(r) for r in raw]
        prompts = [mrc_prompt(p, it.question, it.options, template) for p, it in zip(passages, items)]
        chosen = choose(prompts)
        records = [{"passage_used": p, "question": it.question, "chosen": LETTERS[c], "answer": LETTERS[it.answer],
                    "correct": c == it.answer} for p, it, c in zip(passages, items, chosen)]
        n_ok = sum(r["correct"] for r in records)
        key = "baseline" if bridge is None else bridge
        result["conditions"][key] = {"bridge": bridge, "accuracy": n_ok / len(items), "n_correct": n_ok,
                                     "n": len(items), "records": records}
    return result
