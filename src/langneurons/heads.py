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

import dataclasses
import hashlib
import json
import math
import numbers
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .artifacts import HEADS_CHECKPOINT_FORMAT, HEADS_FORMAT, HEADSET_FORMAT, INTERVENTION_FORMAT, loads_json
from .atomic import atomic_write, atomic_write_text
from .corpus import default_cache_dir
from .errors import UserError

#: Bump when a change alters the sums the same command collects (checkpoint keys include it).
HEADS_VERSION = 1
JSON_NAME = "heads.json"
TENSORS_NAME = "heads.safetensors"

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
class HeadSums:
    """The additive statistics of one language: ``norm_sum [L, n]``, ``sq_sum [L, n]`` (float64),
    ``hist [L, n, NB]`` and ``count`` (int64; ``count [1]``: positions counted, the same for every layer)."""

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
    def device(self) -> torch.device:
        return self.norm_sum.device

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

    def add_tokens(self, n: int) -> None:
        self.count += int(n)

    def merge(self, other: "HeadSums") -> "HeadSums":
        """Add another shard (in place); returns self."""
        if (other.num_layers, other.num_heads, other.n_bins) != (self.num_layers, self.num_heads, self.n_bins):
            raise UserError(f"cannot merge head sums of shape {[other.num_layers, other.num_heads]} into "
                            f"{[self.num_layers, self.num_heads]}; merge sums of the same model and histogram")
        self.norm_sum += other.norm_sum.to(self.device)
        self.sq_sum += other.sq_sum.to(self.device)
        self.hist += other.hist.to(self.device)
        self.count += other.count.to(self.device)
        return self

    def all_reduce(self) -> None:
        """Sum the shards of every rank (torch.distributed; a no-op outside a process group)."""
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for t in (self.norm_sum, self.sq_sum, self.hist, self.count):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    @property
    def n_tokens(self) -> int:
        return int(self.count.sum())

    def mean_norm(self) -> torch.Tensor:
        """``m = S / N``: the mean contribution norm, float64 ``[L, n]`` (CPU)."""
        return (self.norm_sum / max(self.n_tokens, 1)).cpu()

    def std_norm(self) -> torch.Tensor:
        """The standard deviation of ``||c_h||`` (population), float64 ``[L, n]``."""
        n = max(self.n_tokens, 1)
        m = self.norm_sum / n
        return (self.sq_sum / n - m * m).clamp_min(0).sqrt().cpu()

    def tensors(self, code: Optional[str] = None) -> dict[str, torch.Tensor]:
        """The tensors of the artifact (``name.CODE``), or of a checkpoint (``code=None``: sums only)."""
        t = {"norm_sum": self.norm_sum.cpu(), "sq_sum": self.sq_sum.cpu(), "hist": self.hist.cpu(),
             "count": self.count.cpu()}
        if code is None:
            return {k: v.contiguous() for k, v in t.items()}
        t["norm"] = self.mean_norm().float()
        return {f"{k}.{code}": v.contiguous() for k, v in t.items()}

    @classmethod
    def from_tensors(cls, t: dict, code: Optional[str] = None, where: str = "", device="cpu",
                     hist_spec: Optional[dict] = None) -> "HeadSums":
        sfx = "" if code is None else f".{code}"
        try:
            s, q, g, c = t["norm_sum" + sfx], t["sq_sum" + sfx], t["hist" + sfx], t["count" + sfx]
        except KeyError as e:
            raise UserError(f"{where} lacks the tensor {e.args[0]!r}; it is damaged, collect again") from None
        out = cls(s.shape[0] if s.dim() == 2 else 0, s.shape[1] if s.dim() == 2 else 0, device=device,
                  hist_spec=hist_spec)
        if (s.dim() != 2 or tuple(q.shape) != tuple(s.shape) or tuple(g.shape) != (*s.shape, out.n_bins)
                or c.numel() != 1):
            raise UserError(f"{where}: the tensors of {code or 'the checkpoint'} have inconsistent shapes; "
                            "it is damaged, collect again")
        out.norm_sum.copy_(s.to(torch.float64))
        out.sq_sum.copy_(q.to(torch.float64))
        out.hist.copy_(g.to(torch.int64))
        out.count.copy_(c.reshape(1).to(torch.int64))
        return out

    def save(self, path) -> None:
        """An atomic safetensors checkpoint of the sums."""
        from safetensors.torch import save_file
        tensors = self.tensors()
        atomic_write(path, lambda tmp: save_file(tensors, tmp))

    @classmethod
    def load(cls, path, device="cpu", hist_spec: Optional[dict] = None) -> "HeadSums":
        from safetensors.torch import load_file
        try:
            t = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any read failure means a damaged file
            raise UserError(f"{path} is corrupt ({e.__class__.__name__}); remove it and collect again") from None
        return cls.from_tensors(t, None, str(path), device, hist_spec)


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
    from .runtime import forward_kwargs
    adapter = session.adapter
    att = adapter.attention()
    L, n = adapter.num_layers, att.num_heads
    if sums is None:
        sums = HeadSums(L, n, device=session.device)
    if (sums.num_layers, sums.num_heads) != (L, n):
        raise UserError(f"head sums of shape {[sums.num_layers, sums.num_heads]} do not fit this model "
                        f"({L} layers x {n} heads); use sums of the same model")
    grams = [head_grams(att, l) for l in range(L)]
    base = getattr(session.model, "base_model", session.model)
    ids_all = torch.as_tensor(np.asarray(windows, dtype=np.int64)) if not isinstance(windows, torch.Tensor) \
        else windows.long()
    mask_all = torch.as_tensor(mask).long() if mask is not None else None
    N = ids_all.shape[0]
    B = session.batch_size
    batches = [list(range(s, min(s + B, N))) for s in range(0, N, B)]

    def run(k: int, idx: list[int]) -> dict:
        if k < start:
            return {}
        ids = ids_all[idx]
        m = mask_all[idx] if mask_all is not None else None
        flat = m.reshape(-1).bool() if m is not None else None
        counted = int(flat.sum()) if flat is not None else ids.numel()

        def fn(layer: int, z: torch.Tensor) -> None:
            x = z.reshape(-1, z.shape[-1])
            if flat is not None:
                x = x[flat.to(x.device)]
            sums.add(layer, head_norms(x, grams[layer]))

        dev = session.device
        with observe_heads(adapter, fn) as calls, torch.no_grad():
            base(input_ids=ids.to(dev), use_cache=False, **forward_kwargs(base, m.to(dev) if m is not None else None))
        bad = [l for l in range(L) if calls[l] != 1]
        if bad:
            raise UserError(f"the attention output projection of layer(s) {bad[:5]} ran {calls[bad[0]]} time(s) "
                            "in one forward pass instead of once (a fused attention kernel?); load the model "
                            "without custom kernels or give --attn-out")
        sums.add_tokens(counted)
        if after_batch is not None:
            after_batch(k)
        return {}

    session.map_batches(batches, run, progress)
    return sums


# ------------------------------------------------------------------------------------------ the artifact
def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def validate_doc(doc: dict, where: str = "heads.json") -> dict:
    """Check a ``heads.json`` document in full (the registry's loader); return it."""
    def bad(what: str):
        raise UserError(f"{where}: {what}; the head statistics are damaged, run 'langneurons heads collect' again")
    if not isinstance(doc, dict) or doc.get("format") != HEADS_FORMAT:
        raise UserError(f"{where} is not a head-statistics file ({HEADS_FORMAT}); give the directory written by "
                        "'langneurons heads collect'")
    for key in ("num_layers", "num_heads", "head_dim"):
        if not _pos_int(doc.get(key)):
            bad(f"{key!r} must be a positive integer")
    if not isinstance(doc.get("model"), dict):
        bad("'model' must be an object")
    langs = doc.get("languages")
    if (not isinstance(langs, list) or not all(isinstance(c, str) and c for c in langs)
            or len(set(langs)) != len(langs)):
        bad("'languages' must be distinct language codes")
    counts = doc.get("token_counts")
    if not isinstance(counts, dict):
        bad("'token_counts' must be an object")
    for c in langs:
        if not _pos_int(counts.get(c)):
            bad(f"the token count of {c!r} must be a positive integer")
    h = doc.get("histogram", HISTOGRAM)
    if (not isinstance(h, dict) or h.get("kind") != "log2"
            or not all(isinstance(h.get(k), int) and not isinstance(h.get(k), bool)
                       for k in ("bins_per_octave", "min_exp", "max_exp"))
            or h["bins_per_octave"] < 1 or h["max_exp"] < h["min_exp"] or h["bins_per_octave"] * (
                h["max_exp"] - h["min_exp"]) > 10**4):
        bad("'histogram' must be {kind: log2, bins_per_octave, min_exp, max_exp} (integers)")
    return doc


def _json_path(path, name: str = JSON_NAME) -> Path:
    p = Path(path)
    return p / name if p.is_dir() or p.suffix != ".json" else p


def _entropy(p: torch.Tensor) -> torch.Tensor:
    from .identify.lape import entropy
    return entropy(p)


class HeadStats:
    """Per-language head statistics of one model (see the module docstring).

    ``HeadStats.load(DIR)``; ``.languages``; ``.num_layers``; ``.num_heads``; ``.head_dim``;
    ``.mean_norm(code)`` (float64 ``[L, n]``, the primary statistic); ``.std_norm(code)``; ``.count(code)``;
    ``.threshold(languages)`` (``tau``, ``[L, n]``); ``.prob(code, languages)``; ``.table(statistic,
    languages)`` (``[L, n, K]``); ``.sums[code]`` (:class:`HeadSums`).
    """

    def __init__(self, meta: dict, sums: dict[str, HeadSums], path: Optional[Path] = None):
        self.meta = meta
        self.sums = dict(sums)
        self.path = path
        self._fingerprint: Optional[str] = None

    @property
    def languages(self) -> list[str]:
        return list(self.sums)

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.meta["num_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.meta["head_dim"])

    @property
    def hist_spec(self) -> dict:
        return dict(self.meta.get("histogram") or HISTOGRAM)

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "the given head statistics"

    def check_language(self, code: str) -> str:
        if code not in self.sums:
            raise UserError(f"unknown language {code!r}: the head statistics in {self.name} hold "
                            f"{', '.join(self.languages) or 'no languages'}; pick one of those or collect it")
        return code

    def _langs(self, languages: Optional[Sequence[str]]) -> list[str]:
        langs = list(dict.fromkeys(languages)) if languages is not None else self.languages
        for c in langs:
            self.check_language(c)
        if not langs:
            raise UserError(f"{self.name} holds no languages; collect some first")
        return langs

    def mean_norm(self, code: str) -> torch.Tensor:
        return self.sums[self.check_language(code)].mean_norm()

    def std_norm(self, code: str) -> torch.Tensor:
        return self.sums[self.check_language(code)].std_norm()

    def count(self, code: str) -> int:
        return self.sums[self.check_language(code)].n_tokens

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

    @property
    def fingerprint(self) -> str:
        """A digest of the sums (changes when any language's data changes)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for code in sorted(self.sums):
                s = self.sums[code]
                h.update(code.encode() + b"\0" + str(s.n_tokens).encode())
                h.update(s.norm_sum.cpu().numpy().tobytes())
                h.update(s.hist.cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @classmethod
    def load(cls, path) -> "HeadStats":
        """Read ``DIR`` (or ``DIR/heads.json``) with its ``heads.safetensors``."""
        from .artifacts import load
        jp = _json_path(path)
        if not jp.parent.is_dir():
            raise UserError(f"{jp.parent} does not exist; give the directory written by 'langneurons heads collect'")
        if not jp.is_file():
            raise UserError(f"{jp.parent} holds no {JSON_NAME}; give the directory written by "
                            "'langneurons heads collect'")
        meta = load(jp, "heads")
        tp = jp.parent / TENSORS_NAME
        if not tp.is_file():
            raise UserError(f"{tp} is missing beside {jp}; collect the head statistics again")
        from safetensors.torch import load_file
        try:
            t = load_file(str(tp))
        except Exception as e:  # noqa: BLE001 - any read failure means a damaged file
            raise UserError(f"{tp} is corrupt ({e.__class__.__name__}); collect the head statistics again") from None
        L, n = meta["num_layers"], meta["num_heads"]
        sums = {}
        for code in meta["languages"]:
            s = HeadSums.from_tensors(t, code, str(tp), hist_spec=meta.get("histogram"))
            if (s.num_layers, s.num_heads) != (L, n):
                raise UserError(f"{tp}: the sums of {code!r} have shape {[s.num_layers, s.num_heads]} but "
                                f"{jp.name} says {[L, n]}; it is damaged, collect again")
            sums[code] = s
        return cls(meta, sums, jp.parent)

    def save(self, out) -> Path:
        """Write ``OUT/heads.safetensors`` then ``OUT/heads.json`` (each atomically)."""
        from safetensors.torch import save_file
        out = Path(out)
        tensors: dict[str, torch.Tensor] = {}
        for code, s in self.sums.items():
            tensors.update(s.tensors(code))
        meta = dict(self.meta)
        meta.update(format=HEADS_FORMAT, languages=list(self.sums),
                    token_counts={c: s.n_tokens for c, s in self.sums.items()})
        validate_doc(meta, str(out / JSON_NAME))
        atomic_write(out / TENSORS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": HEADS_FORMAT}))
        atomic_write_text(out / JSON_NAME, json.dumps(meta, indent=1, ensure_ascii=False))
        self.meta, self.path, self._fingerprint = meta, out, None
        return out / JSON_NAME


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
class HeadsConfig:
    """``langneurons heads collect`` (the options mean what they mean for ``collect``)."""

    model: str
    languages: list                      # [LanguageSource]
    out: Path
    window: int = 512
    max_tokens: Optional[int] = None
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    device_map: Optional[str] = None
    arch: Optional[str] = None
    attn_out: Optional[str] = None
    trust_remote_code: bool = False
    seed: int = 0
    bos: str = "window"
    separator: str = "eos"
    cache_dir: Optional[Path] = field(default_factory=default_cache_dir)
    checkpoint_every: float = 300.0
    text_field: str = "text"
    progress: bool = True

    def validate(self) -> None:
        from .collect import check_run_options
        check_run_options(self.window, self.batch_size, self.max_tokens, self.dtype)
        if self.bos not in ("window", "none") or self.separator not in ("eos", "none"):
            raise UserError("--bos must be window or none and --separator eos or none")
        if not self.languages:
            raise UserError("no languages given; add --lang CODE=SOURCE (one per language)")


def existing_out(out) -> Optional[dict]:
    """The ``heads.json`` already in OUT (None for a new or empty directory); raises when OUT holds
    something else. Cheap: the command calls it before any model is loaded."""
    out = Path(out)
    f = out / JSON_NAME
    if not f.exists():
        if out.is_dir() and any(p.name != ".partial" for p in out.iterdir()):
            raise UserError(f"--out {out} exists and is not a langneurons head-statistics directory; "
                            "choose a new or empty directory")
        return None
    from .artifacts import load
    return load(f, "heads")


def _crash() -> None:
    """Test hook (``LANGNEURONS_FAULT_AFTER_BATCHES``): die like ``kill -9`` after a checkpoint."""
    os.kill(os.getpid(), signal.SIGKILL)


def collect_heads(cfg: HeadsConfig, model=None, tokenizer=None) -> HeadStats:
    """Collect the head sums of every language of ``cfg`` into ``cfg.out`` (module docstring) and return
    the loaded :class:`HeadStats`. Languages already in OUT (same model, settings and corpus) are skipped;
    an interrupted language resumes from its checkpoint."""
    from . import __version__
    from .collect import check_corpora_not_empty
    from .corpus import Packing, tokenizer_fingerprint
    from .runtime import ModelOptions, model_fingerprint, open_session
    cfg.validate()
    check_corpora_not_empty(cfg.languages, cfg.text_field)
    out = Path(cfg.out)
    existing = existing_out(out)
    session = open_session(ModelOptions(cfg.model, cfg.arch, cfg.dtype, cfg.device, cfg.device_map,
                                        cfg.trust_remote_code), batch_size=cfg.batch_size, model=model,
                           tokenizer=tokenizer)
    model, tokenizer, adapter = session.model, session.tokenizer, session.adapter
    att = adapter.attention(cfg.attn_out)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and cfg.window > max_pos:
        raise UserError(f"--window {cfg.window} exceeds the model's {max_pos} positions; lower --window")
    packing = Packing(cfg.window, cfg.bos, cfg.separator).resolve(tokenizer)
    model_fp = model_fingerprint(model)
    L, n = adapter.num_layers, att.num_heads
    ident = {"model_fingerprint": model_fp, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
             "window": cfg.window, "packing": packing.as_dict(), "site": "attn_out", "attn_out": att.path,
             "histogram": dict(HISTOGRAM)}
    if existing is not None:
        theirs = existing.get("identity") or {}
        diff = [k for k in ident if theirs.get(k) != ident[k]]
        if diff:
            shown = ", ".join(f"{k}: {theirs.get(k)!r} there vs {ident[k]!r} now" for k in diff[:2])
            raise UserError(f"--out {out} holds head statistics of another model or settings ({shown}); "
                            "use a new --out directory")
        stats = HeadStats.load(out)
    else:
        meta = {
            "format": HEADS_FORMAT, "library_version": __version__,
            "model": {"name_or_path": cfg.model, "model_type": adapter.model_type, "fingerprint": model_fp,
                      "num_layers": L, "num_heads": n, "head_dim": att.head_dim,
                      "hidden_size": adapter.hidden_size, "adapter": adapter.source,
                      "arch": dataclasses.asdict(adapter.spec), "attention": att.describe()},
            "identity": ident, "site": "attn_out", "num_layers": L, "num_heads": n, "head_dim": att.head_dim,
            "window": cfg.window, "packing": packing.as_dict(), "dtype": str(model.dtype).replace("torch.", ""),
            "tokenizer_fingerprint": ident["tokenizer_fingerprint"], "histogram": dict(HISTOGRAM),
            "languages": [], "token_counts": {}, "sources": {}, "corpora": {},
            "definition": {"contribution": "c_h = W_O[:, h*d:(h+1)*d] z_h, z = input of the attention output "
                                           "projection (the bias belongs to no head)",
                           "norm": "m_lh(k) = mean over the real positions of language k of ||c_h||_2 (primary)",
                           "prob": "P_lh(k) = share of positions with ||c_h|| >= tau_lh, tau_lh = upper edge of "
                                   "the histogram bin of the median pooled over languages (equal weights)"},
        }
        stats = HeadStats(meta, {}, out)
    batches_run = [0]
    for src in cfg.languages:
        _collect_language(cfg, src, session, packing, stats, out, model_fp, batches_run)
    if session.world > 1:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    return HeadStats.load(out) if (out / JSON_NAME).is_file() else stats


def _collect_language(cfg: HeadsConfig, src, session, packing, stats: HeadStats, out: Path, model_fp: str,
                      batches_run: list) -> None:
    from .corpus import cut_windows, load_stream, select_windows
    code = src.code
    tokenizer = session.tokenizer
    stream, cfp = load_stream(src, tokenizer, packing, cfg.cache_dir, cfg.text_field,
                              stream_cap=(cfg.max_tokens * 4 if cfg.max_tokens else None))
    all_windows = cut_windows(stream, packing, tokenizer.bos_token_id, code)
    chosen = select_windows(len(all_windows), cfg.window, cfg.max_tokens, cfg.seed)
    windows = all_windows[chosen]
    corpus = {"source": src.spec, "corpus_fingerprint": cfp, "max_tokens": cfg.max_tokens, "seed": cfg.seed,
              "n_windows_total": int(len(all_windows)), "n_windows": int(len(chosen)),
              "stream_tokens": int(len(stream))}
    done = (stats.meta.get("corpora") or {}).get(code)
    if code in stats.sums:
        if isinstance(done, dict) and all(done.get(k) == v for k, v in corpus.items()):
            _log(cfg, session, f"{code}: already collected in {out}, skipped")
            return
        raise UserError(f"--out {out} already holds head statistics of {code!r} from another corpus or settings; "
                        "use a new --out directory")
    rank, world = session.rank, session.world
    att = session.adapter.attention()
    key = hashlib.sha256(json.dumps(dict(model=model_fp, corpus=cfp, window=cfg.window, packing=packing.as_dict(),
                                         max_tokens=cfg.max_tokens, seed=cfg.seed, batch=cfg.batch_size,
                                         world=world, rank=rank, dtype=str(session.model.dtype),
                                         attn_out=att.path, histogram=HISTOGRAM, version=HEADS_VERSION),
                                    sort_keys=True).encode()).hexdigest()[:16]
    partial = out / ".partial"
    ckpt = partial / f"heads.{code}.rank{rank}.safetensors"
    ckpt_meta = partial / f"heads.{code}.rank{rank}.json"
    L, n = session.adapter.num_layers, att.num_heads
    sums, start = None, 0
    if ckpt.is_file() and ckpt_meta.is_file():
        try:
            m = json.loads(ckpt_meta.read_text(encoding="utf-8"))
            if isinstance(m, dict) and m.get("key") == key:
                sums = HeadSums.load(ckpt, device=session.device)
                start = int(m["next_batch"])
                _log(cfg, session, f"{code}: resuming at batch {start}")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, ValueError, UserError):
            sums, start = None, 0
    if sums is None or (sums.num_layers, sums.num_heads) != (L, n):
        sums, start = HeadSums(L, n, device=session.device), 0
    fault = int(os.environ.get("LANGNEURONS_FAULT_AFTER_BATCHES", "0") or 0)
    last = [time.monotonic()]

    def after_batch(k: int) -> None:
        batches_run[0] += 1
        crash = fault and batches_run[0] == fault
        if crash or time.monotonic() - last[0] >= cfg.checkpoint_every:
            sums.save(ckpt)
            atomic_write_text(ckpt_meta, json.dumps({"format": HEADS_CHECKPOINT_FORMAT, "key": key,
                                                     "next_batch": k + 1}))
            last[0] = time.monotonic()
        if crash:
            _crash()

    bar = None
    if cfg.progress and session.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(windows), unit="win", desc=f"heads {code}", dynamic_ncols=True, mininterval=1.0)
    accumulate(session, windows, sums, start=start, after_batch=after_batch,
               progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    sums.all_reduce()
    if session.is_main:
        stats.sums[code] = sums
        meta = stats.meta
        corpus["n_tokens"] = sums.n_tokens
        meta.setdefault("corpora", {})[code] = corpus
        meta.setdefault("sources", {})[code] = src.spec
        stats.save(out)
    for f in (ckpt, ckpt_meta):
        if f.exists():
            f.unlink()
    if partial.is_dir() and not any(partial.iterdir()):
        partial.rmdir()


def _log(cfg: HeadsConfig, session, msg: str) -> None:
    if cfg.progress and session.is_main:
        import sys
        print(f"langneurons: {msg}", file=sys.stderr)
