"""Language-activated neurons, the baseline of [R25].

From per-sentence mean activations ``m_k[s, l, j]`` of the first ``S`` sentences of language k
(statistics collected with ``--unit sentence``):

    A_k = {(l, j) : m_k[s, l, j] > 0 for every s < S}

``S`` is the number of sentence means stored for the language (or ``--sentences``, if smaller).
No exclusivity: a neuron active on every sentence of two languages belongs to both.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..neuronset import NeuronSet
from . import base_method, stats_record

NAME = "language-activated"
HELP = "language-activated baseline [R25]: neurons whose sentence mean is > 0 on every sentence (needs --unit sentence)"


def add_arguments(parser) -> None:
    parser.add_argument("--sentences", type=int, default=None,
                        help="use the first N stored sentences of each language [all stored]")


def sentence_means(stats, code: str, limit, layer: int) -> torch.Tensor:
    """The stored per-sentence means ``[S, I]`` of ``code`` at ``layer`` (first ``limit`` if given),
    read from the file alone: large models are read a layer at a time."""
    ls = stats.get(code)
    n = min(int(ls.n_sentences), ls.max_sentences)     # max_sentences is 0 without sentence means
    if n == 0:
        raise UserError(f"the statistics hold no per-sentence means for {code!r}; collect with --unit sentence")
    if limit is not None:
        if limit < 1:
            raise UserError(f"--sentences must be at least 1, got {limit}")
        if limit > n:
            raise UserError(f"--sentences {limit} but only {n} sentence means of {code!r} are stored; "
                            f"use --sentences {n} or collect more with --sentences")
        n = limit
    return ls.part("sentence_mean", (slice(0, n), slice(layer, layer + 1)))[:, 0].float().cpu()


def activated_mask(means: torch.Tensor) -> torch.Tensor:
    """``means [S, L, I]`` -> BoolTensor ``[L, I]``: mean ``> 0`` on all ``S`` sentences (``S >= 1``)."""
    if means.dim() != 3 or means.shape[0] == 0:
        raise UserError(f"sentence means must have shape [sentences >= 1, layers, width], got {tuple(means.shape)}")
    return (means > 0).all(0)


def run(stats, languages: list[str], args) -> NeuronSet:
    masks, used = {}, {}
    for c in languages:
        rows = []
        for layer in range(stats.num_layers):          # a layer at a time: memory of one layer's means
            m = sentence_means(stats, c, args.sentences, layer=layer)
            rows.append(activated_mask(m.unsqueeze(1))[0])
            used[c] = int(m.shape[0])
        masks[c] = torch.stack(rows)
    params = {"sentences": args.sentences, "sentences_used": used,
              "per_language": {c: int(m.sum()) for c, m in masks.items()},
              "rule": "sentence mean > 0 on every used sentence",
              "stats": stats_record(stats, languages)}
    return NeuronSet.from_masks(masks, stats.model_info, base_method(NAME, stats, languages, params))
