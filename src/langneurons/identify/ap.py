"""Average-precision neurons (Kojima et al. 2024).

Every neuron is scored as a one-vs-rest classifier of each language from its per-sentence mean
activation (statistics collected with ``--unit sentence``). With the ``M`` sentences of the chosen
languages (language k contributes its ``S_k`` stored sentences), score ``x[s, n]`` of sentence s
and neuron n, and positives = the sentences of language k:

    AP_k[n] = (1 / S_k) * sum_{s positive} precision_n(x[s, n])
    precision_n(t) = |{positives with x >= t}| / |{sentences with x >= t}|

i.e. precision at each positive's rank in the order of decreasing score. **Ties:** sentences with
equal scores form one group and every positive of the group gets the precision at the *end* of
the group (all tied sentences counted as retrieved). This makes AP independent of the order of
tied sentences and equals scikit-learn's ``average_precision_score``. The chance level is
``S_k / M`` (``1/K`` with equal sentence counts).

Each neuron's scores are sorted once (``torch.sort`` over sentences, in chunks of neurons); the
APs of every language come from the same sorted labels.

Selection: neurons with ``AP_k > --threshold``; with ``--top-k``, at most the k best of those by AP
(ties: smaller flat index first); then neurons kept for several languages are dropped from all of
them (exclusive sets). ``--direction low`` scores ``-x`` (neurons *less* active on language k).
"""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..neuronset import NeuronSet
from . import base_method, stats_record, top_count_mask
from .language_activated import sentence_means

NAME = "ap"
HELP = ("average-precision neurons (Kojima et al. 2024): sentence means as one-vs-rest language classifiers, "
        "AP above a threshold, exclusive (needs --unit sentence)")

DEFAULTS = {"threshold": 0.9, "top_k": None, "direction": "high"}
_CHUNK_ELEMENTS = 1 << 22


def add_arguments(parser) -> None:
    parser.add_argument("--threshold", type=float, default=DEFAULTS["threshold"],
                        help="keep neurons with AP > threshold, in [0, 1); chance is about 1/K [0.9]")
    parser.add_argument("--top-k", type=int, default=DEFAULTS["top_k"],
                        help="keep at most the K best neurons per language (above --threshold; use "
                             "--threshold 0 for a plain top-k) [no limit]")
    parser.add_argument("--direction", choices=("high", "low"), default=DEFAULTS["direction"],
                        help="high: neurons more active on the language; low: less active (scores -x) [high]")
    parser.add_argument("--sentences", type=int, default=None,
                        help="use the first N stored sentences of each language [all stored]")


def average_precision(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-vs-rest AP of every column of ``scores [M, N]`` for every class of ``labels [M]``.

    Returns float64 ``[num_classes, N]``; a class without positives gets NaN. Ties are handled as
    in the module docstring (precision at the end of each group of equal scores).
    """
    if scores.dim() != 2 or labels.dim() != 1 or labels.shape[0] != scores.shape[0]:
        raise UserError(f"average_precision: scores must be [M, N] and labels [M], got "
                        f"{tuple(scores.shape)} and {tuple(labels.shape)}")
    M, N = scores.shape
    labels = labels.long()
    n_pos = torch.bincount(labels, minlength=num_classes).double()                # [K]
    out = torch.empty(num_classes, N, dtype=torch.float64)
    chunk = max(1, _CHUNK_ELEMENTS // max(M, 1))
    rank = torch.arange(M).unsqueeze(1)                                             # [M, 1]
    for a in range(0, N, chunk):
        x = scores[:, a:a + chunk].double()
        xs, order = torch.sort(x, dim=0, descending=True, stable=True)              # [M, n]
        lab = labels[order]                                                         # [M, n]
        # end of each tie group: the last rank r' >= r with xs[r'] == xs[r]
        last = torch.ones_like(xs, dtype=torch.bool)
        last[:-1] = xs[:-1] != xs[1:]
        end = torch.where(last, rank.expand_as(xs), torch.full_like(order, M))
        end = end.flip(0).cummin(0).values.flip(0)                                  # [M, n]
        denom = (end + 1).double()
        for k in range(num_classes):
            pos = lab == k
            hits = pos.cumsum(0).gather(0, end).double()                            # positives up to the group end
            out[k, a:a + chunk] = (pos * (hits / denom)).sum(0) / n_pos[k] if n_pos[k] > 0 else math.nan
    return out


def ap_masks(ap: torch.Tensor, threshold: float = 0.9, top_k=None) -> tuple[torch.Tensor, dict]:
    """Selection from ``ap [K, L, I]`` -> (BoolTensor ``[K, L, I]``, info) as in the module docstring."""
    keep = ap > threshold
    if top_k is not None:
        keep = torch.stack([top_count_mask(ap[k], top_k, eligible=keep[k]) for k in range(ap.shape[0])])
    before = keep.sum((1, 2))
    shared = keep.sum(0) > 1
    keep = keep & ~shared
    info = {"kept_before_exclusivity": before.tolist(), "dropped_shared": int(shared.sum())}
    return keep, info


def run(stats, languages: list[str], args) -> NeuronSet:
    if len(languages) < 2:
        raise UserError(f"ap needs at least 2 languages (one-vs-rest), got {languages}; give more with --languages")
    threshold = float(args.threshold)
    if not (math.isfinite(threshold) and 0.0 <= threshold < 1.0):
        raise UserError(f"--threshold must be in [0, 1), got {args.threshold}; e.g. --threshold 0.9")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be a positive integer, got {args.top_k}")
    L, I = stats.num_layers, stats.width
    ap = torch.empty(len(languages), L, I, dtype=torch.float64)
    for layer in range(L):                      # a layer at a time: memory of one layer's sentence means
        means = [sentence_means(stats, c, args.sentences, layer=layer) for c in languages]
        x = torch.cat(means)                                                        # [M, I]
        if args.direction == "low":
            x = -x
        labels = torch.cat([torch.full((m.shape[0],), k, dtype=torch.long) for k, m in enumerate(means)])
        ap[:, layer] = average_precision(x, labels, len(languages))
    used = {c: int(m.shape[0]) for c, m in zip(languages, means)}
    masks, info = ap_masks(ap, threshold, args.top_k)
    params = {
        "threshold": threshold, "top_k": args.top_k, "direction": args.direction, "sentences": args.sentences,
        "sentences_used": used,
        "chance_ap": {c: used[c] / sum(used.values()) for c in languages},
        "max_ap": {c: float(ap[k].max()) for k, c in enumerate(languages)},
        "kept_before_exclusivity": dict(zip(languages, info["kept_before_exclusivity"])),
        "dropped_shared": info["dropped_shared"],
        "per_language": {c: int(masks[k].sum()) for k, c in enumerate(languages)},
        "ties": "tied scores share the precision at the end of their group (scikit-learn's AP); "
                "top-k ties: smaller flat index first",
        "stats": stats_record(stats, languages),
    }
    return NeuronSet.from_masks({c: masks[k] for k, c in enumerate(languages)}, stats.model_info,
                                base_method(NAME, stats, languages, params))
