"""Task data for fine-tuning and zero-shot evaluation, read from local files.

Formats
-------
- ``sib200``: SIB-200 topic classification, a TSV with header ``index_id  category  text`` (the
  7 categories come from ``labels.txt`` beside the file when present, else the sorted categories).
- ``nli``: premise/hypothesis pairs, a TSV with columns ``premise``, ``hypothesis`` (or ``hypo``) and
  ``label``, either an integer 0/1/2 or a name (entailment, neutral, contradiction); XNLI test/dev
  and the English MultiNLI subset both read this way.
- ``qa``: SQuAD v1.1 JSON (``data -> paragraphs -> {context, qas -> {id, question, answers}}``):
  SQuAD, XQuAD.

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

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import UserError

TASKS = ("sib200", "nli", "qa")
NLI_LABELS = ("entailment", "neutral", "contradiction")
QA_LOSSES = {"answer": "answer", "full": "full", "m25": "full", "prompt": "full"}

csv.field_size_limit(1 << 30)


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


def _read_tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    if not path.is_file():
        raise UserError(f"data file {path} does not exist; give an existing TSV file")
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise UserError(f"{path} is empty; give a TSV file with a header line")
    return [h.strip() for h in rows[0]], [r for r in rows[1:] if r and any(c.strip() for c in r)]


def load_sib200(path: str | Path, label_names: Optional[Sequence[str]] = None) -> ClassificationData:
    """SIB-200 ``index_id  category  text``; labels in the order of ``labels.txt`` beside the file."""
    path = Path(path)
    header, rows = _read_tsv(path)
    try:
        ci, ti = header.index("category"), header.index("text")
    except ValueError:
        raise UserError(f"{path} lacks the columns category and text (header {header}); give a SIB-200 TSV "
                        "(index_id, category, text)") from None
    ii = header.index("index_id") if "index_id" in header else None
    if label_names is None:
        lab_file = path.parent / "labels.txt"
        if lab_file.is_file():
            label_names = [s.strip() for s in lab_file.read_text(encoding="utf-8").splitlines() if s.strip()]
        else:
            label_names = sorted({r[ci] for r in rows})
    index = {n: i for i, n in enumerate(label_names)}
    texts, labels, ids = [], [], []
    for r in rows:
        if r[ci] not in index:
            raise UserError(f"{path}: category {r[ci]!r} is not among the labels {list(label_names)}; "
                            "use the same labels.txt for training and evaluation")
        texts.append(r[ti])
        labels.append(index[r[ci]])
        ids.append(r[ii] if ii is not None else str(len(ids)))
    return ClassificationData(texts, labels, list(label_names), ids)


def load_nli(path: str | Path) -> ClassificationData:
    """Premise/hypothesis TSV; labels 0 entailment, 1 neutral, 2 contradiction (ints or names)."""
    path = Path(path)
    header, rows = _read_tsv(path)
    low = [h.lower() for h in header]
    hyp = "hypothesis" if "hypothesis" in low else ("hypo" if "hypo" in low else None)
    if "premise" not in low or hyp is None or "label" not in low:
        raise UserError(f"{path} lacks the columns premise, hypothesis (or hypo) and label (header {header}); "
                        "give an XNLI/MNLI TSV")
    pi, hi, li = low.index("premise"), low.index(hyp), low.index("label")
    idi = low.index("id") if "id" in low else None
    names = {n: i for i, n in enumerate(NLI_LABELS)}
    texts, labels, ids = [], [], []
    for k, r in enumerate(rows):
        lab = r[li].strip().lower()
        if lab in names:
            y = names[lab]
        elif lab in ("0", "1", "2"):
            y = int(lab)
        else:
            continue        # '-' (no gold label) and the like
        texts.append((r[pi], r[hi]))
        labels.append(y)
        ids.append(r[idi] if idi is not None else str(k))
    if not labels:
        raise UserError(f"{path} has no rows with a label in 0/1/2 or {'/'.join(NLI_LABELS)}")
    return ClassificationData(texts, labels, list(NLI_LABELS), ids)


def load_squad(path: str | Path) -> QAData:
    """SQuAD v1.1-format JSON (SQuAD, XQuAD): one record per question, in file order."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist; give a SQuAD-format JSON file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        ctx, qs, ans, ids = [], [], [], []
        for art in doc["data"]:
            for par in art["paragraphs"]:
                for qa in par["qas"]:
                    answers = [a["text"] for a in qa.get("answers", [])]
                    if not answers:
                        continue
                    ctx.append(par["context"])
                    qs.append(qa["question"])
                    ans.append(answers)
                    ids.append(str(qa.get("id", len(ids))))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not SQuAD-format JSON ({e.__class__.__name__}: {e}); "
                        "give a file with data -> paragraphs -> qas") from None
    if not ids:
        raise UserError(f"{path} holds no question with an answer")
    return QAData(ctx, qs, ans, ids)


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
    """``input_ids``/``attention_mask`` ``[B, T]`` (and ``labels`` with ``-100`` on padding)."""
    T = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    lab = torch.full((B, T), -100, dtype=torch.long) if labels is not None else None
    for i, s in enumerate(seqs):
        n = len(s)
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
        if lab is not None:
            lab[i, sl] = torch.tensor(labels[i], dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if lab is not None:
        out["labels"] = lab
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
