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

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from .artifacts import DIRECTIONS_CHECKPOINT_FORMAT, DIRECTIONS_FORMAT, INTERVENTION_FORMAT
from .errors import UserError
from .unitsums import Layout, UnitConfig, UnitKind, UnitStats, UnitSums, accumulate_windows, collect_units

#: Bump when a change alters the sums the same command collects (checkpoint keys include it).
DIRECTIONS_VERSION = 1


# ------------------------------------------------------------------------------------------ sums
class ResidualSums(UnitSums):
    """The additive statistics of one language: ``sum [L, H]``, ``norm_sum [L]`` (float64) and
    ``count`` (int64 ``[1]``, positions counted; the same for every layer)."""

    FIELDS = ("sum", "norm_sum", "count")
    WHAT = "residual sums"

    def __init__(self, num_layers: int, hidden_size: int, device="cpu"):
        self.num_layers, self.hidden_size = int(num_layers), int(hidden_size)
        self.sum = torch.zeros(self.num_layers, self.hidden_size, dtype=torch.float64, device=device)
        self.norm_sum = torch.zeros(self.num_layers, dtype=torch.float64, device=device)
        self.count = torch.zeros(1, dtype=torch.int64, device=device)

    @property
    def dims(self) -> tuple[int, int]:
        return self.num_layers, self.hidden_size

    def add(self, layer: int, h: torch.Tensor) -> None:
        """Add the hidden states ``h [N, H]`` (the real positions of one pass) of ``layer``."""
        if h.shape[-1] != self.hidden_size:
            raise UserError(f"layer {layer} outputs hidden states of width {h.shape[-1]}, expected "
                            f"{self.hidden_size}; check --arch layers=...")
        x = h.reshape(-1, self.hidden_size).to(self.device, torch.float64)
        self.sum[layer] += x.sum(0)
        self.norm_sum[layer] += torch.linalg.vector_norm(x, dim=-1).sum()

    def mean(self) -> torch.Tensor:
        """``mean_l = S_l / N``: float64 ``[L, H]`` (on the CPU)."""
        return (self.sum / max(self.n_tokens, 1)).cpu()

    def mean_norm(self) -> torch.Tensor:
        """``norm_l = R_l / N``, the mean L2 norm of the residual stream: float64 ``[L]``."""
        return (self.norm_sum / max(self.n_tokens, 1)).cpu()

    def derived(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean().float(), "norm": self.mean_norm().float()}


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
    L, H = session.adapter.num_layers, session.adapter.hidden_size
    if sums is None:
        sums = ResidualSums(L, H, device=session.device)
    if sums.dims != (L, H):
        raise UserError(f"residual sums of shape {list(sums.dims)} do not fit this model "
                        f"({L} layers, hidden size {H}); use sums of the same model")
    return accumulate_windows(session, windows, sums, observe_residual, sums.add,
                              "decoder layer(s) {layers} ran {n} time(s) in one forward pass instead of once; "
                              "check --arch layers=...", mask, start, after_batch, progress)


# ------------------------------------------------------------------------------------------ the artifact
class Directions(UnitStats):
    """Per-language residual means of one model (see the module docstring).

    ``Directions.load(DIR)``; ``.languages``; ``.num_layers``; ``.hidden_size``; ``.mean(code)``
    (float64 ``[L, H]``); ``.mean_norm(code)`` (``[L]``); ``.count(code)``; ``.residual_norm()``
    (``rbar``, ``[L]``); ``.diffmean(target, ...)``; ``.sums[code]`` (:class:`ResidualSums`).
    """

    KIND = "directions"
    WHAT = "directions"
    LABEL = "directions"
    DAMAGED = "the directions file is damaged"
    FORMAT = DIRECTIONS_FORMAT
    SUMS = ResidualSums
    DIMS = DOC_INTS = ("num_layers", "hidden_size")
    FINGERPRINT_FIELDS = ("sum",)
    DEFINITION = {"hidden": "output of decoder layer l (hidden_states[l + 1] before the final norm)",
                  "diffmean": "v_l(t) = mean_l(t) - unweighted mean over the other languages of mean_l(k)",
                  "norm": "norm_l(k) = mean over tokens of ||h_l||_2"}

    # ---- shape and content ---------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.meta["hidden_size"])

    @property
    def model_fingerprint(self) -> Optional[str]:
        m = self.meta.get("model")
        return m.get("fingerprint") if isinstance(m, dict) else None

    def mean(self, code: str) -> torch.Tensor:
        return self.sums[self.check_language(code)].mean()

    def residual_norm(self) -> torch.Tensor:
        """``rbar_l``: the unweighted mean over every language of its mean residual norm, float64 ``[L]``."""
        if not self.sums:
            raise UserError(f"{self.name} holds no languages; collect some first")
        return torch.stack([s.mean_norm() for s in self.sums.values()]).mean(0)

    def diffmean(self, target: str, layer: Optional[int] = None, normalise: bool = False,
                 languages: Optional[Sequence[str]] = None) -> torch.Tensor:
        """See :func:`diffmean`."""
        return diffmean(self, target, layer, normalise, languages)

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


#: Checks a ``directions.json`` document in full (the registry's loader): ``validate_doc(doc, where)``.
validate_doc = Directions.validate_doc


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
class DirectionsConfig(UnitConfig):
    """``langneurons directions collect`` (the options mean what they mean for ``collect``)."""


def _layout(cfg: DirectionsConfig, session) -> Layout:
    L, H = session.adapter.num_layers, session.adapter.hidden_size
    shape = {"num_layers": L, "hidden_size": H}
    return Layout(dims=(L, H), site="residual", settings={}, model_shape=shape, shape=shape)


#: The collection of directions (:func:`langneurons.unitsums.collect_units`).
KIND = UnitKind(Directions, DirectionsConfig, accumulate, _layout, DIRECTIONS_CHECKPOINT_FORMAT, DIRECTIONS_VERSION)


def collect_directions(cfg: DirectionsConfig, model=None, tokenizer=None) -> Directions:
    """Collect the residual sums of every language of ``cfg`` into ``cfg.out`` (module docstring) and
    return the loaded :class:`Directions`. Languages already in OUT (same model, settings and corpus)
    are skipped; an interrupted language resumes from its checkpoint."""
    return collect_units(cfg, KIND, model, tokenizer)
