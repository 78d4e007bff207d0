"""Residual-stream language directions (DiffMean): collection, the artifact, and the steering vector.

A unit beyond MLP neurons: one direction per language and decoder layer in the residual stream,
the difference of mean hidden states ("DiffMean", the best steering method of CLaS-Bench,
Gurgurov et al. 2026).

The hidden state. ``h_l(i)`` in ``R^H`` is the residual stream that decoder layer ``l`` outputs at
token position ``i`` (:func:`langneurons.hooks.observe_residual`: the layer's output, element 0 when
it returns a tuple). For ``l < L - 1`` it is what ``model(..., output_hidden_states=True)`` returns
at index ``l + 1``; HF's last entry (index ``L``) has the final norm applied, ours does not (it is
the unnormalised output of the last layer, the stream a steering vector is added to).

Collection (per language ``k``, over the real, non-pad positions ``i`` of its windows; the windows
are packed exactly as ``collect`` packs them, :mod:`langneurons.corpus`), in float64::

    S_l(k) = sum_i h_l(i)             [L, H]     N(k) = number of positions
    R_l(k) = sum_i ||h_l(i)||_2       [L]
    mean_l(k) = S_l(k) / N(k)         norm_l(k) = R_l(k) / N(k)   (the mean residual norm)

``S``, ``R`` and ``N`` are additive: shards (ranks under torchrun, resumed pieces, halves of a
corpus) merge exactly by adding them (:class:`ResidualSums`).

DiffMean. For a target language ``t`` and the language set ``K`` (every language of the artifact by
default; ``|K| >= 2``)::

    v_l(t) = mean_l(t) - (1 / (|K| - 1)) * sum_{k in K, k != t} mean_l(k)

The "others" mean is the **unweighted** mean of the other languages' means: each language counts
once whatever its token count, so ``v`` does not move when one corpus grows and is not dominated by
the largest corpus (a token-weighted pooled mean would be). ``normalise=True`` returns
``v_l / ||v_l||``.

Steering (:class:`DirectionIntervention`). At each chosen layer ``l`` and selected position::

    h_l <- h_l + delta_l
    normalise=False:  delta_l = alpha * v_l(t)
    normalise=True:   delta_l = alpha * rbar_l * v_l(t) / ||v_l(t)||,   rbar_l = (1/|A|) sum_{k in A} norm_l(k)

with ``A`` every language of the artifact (unweighted, like DiffMean): with ``normalise=True``,
``alpha = 1`` adds a vector as long as an average residual state of that layer. Positions are those
of neuron interventions (``all`` non-pad positions, ``prompt``, ``generated``, ``last``), through
the same controller, so generation with and without KV cache agree.

Artifact: ``OUT/directions.safetensors`` with, per language ``CODE``: ``mean.CODE`` (float32
``[L, H]``), ``norm.CODE`` (float32 ``[L]``), ``count.CODE`` (int64 ``[1]``), and the exact sums
``sum.CODE`` (float64 ``[L, H]``) and ``norm_sum.CODE`` (float64 ``[L]``); ``OUT/directions.json``
(``"format": "langneurons.directions.v1"``) with the model (name, type, fingerprint, layers, hidden
size), languages, token counts, window, packing and sources. Collection is resumable per language
(checkpoints in ``OUT/.partial/``) and adds languages to an existing directory of the same model
and settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .artifacts import DIRECTIONS_CHECKPOINT_FORMAT, DIRECTIONS_FORMAT, INTERVENTION_FORMAT
from .atomic import atomic_write, atomic_write_text
from .corpus import default_cache_dir
from .errors import UserError

#: Bump when a change alters the sums the same command collects (checkpoint keys include it).
DIRECTIONS_VERSION = 1
JSON_NAME = "directions.json"
TENSORS_NAME = "directions.safetensors"


# ------------------------------------------------------------------------------------------ sums
class ResidualSums:
    """The additive statistics of one language: ``sum [L, H]``, ``norm_sum [L]`` (float64) and
    ``count`` (int64 ``[1]``, positions counted; the same for every layer)."""

    def __init__(self, num_layers: int, hidden_size: int, device="cpu"):
        self.num_layers, self.hidden_size = int(num_layers), int(hidden_size)
        self.sum = torch.zeros(self.num_layers, self.hidden_size, dtype=torch.float64, device=device)
        self.norm_sum = torch.zeros(self.num_layers, dtype=torch.float64, device=device)
        self.count = torch.zeros(1, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.sum.device

    def add(self, layer: int, h: torch.Tensor) -> None:
        """Add the hidden states ``h [N, H]`` (the real positions of one pass) of ``layer``."""
        if h.shape[-1] != self.hidden_size:
            raise UserError(f"layer {layer} outputs hidden states of width {h.shape[-1]}, expected "
                            f"{self.hidden_size}; check --arch layers=...")
        x = h.reshape(-1, self.hidden_size).to(self.device, torch.float64)
        self.sum[layer] += x.sum(0)
        self.norm_sum[layer] += torch.linalg.vector_norm(x, dim=-1).sum()

    def add_tokens(self, n: int) -> None:
        self.count += int(n)

    def merge(self, other: "ResidualSums") -> "ResidualSums":
        """Add another shard (in place); returns self."""
        if (other.num_layers, other.hidden_size) != (self.num_layers, self.hidden_size):
            raise UserError(f"cannot merge residual sums of shape {[other.num_layers, other.hidden_size]} into "
                            f"{[self.num_layers, self.hidden_size]}; merge sums of the same model")
        self.sum += other.sum.to(self.device)
        self.norm_sum += other.norm_sum.to(self.device)
        self.count += other.count.to(self.device)
        return self

    def all_reduce(self) -> None:
        """Sum the shards of every rank (torch.distributed; a no-op outside a process group)."""
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for t in (self.sum, self.norm_sum, self.count):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    @property
    def n_tokens(self) -> int:
        return int(self.count.sum())

    def mean(self) -> torch.Tensor:
        """``mean_l = S_l / N``: float64 ``[L, H]`` (on the CPU)."""
        return (self.sum / max(self.n_tokens, 1)).cpu()

    def mean_norm(self) -> torch.Tensor:
        """``norm_l = R_l / N``, the mean L2 norm of the residual stream: float64 ``[L]``."""
        return (self.norm_sum / max(self.n_tokens, 1)).cpu()

    def tensors(self, code: Optional[str] = None) -> dict[str, torch.Tensor]:
        """The tensors of the artifact (``name.CODE``), or of a checkpoint (``code=None``: sums only)."""
        t = {"sum": self.sum.cpu(), "norm_sum": self.norm_sum.cpu(), "count": self.count.cpu()}
        if code is None:
            return {k: v.contiguous() for k, v in t.items()}
        t.update(mean=self.mean().float(), norm=self.mean_norm().float())
        return {f"{k}.{code}": v.contiguous() for k, v in t.items()}

    @classmethod
    def from_tensors(cls, t: dict, code: Optional[str] = None, where: str = "", device="cpu") -> "ResidualSums":
        sfx = "" if code is None else f".{code}"
        try:
            s, ns, c = t["sum" + sfx], t["norm_sum" + sfx], t["count" + sfx]
        except KeyError as e:
            raise UserError(f"{where} lacks the tensor {e.args[0]!r}; it is damaged, collect again") from None
        if s.dim() != 2 or tuple(ns.shape) != (s.shape[0],) or c.numel() != 1:
            raise UserError(f"{where}: the tensors of {code or 'the checkpoint'} have inconsistent shapes; "
                            "it is damaged, collect again")
        out = cls(s.shape[0], s.shape[1], device=device)
        out.sum.copy_(s.to(torch.float64))
        out.norm_sum.copy_(ns.to(torch.float64))
        out.count.copy_(c.reshape(1).to(torch.int64))
        return out

    def save(self, path) -> None:
        """An atomic safetensors checkpoint of the sums."""
        from safetensors.torch import save_file
        tensors = self.tensors()
        atomic_write(path, lambda tmp: save_file(tensors, tmp))

    @classmethod
    def load(cls, path, device="cpu") -> "ResidualSums":
        from safetensors.torch import load_file
        try:
            t = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any read failure means a damaged file
            raise UserError(f"{path} is corrupt ({e.__class__.__name__}); remove it and collect again") from None
        return cls.from_tensors(t, None, str(path), device)


# ------------------------------------------------------------------------------------------ the pass
def accumulate(session, windows, sums: Optional[ResidualSums] = None, mask=None, start: int = 0,
               after_batch: Optional[Callable[[int], None]] = None, progress=None) -> ResidualSums:
    """Add the residual stream of every real position of ``windows`` to ``sums`` (new if ``None``).

    ``windows``: token ids ``[N, T]`` (numpy, uint32 windows of :mod:`langneurons.corpus`, or a
    tensor); ``mask``: ``[N, T]`` (1 = real; ``None`` = every position). Batches of
    ``session.batch_size`` windows in input order run through ``model.base_model`` (no LM head) and
    are split over the ranks by :meth:`~langneurons.runtime.Session.map_batches`; this rank's sums
    are **not** reduced here (:meth:`ResidualSums.all_reduce`). Batches before ``start`` are skipped
    (resume); ``after_batch(k)`` runs after batch ``k`` of this rank.
    """
    from .hooks import observe_residual
    from .runtime import forward_kwargs
    adapter = session.adapter
    L = adapter.num_layers
    if sums is None:
        sums = ResidualSums(L, adapter.hidden_size, device=session.device)
    if (sums.num_layers, sums.hidden_size) != (L, adapter.hidden_size):
        raise UserError(f"residual sums of shape {[sums.num_layers, sums.hidden_size]} do not fit this model "
                        f"({L} layers, hidden size {adapter.hidden_size}); use sums of the same model")
    base = getattr(session.model, "base_model", session.model)
    ids_all = torch.as_tensor(np.asarray(windows, dtype=np.int64)) if not isinstance(windows, torch.Tensor) \
        else windows.long()
    mask_all = torch.as_tensor(mask).long() if mask is not None else None
    n = ids_all.shape[0]
    B = session.batch_size
    batches = [list(range(s, min(s + B, n))) for s in range(0, n, B)]

    def run(k: int, idx: list[int]) -> dict:
        if k < start:
            return {}
        ids = ids_all[idx]
        m = mask_all[idx] if mask_all is not None else None
        flat = m.reshape(-1).bool() if m is not None else None
        counted = int(flat.sum()) if flat is not None else ids.numel()

        def fn(layer: int, h: torch.Tensor) -> None:
            x = h.reshape(-1, h.shape[-1])
            if flat is not None:
                x = x[flat.to(x.device)]
            sums.add(layer, x)

        dev = session.device
        with observe_residual(adapter, fn) as calls, torch.no_grad():
            base(input_ids=ids.to(dev), use_cache=False, **forward_kwargs(base, m.to(dev) if m is not None else None))
        bad = [l for l in range(L) if calls[l] != 1]
        if bad:
            raise UserError(f"decoder layer(s) {bad[:5]} ran {calls[bad[0]]} time(s) in one forward pass instead of "
                            "once; check --arch layers=...")
        sums.add_tokens(counted)
        if after_batch is not None:
            after_batch(k)
        return {}

    session.map_batches(batches, run, progress)
    return sums


# ------------------------------------------------------------------------------------------ the artifact
def _lang_list(doc: dict) -> list:
    langs = doc.get("languages")
    return langs if isinstance(langs, list) else []


def validate_doc(doc: dict, where: str = "directions.json") -> dict:
    """Check a ``directions.json`` document in full (the registry's loader); return it."""
    def bad(what: str):
        raise UserError(f"{where}: {what}; the directions file is damaged, run 'langneurons directions collect' again")
    if not isinstance(doc, dict) or doc.get("format") != DIRECTIONS_FORMAT:
        raise UserError(f"{where} is not a directions file ({DIRECTIONS_FORMAT}); give the directory written by "
                        "'langneurons directions collect'")
    for key in ("num_layers", "hidden_size"):
        v = doc.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            bad(f"{key!r} must be a positive integer")
    model = doc.get("model")
    if not isinstance(model, dict):
        bad("'model' must be an object")
    langs = _lang_list(doc)
    if not all(isinstance(c, str) and c for c in langs) or len(set(langs)) != len(langs):
        bad("'languages' must be distinct language codes")
    counts = doc.get("token_counts")
    if not isinstance(counts, dict):
        bad("'token_counts' must be an object")
    for c in langs:
        n = counts.get(c)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            bad(f"the token count of {c!r} must be a positive integer")
    return doc


def _json_path(path) -> Path:
    p = Path(path)
    return p / JSON_NAME if p.is_dir() or p.suffix != ".json" else p


class Directions:
    """Per-language residual means of one model (see the module docstring).

    ``Directions.load(DIR)``; ``.languages``; ``.num_layers``; ``.hidden_size``; ``.mean(code)``
    (float64 ``[L, H]``); ``.mean_norm(code)`` (``[L]``); ``.count(code)``; ``.residual_norm()``
    (``rbar``, ``[L]``); ``.diffmean(target, ...)``; ``.sums[code]`` (:class:`ResidualSums`).
    """

    def __init__(self, meta: dict, sums: dict[str, ResidualSums], path: Optional[Path] = None):
        self.meta = meta
        self.sums = dict(sums)
        self.path = path
        self._fingerprint: Optional[str] = None

    # ---- shape and content ---------------------------------------------------------------------
    @property
    def languages(self) -> list[str]:
        return list(self.sums)

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.meta["hidden_size"])

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "the given directions"

    @property
    def model_fingerprint(self) -> Optional[str]:
        m = self.meta.get("model")
        return m.get("fingerprint") if isinstance(m, dict) else None

    def check_language(self, code: str) -> str:
        if code not in self.sums:
            raise UserError(f"unknown language {code!r}: the directions in {self.name} hold "
                            f"{', '.join(self.languages) or 'no languages'}; pick one of those or collect it")
        return code

    def mean(self, code: str) -> torch.Tensor:
        return self.sums[self.check_language(code)].mean()

    def mean_norm(self, code: str) -> torch.Tensor:
        return self.sums[self.check_language(code)].mean_norm()

    def count(self, code: str) -> int:
        return self.sums[self.check_language(code)].n_tokens

    def residual_norm(self) -> torch.Tensor:
        """``rbar_l``: the unweighted mean over every language of its mean residual norm, float64 ``[L]``."""
        if not self.sums:
            raise UserError(f"{self.name} holds no languages; collect some first")
        return torch.stack([s.mean_norm() for s in self.sums.values()]).mean(0)

    def diffmean(self, target: str, layer: Optional[int] = None, normalise: bool = False,
                 languages: Optional[Sequence[str]] = None) -> torch.Tensor:
        """See :func:`diffmean`."""
        return diffmean(self, target, layer, normalise, languages)

    @property
    def fingerprint(self) -> str:
        """A digest of the sums (changes when any language's data changes)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for code in sorted(self.sums):
                s = self.sums[code]
                h.update(code.encode() + b"\0" + str(s.n_tokens).encode())
                h.update(s.sum.cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    # ---- files ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path) -> "Directions":
        """Read ``DIR`` (or ``DIR/directions.json``) with its ``directions.safetensors``."""
        from .artifacts import load
        jp = _json_path(path)
        if not jp.parent.is_dir():
            raise UserError(f"{jp.parent} does not exist; give the directory written by 'langneurons directions collect'")
        if not jp.is_file():
            raise UserError(f"{jp.parent} holds no {JSON_NAME}; give the directory written by "
                            "'langneurons directions collect'")
        meta = load(jp, "directions")
        tp = jp.parent / TENSORS_NAME
        if not tp.is_file():
            raise UserError(f"{tp} is missing beside {jp}; collect the directions again")
        from safetensors.torch import load_file
        try:
            t = load_file(str(tp))
        except Exception as e:  # noqa: BLE001 - any read failure means a damaged file
            raise UserError(f"{tp} is corrupt ({e.__class__.__name__}); collect the directions again") from None
        L, H = meta["num_layers"], meta["hidden_size"]
        sums = {}
        for code in meta["languages"]:
            s = ResidualSums.from_tensors(t, code, str(tp))
            if (s.num_layers, s.hidden_size) != (L, H):
                raise UserError(f"{tp}: the sums of {code!r} have shape {[s.num_layers, s.hidden_size]} but "
                                f"{jp.name} says {[L, H]}; it is damaged, collect again")
            sums[code] = s
        return cls(meta, sums, jp.parent)

    def save(self, out) -> Path:
        """Write ``OUT/directions.safetensors`` then ``OUT/directions.json`` (each atomically)."""
        from safetensors.torch import save_file
        out = Path(out)
        tensors: dict[str, torch.Tensor] = {}
        for code, s in self.sums.items():
            tensors.update(s.tensors(code))
        meta = dict(self.meta)
        meta.update(format=DIRECTIONS_FORMAT, languages=list(self.sums),
                    token_counts={c: s.n_tokens for c, s in self.sums.items()})
        validate_doc(meta, str(out / JSON_NAME))
        atomic_write(out / TENSORS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": DIRECTIONS_FORMAT}))
        atomic_write_text(out / JSON_NAME, json.dumps(meta, indent=1, ensure_ascii=False))
        self.meta, self.path, self._fingerprint = meta, out, None
        return out / JSON_NAME

    # ---- summaries -----------------------------------------------------------------------------
    def diffmean_norms(self, languages: Optional[Sequence[str]] = None) -> torch.Tensor:
        """``||v_l(t)||`` for every layer and language of ``languages``: float64 ``[L, K]``."""
        langs = list(languages) if languages is not None else self.languages
        return torch.stack([torch.linalg.vector_norm(diffmean(self, t, languages=langs), dim=-1) for t in langs], 1)

    def cosines(self, layer: int, languages: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Cosine similarity of the languages' DiffMean vectors at ``layer``: float64 ``[K, K]`` (NaN for a
        zero vector)."""
        langs = list(languages) if languages is not None else self.languages
        V = torch.stack([diffmean(self, t, layer, languages=langs) for t in langs])
        n = torch.linalg.vector_norm(V, dim=-1)
        return (V @ V.T) / (n[:, None] * n[None, :])


def diffmean(dirs: Directions, target: str, layer: Optional[int] = None, normalise: bool = False,
             languages: Optional[Sequence[str]] = None) -> torch.Tensor:
    """``v_l(target) = mean_l(target) - mean over the other languages of mean_l(k)`` (unweighted; see the
    module docstring): float64 ``[L, H]``, or ``[H]`` for one ``layer``. ``languages``: the language set
    ``K`` (default every language of ``dirs``; it must hold ``target`` and one other). ``normalise``:
    unit vectors per layer (a zero vector stays zero)."""
    langs = list(dict.fromkeys(languages)) if languages is not None else dirs.languages
    for c in langs:
        dirs.check_language(c)
    dirs.check_language(target)
    if target not in langs:
        raise UserError(f"the target language {target!r} is not in the language set {langs}; add it")
    others = [c for c in langs if c != target]
    if not others:
        raise UserError(f"DiffMean of {target!r} needs at least one other language; {dirs.name} holds "
                        f"{', '.join(dirs.languages)}: collect another language")
    v = dirs.mean(target) - torch.stack([dirs.mean(c) for c in others]).mean(0)
    if layer is not None:
        if not -dirs.num_layers <= int(layer) < dirs.num_layers:
            raise UserError(f"layer {layer} is outside 0..{dirs.num_layers - 1}")
        v = v[int(layer)]
    if normalise:
        n = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        v = v / torch.where(n > 0, n, torch.ones_like(n))
    return v


# ------------------------------------------------------------------------------------------ the intervention
@dataclass(eq=False)
class DirectionIntervention:
    """Add ``alpha`` times a language direction to the residual stream output of ``layers``.

    ``directions``: a :class:`Directions` (or the path of one): the vector of layer ``l`` is the
    DiffMean ``v_l(language)`` over the language set ``contrast`` (``None``: every language of the
    artifact); or a tensor, ``[L, H]`` (row ``l`` for layer ``l``) or ``[H]`` (the same vector at every
    chosen layer), added as given (``language`` is then only a label). ``layers``: an int or a list.
    ``normalise``: ``delta_l = alpha * rbar_l * v_l / ||v_l||`` (``rbar_l`` the mean residual norm of
    the artifact at layer ``l``), else ``delta_l = alpha * v_l`` (module docstring). ``positions``:
    ``all`` (non-pad), ``prompt``, ``generated`` or ``last``, as for :class:`~langneurons.intervene.Intervention`.
    Apply it with ``intervene`` / ``Session.intervened``, alone or in a list with neuron interventions.
    After construction ``num_layers`` (``None`` for an ``[H]`` tensor) and ``hidden_size`` are set, and
    :meth:`deltas` gives the vectors added.
    """

    directions: object
    language: Optional[str]
    layers: Union[int, Sequence[int]]
    alpha: float
    normalise: bool = False
    positions: str = "all"
    contrast: Optional[Sequence[str]] = None
    _deltas: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self):
        from .intervene import POSITIONS
        d = self.directions
        if isinstance(d, (str, os.PathLike)):
            d = self.directions = Directions.load(d)
        if isinstance(d, Directions):
            if self.language is None:
                raise UserError(f"a direction intervention needs the language whose direction it adds; "
                                f"{d.name} holds {', '.join(d.languages)}")
            d.check_language(self.language)
            L, H = d.num_layers, d.hidden_size
        elif isinstance(d, torch.Tensor):
            if d.dim() not in (1, 2) or not d.is_floating_point():
                raise UserError(f"a direction tensor must be float [L, H] or [H], got {d.dtype} {list(d.shape)}")
            if self.normalise:
                raise UserError("normalise=True needs the mean residual norms of a Directions artifact; pass "
                                "Directions.load(DIR) (or scale the tensor yourself)")
            if self.contrast is not None:
                raise UserError("contrast applies to a Directions artifact, not to a tensor")
            self.directions = d = d.detach().to("cpu", torch.float64)
            L, H = (d.shape[0], d.shape[1]) if d.dim() == 2 else (None, d.shape[0])
        else:
            raise UserError(f"directions must be a Directions artifact, its path or a tensor, got {type(d).__name__}")
        try:
            self.alpha = float(self.alpha)
        except (TypeError, ValueError):
            raise UserError(f"alpha {self.alpha!r} is not a number") from None
        if not math.isfinite(self.alpha):
            raise UserError(f"alpha {self.alpha} is not a finite number")
        layers = [self.layers] if isinstance(self.layers, int) else list(self.layers)
        self.layers = sorted({int(l) for l in layers})
        if not self.layers:
            raise UserError("a direction intervention needs at least one layer")
        if L is not None:
            bad = [l for l in self.layers if not 0 <= l < L]
            if bad:
                raise UserError(f"layers {bad} are outside 0..{L - 1}")
        self.hidden_size = int(H)
        self.num_layers = L
        if self.positions not in POSITIONS:
            raise UserError(f"unknown positions {self.positions!r}; use one of {', '.join(POSITIONS)}")
        if self.contrast is not None:
            self.contrast = list(dict.fromkeys(self.contrast))
        self._deltas = self._compute()

    # ---- vectors -------------------------------------------------------------------------------
    def _compute(self) -> dict[int, torch.Tensor]:
        d = self.directions
        if isinstance(d, torch.Tensor):
            return {l: self.alpha * (d[l] if d.dim() == 2 else d) for l in self.layers}
        v = diffmean(d, self.language, normalise=self.normalise, languages=self.contrast)   # [L, H] float64
        if self.normalise:
            v = v * d.residual_norm()[:, None]
        return {l: self.alpha * v[l] for l in self.layers}

    def deltas(self) -> dict[int, torch.Tensor]:
        """``{layer: delta_l}``: the float64 ``[H]`` vector added at each chosen layer."""
        return {l: v.clone() for l, v in self._deltas.items()}

    def plan(self, adapter) -> dict[int, torch.Tensor]:
        """``{layer: delta_l}`` in the dtype and on the device of each layer (shape checked)."""
        L, H = adapter.num_layers, adapter.hidden_size
        if (self.num_layers is not None and self.num_layers != L) or self.hidden_size != H:
            shown = f"{self.num_layers}x{self.hidden_size}" if self.num_layers is not None else f"width {self.hidden_size}"
            raise UserError(f"the directions ({shown}) do not fit this model ({L} layers, hidden size {H}); "
                            "use directions collected from the same model")
        bad = [l for l in self.layers if l >= L]
        if bad:
            raise UserError(f"layers {bad} are outside 0..{L - 1}")
        out = {}
        for l, v in self._deltas.items():
            w = adapter.layers[l].down.weight
            dtype = w.dtype if w.dtype.is_floating_point else torch.float32
            out[l] = v.to(device=w.device, dtype=dtype)
        return out

    # ---- description and serialisation ---------------------------------------------------------
    @property
    def operator(self) -> str:
        return f"add:diffmean{'-norm' if self.normalise else ''}*{self.alpha:g}"

    def describe(self) -> str:
        layers = ",".join(str(l) for l in self.layers)
        return f"{self.operator}[{self.language or 'vector'}]@residual:{layers}/{self.positions}"

    def _digest(self) -> str:
        h = hashlib.sha256()
        for l in sorted(self._deltas):
            h.update(str(l).encode())
            h.update(self._deltas[l].numpy().tobytes())
        return h.hexdigest()[:16]

    def to_dict(self) -> dict:
        """A JSON-ready record (the intervention format, ``"unit": "direction"``); :meth:`from_dict`
        rebuilds it from the same directions."""
        d = self.directions
        src = ({"path": str(d.path) if d.path is not None else None, "fingerprint": d.fingerprint,
                "model": dict(d.meta.get("model") or {}), "languages": d.languages}
               if isinstance(d, Directions) else {"path": None, "tensor_shape": list(d.shape)})
        src["digest"] = self._digest()
        return {"format": INTERVENTION_FORMAT, "unit": "direction", "operator": self.operator,
                "languages": [self.language] if self.language is not None else [], "site": "residual",
                "positions": self.positions, "layers": list(self.layers), "alpha": self.alpha,
                "normalise": bool(self.normalise), "contrast": self.contrast, "directions": src}

    @classmethod
    def from_dict(cls, d: dict, directions=None) -> "DirectionIntervention":
        """Rebuild from :meth:`to_dict`; ``directions`` defaults to the recorded path."""
        if not isinstance(d, dict) or d.get("format") != INTERVENTION_FORMAT or d.get("unit") != "direction":
            raise UserError(f"not a direction intervention record ({INTERVENTION_FORMAT} with unit 'direction'); "
                            "make one with DirectionIntervention.to_dict()")
        src = d.get("directions") or {}
        if directions is None:
            if not src.get("path"):
                raise UserError("the intervention record names no directions directory; pass directions=...")
            directions = Directions.load(src["path"])
        if isinstance(directions, (str, os.PathLike)):
            directions = Directions.load(directions)
        if (isinstance(directions, Directions) and src.get("fingerprint")
                and directions.fingerprint != src["fingerprint"]):
            raise UserError(f"the intervention was made with directions {src.get('path')} (fingerprint "
                            f"{src['fingerprint']}) but {directions.name} has fingerprint {directions.fingerprint}; "
                            "pass the same directions")
        langs = d.get("languages") or [None]
        iv = cls(directions, langs[0], d["layers"], d["alpha"], normalise=bool(d.get("normalise")),
                 positions=d.get("positions", "all"), contrast=d.get("contrast"))
        if src.get("digest") and iv._digest() != src["digest"]:
            raise UserError("the directions give other vectors than the ones the intervention was made with; "
                            "pass the same directions")
        return iv


# ------------------------------------------------------------------------------------------ collection
@dataclass
class DirectionsConfig:
    """``langneurons directions collect`` (the options mean what they mean for ``collect``)."""

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
    """The ``directions.json`` already in OUT (None for a new or empty directory); raises when OUT holds
    something else. Cheap: the command calls it before any model is loaded."""
    out = Path(out)
    f = out / JSON_NAME
    if not f.exists():
        if out.is_dir() and any(p.name != ".partial" for p in out.iterdir()):
            raise UserError(f"--out {out} exists and is not a langneurons directions directory; "
                            "choose a new or empty directory")
        return None
    from .artifacts import load
    return load(f, "directions")


def _crash() -> None:
    """Test hook (``LANGNEURONS_FAULT_AFTER_BATCHES``): die like ``kill -9`` after a checkpoint."""
    os.kill(os.getpid(), signal.SIGKILL)


def collect_directions(cfg: DirectionsConfig, model=None, tokenizer=None) -> Directions:
    """Collect the residual sums of every language of ``cfg`` into ``cfg.out`` (module docstring) and
    return the loaded :class:`Directions`. Languages already in OUT (same model, settings and corpus)
    are skipped; an interrupted language resumes from its checkpoint."""
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
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and cfg.window > max_pos:
        raise UserError(f"--window {cfg.window} exceeds the model's {max_pos} positions; lower --window")
    packing = Packing(cfg.window, cfg.bos, cfg.separator).resolve(tokenizer)
    model_fp = model_fingerprint(model)
    L, H = adapter.num_layers, adapter.hidden_size
    ident = {"model_fingerprint": model_fp, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
             "window": cfg.window, "packing": packing.as_dict(), "site": "residual"}
    if existing is not None:
        theirs = existing.get("identity") or {}
        diff = [k for k in ident if theirs.get(k) != ident[k]]
        if diff:
            shown = ", ".join(f"{k}: {theirs.get(k)!r} there vs {ident[k]!r} now" for k in diff[:2])
            raise UserError(f"--out {out} holds directions of another model or settings ({shown}); "
                            "use a new --out directory")
        dirs = Directions.load(out)
    else:
        meta = {
            "format": DIRECTIONS_FORMAT, "library_version": __version__,
            "model": {"name_or_path": cfg.model, "model_type": adapter.model_type, "fingerprint": model_fp,
                      "num_layers": L, "hidden_size": H, "adapter": adapter.source,
                      "arch": dataclasses.asdict(adapter.spec)},
            "identity": ident, "site": "residual", "num_layers": L, "hidden_size": H,
            "window": cfg.window, "packing": packing.as_dict(), "dtype": str(model.dtype).replace("torch.", ""),
            "tokenizer_fingerprint": ident["tokenizer_fingerprint"],
            "languages": [], "token_counts": {}, "sources": {}, "corpora": {},
            "definition": {"hidden": "output of decoder layer l (hidden_states[l + 1] before the final norm)",
                           "diffmean": "v_l(t) = mean_l(t) - unweighted mean over the other languages of mean_l(k)",
                           "norm": "norm_l(k) = mean over tokens of ||h_l||_2"},
        }
        dirs = Directions(meta, {}, out)
    batches_run = [0]                   # over every language of this call (the fault-injection counter)
    for src in cfg.languages:
        _collect_language(cfg, src, session, packing, dirs, out, model_fp, batches_run)
    if session.world > 1:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    return Directions.load(out) if (out / JSON_NAME).is_file() else dirs


def _collect_language(cfg: DirectionsConfig, src, session, packing, dirs: Directions, out: Path, model_fp: str,
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
              "n_windows_total": int(len(all_windows)), "n_windows": int(len(chosen)), "stream_tokens": int(len(stream))}
    done = (dirs.meta.get("corpora") or {}).get(code)
    if code in dirs.sums:
        if isinstance(done, dict) and all(done.get(k) == v for k, v in corpus.items()):
            _log(cfg, session, f"{code}: already collected in {out}, skipped")
            return
        raise UserError(f"--out {out} already holds directions of {code!r} from another corpus or settings; "
                        "use a new --out directory")
    rank, world = session.rank, session.world
    key = hashlib.sha256(json.dumps(dict(model=model_fp, corpus=cfp, window=cfg.window, packing=packing.as_dict(),
                                         max_tokens=cfg.max_tokens, seed=cfg.seed, batch=cfg.batch_size,
                                         world=world, rank=rank, dtype=str(session.model.dtype),
                                         version=DIRECTIONS_VERSION), sort_keys=True).encode()).hexdigest()[:16]
    partial = out / ".partial"
    ckpt = partial / f"directions.{code}.rank{rank}.safetensors"
    ckpt_meta = partial / f"directions.{code}.rank{rank}.json"
    adapter = session.adapter
    sums, start = None, 0
    if ckpt.is_file() and ckpt_meta.is_file():
        try:
            m = json.loads(ckpt_meta.read_text(encoding="utf-8"))
            if isinstance(m, dict) and m.get("key") == key:
                sums = ResidualSums.load(ckpt, device=session.device)
                start = int(m["next_batch"])
                _log(cfg, session, f"{code}: resuming at batch {start}")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, ValueError, UserError):
            sums, start = None, 0
    if sums is None or (sums.num_layers, sums.hidden_size) != (adapter.num_layers, adapter.hidden_size):
        sums, start = ResidualSums(adapter.num_layers, adapter.hidden_size, device=session.device), 0
    fault = int(os.environ.get("LANGNEURONS_FAULT_AFTER_BATCHES", "0") or 0)
    last = [time.monotonic()]

    def after_batch(k: int) -> None:
        batches_run[0] += 1
        crash = fault and batches_run[0] == fault
        if crash or time.monotonic() - last[0] >= cfg.checkpoint_every:
            sums.save(ckpt)
            atomic_write_text(ckpt_meta, json.dumps({"format": DIRECTIONS_CHECKPOINT_FORMAT, "key": key,
                                                     "next_batch": k + 1}))
            last[0] = time.monotonic()
        if crash:
            _crash()

    bar = None
    if cfg.progress and session.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(windows), unit="win", desc=f"directions {code}", dynamic_ncols=True, mininterval=1.0)
    accumulate(session, windows, sums, start=start, after_batch=after_batch,
               progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    sums.all_reduce()
    if session.is_main:
        dirs.sums[code] = sums
        meta = dirs.meta
        corpus["n_tokens"] = sums.n_tokens
        meta.setdefault("corpora", {})[code] = corpus
        meta.setdefault("sources", {})[code] = src.spec
        dirs.save(out)
    for f in (ckpt, ckpt_meta):
        if f.exists():
            f.unlink()
    if partial.is_dir() and not any(partial.iterdir()):
        partial.rmdir()


def _log(cfg: DirectionsConfig, session, msg: str) -> None:
    if cfg.progress and session.is_main:
        import sys
        print(f"langneurons: {msg}", file=sys.stderr)
