"""Act-Prob-percentile ("Act Prob 90p") [M25].

For each language ``k`` of the chosen set, with a per-neuron threshold ``t[l, j]``:

    score_k[l, j] = P_k(a[l, j] > t[l, j])     (fraction of k's tokens above the threshold)

and the ``round(rate * L*I)`` neurons with the highest score are language k's set (ties: smaller
flat index ``l * I + j`` first; neurons with score 0 are never selected). Sets of different
languages may overlap. The threshold source (``--threshold``):

- ``own`` (the paper's code): ``t_k`` = language k's own P-th percentile. Then every score is about
  ``1 - P/100`` *by construction* (0.10 for P90), so the ranking mostly reflects estimation noise
  (in [M25]: batch-averaged quantiles and subset sampling). Here quantile and fraction come from
  the same sketch CDF, so the scores agree to about 1e-12 except at point masses (exact zeros) and
  the ranking is numerical noise; ``method.params.score_spread`` shows it. Offered for replication.
- ``pooled`` (default): ``t`` = P-th percentile of all chosen languages' tokens pooled
  (:func:`~langneurons.stats.pooled_quantile`, token-weighted). A neuron scores high for k when
  k's tokens exceed the common bar more often than the others' do.
- a language code (e.g. ``en``): ``t`` = that language's P-th percentile; it must be in the
  statistics (not necessarily among ``--languages``).

Quantiles and fractions come from the statistics' quantile sketch. [M25] computed its
statistics at the ``pre`` site (before the nonlinearity); this method works at whatever site the
statistics were collected at and records it in ``method.params``.
"""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..neuronset import NeuronSet
from ..stats import pooled_quantile
from . import base_method, require_tokens, stats_record, top_count_mask

NAME = "act-prob-percentile"
HELP = ("Act-Prob-percentile [M25]: per language, the neurons most often above a percentile threshold "
        "(own, pooled or a reference language's)")

DEFAULTS = {"percentile": 90.0, "rate": 0.00125, "threshold": "pooled"}


def add_arguments(parser) -> None:
    parser.add_argument("--percentile", type=float, default=DEFAULTS["percentile"],
                        help="percentile P of the threshold, in (0, 100) [90]")
    parser.add_argument("--rate", type=float, default=DEFAULTS["rate"],
                        help="neurons per language = round(rate * L*I) [0.00125]")
    parser.add_argument("--threshold", default=DEFAULTS["threshold"], metavar="own|pooled|CODE",
                        help="threshold source: own (each language's own P-th percentile, as in [M25]; every "
                             "score is then about 1-P/100, so rankings are mostly noise), pooled (P-th "
                             "percentile of the chosen languages pooled) or a language code (that language's "
                             "P-th percentile) [pooled]. [M25] used statistics of the pre site; the site of "
                             "the statistics is recorded")


def check_params(percentile: float, rate: float) -> tuple[float, float]:
    try:
        percentile, rate = float(percentile), float(rate)
    except (TypeError, ValueError):
        raise UserError("--percentile and --rate must be numbers") from None
    if not (math.isfinite(percentile) and 0.0 < percentile < 100.0):
        raise UserError(f"--percentile must be strictly between 0 and 100, got {percentile}; e.g. --percentile 90")
    if not (math.isfinite(rate) and 0.0 < rate <= 1.0):
        raise UserError(f"--rate must be in (0, 1], got {rate}; e.g. --rate 0.00125")
    return percentile, rate


def select_by_score(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Per language, the ``count`` highest scores of ``scores [K, L, I]`` -> BoolTensor ``[K, L, I]``.

    Ties: smaller flat index first. Scores ``<= 0`` (never above the threshold) are not selected.
    """
    return torch.stack([top_count_mask(s, count, eligible=s > 0) for s in scores])


def thresholds(per_lang: dict, q: float, source: str, reference=None) -> dict:
    """Per-language thresholds ``{code: Tensor [L, I]}`` at quantile ``q`` (``0 < q < 1``).

    ``per_lang``: ``{code: LanguageStats}`` of the chosen languages; ``source``: ``own``,
    ``pooled`` or ``reference`` (then ``reference`` is the reference language's LanguageStats).
    """
    if source == "own":
        return {c: s.quantile(q) for c, s in per_lang.items()}
    if source == "pooled":
        t = pooled_quantile(list(per_lang.values()), q)
    elif source == "reference":
        t = reference.quantile(q)
    else:
        raise UserError(f"unknown threshold source {source!r}; use own, pooled or a language code")
    return {c: t for c in per_lang}


def act_prob_scores(per_lang: dict, q: float, source: str, reference=None) -> torch.Tensor:
    """``score[k, l, j]`` = fraction of language k's tokens above its threshold, float64 ``[K, L, I]``."""
    t = thresholds(per_lang, q, source, reference)
    return torch.stack([s.frac_above(t[c]).double().cpu() for c, s in per_lang.items()])


def run(stats, languages: list[str], args) -> NeuronSet:
    percentile, rate = check_params(args.percentile, args.rate)
    source = str(args.threshold)
    reference = None
    if source not in ("own", "pooled"):
        if source not in stats.languages:
            raise UserError(f"--threshold {source!r} is neither own, pooled nor a language of these statistics "
                            f"({', '.join(stats.languages)}); pick one of those")
        reference, ref_code, source = stats.get(source), source, "reference"
        require_tokens(stats, [ref_code])
    else:
        ref_code = None
    require_tokens(stats, languages)
    per_lang = {c: stats.get(c) for c in languages}
    for c, s in per_lang.items():
        if not s.sketch_bins:
            raise UserError(f"statistics of {c!r} have no quantile sketch; collect again without --sketch-bins 0")
    L, I = stats.num_layers, stats.width
    count = int(round(rate * L * I))
    scores = act_prob_scores(per_lang, percentile / 100.0, source, reference)
    masks = select_by_score(scores, count)
    params = {
        "percentile": percentile, "rate": rate, "threshold": ref_code or source,
        "threshold_source": source, "count": count,
        "per_language": {c: int(masks[k].sum()) for k, c in enumerate(languages)},
        "min_selected_score": {c: (float(scores[k][masks[k]].min()) if bool(masks[k].any()) else None)
                               for k, c in enumerate(languages)},
        "mean_score": {c: float(scores[k].mean()) for k, c in enumerate(languages)},
        "tie_break": "equal score: smaller flat index layer*width+index first; score 0 never selected",
        "site": stats.site,
        "stats": stats_record(stats, languages),
    }
    params["score_spread"] = {c: float(scores[k].max() - scores[k].min()) for k, c in enumerate(languages)}
    if source == "own":
        flat = [c for c, v in params["score_spread"].items() if v < 1e-6]
        params["note"] = (f"threshold own: every score is about {1 - percentile / 100:.2f} by construction, "
                          "so the ranking mostly reflects estimation noise"
                          + (f"; for {', '.join(flat)} all scores agree to 1e-6, so the selection is numerical "
                             "noise (use --threshold pooled or a reference language)" if flat else ""))
    return NeuronSet.from_masks({c: masks[k] for k, c in enumerate(languages)}, stats.model_info,
                                base_method(NAME, stats, languages, params))
