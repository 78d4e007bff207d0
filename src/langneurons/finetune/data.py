"""Task data for fine-tuning and zero-shot evaluation: the task readers' records as
:class:`ClassificationData` / :class:`QAData`, their encoding and batching.

Formats (each file read by the reader of its task in :mod:`langneurons.tasks`)
-------------------------------------------------------------------------------
- ``sib200``: SIB-200 topic classification, a TSV with header ``index_id  category  text``
  (:func:`~langneurons.tasks.sib200.read_sib200_tsv`; the 7 categories come from ``labels.txt``
  beside the file when present, else the sorted categories).
- ``nli``: premise/hypothesis pairs, a TSV with columns ``premise``, ``hypothesis`` (or ``hypo``) and
  ``label`` (:func:`~langneurons.tasks.xnli.read_nli_tsv`), the label either an integer 0/1/2 or a
  name (entailment, neutral, contradiction); rows with another label (MultiNLI's ``-``) are left
  out. XNLI test/dev and the English MultiNLI subset both read this way.
- ``qa``: SQuAD v1.1 JSON (``data -> paragraphs -> {context, qas -> {id, question, answers}}``):
  SQuAD, XQuAD (:func:`~langneurons.tasks.xquad.read_squad`); unanswered questions are left out.

Encodings
---------
Classification: the text (or the pair ``tokenizer(premise, hypothesis)``, the tokenizer's own pair
template) truncated to ``max_length`` tokens from the right. QA: ``prompt ids + answer ids``, with

    prompt = "Context: {context}\\nQuestion: {question}\\nAnswer:"   answer = " {answer}" + EOS

tokenised in three pieces (context part, question part, answer) so that the context alone is cut
when the whole would exceed ``max_length``. The label vector is ``-100`` on the prompt (loss on the
answer tokens, default) or only on padding (``qa_loss="full"``, [M25]'s whole-sequence loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import UserError
from ..tasks.sib200 import read_sib200_labels, read_sib200_tsv
from ..tasks.xnli import read_nli_tsv
from ..tasks.xquad import read_squad

TASKS = ("sib200", "nli", "qa")
NLI_LABELS = ("entailment", "neutral", "contradiction")
QA_LOSSES = {"answer": "answer", "full": "full", "m25": "full", "prompt": "full"}


@dataclass
class ClassificationData:
    """Texts (or text pairs) and integer labels over ``labels``."""

    texts: list
    labels: list[int]
    label_names: list[str]
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: Sequence[int]) -> "ClassificationData":
        return ClassificationData([self.texts[i] for i in idx], [self.labels[i] for i in idx], self.label_names,
                                  [self.ids[i] for i in idx] if self.ids else [])


@dataclass
class QAData:
    contexts: list[str]
    questions: list[str]
    answers: list[list[str]]      # all gold answers; the first is the training target
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx: Sequence[int]) -> "QAData":
        return QAData([self.contexts[i] for i in idx], [self.questions[i] for i in idx],
                      [self.answers[i] for i in idx], [self.ids[i] for i in idx])


def load_sib200(path: str | Path, label_names: Optional[Sequence[str]] = None) -> ClassificationData:
    """SIB-200 ``index_id  category  text``; labels in the order of ``labels.txt`` beside the file."""
    path = Path(path)
    rows = read_sib200_tsv(path)
    if label_names is None:
        listed = read_sib200_labels(path)
        label_names = listed if listed is not None else sorted({r["category"] for r in rows})
    index = {n: i for i, n in enumerate(label_names)}
    texts, labels, ids = [], [], []
    for r in rows:
        if r["category"] not in index:
            raise UserError(f"{path}: category {r['category']!r} is not among the labels {list(label_names)}; "
                            "use the same labels.txt for training and evaluation")
        texts.append(r["text"])
        labels.append(index[r["category"]])
        ids.append(r.get("index_id", str(len(ids))))
    return ClassificationData(texts, labels, list(label_names), ids)


def load_nli(path: str | Path) -> ClassificationData:
    """Premise/hypothesis TSV; labels 0 entailment, 1 neutral, 2 contradiction (ints or names)."""
    path = Path(path)
    names = {n: i for i, n in enumerate(NLI_LABELS)}
    texts, labels, ids = [], [], []
    for k, r in enumerate(read_nli_tsv(path)):
        lab = r["label"].strip().lower()
        if lab in names:
            y = names[lab]
        elif lab in ("0", "1", "2"):
            y = int(lab)
        else:
            continue        # '-' (no gold label) and the like
        texts.append((r["premise"], r["hypothesis"]))
        labels.append(y)
        ids.append(r.get("id", str(k)))
    if not labels:
        raise UserError(f"{path} has no rows with a label in 0/1/2 or {'/'.join(NLI_LABELS)}")
    return ClassificationData(texts, labels, list(NLI_LABELS), ids)


def load_squad(path: str | Path) -> QAData:
    """SQuAD v1.1-format JSON (SQuAD, XQuAD): one record per answered question, in file order."""
    docs = read_squad(Path(path), skip_unanswered=True)
    if not docs:
        raise UserError(f"{path} holds no question with an answer")
    return QAData([d["context"] for d in docs], [d["question"] for d in docs], [d["answers"] for d in docs],
                  [d["id"] for d in docs])


def load_task(task: str, path: str | Path, label_names: Optional[Sequence[str]] = None):
    if task == "sib200":
        return load_sib200(path, label_names)
    if task == "nli":
        return load_nli(path)
    if task == "qa":
        return load_squad(path)
    raise UserError(f"unknown --task {task!r}; use one of {', '.join(TASKS)}")


def select_fraction(n: int, fraction: float, how: str, seed: int) -> list[int]:
    """Indices of ``round(fraction * n)`` examples (at least 1): the first ones, or a seeded random subset."""
    if not (0.0 < fraction <= 1.0):
        raise UserError(f"--data-fraction must be in (0, 1], got {fraction}")
    k = max(1, int(round(fraction * n)))
    if how == "first" or k == n:
        return list(range(k))
    if how != "random":
        raise UserError(f"--data-select must be first or random, got {how!r}")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n, size=k, replace=False).tolist())


# ------------------------------------------------------------------------------------ encoding
def encode_classification(tok, data: ClassificationData, max_length: int) -> list[list[int]]:
    """Token ids per example (with the tokenizer's special tokens), cut to ``max_length``."""
    if not data.texts:
        return []
    if isinstance(data.texts[0], tuple):
        a = [t[0] for t in data.texts]
        b = [t[1] for t in data.texts]
        enc = tok(a, b, truncation=True, max_length=max_length)
    else:
        enc = tok(list(data.texts), truncation=True, max_length=max_length)
    return [list(x) for x in enc["input_ids"]]


def qa_prompt_pieces(context: str, question: str) -> tuple[str, str]:
    return f"Context: {context}", f"\nQuestion: {question}\nAnswer:"


@dataclass
class QAEncoded:
    prompt: list[int]        # ids fed before generation
    answer: list[int]        # ids of " answer" + EOS (empty when encoding for evaluation only)


def encode_qa(tok, data: QAData, max_length: int, with_answer: bool = True,
              max_answer_tokens: int = 64) -> list[QAEncoded]:
    """Prompt ids (BOS + context part + question part, context cut to fit) and answer ids."""
    ctx_parts, q_parts = zip(*(qa_prompt_pieces(c, q) for c, q in zip(data.contexts, data.questions)))
    ctx_ids = tok(list(ctx_parts), add_special_tokens=True)["input_ids"]
    q_ids = tok(list(q_parts), add_special_tokens=False)["input_ids"]
    if with_answer:
        a_ids = tok([" " + a[0] for a in data.answers], add_special_tokens=False)["input_ids"]
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        a_ids = [list(a[:max_answer_tokens]) + eos for a in a_ids]
    else:
        a_ids = [[] for _ in ctx_ids]
    out = []
    for c, q, a in zip(ctx_ids, q_ids, a_ids):
        room = max_length - len(q) - len(a)
        if room < 2:
            q = q[-max(1, max_length // 4):]
            room = max_length - len(q) - len(a)
        c = list(c[:max(2, room)])
        out.append(QAEncoded(c + list(q), list(a)))
    return out


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right",
              labels: Optional[list[list[int]]] = None) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` ``[B, T]`` (and ``labels`` with ``-100`` on padding), padded by
    the runtime's one padding function (:func:`langneurons.runtime.pad_rows`)."""
    from ..runtime import pad_rows
    ids, mask = pad_rows(seqs, pad_id, side)
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        out["labels"] = pad_rows(labels, -100, side)[0]
    return out


def qa_training_sequences(enc: list[QAEncoded], qa_loss: str) -> tuple[list[list[int]], list[list[int]]]:
    """Input ids and label ids of a causal-LM step: labels -100 on the prompt unless ``qa_loss='full'``."""
    mode = QA_LOSSES.get(qa_loss)
    if mode is None:
        raise UserError(f"unknown --qa-loss {qa_loss!r}; use answer (default) or full (alias m25)")
    seqs, labs = [], []
    for e in enc:
        seqs.append(e.prompt + e.answer)
        labs.append((e.prompt if mode == "full" else [-100] * len(e.prompt)) + e.answer)
    return seqs, labs


def batches(n: int, batch_size: int, epochs: float, seed: int) -> list[list[int]]:
    """The whole training order: per epoch a seeded permutation cut into batches; ``epochs`` may be fractional."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = []
    per_epoch = math.ceil(n / batch_size)
    total = max(1, int(math.ceil(epochs * per_epoch)))
    while len(out) < total:
        perm = rng.permutation(n).tolist()
        out.extend(perm[i:i + batch_size] for i in range(0, n, batch_size))
    return out[:total]
