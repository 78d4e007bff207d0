"""Downstream tasks of the papers, on local files or ``hf:`` datasets, with and without interventions.

=========== ========== ================================================ ===========================
task        kind       scoring                                          metrics (headline first)
=========== ========== ================================================ ===========================
xnli        choice     3 label verbalisations, summed log-likelihood    acc, acc_norm
xcopa       choice     premise + connector, choice log-likelihood       acc, acc_norm
xwinograd   choice     partial scoring of the text after the pronoun    acc, acc_norm
sib200      choice     topic-name log-likelihood                        acc_norm, acc
xquad       generate   greedy answer, SQuAD EM/F1 (or token-id EM/F1)   f1, em
flores      generate   greedy translation, sacreBLEU corpus scores      chrf++, bleu
mcq         letter     A-D next-token argmax (local JSONL)              acc
belebele    letter     as mcq, default hf:facebook/belebele             acc
include     letter     as mcq, default hf:CohereLabs/include-base-44    acc
=========== ========== ================================================ ===========================

``get_task(name)`` returns the task object; :func:`langneurons.tasks.runner.run_eval` evaluates
it over languages and intervention settings.
"""

from __future__ import annotations

from ..errors import UserError


def _registry() -> dict:
    from . import flores, mcq, sib200, xcopa, xnli, xquad, xwinograd
    return {"xnli": xnli.TASK, "xcopa": xcopa.TASK, "xwinograd": xwinograd.TASK, "sib200": sib200.TASK,
            "xquad": xquad.TASK, "flores": flores.TASK, "mcq": mcq.TASK, "belebele": mcq.BELEBELE,
            "include": mcq.INCLUDE}


TASK_NAMES = ("xnli", "xcopa", "xwinograd", "sib200", "xquad", "flores", "mcq", "belebele", "include")


def get_task(name: str):
    reg = _registry()
    if name not in reg:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
    return reg[name]


__all__ = ["get_task", "TASK_NAMES"]
