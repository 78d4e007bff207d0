"""Top activation probability per language [X25].

For each language ``k`` separately, with ``p_k[l, j] = count_pos_k[l, j] / n_k`` over ``N = L*I``
neurons:

    t_k = value of rank round((1 - top_rate) * N) among p_k   (kthvalue: 1-indexed, no interpolation)
    T_k = {(l, j) : p_k[l, j] >= t_k}

Neurons tied with ``t_k`` are all kept, so ``|T_k|`` can exceed ``round(top_rate * N)``. No
entropy, no exclusivity: a neuron may belong to several languages.

Between languages (:func:`overlap_similarity`):

    O[k, k'] = |T_k ∩ T_k'|
    S[k, k'] = cos(p_k[T_k ∩ T_k'], p_k'[T_k ∩ T_k'])   (0 for an empty intersection or a zero vector)

``S`` gathers, for every neuron ``(l_i, j_i)`` of the intersection, ``p_k[l_i, j_i]`` and
``p_k'[l_i, j_i]``; it is computed for all pairs at once with masked matrix products:
``D = (M∘P)(M∘P)^T`` (dot products over intersections), ``A = (M∘P²) M^T`` (squared norms of row
k over ``T_k ∩ T_k'``), ``S = D / sqrt(A ∘ A^T)`` with ``P, M`` the ``[K, N]`` probabilities and masks.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..neuronset import NeuronSet
from . import base_method, check_open_unit, kth_value, prob_table, rank_of, stats_record

NAME = "top-prob"
HELP = "top activation probability per language [X25]: the top_rate most often active neurons of each language"

DEFAULTS = {"top_rate": 0.01}


def add_arguments(parser) -> None:
    parser.add_argument("--top-rate", type=float, default=DEFAULTS["top_rate"],
                        help="fraction of all L*I neurons kept per language (ties at the threshold are kept) [0.01]")


def _check_probs(probs: dict) -> tuple[int, int]:
    if not isinstance(probs, dict) or not probs:
        raise UserError("top-prob needs a non-empty dict {language: activation probabilities [L, I]}")
    shape = None
    for lang, p in probs.items():
        if not isinstance(p, torch.Tensor) or p.dim() != 2:
            raise UserError(f"probabilities of {lang!r} must be a 2-D tensor [layers, width]")
        if shape is None:
            shape = tuple(p.shape)
        elif tuple(p.shape) != shape:
            raise UserError(f"probabilities of {lang!r} have shape {tuple(p.shape)}, others {shape}; "
                            f"use statistics of one model")
    if shape[0] * shape[1] == 0:
        raise UserError("probability tables are empty")
    return shape


def top_prob_threshold(p: torch.Tensor, top_rate: float = 0.01) -> tuple[float, int]:
    """``(t, rank)``: the value of rank ``round((1 - top_rate) * N)`` of ``p`` (clamped into [1, N])."""
    rank = rank_of(1.0 - top_rate, p.numel())
    return kth_value(p.double(), rank), rank


def top_prob_masks(probs: dict[str, torch.Tensor], top_rate: float = 0.01) -> dict[str, torch.Tensor]:
    """``{language: BoolTensor [L, I]}``: ``p_k >= t_k`` with ``t_k`` from :func:`top_prob_threshold`.

    ``probs``: ``{language: activation probability [L, I]}`` (any float dtype, all of one shape).
    """
    top_rate = check_open_unit("top_rate", top_rate)
    _check_probs(probs)
    out = {}
    for lang, p in probs.items():
        t, _ = top_prob_threshold(p, top_rate)
        out[lang] = p.double() >= t
    return out


def overlap_similarity(probs: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
                       ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """``(languages, O, S)`` over the languages of ``probs`` (in its order).

    ``O`` int64 ``[K, K]``: ``O[k, k'] = |T_k ∩ T_k'|``. ``S`` float64 ``[K, K]``: cosine of
    ``p_k`` and ``p_k'`` restricted to ``T_k ∩ T_k'`` (0 where the intersection is empty or one
    restricted vector is all zeros). ``masks[k]`` is ``T_k`` as a BoolTensor ``[L, I]``.
    """
    shape = _check_probs(probs)
    langs = list(probs)
    missing = [c for c in langs if c not in masks]
    if missing:
        raise UserError(f"overlap_similarity: no mask for language(s) {', '.join(missing)}")
    for c in langs:
        if tuple(masks[c].shape) != shape:
            raise UserError(f"overlap_similarity: mask of {c!r} has shape {tuple(masks[c].shape)}, "
                            f"probabilities {shape}")
    P = torch.stack([probs[c].detach().double().cpu().reshape(-1) for c in langs])      # [K, N]
    M = torch.stack([masks[c].detach().cpu().bool().reshape(-1) for c in langs]).double()  # [K, N]
    O = (M @ M.T).round().to(torch.int64)
    MP = M * P
    D = MP @ MP.T                     # D[k, k'] = sum_{n in T_k ∩ T_k'} p_k[n] p_k'[n]
    A = (M * P * P) @ M.T             # A[k, k'] = sum_{n in T_k ∩ T_k'} p_k[n]^2
    denom = (A * A.T).sqrt()          # |p_k| |p_k'| over the intersection
    S = torch.where(denom > 0, D / denom.clamp_min(1e-300), torch.zeros_like(D))
    return langs, O, S


def run(stats, languages: list[str], args) -> NeuronSet:
    top_rate = check_open_unit("top_rate", args.top_rate)
    p = prob_table(stats, languages)
    probs = {c: p[..., k] for k, c in enumerate(languages)}
    masks = top_prob_masks(probs, top_rate)
    thresholds = {c: top_prob_threshold(probs[c], top_rate)[0] for c in languages}
    params = {
        "top_rate": top_rate,
        "rank": rank_of(1.0 - top_rate, stats.num_layers * stats.width),
        "thresholds": thresholds,
        "per_language": {c: int(m.sum()) for c, m in masks.items()},
        "ties": "neurons tied with the threshold are all kept (>=)",
        "stats": stats_record(stats, languages),
    }
    return NeuronSet.from_masks(masks, stats.model_info, base_method(NAME, stats, languages, params))
