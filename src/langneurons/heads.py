"""Attention heads as language units: per-language head statistics, head sets, head interventions.

The unit. Head ``h`` of decoder layer ``l`` writes, at token position ``i``, the vector

    c_h(i) = W_O[:, h*d:(h+1)*d] z_h(i)          in R^H

where ``z_h(i)`` (``d = head_dim`` numbers) is the head's slice of the input of the layer's attention
output projection (``o_proj``, GPT-2 ``c_proj``, ``dense``, OPT ``out_proj``: the adapter table,
:data:`langneurons.arch.ATTN_OUT`) and ``W_O`` its weight (GPT-2's ``Conv1D`` stores it transposed).
The projection's output is ``sum_h c_h + b``; the bias belongs to no head. Under grouped-query
attention the input still has ``num_attention_heads * head_dim`` columns (keys and values are shared,
head outputs are not); fused query-key-value layouts (GPT-2, GPT-NeoX, BLOOM, Falcon, Phi-3) still
have a separate output projection. For pre-norm models ``c_h`` is what the head adds to the residual
stream; where a norm follows the attention (Gemma 2/3, OLMo 2 post-norms) it is the head's share of
the normalised vector's input.

Statistics (per language ``k``, over the real, non-pad positions ``i`` of its windows, packed as
``collect`` packs them), in float64, all additive::

    N(k)               positions counted                              count.CODE     int64 [1]
    S_lh(k)  = sum_i ||c_h(i)||_2                                     norm_sum.CODE  float64 [L, n]
    Q_lh(k)  = sum_i ||c_h(i)||_2^2                                   sq_sum.CODE    float64 [L, n]
    G_lhb(k) = #{i : ||c_h(i)|| in bin b}                             hist.CODE      int64 [L, n, NB]

    m_lh(k) = S_lh(k) / N(k)           the mean contribution norm     (PRIMARY; norm.CODE float32 [L, n])
    s_lh(k) = sqrt(Q / N - m^2)        its standard deviation

``||c_h||`` is computed exactly from ``z_h`` without forming ``c_h``: ``||c_h||^2 = z_h^T (W_h^T W_h) z_h``
with the ``d x d`` Gram matrix of the head's columns (float64).

Why the mean norm is the primary statistic. An MLP neuron has a natural zero (ReLU/SiLU/GELU
outputs at or below 0 are "off"), so "the neuron fires" and its probability are well defined. A head
has none: its output is a vector that is never exactly zero, and a probability of "being active"
needs a threshold chosen by us. The mean norm needs no threshold, is additive (shards merge
exactly), is in the units of the residual stream, and is what ablating the head removes on average.
The thresholded probability is kept as a secondary statistic:

    tau_lh = the upper edge of the histogram bin holding the median of ||c_h|| over the languages
             pooled, each language weighted equally (the first bin where the mean over languages of
             the cumulative share G_lh<=b(k) / N(k) reaches 1/2)
    P_lh(k) = P_k(||c_h|| >= tau_lh) = sum_{b > b*} G_lhb(k) / N(k)      (exact for that edge)

The histogram has fixed log2 bins (``BINS_PER_OCTAVE`` = 4 per octave, edges ``2^(e/4)`` for
``e = 4*MIN_EXP .. 4*MAX_EXP``, plus an underflow and an overflow bin): additive like the sums, and
the threshold has a resolution of ``2^(1/4)`` (19%). Pooling weights languages equally (as DiffMean
does) so the threshold does not follow the largest corpus.

Selection (:func:`lape_heads`, :func:`top_heads`; ``x_lh(k)`` = the chosen statistic, ``m`` by default,
``P`` with ``statistic="prob"``, its threshold pooled over the selected languages; ``K`` languages,
``L * n`` heads; ``count = max(1, round(top_rate * L * n))``; ties broken by the flat index
``l * n + h``, smaller first):

- ``lape`` (in the spirit of LAPE): ``p_lh(k) = x_lh(k) / sum_k' x_lh(k')`` (heads with
  ``sum_k' x = 0`` are never selected); ``H_lh = -sum_k p ln p``; keep the ``count`` heads of lowest
  entropy over all layers jointly; assign each to every language with ``p_lh(k) > bar / K`` (``bar``
  = 1: above the uniform share; a kept head is unassigned only when it is exactly uniform).
- ``top`` (in the spirit of top-prob): per language ``k`` separately, the ``count`` heads with the
  largest ``r_lh(k) = x_lh(k) / ((1/K) sum_k' x_lh(k'))`` (the head's strength in ``k`` relative to its
  mean over the languages; heads with a zero mean are never selected). A head may belong to several.

The selection depends on the language set. Head sets (:class:`HeadSet`, ``langneurons.headset.v1``)
hold per language the sorted unique rows ``[layer, head]`` and the model shape ``(num_layers, num_heads)``.

Intervention (:class:`HeadIntervention`). A forward pre-hook on the output projection writes the
columns of the selected heads of ``z``: ``zero`` (``z_h <- 0``, removing ``c_h``) or ``scale:A``
(``z_h <- A z_h``, so ``c_h <- A c_h``), at the positions of neuron interventions (``all`` non-pad
positions, ``prompt``, ``generated``, ``last``) through the same controller, so generation with and
without KV cache agree; composable with neuron and direction interventions in one ``intervene`` list.

Artifact: ``OUT/heads.safetensors`` (per language the tensors above) and ``OUT/heads.json``
(``"format": "langneurons.heads.v1"``): the model (name, type, fingerprint, layers, heads, head_dim,
hidden size, the attention output projection), languages, token counts, window, packing, sources and
the histogram. Collection is resumable per language (``OUT/.partial/``) and adds languages to an
existing directory of the same model and settings.

Families: every model type of the adapter table (Llama, Mistral, Qwen 2/3, Gemma 1/2/3, OLMo 2,
StableLM, Phi, Phi-3, GPT-2, GPT-NeoX, BLOOM, OPT, Falcon), others when their attention output
projection is found (or given with ``--attn-out``). Refused: mixture-of-experts models (the adapter
refuses them), models without a separate output projection taking the head outputs side by side
(``num_heads * head_dim`` inputs), and layers whose projection is bypassed (a fused kernel: the hook
must run once per layer and pass).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from .artifacts import HEADS_CHECKPOINT_FORMAT, HEADS_FORMAT, HEADSET_FORMAT, INTERVENTION_FORMAT, loads_json
from .atomic import atomic_write_text
from .errors import UserError
from .unitsums import Layout, UnitConfig, UnitKind, UnitStats, UnitSums, accumulate_windows, collect_units

#: Bump when a change alters the sums the same command collects (checkpoint keys include it).
HEADS_VERSION = 1

BINS_PER_OCTAVE = 4
MIN_EXP = -20
MAX_EXP = 20
#: The histogram of ``||c_h||`` (see the module docstring), recorded in heads.json.
HISTOGRAM = {"kind": "log2", "bins_per_octave": BINS_PER_OCTAVE, "min_exp": MIN_EXP, "max_exp": MAX_EXP}

METHODS = ("lape", "top")
STATISTICS = ("norm", "prob")
DEFAULT_TOP_RATE = 0.05

MAX_LAYERS = 10**6
MAX_HEADS = 10**6


def hist_edges(spec: Optional[dict] = None) -> torch.Tensor:
    """The bin edges ``2^(e / bins_per_octave)``, float64 ``[E]``; ``E + 1`` bins (bin 0: below the first
    edge, bin ``E``: at or above the last; bin ``b`` otherwise ``[edge_{b-1}, edge_b)``)."""
    s = spec or HISTOGRAM
    k = int(s["bins_per_octave"])
    e = torch.arange(int(s["min_exp"]) * k, int(s["max_exp"]) * k + 1, dtype=torch.float64)
    return torch.pow(2.0, e / k)


def n_bins(spec: Optional[dict] = None) -> int:
    return int(hist_edges(spec).numel()) + 1


# ------------------------------------------------------------------------------------------ sums
class HeadSums(UnitSums):
    """The additive statistics of one language: ``norm_sum [L, n]``, ``sq_sum [L, n]`` (float64),
    ``hist [L, n, NB]`` and ``count`` (int64; ``count [1]``: positions counted, the same for every layer)."""

    FIELDS = ("norm_sum", "sq_sum", "hist", "count")
    WHAT = "head sums"
    MERGE_HINT = "merge sums of the same model and histogram"

    def __init__(self, num_layers: int, num_heads: int, device="cpu", hist_spec: Optional[dict] = None):
        self.num_layers, self.num_heads = int(num_layers), int(num_heads)
        self.hist_spec = dict(hist_spec or HISTOGRAM)
        self.edges = hist_edges(self.hist_spec).to(device)
        L, n = self.num_layers, self.num_heads
        self.norm_sum = torch.zeros(L, n, dtype=torch.float64, device=device)
        self.sq_sum = torch.zeros(L, n, dtype=torch.float64, device=device)
        self.hist = torch.zeros(L, n, self.edges.numel() + 1, dtype=torch.int64, device=device)
        self.count = torch.zeros(1, dtype=torch.int64, device=device)

    @property
    def dims(self) -> tuple[int, int]:
        return self.num_layers, self.num_heads

    @property
    def n_bins(self) -> int:
        return int(self.hist.shape[-1])

    def add(self, layer: int, norms: torch.Tensor) -> None:
        """Add the head norms ``||c_h||`` ``[N, n]`` (the real positions of one pass) of ``layer``."""
        if norms.shape[-1] != self.num_heads:
            raise UserError(f"layer {layer} has {norms.shape[-1]} heads, expected {self.num_heads}; "
                            "use sums of the same model")
        x = norms.reshape(-1, self.num_heads).to(self.device, torch.float64)
        self.norm_sum[layer] += x.sum(0)
        self.sq_sum[layer] += (x * x).sum(0)
        b = torch.bucketize(x, self.edges, right=True)                      # [N, n] in 0..E
        flat = (b + torch.arange(self.num_heads, device=self.device) * self.n_bins).reshape(-1)
        self.hist[layer] += torch.bincount(flat, minlength=self.num_heads * self.n_bins).view(self.num_heads, -1)

    def mean_norm(self) -> torch.Tensor:
        """``m = S / N``: the mean contribution norm, float64 ``[L, n]`` (CPU)."""
        return (self.norm_sum / max(self.n_tokens, 1)).cpu()

    def std_norm(self) -> torch.Tensor:
        """The standard deviation of ``||c_h||`` (population), float64 ``[L, n]``."""
        n = max(self.n_tokens, 1)
        m = self.norm_sum / n
        return (self.sq_sum / n - m * m).clamp_min(0).sqrt().cpu()

    def derived(self) -> dict[str, torch.Tensor]:
        return {"norm": self.mean_norm().float()}


# ------------------------------------------------------------------------------------------ the norms
def head_grams(att, layer: int) -> torch.Tensor:
    """``W_h^T W_h`` for every head of ``layer``: float64 ``[n, d, d]`` on the weight's device."""
    W = att.weight(layer).detach().to(torch.float64)                  # [H, n*d]
    Wh = W.reshape(W.shape[0], att.num_heads, att.head_dim).permute(1, 0, 2)   # [n, H, d]
    return Wh.transpose(1, 2) @ Wh


def head_norms(z: torch.Tensor, grams: torch.Tensor) -> torch.Tensor:
    """``||c_h|| = sqrt(z_h^T G_h z_h)`` for ``z [..., n * d]`` and ``grams [n, d, d]``: float64 ``[..., n]``."""
    n, d = grams.shape[0], grams.shape[1]
    x = z.to(grams.device, torch.float64).reshape(*z.shape[:-1], n, d)
    y = torch.einsum("...hd,hde->...he", x, grams)
    return (y * x).sum(-1).clamp_min(0).sqrt()


def accumulate(session, windows, sums: Optional[HeadSums] = None, mask=None, start: int = 0,
               after_batch: Optional[Callable[[int], None]] = None, progress=None) -> HeadSums:
    """Add the head norms of every real position of ``windows`` to ``sums`` (new if ``None``).

    ``windows``: token ids ``[N, T]`` (numpy or a tensor); ``mask``: ``[N, T]`` (1 = real; ``None`` =
    every position). Batches of ``session.batch_size`` windows in input order run through
    ``model.base_model`` and are split over the ranks by :meth:`~langneurons.runtime.Session.map_batches`;
    this rank's sums are **not** reduced here (:meth:`HeadSums.all_reduce`). Batches before ``start``
    are skipped (resume); ``after_batch(k)`` runs after batch ``k`` of this rank.
    """
    from .hooks import observe_heads
    att = session.adapter.attention()
    L, n = session.adapter.num_layers, att.num_heads
    if sums is None:
        sums = HeadSums(L, n, device=session.device)
    if sums.dims != (L, n):
        raise UserError(f"head sums of shape {list(sums.dims)} do not fit this model "
                        f"({L} layers x {n} heads); use sums of the same model")
    grams = [head_grams(att, l) for l in range(L)]
    return accumulate_windows(session, windows, sums, observe_heads,
                              lambda layer, z: sums.add(layer, head_norms(z, grams[layer])),
                              "the attention output projection of layer(s) {layers} ran {n} time(s) in one forward "
                              "pass instead of once (a fused attention kernel?); load the model without custom "
                              "kernels or give --attn-out", mask, start, after_batch, progress)


# ------------------------------------------------------------------------------------------ the artifact
def _entropy(p: torch.Tensor) -> torch.Tensor:
    from .identify.lape import entropy
    return entropy(p)


class HeadStats(UnitStats):
    """Per-language head statistics of one model (see the module docstring).

    ``HeadStats.load(DIR)``; ``.languages``; ``.num_layers``; ``.num_heads``; ``.head_dim``;
    ``.mean_norm(code)`` (float64 ``[L, n]``, the primary statistic); ``.std_norm(code)``; ``.count(code)``;
    ``.threshold(languages)`` (``tau``, ``[L, n]``); ``.prob(code, languages)``; ``.table(statistic,
    languages)`` (``[L, n, K]``); ``.sums[code]`` (:class:`HeadSums`).
    """

    KIND = "heads"
    WHAT = "head statistics"
    LABEL = "head-statistics"
    DAMAGED = "the head statistics are damaged"
    FORMAT = HEADS_FORMAT
    SUMS = HeadSums
    DIMS = ("num_layers", "num_heads")
    DOC_INTS = ("num_layers", "num_heads", "head_dim")
    FINGERPRINT_FIELDS = ("norm_sum", "hist")
    DEFINITION = {"contribution": "c_h = W_O[:, h*d:(h+1)*d] z_h, z = input of the attention output "
                                  "projection (the bias belongs to no head)",
                  "norm": "m_lh(k) = mean over the real positions of language k of ||c_h||_2 (primary)",
                  "prob": "P_lh(k) = share of positions with ||c_h|| >= tau_lh, tau_lh = upper edge of "
                          "the histogram bin of the median pooled over languages (equal weights)"}

    @classmethod
    def check_doc(cls, doc: dict, bad) -> None:
        h = doc.get("histogram", HISTOGRAM)
        if (not isinstance(h, dict) or h.get("kind") != "log2"
                or not all(isinstance(h.get(k), int) and not isinstance(h.get(k), bool)
                           for k in ("bins_per_octave", "min_exp", "max_exp"))
                or h["bins_per_octave"] < 1 or h["max_exp"] < h["min_exp"] or h["bins_per_octave"] * (
                    h["max_exp"] - h["min_exp"]) > 10**4):
            bad("'histogram' must be {kind: log2, bins_per_octave, min_exp, max_exp} (integers)")

    @classmethod
    def sums_kwargs(cls, meta: dict) -> dict:
        return {"hist_spec": meta.get("histogram")}

    @property
    def num_heads(self) -> int:
        return int(self.meta["num_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.meta["head_dim"])

    @property
    def hist_spec(self) -> dict:
        return dict(self.meta.get("histogram") or HISTOGRAM)

    def _langs(self, languages: Optional[Sequence[str]]) -> list[str]:
        langs = list(dict.fromkeys(languages)) if languages is not None else self.languages
        for c in langs:
            self.check_language(c)
        if not langs:
            raise UserError(f"{self.name} holds no languages; collect some first")
        return langs

    def std_norm(self, code: str) -> torch.Tensor:
        return self.sums[self.check_language(code)].std_norm()
    def _shares(self, code: str) -> torch.Tensor:
        s = self.sums[code]
        return s.hist.cpu().double() / max(s.n_tokens, 1)                 # [L, n, NB]

    def threshold_bins(self, languages: Optional[Sequence[str]] = None) -> torch.Tensor:
        """``b*``: the bin of the pooled median (languages weighted equally), int64 ``[L, n]``."""
        langs = self._langs(languages)
        pooled = torch.stack([self._shares(c) for c in langs]).mean(0)      # [L, n, NB]
        cdf = pooled.cumsum(-1)
        return (cdf < 0.5).sum(-1).clamp_max(pooled.shape[-1] - 1)

    def threshold(self, languages: Optional[Sequence[str]] = None) -> torch.Tensor:
        """``tau``: the upper edge of the pooled median's bin, float64 ``[L, n]`` (the last edge for the
        overflow bin)."""
        edges = hist_edges(self.hist_spec)
        b = self.threshold_bins(languages).clamp_max(edges.numel() - 1)
        return edges[b]

    def prob(self, code: str, languages: Optional[Sequence[str]] = None) -> torch.Tensor:
        """``P_k(||c_h|| >= tau_h)`` with ``tau`` pooled over ``languages`` (default: all): float64 ``[L, n]``."""
        self.check_language(code)
        b = self.threshold_bins(languages)
        sh = self._shares(code)
        above = torch.arange(sh.shape[-1]) > b.unsqueeze(-1)
        return (sh * above).sum(-1)

    def table(self, statistic: str = "norm", languages: Optional[Sequence[str]] = None) -> torch.Tensor:
        """``x_lh(k)`` for the languages (default all): float64 ``[L, n, K]`` (``norm``: ``m``; ``prob``: ``P``)."""
        langs = self._langs(languages)
        if statistic == "norm":
            cols = [self.mean_norm(c) for c in langs]
        elif statistic == "prob":
            cols = [self.prob(c, langs) for c in langs]
        else:
            raise UserError(f"unknown statistic {statistic!r}; use one of {', '.join(STATISTICS)}")
        return torch.stack(cols, -1)

    @property
    def model_info(self) -> dict:
        """The ``model`` block of a head set made from these statistics."""
        m = self.meta.get("model") or {}
        return {"name_or_path": m.get("name_or_path"), "model_type": m.get("model_type"),
                "num_layers": self.num_layers, "num_heads": self.num_heads, "head_dim": self.head_dim,
                "fingerprint": m.get("fingerprint")}



#: Checks a ``heads.json`` document in full (the registry's loader): ``validate_doc(doc, where)``.
validate_doc = HeadStats.validate_doc


# ------------------------------------------------------------------------------------------ selection
def _check_rate(top_rate) -> float:
    from .identify import check_open_unit
    return check_open_unit("top_rate", top_rate)


def _check_table(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise UserError(f"head selection needs a table [layers, heads, languages], got "
                        f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    x = x.detach().double().cpu()
    if bool(torch.isnan(x).any()) or bool((x < 0).any()):
        raise UserError("head statistics must be non-negative numbers; they are corrupt, collect them again")
    return x


def head_count(top_rate: float, L: int, n: int) -> int:
    """``max(1, round(top_rate * L * n))``, at most ``L * n``."""
    return min(max(int(round(_check_rate(top_rate) * L * n)), 1), L * n)


def lape_heads(x: torch.Tensor, top_rate: float = DEFAULT_TOP_RATE, bar: float = 1.0) -> tuple[torch.Tensor, dict]:
    """LAPE-style selection on ``x [L, n, K]`` (module docstring): ``(masks [K, L, n], info)``."""
    x = _check_table(x)
    L, n, K = x.shape
    if K < 2:
        raise UserError(f"lape needs at least 2 languages (entropy over one language is always 0), got {K}; "
                        "give more with --languages")
    bar = float(bar)
    if not (math.isfinite(bar) and 0 < bar < K):
        raise UserError(f"--bar must be a number in (0, K) = (0, {K}), got {bar}")
    from .identify import top_count_mask
    total = x.sum(-1)
    eligible = total > 0
    p = torch.where(eligible.unsqueeze(-1), x / total.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(-1),
                    torch.zeros_like(x))
    H = _entropy(p).masked_fill(~eligible, math.inf)
    count = head_count(top_rate, L, n)
    selected = top_count_mask(-H, count, eligible=eligible)
    masks = selected.unsqueeze(0) & (p > bar / K).permute(2, 0, 1)
    n_sel = int(selected.sum())
    info = {"requested": count, "selected": n_sel, "eligible": int(eligible.sum()), "shortfall": count - n_sel,
            "unassigned": int((selected & ~masks.any(0)).sum()), "bar": bar, "share_bar": bar / K,
            "max_selected_entropy": float(H[selected].max()) if n_sel else None, "max_entropy": math.log(K),
            "tie_break": "equal entropy: smaller flat index layer*num_heads+head first"}
    return masks, info


def top_heads(x: torch.Tensor, top_rate: float = DEFAULT_TOP_RATE) -> tuple[torch.Tensor, dict]:
    """Per-language top selection on ``x [L, n, K]`` (module docstring): ``(masks [K, L, n], info)``."""
    x = _check_table(x)
    L, n, K = x.shape
    from .identify import top_count_mask
    mean = x.mean(-1)
    eligible = mean > 0
    r = torch.where(eligible.unsqueeze(-1), x / mean.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(-1),
                    torch.zeros_like(x))
    count = head_count(top_rate, L, n)
    masks = torch.stack([top_count_mask(r[..., k], count, eligible=eligible) for k in range(K)])
    info = {"requested": count, "eligible": int(eligible.sum()),
            "per_language_min_ratio": [float(r[..., k][masks[k]].min()) if bool(masks[k].any()) else None
                                       for k in range(K)],
            "tie_break": "equal ratio: smaller flat index layer*num_heads+head first"}
    return masks, info


def identify_heads(stats: Union["HeadStats", str, os.PathLike], method: str = "lape",
                   top_rate: float = DEFAULT_TOP_RATE, languages: Optional[Sequence[str]] = None,
                   statistic: str = "norm", bar: float = 1.0) -> "HeadSet":
    """Select language heads from head statistics (``lape`` or ``top``, module docstring); a :class:`HeadSet`."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if statistic not in STATISTICS:
        raise UserError(f"unknown statistic {statistic!r}; use one of {', '.join(STATISTICS)}")
    if not isinstance(stats, HeadStats):
        stats = HeadStats.load(stats)
    langs = stats._langs(languages)
    x = stats.table(statistic, langs)
    if method == "lape":
        masks, info = lape_heads(x, top_rate, bar)
    else:
        masks, info = top_heads(x, top_rate)
    params = {"top_rate": float(top_rate), "statistic": statistic, **({"bar": float(bar)} if method == "lape" else {}),
              **info, "per_language": {c: int(masks[k].sum()) for k, c in enumerate(langs)},
              "stats": {"directory": str(stats.path) if stats.path is not None else None,
                        "window": stats.meta.get("window"),
                        "n_tokens": {c: stats.count(c) for c in langs}}}
    method_block = {"name": method, "params": params, "languages": langs, "stats_fingerprint": stats.fingerprint}
    return HeadSet.from_masks({c: masks[k] for k, c in enumerate(langs)}, stats.model_info, method_block)


# ------------------------------------------------------------------------------------------ head sets
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _head_rows(rows, lang: str, where: str, L: int, n: int, strict: bool) -> torch.Tensor:
    """``rows`` (pairs or a tensor ``[m, 2]``) as int64 ``[m, 2]`` inside ``L x n``; sorted unique (``strict``:
    refuse instead of sorting)."""
    if isinstance(rows, torch.Tensor):
        if rows.dtype == torch.bool or rows.dtype.is_floating_point or rows.dtype.is_complex:
            raise UserError(f"{where}: heads[{lang!r}] must hold integers, got a {rows.dtype} tensor")
        t = rows.detach().to("cpu", torch.int64)
        if t.numel() == 0:
            t = t.reshape(0, 2)
        if t.dim() != 2 or t.shape[1] != 2:
            raise UserError(f"{where}: heads[{lang!r}] must have shape [m, 2] (layer, head), got {tuple(t.shape)}")
        pairs = t.tolist()
    else:
        if isinstance(rows, (str, bytes)) or not isinstance(rows, (list, tuple)):
            raise UserError(f"{where}: heads[{lang!r}] must be a list of [layer, head] pairs, "
                            f"got {type(rows).__name__}")
        pairs = rows
    flat = []
    for row in pairs:
        if (not isinstance(row, (list, tuple)) or len(row) != 2 or not all(_is_int(v) for v in row)):
            raise UserError(f"{where}: heads[{lang!r}] has a bad row {row!r}; every row must be a pair of integers "
                            "[layer, head]")
        a, b = int(row[0]), int(row[1])
        if not (0 <= a < L and 0 <= b < n):
            raise UserError(f"{where}: heads[{lang!r}] has row {[a, b]} outside the model shape {L} layers x {n} heads "
                            f"(layer < {L}, head < {n}); fix the row or the model shape")
        flat.append((a, b))
    if strict:
        for p, q in zip(flat, flat[1:]):
            if q <= p:
                what = "lists row {} twice".format(list(p)) if p == q else f"has row {list(q)} after {list(p)}"
                raise UserError(f"{where}: heads[{lang!r}] {what}; rows must be sorted by (layer, head) and unique")
    flat = sorted(set(flat))
    return torch.tensor(flat, dtype=torch.int64).reshape(-1, 2)


class HeadSet:
    """Per-language sets of attention heads ``[layer, head]`` of one model (``langneurons.headset.v1``)::

        {"format": "langneurons.headset.v1",
         "model": {"name_or_path": ..., "model_type": ..., "num_layers": L, "num_heads": n, "head_dim": d, ...},
         "method": {"name": "lape", "params": {...}, "languages": ["en", "zh"], "stats_fingerprint": ...},
         "heads": {"en": [[0, 3], [1, 0]], "zh": []}}

    Rows sorted by ``(layer, head)`` and unique; every language of ``method.languages`` has a key in
    ``heads`` and no other key is there; ``head_dim`` is optional. :meth:`from_dict` (used by
    :meth:`load` and the artifact registry) validates a document in full; the constructor sorts.
    """

    def __init__(self, heads: dict, model: dict, method: Optional[dict] = None, *, _where: str = "head set",
                 _strict: bool = False):
        where = _where
        if not isinstance(model, dict):
            raise UserError(f"{where}: 'model' must be an object with num_layers and num_heads")
        model = dict(model)
        for key, limit in (("num_layers", MAX_LAYERS), ("num_heads", MAX_HEADS)):
            v = model.get(key)
            if not _is_int(v) or not 1 <= v <= limit:
                raise UserError(f"{where}: model.{key} must be an integer in 1..{limit}, got {v!r}; give the model "
                                "shape (layers x attention heads)")
        hd = model.get("head_dim")
        if hd is not None and (not _is_int(hd) or hd < 1):
            raise UserError(f"{where}: model.head_dim must be a positive integer or absent, got {hd!r}")
        method = dict(method or {"name": "unknown"})
        if not isinstance(method.get("name"), str) or not method["name"]:
            raise UserError(f"{where}: method.name must be a non-empty string")
        if not isinstance(heads, dict):
            raise UserError(f"{where}: 'heads' must be an object mapping language -> [[layer, head], ...]")
        langs = method.get("languages")
        if langs is None:
            langs = list(heads)
        if (not isinstance(langs, list) or not all(isinstance(c, str) and c for c in langs)
                or len(set(langs)) != len(langs)):
            raise UserError(f"{where}: method.languages must be a list of distinct language codes, got {langs!r}")
        extra = [c for c in heads if c not in langs]
        if extra:
            raise UserError(f"{where}: heads has languages {extra} that method.languages {langs} does not list")
        if _strict:
            absent = [c for c in langs if c not in heads]
            if absent:
                raise UserError(f"{where}: method.languages lists {absent} but 'heads' has no key for them; every "
                                "listed language needs a key (an empty list if it has no heads)")
        if not langs:
            raise UserError(f"{where}: the set holds no languages; a head set needs at least one")
        method["languages"] = list(langs)
        if not isinstance(method.get("params", {}), dict):
            raise UserError(f"{where}: method.params must be an object")
        self.model = model
        self.method = method
        L, n = model["num_layers"], model["num_heads"]
        self.heads = {c: _head_rows(heads.get(c, []), c, where, L, n, _strict) for c in langs}
        self.path: Optional[Path] = None

    @property
    def languages(self) -> list[str]:
        return list(self.heads)

    @property
    def num_layers(self) -> int:
        return int(self.model["num_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.model["num_heads"])

    @property
    def head_dim(self) -> Optional[int]:
        return self.model.get("head_dim")

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else f"({self.method['name']})"

    def __repr__(self) -> str:
        sizes = ", ".join(f"{c}={self.total(c)}" for c in self.languages)
        return f"HeadSet({self.method['name']!r}, {self.num_layers}x{self.num_heads}, {sizes})"

    def __eq__(self, other) -> bool:
        if not isinstance(other, HeadSet):
            return NotImplemented
        return (self.model == other.model and self.method == other.method and self.languages == other.languages
                and all(torch.equal(self.heads[c], other.heads[c]) for c in self.languages))

    __hash__ = None

    def check_language(self, code: str) -> str:
        if code not in self.heads:
            raise UserError(f"unknown language {code!r}: the head set {self.name} has "
                            f"{', '.join(self.languages) or 'no languages'}; pick one of those")
        return code

    def total(self, code: str) -> int:
        return int(self.heads[self.check_language(code)].shape[0])

    def mask(self, code: str) -> torch.Tensor:
        """BoolTensor ``[L, n]``, True at the heads of ``code``."""
        out = torch.zeros(self.num_layers, self.num_heads, dtype=torch.bool)
        r = self.heads[self.check_language(code)]
        out[r[:, 0], r[:, 1]] = True
        return out

    def masks(self) -> dict[str, torch.Tensor]:
        return {c: self.mask(c) for c in self.languages}

    @classmethod
    def from_masks(cls, masks: dict, model: dict, method: Optional[dict] = None) -> "HeadSet":
        """From ``{language: BoolTensor [L, n]}`` (the shape must agree with ``model``)."""
        rows = {}
        for c, m in masks.items():
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.dim() != 2:
                raise UserError(f"mask of {c!r} must be a 2-D bool tensor [layers, heads]")
            if tuple(m.shape) != (model.get("num_layers"), model.get("num_heads")):
                raise UserError(f"mask of {c!r} has shape {tuple(m.shape)}, the model "
                                f"{model.get('num_layers')}x{model.get('num_heads')}")
            rows[c] = m.cpu().nonzero()
        method = dict(method or {"name": "masks"})
        method.setdefault("languages", list(masks))
        return cls(rows, dict(model), method)

    def to_dict(self) -> dict:
        return {"format": HEADSET_FORMAT, "model": json.loads(json.dumps(self.model)),
                "method": json.loads(json.dumps(self.method)),
                "heads": {c: r.tolist() for c, r in self.heads.items()}}

    def save(self, path) -> Path:
        """Write the set as JSON, atomically. Returns the path."""
        path = Path(path)
        doc = self.to_dict()
        head = json.dumps({k: doc[k] for k in ("format", "model", "method")}, indent=2, ensure_ascii=False)
        lines = [f"    {json.dumps(c, ensure_ascii=False)}: {json.dumps(r, separators=(',', ':'))}"
                 for c, r in doc["heads"].items()]
        text = head[:-2] + ',\n  "heads": {\n' + ",\n".join(lines) + "\n  }\n}\n"
        atomic_write_text(path, text, create_dirs=False)
        self.path = path
        return path

    @classmethod
    def from_dict(cls, doc, where: str = "head set") -> "HeadSet":
        """Validate a parsed document (class docstring) and build the set."""
        if not isinstance(doc, dict):
            raise UserError(f"{where}: expected a JSON object with format/model/method/heads, got {type(doc).__name__}")
        if doc.get("format") != HEADSET_FORMAT:
            raise UserError(f"{where}: format is {doc.get('format')!r}, expected {HEADSET_FORMAT!r}; give a head set "
                            "written by 'langneurons heads identify'")
        missing = [k for k in ("model", "method", "heads") if k not in doc]
        if missing:
            raise UserError(f"{where}: missing key(s) {', '.join(missing)}; the file is incomplete")
        method = doc["method"]
        if not isinstance(method, dict) or "languages" not in method:
            raise UserError(f"{where}: 'method' must be an object with at least 'name' and 'languages'")
        return cls(doc["heads"], doc["model"], method, _where=where, _strict=True)

    @classmethod
    def load(cls, path) -> "HeadSet":
        path = Path(path)
        where = f"head set {path}"
        if path.is_dir():
            raise UserError(f"{where} is a directory; give the .json file written by 'langneurons heads identify'")
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{where} does not exist; check the path") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {where}: {e.__class__.__name__}") from None
        try:
            doc = loads_json(text, where)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} is not valid JSON ({e.msg} at line {e.lineno}); regenerate it") from None
        hs = cls.from_dict(doc, where)
        hs.path = path
        return hs

    def validate_for(self, num_layers: int, num_heads: int, head_dim: Optional[int] = None) -> None:
        """Raise UserError unless the set was made for a ``num_layers x num_heads`` model (and ``head_dim``)."""
        same = (self.num_layers, self.num_heads) == (num_layers, num_heads)
        if same and (head_dim is None or self.head_dim is None or self.head_dim == head_dim):
            return
        mine = f", head_dim {self.head_dim}" if self.head_dim else ""
        here = f", head_dim {head_dim}" if head_dim else ""
        raise UserError(f"head set {self.name} was made for a {self.num_layers}x{self.num_heads} model (layers x "
                        f"attention heads{mine}); this model is {num_layers}x{num_heads}{here}; use a head set "
                        "identified on this model")


# ------------------------------------------------------------------------------------------ the intervention
def head_operator(spec):
    """Parse a head operator: ``zero`` or ``scale:A`` (an :class:`~langneurons.intervene.Operator`); UserError else."""
    from .intervene import parse_operator
    op = parse_operator(spec)
    if not ((op.mode == "set" and op.source == "const" and op.spec == "zero")
            or (op.mode == "scale" and op.source == "const")):
        raise UserError(f"head interventions take zero or scale:A, not {op.spec!r}")
    return op


@dataclass(eq=False)
class HeadIntervention:
    """Zero or scale attention heads' outputs (module docstring).

    ``heads``: a :class:`HeadSet` (or its path): the union of the heads of ``language`` (a code or a list);
    or rows ``[[layer, head], ...]`` (a list or a LongTensor ``[m, 2]``; ``language`` is then a label and
    the rows are checked against the model when applied). ``operator``: ``zero`` or ``scale:A``.
    ``positions``: ``all`` (non-pad), ``prompt``, ``generated`` or ``last``, as for neuron interventions.
    ``layers``: restrict to these layers (``None``: all). Apply it with ``intervene`` /
    ``Session.intervened``, alone or in a list with neuron and direction interventions. The output
    projection is the adapter's (:meth:`~langneurons.arch.Adapter.attention`; call
    ``session.adapter.attention(PATH)`` first to override it).
    """

    heads: object
    language: Union[str, Sequence[str], None] = None
    operator: str = "zero"
    positions: str = "all"
    layers: Optional[Sequence[int]] = None
    op: object = field(init=False, repr=False, default=None)
    rows: torch.Tensor = field(init=False, repr=False, default=None)

    batch_scope = "batch"          # read by the controller's writer; head operators are never batch statistics

    def __post_init__(self):
        from .intervene import POSITIONS
        h = self.heads
        if isinstance(h, (str, os.PathLike)):
            h = self.heads = HeadSet.load(h)
        langs = [self.language] if isinstance(self.language, str) else (
            list(self.language) if self.language is not None else [])
        if isinstance(h, HeadSet):
            if not langs:
                raise UserError(f"a head intervention needs the language(s) whose heads it writes; {h.name} has "
                                f"{', '.join(h.languages)}")
            if len(set(langs)) != len(langs):
                raise UserError(f"a language is named twice in {langs}")
            for c in langs:
                h.check_language(c)
            rows = torch.cat([h.heads[c] for c in langs]) if langs else torch.empty(0, 2, dtype=torch.long)
        else:
            if isinstance(h, torch.Tensor):
                rows = h
            elif isinstance(h, (list, tuple)):
                try:
                    rows = torch.tensor([list(r) for r in h], dtype=torch.long).reshape(-1, 2)
                except (TypeError, ValueError, RuntimeError):
                    raise UserError(f"head rows must be [layer, head] pairs of integers, got {h!r}") from None
            else:
                raise UserError(f"heads must be a HeadSet, its path, or [layer, head] rows, got {type(h).__name__}")
            if rows.dtype.is_floating_point or rows.dtype == torch.bool or rows.dim() != 2 or rows.shape[1] != 2:
                raise UserError(f"head rows must be integers of shape [m, 2] (layer, head), got {rows.dtype} "
                                f"{list(rows.shape)}")
            if bool((rows < 0).any()):
                raise UserError(f"head rows must be non-negative, got {rows[(rows < 0).any(1)][0].tolist()}")
        self.language = langs[0] if len(langs) == 1 else (langs or None)
        self.languages = langs
        rows = torch.unique(rows.detach().cpu().long().reshape(-1, 2), dim=0) if rows.numel() else rows.reshape(0, 2)
        if self.layers is not None:
            self.layers = sorted({int(l) for l in ([self.layers] if isinstance(self.layers, int) else self.layers)})
            rows = rows[torch.isin(rows[:, 0], torch.tensor(self.layers, dtype=torch.long))]
        self.rows = rows
        op = head_operator(self.operator)
        self.op = op
        self.operator = op.spec
        if self.positions not in POSITIONS:
            raise UserError(f"unknown positions {self.positions!r}; use one of {', '.join(POSITIONS)}")

    def plan(self, adapter) -> dict:
        """``{layer: _LayerPlan(columns, values)}``: the input columns of the selected heads of each layer."""
        from .intervene import _LayerPlan
        att = adapter.attention()
        L, n = adapter.num_layers, att.num_heads
        if isinstance(self.heads, HeadSet):
            self.heads.validate_for(L, n, att.head_dim)
        if self.rows.numel():
            bad = self.rows[(self.rows[:, 0] >= L) | (self.rows[:, 1] >= n)]
            if bad.numel():
                r = bad[0].tolist()
                what = f"layer {r[0]} is outside 0..{L - 1}" if r[0] >= L else f"head {r[1]} is outside 0..{n - 1}"
                raise UserError(f"head row {r}: {what} (this model has {L} layers x {n} attention heads)")
        out = {}
        for l in sorted({int(x) for x in self.rows[:, 0].tolist()}):
            heads = self.rows[self.rows[:, 0] == l, 1]
            w = att.modules[l].weight
            dtype = w.dtype if w.dtype.is_floating_point else torch.float32
            idx = att.columns(heads).to(w.device)
            val = torch.zeros(idx.numel(), dtype=dtype, device=w.device) if self.op.mode == "set" else None
            out[l] = _LayerPlan(idx=idx, val=val)
        return out

    def describe(self) -> str:
        label = "+".join(self.languages) if self.languages else f"{int(self.rows.shape[0])} heads"
        return f"{self.operator}[{label}]@heads/{self.positions}"

    def _digest(self) -> str:
        return hashlib.sha256(json.dumps(self.rows.tolist()).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        """A JSON-ready record (the intervention format, ``"unit": "head"``); :meth:`from_dict` rebuilds it."""
        h = self.heads
        src = ({"path": str(h.path) if h.path is not None else None, "model": dict(h.model),
                "method": h.method.get("name")} if isinstance(h, HeadSet) else {"path": None})
        src.update(digest=self._digest(), rows=self.rows.tolist())
        return {"format": INTERVENTION_FORMAT, "unit": "head", "operator": self.operator,
                "languages": list(self.languages), "site": "attn_out", "positions": self.positions,
                "layers": list(self.layers) if self.layers is not None else None, "heads": src}

    @classmethod
    def from_dict(cls, d: dict, heads=None) -> "HeadIntervention":
        """Rebuild from :meth:`to_dict`; ``heads`` defaults to the recorded head set (or the recorded rows)."""
        if not isinstance(d, dict) or d.get("format") != INTERVENTION_FORMAT or d.get("unit") != "head":
            raise UserError(f"not a head intervention record ({INTERVENTION_FORMAT} with unit 'head'); "
                            "make one with HeadIntervention.to_dict()")
        src = d.get("heads") or {}
        langs = list(d.get("languages") or [])
        if heads is None:
            heads = src["path"] if src.get("path") else src.get("rows", [])
        iv = cls(heads, langs[0] if len(langs) == 1 else (langs or None), d["operator"],
                 positions=d.get("positions", "all"), layers=d.get("layers"))
        if src.get("digest") and iv._digest() != src["digest"]:
            raise UserError("the head set gives other heads than the ones the intervention was made with; "
                            "pass the same head set")
        return iv


# ------------------------------------------------------------------------------------------ collection
@dataclass
class HeadsConfig(UnitConfig):
    """``langneurons heads collect`` (the options mean what they mean for ``collect``); ``attn_out``: the
    attention output projection (``--attn-out``)."""

    attn_out: Optional[str] = None


def _layout(cfg: HeadsConfig, session) -> Layout:
    adapter = session.adapter
    att = adapter.attention(cfg.attn_out)
    L, n = adapter.num_layers, att.num_heads
    return Layout(dims=(L, n), site="attn_out", settings={"attn_out": att.path, "histogram": dict(HISTOGRAM)},
                  model_shape={"num_layers": L, "num_heads": n, "head_dim": att.head_dim,
                               "hidden_size": adapter.hidden_size},
                  shape={"num_layers": L, "num_heads": n, "head_dim": att.head_dim},
                  model_extra={"attention": att.describe()}, extra={"histogram": dict(HISTOGRAM)})


#: The collection of head statistics (:func:`langneurons.unitsums.collect_units`).
KIND = UnitKind(HeadStats, HeadsConfig, accumulate, _layout, HEADS_CHECKPOINT_FORMAT, HEADS_VERSION)


def collect_heads(cfg: HeadsConfig, model=None, tokenizer=None) -> HeadStats:
    """Collect the head sums of every language of ``cfg`` into ``cfg.out`` (module docstring) and return
    the loaded :class:`HeadStats`. Languages already in OUT (same model, settings and corpus) are skipped;
    an interrupted language resumes from its checkpoint."""
    return collect_units(cfg, KIND, model, tokenizer)
