"""Evaluation of fine-tuned models: classification accuracy and generative QA (EM / F1).

QA scoring (SQuAD v1.1 style, per example the maximum over the gold answers; the same functions as
the ``xquad`` task, :mod:`langneurons.tasks.xquad`):

- normalise: lower-case, drop punctuation (every Unicode ``P*`` character and ASCII punctuation),
  drop the English articles a/an/the, collapse whitespace;
- words: whitespace tokens, except that characters of scripts written without spaces (CJK, kana,
  Thai, ...) count one token each (MLQA's "mixed segmentation"), so Chinese and Thai get a
  meaningful F1;
- ``EM = [words(pred) == words(gold)]``; ``F1 = 2 P R / (P + R)`` over the multiset overlap of words.

``em_tokens``/``f1_tokens`` are the same on tokenizer ids of the raw strings ([M25]'s token-id
scores), reported alongside for replication.

Predictions are greedy continuations of the prompt (the runtime's generation pass: left padding), cut
at the first newline or EOS.
Both evaluators accept ``context``: a factory of a context manager entered around the forward passes
(a test-time intervention).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from ..tasks.xquad import squad_em_f1, token_em_f1
from ..runtime import pad_id
from .data import ClassificationData, QAData, encode_classification, encode_qa, pad_batch

def qa_scores(pred: str, golds: list[str], tok=None) -> dict[str, float]:
    """SQuAD EM/F1 with mixed segmentation, plus token-id EM/F1 when ``tok`` is given."""
    em, f1 = squad_em_f1(pred, golds, mixed=True)
    out = {"em": em, "f1": f1}
    if tok is not None:
        out["em_tokens"], out["f1_tokens"] = token_em_f1(pred, golds, tok)
    return out


def _ctx(context: Optional[Callable]):
    return context() if context is not None else contextlib.nullcontext()


@torch.no_grad()
def evaluate_classification(classifier, tok, data: ClassificationData, batch_size: int = 16, max_length: int = 256,
                            context: Optional[Callable] = None, progress: bool = False, desc: str = "eval") -> dict:
    """Accuracy and per-example correctness (in data order) of a :class:`SequenceClassifier`."""
    was = classifier.training
    classifier.eval()
    ids = encode_classification(tok, data, max_length)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    preds = [0] * len(ids)
    dev = classifier.head.weight.device
    it = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
    with _ctx(context):
        for s in it:
            idx = order[s:s + batch_size]
            b = pad_batch([ids[i] for i in idx], pad_id(tok), "right")
            logits = classifier(b["input_ids"].to(dev), b["attention_mask"].to(dev))
            for i, p in zip(idx, logits.argmax(-1).tolist()):
                preds[i] = p
    classifier.train(was)
    correct = [int(p == y) for p, y in zip(preds, data.labels)]
    return {"n": len(correct), "accuracy": sum(correct) / max(1, len(correct)), "correct": correct,
            "predictions": preds}


def generate_answers(model, tok, data: QAData, batch_size: int = 8, max_length: int = 512,
                     max_new_tokens: int = 32, context: Optional[Callable] = None, progress: bool = False,
                     desc: str = "eval") -> list[str]:
    """Greedy answers (decoded, cut at the first newline, stripped), in data order, through the
    runtime's generation pass (:meth:`langneurons.runtime.Session.generate`)."""
    from ..runtime import Session
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    was = inner.training
    inner.eval()
    enc = encode_qa(tok, data, max_length - max_new_tokens, with_answer=False)
    session = Session(inner, tok, batch_size=batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(enc), desc=desc, unit="example", leave=False, dynamic_ncols=True)
    try:
        with _ctx(context):
            return session.generate(ids=[e.prompt for e in enc], max_new_tokens=max_new_tokens, stop=("\n",),
                                    strip=True, progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
        inner.train(was)


def evaluate_qa(model, tok, data: QAData, batch_size: int = 8, max_length: int = 512, max_new_tokens: int = 32,
                context: Optional[Callable] = None, progress: bool = False, desc: str = "eval") -> dict:
    """EM/F1 (words and token ids, in %) and per-example scores of greedy answers."""
    preds = generate_answers(model, tok, data, batch_size, max_length, max_new_tokens, context, progress, desc)
    per = [qa_scores(p, g, tok) for p, g in zip(preds, data.answers)]
    n = max(1, len(per))
    res = {"n": len(per), **{k: 100.0 * sum(d[k] for d in per) / n for k in ("em", "f1", "em_tokens", "f1_tokens")}}
    res["correct"] = [d["f1"] for d in per]         # per-example score used by paired tests
    res["predictions"] = preds
    return res

