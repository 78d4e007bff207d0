"""LAPE: language activation probability entropy [T24].

With ``K`` languages, ``L`` layers and ``I`` neurons per layer:

1. ``p[l, j, k] = count_pos_k[l, j] / n_k``                                     ``[L, I, K]``
2. ``q[l, j, k] = p[l, j, k] / sum_k' p[l, j, k']`` (0/0 -> 0);
   ``H[l, j] = -sum_k q ln q`` (natural log, 0 ln 0 = 0)                          ``[L, I]``
3. ``tau_f`` = value of rank ``round(filter_rate * L*I*K)`` among all ``p`` pooled (kthvalue:
   1-indexed, no interpolation). A neuron with ``p[l, j, k] <= tau_f`` for *every* language gets
   ``H = +inf`` (it is rarely active anywhere: a low entropy would mean nothing).
4. Select the ``round(top_rate * L*I)`` neurons with the smallest ``H`` over all layers jointly.
   An ``H = +inf`` neuron is never selected: when fewer neurons survive the filter, fewer are
   selected and ``info["shortfall"]`` says how many are missing. Ties in ``H`` are broken by the
   flat index ``l * I + j`` (smaller first, stable sort).
5. ``tau_b`` = value of rank ``round(activation_bar_ratio * L*I*K)`` among all ``p``. A selected
   neuron belongs to every language ``k`` with ``p[l, j, k] > tau_b`` (to several, or to none when
   the bar is above all of its probabilities; ``info["unassigned"]`` counts those).
6. Every language gets its own list, empty or not.

The selection depends on the language set: the same statistics with other ``--languages`` give
other neurons.
"""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..neuronset import NeuronSet
from . import base_method, check_open_unit, kth_value, prob_table, rank_of, stats_record, top_count_mask

NAME = "lape"
HELP = "language activation probability entropy [T24]: low-entropy neurons, assigned by an activation bar"

DEFAULTS = {"top_rate": 0.01, "filter_rate": 0.95, "activation_bar_ratio": 0.95}


def add_arguments(parser) -> None:
    parser.add_argument("--top-rate", type=float, default=DEFAULTS["top_rate"],
                        help="fraction of all L*I neurons to select (lowest entropy) [0.01]")
    parser.add_argument("--filter-rate", type=float, default=DEFAULTS["filter_rate"],
                        help="quantile of all pooled probabilities: neurons at or below it in every "
                             "language are never selected [0.95]")
    parser.add_argument("--activation-bar-ratio", type=float, default=DEFAULTS["activation_bar_ratio"],
                        help="quantile of all pooled probabilities a selected neuron must exceed in a "
                             "language to belong to it [0.95]")


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy over the last axis of ``p [..., K]`` after normalising it to sum 1.

    ``q = p / sum_k p`` with 0/0 -> 0, ``H = -sum_k q ln q`` with 0 ln 0 = 0. Returns ``[...]`` float64.
    """
    p = p.double()
    total = p.sum(-1, keepdim=True)
    q = torch.where(total > 0, p / total.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(p))
    return -torch.special.xlogy(q, q).sum(-1)


def lape_masks(p: torch.Tensor, top_rate: float = 0.01, filter_rate: float = 0.95,
               activation_bar_ratio: float = 0.95) -> tuple[torch.Tensor, dict]:
    """LAPE selection on an activation-probability table ``p [L, I, K]``.

    Returns ``(masks, info)``: ``masks`` is a BoolTensor ``[K, L, I]`` (``masks[k]`` = neurons of
    language ``k``) and ``info`` holds the derived quantities: ``tau_f``, ``tau_b`` and their ranks,
    ``requested`` (``round(top_rate * L*I)``), ``selected``, ``filtered_inf`` (neurons with
    ``H = +inf``), ``survivors``, ``shortfall``, ``unassigned`` and ``max_selected_entropy``.
    """
    if p.dim() != 3:
        raise UserError(f"LAPE needs a probability table [layers, width, languages], got shape {tuple(p.shape)}")
    L, I, K = p.shape
    if K < 2:
        raise UserError(f"LAPE needs at least 2 languages (entropy over one language is always 0), got {K}; "
                        f"give more with --languages")
    top_rate = check_open_unit("top_rate", top_rate)
    filter_rate = check_open_unit("filter_rate", filter_rate)
    activation_bar_ratio = check_open_unit("activation_bar_ratio", activation_bar_ratio)
    p = p.double()
    if bool(torch.isnan(p).any()) or bool((p < 0).any()):
        raise UserError("activation probabilities must be non-negative numbers; the statistics are corrupt, "
                        "collect them again")
    n_all = L * I * K
    rank_f, rank_b = rank_of(filter_rate, n_all), rank_of(activation_bar_ratio, n_all)
    tau_f, tau_b = kth_value(p, rank_f), kth_value(p, rank_b)

    H = entropy(p)                                   # [L, I]
    dead = (p <= tau_f).all(-1)                      # [L, I]: below the filter in every language
    H = H.masked_fill(dead, math.inf)

    requested = int(round(top_rate * L * I))
    # smallest H first = largest -H; +inf neurons are not eligible
    selected = top_count_mask(-H, requested, eligible=~dead)
    n_sel = int(selected.sum())

    masks = selected.unsqueeze(0) & (p > tau_b).permute(2, 0, 1)   # [K, L, I]
    survivors = int((~dead).sum())
    info = {
        "tau_f": tau_f, "rank_f": rank_f, "tau_b": tau_b, "rank_b": rank_b,
        "requested": requested, "selected": n_sel, "filtered_inf": int(dead.sum()), "survivors": survivors,
        "shortfall": requested - n_sel,
        "unassigned": int((selected & ~masks.any(0)).sum()),
        "max_selected_entropy": float(H[selected].max()) if n_sel else None,
        "tie_break": "equal entropy: smaller flat index layer*width+index first",
    }
    if info["shortfall"]:
        info["note"] = (f"only {survivors} neurons pass the filter (tau_f = {tau_f:.6g}); selected {n_sel} "
                        f"of the {requested} requested, never a +inf-entropy neuron")
    return masks, info


def run(stats, languages: list[str], args) -> NeuronSet:
    params = {"top_rate": args.top_rate, "filter_rate": args.filter_rate,
              "activation_bar_ratio": args.activation_bar_ratio}
    for k, v in params.items():
        check_open_unit(k, v)
    if len(languages) < 2:
        raise UserError(f"lape needs at least 2 languages, got {languages}; give more with --languages")
    p = prob_table(stats, languages)
    masks, info = lape_masks(p, **params)
    info["per_language"] = {c: int(masks[k].sum()) for k, c in enumerate(languages)}
    params.update(info)
    params["stats"] = stats_record(stats, languages)
    return NeuronSet.from_masks({c: masks[k] for k, c in enumerate(languages)}, stats.model_info,
                                base_method(NAME, stats, languages, params))
