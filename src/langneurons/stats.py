"""Streaming, mergeable activation statistics per language, layer and neuron.

:class:`LanguageStats` accumulates, for the ``[L, I]`` neurons of one site and one language:

- ``n_tokens``: tokens whose activations were counted (exactly those, nothing else);
- ``count_pos[l, j]`` and ``count_neg[l, j]`` (int64): tokens with activation ``> 0`` and ``< 0``
  (compared in float32); the rest are exact zeros, kept as a point mass by the sketch;
- ``sum``, ``sumsq`` (float64): first and second moments, for mean and standard deviation;
- ``vmin``, ``vmax`` (float32): running extremes;
- a quantile sketch: per neuron, a histogram over ``B`` bins with edges ``e_0 <= ... <= e_B`` fixed
  from a calibration sample, plus an underflow and an overflow bin. Two kinds of edges:

  * ``quantile`` (default): the calibration sample's own quantiles, so every bin holds about
    ``1/B`` of the tokens; accurate even where the density has a spike (the minimum of SiLU/GELU).
    Binning is a per-neuron ``searchsorted``: cheap on a GPU, costly on a CPU.
  * ``uniform``: ``B`` equal-width bins between the calibration P0.5 and P99.5. Binning is one
    multiply-add, a floor and a ``bincount``; less accurate near density spikes.

  Counts are exact integers, so sketches with the same edges merge by addition. Exact zeros are a
  separate point mass (from ``count_pos`` and ``count_neg``). Quantiles and the fraction of tokens
  above any per-neuron threshold are read off by linear interpolation inside a bin (the outer
  bins reach to ``vmin``/``vmax``);
- in sentence mode, the mean activation of each of the first ``S`` sentences
  (``sentence_mean``, ``[S, L, I]``), from which ``p_max`` and ``p_median`` are derived.

**The sampled sketch and its accuracy guarantee.** Counts, moments and extremes are exact over every
token. The sketch may instead see a seeded sample of token positions: with rate ``r < 1`` every real
position is kept independently with probability ``r`` (a Bernoulli draw from a generator seeded
with ``(seed, batch index)``, so the sample does not depend on how batches are split over ranks or
resumes), the same positions in every layer. Every position of the corpus has the same chance, so,
given its size ``m``, the sample is a uniform sample without replacement. The sketch also keeps
``sketch_tokens`` (``m``) and the sample's exact zeros ``sketch_zeros``; the exact zero mass ``z`` of
a neuron comes from the counts over all tokens, and the sample's non-zero histogram is rescaled to
the exact non-zero mass ``1 - z``.

For a uniform sample of ``m`` of a corpus's values and any fixed threshold ``t``, Hoeffding's
inequality holds one tail at a time, ``P(F_m(t) - F(t) >= eps) <= exp(-2 m eps^2)`` and likewise
below; it holds for sampling without replacement (Hoeffding 1963, section 6). The quantile at level
``p`` read from the sample lies within ``eps`` of ``p`` unless the upper tail fails at
``F^-1(p - eps)`` or the lower tail at ``F^-1(p + eps)``; a union bound over those two events, the
``K`` levels of the grid P1..P99 and the ``N = L I`` neurons gives: with probability at least
``1 - delta``, every grid quantile of every neuron is within ``eps`` percentile points of the
corpus's own, when

    m >= ln(2 N K / delta) / (2 eps^2)            (:func:`sketch_sample_size`)

Per neuron the read-off mixes the exact zero mass with the ``m'`` sampled non-zero values, a uniform
sample of the non-zero values given ``m'``; its error is ``(1 - z)`` times theirs, at most
``(1 - z) sqrt(ln(2 N K / delta) / (2 m'))``, which is ``sqrt(1 - z) eps`` at ``m' = (1 - z) m``:
the exact zeros only help.

The default (``eps`` = 0.3 percentile points, ``delta`` = 0.01, ``K`` = 99) asks for about 1.1 M
positions for 10^4 neurons and 1.4 M for the 2.3 M neurons of a 70B model; collect picks
``r = min(1, m / n)`` for a language of ``n`` tokens (small corpora are sketched in full) and
records the rate, ``m`` and the achieved ``eps`` in stats.json. The histogram read-off adds its own
error, at most the mass of one bin and in practice far less (linear interpolation inside bins of
about ``1/B`` of the mass: ``benchmarks/collect.py`` measures both parts on model activations, and
``tests/test_stats.py`` checks the sum on synthetic SiLU, GELU, ReLU and heavy-tailed activations).

Everything except the sketch edges is additive; :meth:`LanguageStats.merge` adds another shard,
and a shard with other edges or another sampling rate is refused (collect calibrates every shard of
one run identically).

:class:`ActivationStats` is the on-disk collection: ``DIR/stats.json`` (metadata) and one
``DIR/<CODE>.safetensors`` per language.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .atomic import atomic_write
from .errors import UserError

from .artifacts import STATS_FORMAT  # noqa: E402 - the tag is defined in the artifact registry
DEFAULT_SKETCH_BINS = 128
SKETCH_KINDS = ("quantile", "uniform")
CALIBRATION_RANGE = (0.005, 0.995)
CALIBRATION_TOKENS = 4096
_CHUNK = 1 << 20  # tokens per accumulation step: keeps float32 counts exact
#: the sampled sketch's guarantee (module docstring): error in percentile points, failure probability,
#: and the quantile levels it covers (P1..P99)
SKETCH_ERROR_PP = 0.3
SKETCH_DELTA = 0.01
SKETCH_LEVELS = 99
#: sketch read-off tables up to this many bins in all (about 130k neurons at 128 bins; 256 MiB of
#: tables) are built once and kept; larger statistics are read one layer at a time, so memory does
#: not grow with depth
TABLE_CACHE_ELEMENTS = 1 << 24


def sketch_sample_size(num_neurons: int, error_pp: float = SKETCH_ERROR_PP, delta: float = SKETCH_DELTA,
                       levels: int = SKETCH_LEVELS) -> int:
    """Sampled positions ``m`` for which every grid quantile of every one of ``num_neurons`` neurons
    is within ``error_pp`` percentile points of the corpus's own, with probability ``1 - delta``:
    ``m = ceil(ln(2 N K / delta) / (2 eps^2))`` (Hoeffding and a union bound; module docstring)."""
    if not 0 < error_pp < 100 or not 0 < delta < 1:
        raise UserError(f"sketch error {error_pp} must be in (0, 100) percentile points and delta {delta} in (0, 1)")
    eps = error_pp / 100.0
    return int(math.ceil(math.log(2.0 * max(1, num_neurons) * levels / delta) / (2.0 * eps * eps)))


def sketch_error_bound(num_neurons: int, sampled: int, total: int, delta: float = SKETCH_DELTA,
                       levels: int = SKETCH_LEVELS) -> float:
    """The ``eps`` (percentile points) that ``sampled`` of ``total`` positions guarantee; 0 when the
    sketch saw every position."""
    if sampled >= total or total == 0:
        return 0.0
    return 100.0 * math.sqrt(math.log(2.0 * max(1, num_neurons) * levels / delta) / (2.0 * max(1, sampled)))


def sketch_rate(total_tokens: int, num_neurons: int, error_pp: float = SKETCH_ERROR_PP,
                delta: float = SKETCH_DELTA) -> float:
    """Rate ``min(1, m / n)`` at which a language of ``total_tokens`` positions is sketched."""
    if total_tokens <= 0:
        return 1.0
    return min(1.0, sketch_sample_size(num_neurons, error_pp, delta) / total_tokens)


def sample_positions(n: int, rate: float, seed: int, index: int) -> Optional[torch.Tensor]:
    """Sorted positions of ``0..n-1`` that batch ``index`` feeds to the sketch, each kept independently
    with probability ``rate`` (``None``: all of them). Depends only on ``(seed, index)``, not on the
    rank; equal inclusion probabilities keep the sample unbiased whatever the batch sizes."""
    if rate >= 1.0:
        return None
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]).generate_state(2, np.uint32)
    g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return (torch.rand(n, generator=g) < rate).nonzero().squeeze(1)


class LanguageStats:
    """Mergeable statistics of one language at one site (see the module docstring)."""

    def __init__(self, num_layers: int, width: int, sketch_bins: int = DEFAULT_SKETCH_BINS,
                 sentences: int = 0, device: torch.device | str = "cpu", sketch_kind: str = "quantile",
                 sketch_rate: float = 1.0):
        L, I = num_layers, width
        self.num_layers, self.width = L, I
        self.sketch_bins = int(sketch_bins)
        if sketch_kind not in SKETCH_KINDS:
            raise UserError(f"unknown sketch kind {sketch_kind!r}; use one of {', '.join(SKETCH_KINDS)}")
        self.sketch_kind = sketch_kind
        if not 0.0 < float(sketch_rate) <= 1.0:
            raise UserError(f"sketch rate {sketch_rate} must be in (0, 1]")
        self.sketch_rate = float(sketch_rate)
        self.device = torch.device(device)
        kw = dict(device=self.device)
        self.n_tokens = torch.zeros((), dtype=torch.int64, **kw)
        self.count_pos = torch.zeros(L, I, dtype=torch.int64, **kw)
        self.count_neg = torch.zeros(L, I, dtype=torch.int64, **kw)
        self.sum = torch.zeros(L, I, dtype=torch.float64, **kw)
        self.sumsq = torch.zeros(L, I, dtype=torch.float64, **kw)
        self.vmin = torch.full((L, I), float("inf"), dtype=torch.float32, **kw)
        self.vmax = torch.full((L, I), float("-inf"), dtype=torch.float32, **kw)
        B = self.sketch_bins
        if B:
            self.edges = torch.full((L, I, B + 1), float("nan"), dtype=torch.float32, **kw)
            self.hist = torch.zeros(L, I, B + 2, dtype=torch.int64, **kw)
            self._offsets = torch.arange(I, device=self.device, dtype=torch.int32) * (B + 2)
            self._scale = torch.empty(L, I, dtype=torch.float32, **kw)
            self._shift = torch.empty(L, I, dtype=torch.float32, **kw)
        else:
            self.edges = self.hist = None
        sampled = bool(B) and self.sketch_rate < 1.0
        # the sampled sketch's own token and zero counts (module docstring); None: it saw every token
        self.sketch_tokens = torch.zeros((), dtype=torch.int64, **kw) if sampled else None
        self.sketch_zeros = torch.zeros(L, I, dtype=torch.int64, **kw) if sampled else None
        self.max_sentences = int(sentences)
        self.n_sentences = torch.zeros((), dtype=torch.int64, **kw)
        self.sentence_mean = (torch.zeros(self.max_sentences, L, I, dtype=torch.float32, **kw)
                              if sentences else None)
        self._calibrated = [False] * L
        self._version = 0  # bumped by every change, so derived tables are rebuilt

    # ------------------------------------------------------------------ accumulation
    def add_layer(self, layer: int, x: torch.Tensor, sketch_rows: Optional[torch.Tensor] = None) -> None:
        """Add the activations ``x`` (``[N, I]``, any float dtype) of ``N`` tokens of one layer.

        Counts and moments take every row; a sampled sketch (``sketch_rate < 1``) takes the rows
        ``sketch_rows`` (the same in every layer of a batch; see :func:`sample_positions`).
        The token counts are added once per batch with :meth:`add_tokens`.
        """
        self._require_writable()
        if x.device.type == "cpu" or not x.is_floating_point():
            x = x.float()
        for start in range(0, x.shape[0], _CHUNK):
            self._add_chunk(layer, x[start:start + _CHUNK])
        if self.sketch_bins:
            if self.sketch_tokens is not None:
                xs = (x if sketch_rows is None else x.index_select(0, sketch_rows.to(x.device))).float()
                self.sketch_zeros[layer] += (xs == 0).sum(0)
            elif sketch_rows is not None:
                raise ValueError("sketch rows given to statistics that sketch every token")
            else:
                xs = x.float()
            for start in range(0, xs.shape[0], _CHUNK):
                self._add_sketch(layer, xs[start:start + _CHUNK])

    def _add_sketch(self, layer: int, x: torch.Tensor) -> None:
        if not self._calibrated[layer]:
            self.set_edges(layer, calibration_edges(x[:CALIBRATION_TOKENS], self.sketch_bins, self.sketch_kind))
        self.hist[layer].view(-1).add_(torch.bincount(self.bin_index(layer, x).view(-1),
                                                      minlength=self.hist[layer].numel()))

    def _add_chunk(self, layer: int, x: torch.Tensor) -> None:
        if x.device.type != "cpu":
            self._add_chunk_direct(layer, x)
            return
        # float32 on a CPU (measured fastest there): sign() in {-1, 0, 1}; column sums are exact in
        # float32 (N < 2^24); pos - neg and pos give both counts.
        sign = x.sign()
        balance = sign.sum(0)
        pos = sign.clamp_min_(0).sum(0)
        self.count_pos[layer] += pos.to(torch.int64)
        self.count_neg[layer] += (pos - balance).to(torch.int64)
        self.sum[layer] += x.sum(0).double()
        self.sumsq[layer] += (x * x).sum(0).double()
        torch.minimum(self.vmin[layer], x.amin(0), out=self.vmin[layer])
        torch.maximum(self.vmax[layer], x.amax(0), out=self.vmax[layer])

    def _add_chunk_direct(self, layer: int, x: torch.Tensor) -> None:
        """On a GPU: read ``x`` in its own dtype (bfloat16 from a bf16 model) and accumulate in float32
        (float64 for float64): no float32 copy and about a quarter of the memory traffic of the
        sign path. GPU reductions are tree-shaped; on a CPU a column's sum of squares would be
        accumulated row by row (less exact), so CPUs keep the float32 path."""
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.count_pos[layer] += (x > 0).sum(0)
        self.count_neg[layer] += (x < 0).sum(0)
        self.sum[layer] += x.sum(0, dtype=acc).double()
        self.sumsq[layer] += torch.linalg.vector_norm(x, dim=0, dtype=acc).double().square()
        lo, hi = torch.aminmax(x, dim=0)
        torch.minimum(self.vmin[layer], lo.float(), out=self.vmin[layer])
        torch.maximum(self.vmax[layer], hi.float(), out=self.vmax[layer])

    def bin_index(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Flat histogram index (neuron * (B + 2) + bin) of every value of ``x [N, I]``.

        Bin 0 holds ``x < e_0``, bin ``k`` holds ``e_{k-1} <= x < e_k``, bin ``B + 1`` holds ``x >= e_B``.
        """
        B = self.sketch_bins
        if self.sketch_kind == "uniform":
            z = torch.addcmul(self._shift[layer], x, self._scale[layer]).floor_().clamp_(0, B + 1)
            return z.to(torch.int32).add_(self._offsets)
        idx = torch.searchsorted(self.edges[layer], x.t().contiguous(), right=True, out_int32=True)
        return idx.add_(self._offsets[:, None])

    def set_edges(self, layer: int, edges: torch.Tensor) -> None:
        """Fix the sketch edges ``[I, B + 1]`` (non-decreasing per neuron) of ``layer``."""
        self.edges[layer] = edges.to(self.device, torch.float32)
        self._calibrated[layer] = True
        self._version += 1
        self._refresh_affine(layer)

    def _refresh_affine(self, layer: int) -> None:
        lo, hi = self.edges[layer, :, 0], self.edges[layer, :, -1]
        scale = self.sketch_bins / (hi - lo)
        self._scale[layer] = scale
        self._shift[layer] = 1.0 - lo * scale

    def add_tokens(self, n: int, sketched: Optional[int] = None) -> None:
        """Count ``n`` tokens of a batch, ``sketched`` of them in a sampled sketch (default all)."""
        self.n_tokens += int(n)
        if self.sketch_tokens is not None:
            self.sketch_tokens += int(n if sketched is None else sketched)
        self._version += 1

    def add_sentence_means(self, layer: int, means: torch.Tensor, first_index: int) -> None:
        """Store per-sentence mean activations ``[b, I]`` of sentences ``first_index ...``."""
        if self.sentence_mean is None:
            return
        stop = min(self.max_sentences, first_index + means.shape[0])
        if stop > first_index:
            self.sentence_mean[first_index:stop, layer] = means[: stop - first_index].float()

    def add_sentences(self, n: int) -> None:
        self.n_sentences += int(n)

    # ------------------------------------------------------------------ merging and state
    TENSORS = ("n_tokens", "count_pos", "count_neg", "sum", "sumsq", "vmin", "vmax", "edges", "hist",
               "sketch_tokens", "sketch_zeros", "n_sentences", "sentence_mean")

    def _require_writable(self) -> None:
        if self.__dict__.get("_path") is not None:
            raise UserError(f"statistics opened from {self._path} are read-only; use LanguageStats.load to add to them")

    def merge(self, other: "LanguageStats") -> "LanguageStats":
        """Add another shard's statistics in place (sketch edges must be identical)."""
        self._require_writable()
        if (other.num_layers, other.width, other.sketch_bins) != (self.num_layers, self.width, self.sketch_bins):
            raise UserError("cannot merge statistics of different shapes or sketch sizes; "
                            "merge only shards of the same collect run")
        if self.sketch_bins and other.sketch_rate != self.sketch_rate:
            raise UserError(f"cannot merge sketches sampled at rates {self.sketch_rate} and {other.sketch_rate}; "
                            "merge only shards of the same collect run")
        if self.sketch_bins and not torch.equal(self.edges.nan_to_num(0), other.edges.to(self.device).nan_to_num(0)):
            raise UserError("cannot merge quantile sketches with different bin edges; "
                            "collect the shards in one run (torchrun) or resume the same run")
        o = {k: getattr(other, k).to(self.device) for k in ("n_tokens", "count_pos", "sum", "sumsq")}
        self.n_tokens += o["n_tokens"]
        self.count_pos += o["count_pos"]
        self.count_neg += other.count_neg.to(self.device)
        self.sum += o["sum"]
        self.sumsq += o["sumsq"]
        torch.minimum(self.vmin, other.vmin.to(self.device), out=self.vmin)
        torch.maximum(self.vmax, other.vmax.to(self.device), out=self.vmax)
        if self.sketch_bins:
            self.hist += other.hist.to(self.device)
        if self.sketch_tokens is not None:
            self.sketch_tokens += other.sketch_tokens.to(self.device)
            self.sketch_zeros += other.sketch_zeros.to(self.device)
        self._version += 1
        if self.sentence_mean is not None and other.sentence_mean is not None:
            # sentence indices are global: shards fill disjoint rows
            self.sentence_mean += other.sentence_mean.to(self.device)
            self.n_sentences += other.n_sentences.to(self.device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for k in self.TENSORS:
            v = getattr(self, k)
            if v is not None:
                out[k] = v.detach().to("cpu").contiguous()
        if "hist" in out and (out["hist"].numel() == 0 or int(out["hist"].max()) < 2**31):
            out["hist"] = out["hist"].to(torch.int32)  # lossless; loaded back as int64
        if self.sentence_mean is not None and int(self.n_sentences) > 0:
            out["p_max"], out["p_median"] = self.sentence_patch_values()
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device="cpu", sketch_kind: str = "quantile",
                        sketch_rate: float = 1.0) -> "LanguageStats":
        L, I = state["count_pos"].shape
        B = state["hist"].shape[-1] - 2 if "hist" in state else 0
        S = state["sentence_mean"].shape[0] if "sentence_mean" in state else 0
        if bool(B) and ("sketch_zeros" in state) != (sketch_rate < 1.0):
            raise UserError(f"a sampled sketch needs its rate and sketch_tokens/sketch_zeros together (rate "
                            f"{sketch_rate}); load statistics with LanguageStats.load or collect them again")
        self = cls(L, I, sketch_bins=B, sentences=S, device=device, sketch_kind=sketch_kind, sketch_rate=sketch_rate)
        for k in cls.TENSORS:
            if k in state:
                v = state[k].to(self.device).clone()
                setattr(self, k, v.to(getattr(self, k).dtype).reshape(getattr(self, k).shape))
        if B:
            self._calibrated = [bool(torch.isfinite(self.edges[l]).all()) for l in range(L)]
            for l in range(L):
                if self._calibrated[l]:
                    self._refresh_affine(l)
        return self

    def save(self, path: str | os.PathLike) -> None:
        atomic_save_tensors(self.state_dict(), path, metadata={"format": STATS_FORMAT, "sketch_kind": self.sketch_kind,
                                                               "sketch_rate": repr(self.sketch_rate)})

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu") -> "LanguageStats":
        """Every tensor of the file in memory, ready to accumulate more (a resumed collection)."""
        shapes, kind, rate = cls._read_header(path)
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"statistics file {path} is unreadable or corrupt ({e}); collect it again") from None
        return cls.from_state_dict(state, device=device, sketch_kind=kind, sketch_rate=rate)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "LanguageStats":
        """Read-only statistics that load each tensor from the file when first used (on the CPU).

        The read-offs (:meth:`cdf`, :meth:`quantile`) of large statistics read the sketch one layer
        at a time through :meth:`part`, mapping the file for that read only, so memory stays bounded
        by one layer however many languages are open. Use :meth:`load` to accumulate."""
        shapes, kind, rate = cls._read_header(path)
        self = cls.__new__(cls)
        self.num_layers, self.width = shapes["count_pos"]
        self.sketch_bins = shapes["hist"][-1] - 2 if "hist" in shapes else 0
        self.sketch_kind, self.sketch_rate = kind, rate
        self.device = torch.device("cpu")
        self.max_sentences = shapes["sentence_mean"][0] if "sentence_mean" in shapes else 0
        self._version = 0
        self._path, self._keys = Path(path), set(shapes)
        return self

    def __getattr__(self, name: str):
        # only reached for attributes not set: the tensors of statistics opened with open()
        d = self.__dict__
        if name in LanguageStats.TENSORS and d.get("_path") is not None:
            if name not in d["_keys"]:
                return None
            with safe_open(str(d["_path"]), "pt") as f:
                t = f.get_tensor(name)
            d[name] = t
            return t
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @staticmethod
    def _read_header(path) -> tuple[dict, str, float]:
        """Shapes of every tensor, sketch kind and rate, checked as far as the header tells."""
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"statistics file {path} is unreadable or corrupt ({e}); collect it again") from None
        missing = [k for k in ("n_tokens", "count_pos", "sum", "sumsq") if k not in shapes]
        if missing:
            raise UserError(f"statistics file {path} lacks {', '.join(missing)}; collect it again")
        if len(shapes["count_pos"]) != 2:
            raise UserError(f"statistics file {path} is corrupt (count_pos has shape {shapes['count_pos']}); "
                            "collect it again")
        L, I = shapes["count_pos"]
        for k in ("sum", "sumsq", "count_neg", "vmin", "vmax", "sketch_zeros"):
            if k in shapes and shapes[k] != (L, I):
                raise UserError(f"statistics file {path} is corrupt ({k} has shape {shapes[k]}); collect it again")
        if "hist" in shapes and (len(shapes["hist"]) != 3 or shapes["hist"][:2] != (L, I)
                                 or shapes.get("edges") != (L, I, shapes["hist"][2] - 1)):
            raise UserError(f"statistics file {path} has a corrupt sketch (hist {shapes['hist']}, edges "
                            f"{shapes.get('edges')}); collect it again")
        kind = meta.get("sketch_kind", "quantile")
        if kind not in SKETCH_KINDS:
            raise UserError(f"statistics file {path} names an unknown sketch kind {kind!r}; collect it again")
        try:
            rate = float(meta.get("sketch_rate", "1.0"))
        except ValueError:
            rate = float("nan")
        if not 0.0 < rate <= 1.0 or ("hist" in shapes and (rate < 1.0) != ("sketch_zeros" in shapes)):
            raise UserError(f"statistics file {path} has a corrupt sampled sketch; collect it again")
        return shapes, kind, rate

    # ------------------------------------------------------------------ derived quantities
    def prob(self) -> torch.Tensor:
        """Activation probability ``count_pos / n_tokens`` (float64 ``[L, I]``)."""
        n = int(self.n_tokens)
        return self.count_pos.double() / n if n else torch.zeros_like(self.sum)

    def mean(self) -> torch.Tensor:
        n = int(self.n_tokens)
        return self.sum / n if n else torch.zeros_like(self.sum)

    def std(self) -> torch.Tensor:
        """Population standard deviation (float64 ``[L, I]``)."""
        n = int(self.n_tokens)
        if not n:
            return torch.zeros_like(self.sum)
        m = self.sum / n
        return (self.sumsq / n - m * m).clamp_min(0).sqrt()

    def _require_sketch(self) -> None:
        if not self.sketch_bins:
            raise UserError("these statistics were collected without a quantile sketch; "
                            "collect again without --sketch-bins 0")

    def part(self, name: str, index) -> Optional[torch.Tensor]:
        """``getattr(self, name)[index]``, read from the file alone when the tensor is not loaded
        (statistics opened with :meth:`open`); ``None`` for a tensor these statistics lack."""
        if name in self.__dict__ or self.__dict__.get("_path") is None:
            t = getattr(self, name)
            return None if t is None else t[index]
        if name not in self._keys:
            return None
        with safe_open(str(self._path), "pt") as f:   # mapped for this read only: no resident pages kept
            return f.get_slice(name)[index]

    def _tables(self, layers: slice) -> "_SketchTables":
        p = lambda name: self.part(name, layers)  # noqa: E731
        return _SketchTables(p("edges"), p("hist"), p("count_pos"), p("count_neg"), self.n_tokens,
                             p("sketch_zeros"), p("vmin"), p("vmax"))

    def _tables_fit(self) -> bool:
        """Whether the read-off tables of every layer are kept as one cached block."""
        return self.num_layers * self.width * (self.sketch_bins + 2) <= TABLE_CACHE_ELEMENTS

    def _table_blocks(self):
        """(layers, tables) covering every layer: one block, built once per state of the statistics,
        when all tables fit in TABLE_CACHE_ELEMENTS; else one layer at a time (memory of one layer)."""
        L = self.num_layers
        if self._tables_fit():
            if self.__dict__.get("_tables_key") != self._version:
                self._tables_cache = self._tables(slice(0, L))
                self._tables_key = self._version
            yield slice(0, L), self._tables_cache
        else:
            for layer in range(L):
                yield slice(layer, layer + 1), self._tables(slice(layer, layer + 1))

    def cdf(self, threshold: torch.Tensor) -> torch.Tensor:
        """Fraction of tokens with activation ``<= threshold`` (per-neuron ``[L, I]``), float64.

        Exact zeros are a point mass (``n - count_pos - count_neg`` tokens); every other token is
        spread uniformly inside its bin: bin 0 is ``[min(vmin, e_0), e_0)``, bin ``k`` is
        ``[e_{k-1}, e_k)`` and bin ``B + 1`` is ``[e_B, max(vmax, e_B)]``. Large statistics are read
        one layer at a time.
        """
        self._require_sketch()
        t = torch.as_tensor(threshold, device=self.device).double().expand(self.num_layers, self.width)
        out = torch.empty(self.num_layers, self.width, dtype=torch.float64, device=self.device)
        for layers, tables in self._table_blocks():
            out[layers] = tables.cdf(t[layers])
        return out

    def quantile(self, q: float) -> torch.Tensor:
        """Global ``q``-quantile (``0 <= q <= 1``) of every neuron, float64 ``[L, I]``.

        The smallest ``t`` with ``cdf(t) >= q``, by inverting the piecewise-linear CDF directly:
        the target count ``r = q n`` falls below the zeros (negative ``t``), on the point mass of
        exact zeros (``t = 0``) or above it.
        """
        self._require_sketch()
        if not 0.0 <= q <= 1.0:
            raise UserError(f"quantile {q} is outside [0, 1]")
        out = torch.empty(self.num_layers, self.width, dtype=torch.float64, device=self.device)
        for layers, tables in self._table_blocks():
            out[layers] = tables.quantile(q)
        return out

    def frac_above(self, threshold: torch.Tensor) -> torch.Tensor:
        """Fraction of tokens with activation ``> threshold`` (float64 ``[L, I]``)."""
        return 1.0 - self.cdf(threshold)

    def sentence_patch_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``p_max`` and ``p_median`` over the per-sentence means of the first ``S`` sentences.

        The median of an even number of sentences is the mean of the two middle values (numpy's).
        Statistics opened with :meth:`open` read the values saved beside the means.
        """
        if self.__dict__.get("_path") is not None and {"p_max", "p_median"} <= self._keys:
            with safe_open(str(self._path), "pt") as f:
                return f.get_tensor("p_max"), f.get_tensor("p_median")
        n = min(int(self.n_sentences), self.max_sentences)
        if self.sentence_mean is None or n == 0:
            raise UserError("these statistics hold no per-sentence means; collect with --unit sentence")
        m = self.sentence_mean[:n]
        return m.max(0).values, torch.quantile(m.double(), 0.5, dim=0).float()


class _SketchTables:
    """Threshold-independent read-off tables of the sketch of some neurons (leading dims ``[...]``):
    float64 edges ``[..., B+1]``, cumulative bin counts without the exact zeros ``[..., B+2]``, the
    outer bins' bounds, the zero count and the total ``[...]`` (two tables per neuron: an 80-layer,
    28672-wide model's layer takes 60 MB)."""

    def __init__(self, edges, hist, count_pos, count_neg, n_tokens, sketch_zeros, vmin, vmax):
        e = edges.double().contiguous()
        zeros = (n_tokens - count_pos - count_neg).double()
        sample_zeros = zeros if sketch_zeros is None else sketch_zeros.double()
        # take the exact zeros out of the bin they were counted in: they are a point mass
        b0 = torch.searchsorted(e, torch.zeros_like(e[..., :1]), right=True)
        counts = hist.double().scatter_add(-1, b0, -sample_zeros.unsqueeze(-1))
        if sketch_zeros is not None:
            # a sampled sketch: its non-zero mass stands for the exact non-zero mass of every token
            nonzero = (count_pos + count_neg).double()
            sampled = counts.sum(-1)
            counts = counts * torch.where(sampled > 0, nonzero / sampled.clamp_min(1), torch.zeros_like(nonzero)).unsqueeze(-1)
            # a neuron whose sample held only zeros: its rare non-zero tokens go to the outer bins
            none = (sampled == 0).double()
            counts[..., 0] += none * count_neg.double()
            counts[..., -1] += none * count_pos.double()
        self.e, self.cum, self.zeros = e, counts.cumsum_(-1), zeros
        self.lo0 = torch.minimum(vmin.double(), e[..., 0])      # lower bound of bin 0
        self.hi_last = torch.maximum(vmax.double(), e[..., -1])  # upper bound of bin B + 1
        self.total = self.cum[..., -1] + zeros

    def _bin(self, b: torch.Tensor) -> tuple:
        """Lower bound, upper bound, count and count below of bins ``b [..., 1]``."""
        B1 = self.e.shape[-1]   # B + 1
        lo = torch.where(b == 0, self.lo0.unsqueeze(-1), self.e.gather(-1, (b - 1).clamp_min(0))).squeeze(-1)
        hi = torch.where(b == B1, self.hi_last.unsqueeze(-1), self.e.gather(-1, b.clamp_max(B1 - 1))).squeeze(-1)
        upto = self.cum.gather(-1, b).squeeze(-1)
        below = torch.where(b.squeeze(-1) == 0, 0.0, self.cum.gather(-1, (b - 1).clamp_min(0)).squeeze(-1))
        return lo, hi, upto - below, below

    def cdf(self, t: torch.Tensor) -> torch.Tensor:
        zeros, total = self.zeros, self.total
        b = torch.searchsorted(self.e, t.double().unsqueeze(-1).contiguous(), right=True)   # bin of t
        b_lo, b_hi, inside, below = self._bin(b)
        width = b_hi - b_lo
        frac = torch.where(width > 0, (t - b_lo) / width.clamp_min(1e-300), torch.ones_like(width)).clamp(0, 1)
        out = below + frac * inside + torch.where(t >= 0, zeros, torch.zeros_like(zeros))
        return torch.where(total > 0, out / total.clamp_min(1), torch.zeros_like(out))

    def quantile(self, q: float) -> torch.Tensor:
        zeros, total, cum = self.zeros, self.total, self.cum
        r = q * total
        c0 = self.cdf(torch.zeros_like(total)) * total - zeros  # continuous mass at or below 0
        target = torch.where(r <= c0, r, r - zeros).clamp_min(0)
        k = torch.searchsorted(cum, target.unsqueeze(-1).contiguous()).clamp_max(cum.shape[-1] - 1)  # first cum >= target
        lo_k, hi_k, inside, before = self._bin(k)
        frac = torch.where(inside > 0, (target - before) / inside.clamp_min(1e-300), torch.zeros_like(inside))
        t = lo_k + frac.clamp(0, 1) * (hi_k - lo_k)
        t = torch.where((r > c0) & (r <= c0 + zeros), torch.zeros_like(t), t)
        return torch.where(total > 0, t, torch.zeros_like(t))


def calibration_edges(x: torch.Tensor, bins: int, kind: str = "quantile") -> torch.Tensor:
    """Sketch edges ``[I, bins + 1]`` from a calibration sample ``x [N, I]``.

    ``quantile``: edge ``k`` is the order statistic at rank ``round(k (N - 1) / bins)``, so each inner
    bin holds about ``1 / bins`` of the calibration tokens. ``uniform``: equal-width edges between the
    order statistics at ``round(0.005 (N - 1))`` and ``round(0.995 (N - 1))`` (P0.5 and P99.5).
    A neuron with a constant calibration sample still gets a positive-width range.
    """
    xs = x.float().sort(dim=0).values  # [N, I]
    n = xs.shape[0]
    if kind == "quantile":
        ranks = torch.round(torch.linspace(0, n - 1, bins + 1, device=x.device)).long()
        edges = xs[ranks].t().contiguous()
        lo, hi = edges[:, 0], edges[:, -1]
    else:
        lo_q, hi_q = CALIBRATION_RANGE
        lo, hi = xs[round(lo_q * (n - 1))], xs[round(hi_q * (n - 1))]
        edges = None
    hi_fixed = torch.where(hi > lo, hi, lo + 1e-6 * (lo.abs() + 1))
    if edges is None:
        steps = torch.linspace(0, 1, bins + 1, device=x.device)
        return lo[:, None] + (hi_fixed - lo)[:, None] * steps
    edges[:, -1] = hi_fixed
    return edges


def pooled_quantile(stats: Iterable[LanguageStats], q: float, iters: int = 48) -> torch.Tensor:
    """The ``q``-quantile of the pooled token distribution of several languages, ``[L, I]``.

    Solves ``sum_k n_k F_k(t) / sum_k n_k = q`` per neuron by bisection on the sketch CDFs (48 halvings
    of ``[min, max]``: far below a bin's width), so it works for sketches with different edges (every
    language is calibrated on its own tokens).
    """
    stats = list(stats)
    if not stats:
        raise UserError("no languages to pool")
    n = torch.stack([s.n_tokens.double().cpu() for s in stats])
    return _bisect_cdf(stats, n / n.sum(), q, iters)


def _bisect_cdf(stats: list[LanguageStats], weights: torch.Tensor, q: float, iters: int) -> torch.Tensor:
    """Layer by layer (one layer's tables of every language in memory at a time, for large models)."""
    for s in stats:
        s._require_sketch()
    L, I = stats[0].num_layers, stats[0].width
    out = torch.empty(L, I, dtype=torch.float64)
    if all(s._tables_fit() for s in stats):
        blocks = [(slice(0, L), [next(s._table_blocks())[1] for s in stats])]      # cached, one block
    else:                                                                       # a layer at a time
        blocks = ((slice(l, l + 1), [s._tables(slice(l, l + 1)) for s in stats]) for l in range(L))
    for layers, tables in blocks:
        lo = torch.stack([torch.minimum(s.part("vmin", layers), torch.zeros(())) for s in stats]).min(0).values.double()
        hi = torch.stack([torch.maximum(s.part("vmax", layers), torch.zeros(())) for s in stats]).max(0).values.double()
        lo = lo - 1e-12  # cdf(lo) < q for every q > 0
        for _ in range(iters):
            mid = (lo + hi) / 2
            F = sum(float(wk) * t.cdf(mid) for wk, t in zip(weights, tables))
            below = F < q
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        # an interval that closes on 0 from both sides has found the point mass of exact zeros
        out[layers] = torch.where((lo < 0) & (hi >= 0), torch.zeros_like(hi), hi).cpu()
    return out


def atomic_save_tensors(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    """Write a safetensors file atomically (temp file in the same directory, then rename)."""
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


class ActivationStats:
    """Statistics of several languages on one model and site: ``DIR/stats.json`` + ``DIR/<CODE>.safetensors``.

    >>> stats = ActivationStats.load("runs/stats")      # doctest: +SKIP
    >>> stats.languages, stats.get("en").prob().shape   # doctest: +SKIP
    """

    def __init__(self, meta: dict, directory: Optional[Path] = None,
                 per_language: Optional[dict[str, LanguageStats]] = None):
        self.meta = meta
        self.directory = Path(directory) if directory else None
        self._cache: dict[str, LanguageStats] = dict(per_language or {})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ActivationStats":
        d = Path(directory)
        f = d / "stats.json"
        if not f.is_file():
            raise UserError(f"{d} holds no stats.json; point --stats at a directory written by 'langneurons collect'")
        try:
            meta = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{f} is corrupt ({e.__class__.__name__}); collect the statistics again") from None
        if not isinstance(meta, dict) or meta.get("format") != STATS_FORMAT or "languages" not in meta:
            raise UserError(f"{f} is not a langneurons statistics file (format {STATS_FORMAT}); collect again")
        return cls(meta, d)

    @property
    def languages(self) -> list[str]:
        return list(self.meta["languages"].keys())

    @property
    def num_layers(self) -> int:
        return int(self.meta["model"]["num_layers"])

    @property
    def width(self) -> int:
        return int(self.meta["model"]["width"])

    @property
    def site(self) -> str:
        return self.meta["model"]["site"]

    @property
    def model_info(self) -> dict:
        """The ``model`` block of a neuron-set file made from these statistics (with ``arch``, the
        module-path spec, when ``collect`` was given ``--arch``: later commands read it back)."""
        m = self.meta["model"]
        info = {k: m[k] for k in ("name_or_path", "model_type", "num_layers", "width", "site")}
        if m.get("adapter") == "override" and isinstance(m.get("arch"), dict):   # --arch given at collect time
            from .arch import ArchSpec
            info["arch"] = ArchSpec(**m["arch"]).describe()
        return info

    @property
    def fingerprint(self) -> str:
        """A digest of the model, site and every language's corpus and token count."""
        key = json.dumps({"model": self.meta["model"], "tokenizer": self.meta.get("tokenizer_fingerprint"),
                          "window": self.meta.get("window"), "unit": self.meta.get("unit"),
                          "languages": {k: {f: v.get(f) for f in ("corpus_fingerprint", "n_tokens")}
                                        for k, v in sorted(self.meta["languages"].items())}},
                         sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def get(self, code: str) -> LanguageStats:
        if code not in self.meta["languages"]:
            raise UserError(f"language {code!r} is not in these statistics (they hold {', '.join(self.languages)}); "
                            "collect it first or pick another")
        if code not in self._cache:
            if self.directory is None:
                raise UserError(f"statistics of {code!r} are not loaded")
            path = self.directory / f"{code}.safetensors"
            if not path.is_file():
                raise UserError(f"{path} is missing; collect language {code!r} again")
            ls = LanguageStats.open(path)
            if (ls.num_layers, ls.width) != (self.num_layers, self.width):
                raise UserError(f"{path} has shape {ls.num_layers}x{ls.width} but stats.json says "
                                f"{self.num_layers}x{self.width}; collect again")
            self._cache[code] = ls
        return self._cache[code]

    def check_languages(self, languages: Optional[Iterable[str]]) -> list[str]:
        """Validate a language selection (``None`` = all) against the statistics."""
        if languages is None:
            return self.languages
        langs = list(languages)
        unknown = [c for c in langs if c not in self.meta["languages"]]
        if unknown:
            raise UserError(f"unknown language(s) {', '.join(unknown)}; these statistics hold {', '.join(self.languages)}")
        if len(set(langs)) != len(langs):
            raise UserError("a language is named twice in --languages")
        return langs
