"""Test-time interventions on language neurons (METHODS.md section 4).

An :class:`Intervention` names a neuron set and the language(s) whose neurons it touches, the
activation site it writes (``act`` by default), the token positions it writes, and an operator.
``intervene(model, iv)`` applies it (or a list of them) inside a ``with`` block to every forward
pass of ``model``: plain calls, scoring passes and ``model.generate`` with or without KV cache.

Operators (``parse_operator``), acting on the selected activations ``a[b, t, j]`` of layer ``l``:

============================  =====================================================================
``zero``                      ``a <- 0`` (deactivation)
``set:STAT[*A]``              ``a <- A * STAT[l, j]`` (per-neuron statistic of a language)
``set:CONST``                 ``a <- CONST`` (e.g. ``set:-1``, ``set:10``)
``scale:A``                   ``a <- A * a``
``add:STAT[*A]``              ``a <- a + A * STAT[l, j]`` (``add:CONST`` adds a constant)
``set:batch-NAME[*A]``        ``a <- A * BATCH[j]`` (statistic of the current activations, below)
``add:batch-NAME[*A]``        ``a <- a + A * BATCH[j]``
============================  =====================================================================

``STAT`` is one of ``mean``, ``std``, ``min``, ``max``, ``pXX`` (per-neuron quantile ``XX/100`` from
the statistics' sketch, e.g. ``p90``, ``p10``, ``p5``, ``p99.5``), ``p_max`` and ``p_median`` (the
maximum and the median over sentences of the per-sentence mean activation: [R25]'s patch values,
which need statistics collected with ``--unit sentence``).

Which statistics. Values come from :class:`~langneurons.stats.ActivationStats` of the **same site**
they are written into (``stats_site=None`` enforces it); ``stats_site="pre"`` writes ``pre``
statistics into ``act`` on purpose, to replicate [M25]. ``stats_language=None`` takes every neuron's
value from its own language; a neuron that belongs to several of the selected languages gets the
**mean of those languages' values** (order-independent). ``stats_language="en"`` takes every
value from English.

Test-time (batch) statistics, following [R25]. ``BATCH[j]`` is computed, per selected neuron ``j``
of the layer, from the activations the layer produced in the current forward call *before*
anything is written into it, over its **non-pad positions** (attention mask 1):
``batch-max`` = maximum, ``batch-min`` = minimum, ``batch-mean`` = mean, ``batch-pXX`` = the ``XX``-th
percentile with linear interpolation between order statistics (numpy's default, no size limit).
``batch_scope="batch"`` (default, [R25]) pools the non-pad positions of every sequence of the
call, so the value depends on what else is in the batch; ``batch_scope="sequence"`` computes one
value per sequence (independent of batch composition and padding). Inside ``model.generate`` the
value is computed on the prompt pass (the first forward call of that generation) and kept for
every later step, so generation with and without KV cache agree; outside ``generate`` every
forward call computes its own value.

Positions (``positions=``), on top of "never a pad position":

- ``all`` (default): every non-pad position of every forward call;
- ``prompt``: positions before the prompt length ``P`` (the padded width of the prompt given to
  ``generate``); outside ``generate`` every position is prompt unless ``ctl.prompt_length`` is set;
- ``generated``: positions ``>= P`` (the generated tokens themselves; the prompt pass that predicts
  the first new token is not touched); outside ``generate``: positions ``>= ctl.prompt_length``;
- ``last``: the newest position at the time it is computed. In ``generate`` that is the last
  prompt position and every generated position (``>= P - 1``), so a KV cache and a full
  recomputation write the same positions; outside ``generate``, the last non-pad position of each
  sequence of the call.

Mechanics. A forward pre-hook on the model (``with_kwargs=True``) reads each call's
``attention_mask`` (2-D ``[B, past + T]``; the last ``T`` columns belong to the current tokens) and
the past length (``cache_position``, the mask width, or the cache), and builds the position mask
once per call. ``model.generate`` is wrapped for the duration of the block to mark generation
sessions. Writer hooks (``langneurons.hooks.write``) hold, per layer, one index tensor
``idx_l`` (``[n_l]``) and one value tensor ``v_l`` (``[n_l]``, precomputed when the block is
entered) and apply ``index_copy_`` on the last dimension under the position mask: unselected
neurons and untouched layers stay bit-identical. Writes are in place when the activation does
not require grad, else out of place.

Language arithmetic (Gurgurov et al. 2025, "Language Arithmetics"). One
:class:`ArithmeticIntervention` steers from source language(s) ``s`` to a target ``t`` in the same
forward pass: it **deactivates** the neurons of ``s`` and **activates** those of ``t``. With
``N(x)`` the neurons of language ``x``, ``mu_x[l, j]`` its per-neuron mean activation (statistics of
the written site) and strength ``A >= 0`` (default 1):

==================  =========================================  =======================================
spec                source neurons (``N(s)`` without ``N(t)``)  target neurons ``N(t)``
==================  =========================================  =======================================
``arith:add[*A]``   ``a <- a - A * mu_s`` (``add:mean*-A``)     ``a <- a + A * mu_t`` (``add:mean*A``)
``arith:mul[*A]``   ``a <- max(0, 1 - A) * a``                  ``a <- (1 + A) * a``
==================  =========================================  =======================================

The additive variant removes the source's mean activation and adds the target's: ``A = 1`` moves a
neuron's expected value from the source's toward the target's. The multiplicative variant damps
the source neurons (``A = 1``: to 0, ``A >= 1`` clips at 0 rather than flipping the sign) and
amplifies the target's by the same proportion. The published code of the paper deactivates by
*setting* the source neurons to a constant and activates with ``a + A * mu_t``; ``arith:add``
is the symmetric version of that arithmetic. Several source languages (``sources=[...]``) are
deactivated together; a neuron of several of them subtracts the mean of those languages' means
(the rule of ``add:STAT`` above). A neuron in both ``N(s)`` and ``N(t)`` **gets the target value
only** (computed from its unmodified activation): the source part excludes the target's neurons,
so the two writes touch disjoint neurons; the target part is also installed last. The two parts are
ordinary :class:`Intervention` objects (``ArithmeticIntervention.parts``, source first) written at
the same site and positions; ``intervene`` accepts an ``ArithmeticIntervention`` anywhere an
intervention is accepted and installs its parts in that order. ``parse_arith`` parses the spec;
``parse_operator`` refuses it (it is not a single-set operator).

Residual-stream directions. :class:`~langneurons.directions.DirectionIntervention` (a language's
DiffMean vector added to the residual stream output of chosen decoder layers, see
:mod:`langneurons.directions`) goes through the same controller: ``intervene`` takes a list mixing
both kinds, applied in list order at their own sites; its positions are this controller's position
masks (so a KV cache and a full recomputation write the same positions, and pad positions are never
written); its writer hook on the decoder layer returns ``h + delta_l`` (out of place) under the mask.

>>> iv = Intervention(neurons=ns, languages=["zh"], operator="set:p_max", stats=stats)  # doctest: +SKIP
>>> with intervene(model, iv):                                                         # doctest: +SKIP
...     out = model.generate(ids, attention_mask=mask, max_new_tokens=20)
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import re
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch

from .arch import Adapter, check_site
from .directions import DirectionIntervention
from .errors import UserError
from .heads import HeadIntervention
from .hooks import write, write_heads, write_residual
from .neuronset import NeuronSet

from .artifacts import INTERVENTION_FORMAT  # noqa: E402 - the tag is defined in the artifact registry
POSITIONS = ("all", "prompt", "generated", "last")
BATCH_SCOPES = ("batch", "sequence")
STAT_NAMES = ("mean", "std", "min", "max", "p_max", "p_median")
BATCH_NAMES = ("max", "min", "mean")

ARITH_KINDS = ("add", "mul")
ARITH_HELP = ("arith:add[*A] (source neurons a - A*mean_s, target neurons a + A*mean_t) or arith:mul[*A] "
              "(source neurons max(0, 1-A)*a, target neurons (1+A)*a); A >= 0, default 1")
OPERATOR_HELP = ("zero, set:STAT[*A], set:CONST, scale:A, add:STAT[*A], add:CONST, set:batch-NAME[*A] or "
                 "add:batch-NAME[*A] (STAT: mean, std, min, max, pXX such as p90, p_max, p_median; "
                 "NAME: max, min, mean, pXX such as p10); 'langneurons steer' also takes language "
                 "arithmetic: " + ARITH_HELP)

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_PCT = re.compile(r"^p(\d+(?:\.\d+)?)$")


# ------------------------------------------------------------------------------------------ operators
@dataclass(frozen=True)
class Operator:
    """A parsed operator (see the module docstring).

    ``mode``: ``set`` | ``add`` | ``scale``; ``source``: ``const`` | ``stat`` | ``batch``;
    ``stat``: the statistic name (``mean``, ``p90``, ``p_max``, ... or, for ``batch``, ``max``,
    ``p10``, ...); ``value``: the constant (``const``) or the scale factor (``scale``);
    ``factor``: the multiplier of a statistic.
    """

    spec: str
    mode: str
    source: str
    stat: Optional[str] = None
    value: float = 0.0
    factor: float = 1.0

    @property
    def quantile(self) -> Optional[float]:
        """``q`` in [0, 1] of a ``pXX`` statistic, else ``None``."""
        m = _PCT.match(self.stat or "")
        return float(m.group(1)) / 100.0 if m else None

    @property
    def needs_stats(self) -> bool:
        return self.source == "stat"

    @property
    def is_batch(self) -> bool:
        return self.source == "batch"


def _number(text: str, spec: str) -> float:
    if not re.fullmatch(_NUM, text.strip()):
        raise UserError(f"operator {spec!r}: {text!r} is not a number; use {OPERATOR_HELP}")
    v = float(text)
    if not math.isfinite(v):
        raise UserError(f"operator {spec!r}: {text!r} is not a finite number")
    return v


def _check_stat_name(name: str, spec: str, batch: bool) -> str:
    m = _PCT.match(name)
    if m:
        q = float(m.group(1))
        if not 0.0 <= q <= 100.0:
            raise UserError(f"operator {spec!r}: percentile {name} is outside p0..p100")
        return name
    allowed = BATCH_NAMES if batch else STAT_NAMES
    if name not in allowed:
        kind = "batch statistic" if batch else "statistic"
        raise UserError(f"operator {spec!r}: unknown {kind} {name!r}; use one of {', '.join(allowed)} or pXX "
                        f"(e.g. p90); operators: {OPERATOR_HELP}")
    return name


def parse_operator(spec: Union[str, Operator]) -> Operator:
    """Parse an operator string (grammar in the module docstring); UserError on bad input."""
    if isinstance(spec, Operator):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"empty operator; use {OPERATOR_HELP}")
    s = spec.strip()
    if s == "zero":
        return Operator(spec=s, mode="set", source="const", value=0.0)
    if is_arith(s):
        raise UserError(f"operator {s!r} is language arithmetic: it writes a source and a target language at once, "
                        "which this command does not do; use it with 'langneurons steer' (or "
                        "langneurons.intervene.ArithmeticIntervention), or give a single-set operator: "
                        + OPERATOR_HELP.split("; 'langneurons steer'")[0])
    if ":" not in s:
        raise UserError(f"unknown operator {s!r}; use {OPERATOR_HELP}")
    mode, arg = (p.strip() for p in s.split(":", 1))
    if mode not in ("set", "add", "scale"):
        raise UserError(f"unknown operator {s!r} (mode {mode!r}); use {OPERATOR_HELP}")
    if not arg:
        raise UserError(f"operator {s!r} names no value; use {OPERATOR_HELP}")
    if mode == "scale":
        return Operator(spec=s, mode="scale", source="const", value=_number(arg, s))
    if re.fullmatch(_NUM, arg):
        return Operator(spec=s, mode=mode, source="const", value=_number(arg, s))
    term, factor = arg, 1.0
    if "*" in arg:
        term, f = (p.strip() for p in arg.split("*", 1))
        factor = _number(f, s)
    if re.fullmatch(_NUM, term):
        return Operator(spec=s, mode=mode, source="const", value=_number(term, s) * factor)
    if term.startswith("batch-"):
        name = _check_stat_name(term[len("batch-"):], s, batch=True)
        return Operator(spec=s, mode=mode, source="batch", stat=name, factor=factor)
    name = _check_stat_name(term, s, batch=False)
    return Operator(spec=s, mode=mode, source="stat", stat=name, factor=factor)


def is_arith(spec) -> bool:
    """Whether ``spec`` names a language-arithmetic operator (``arith`` or ``arith:...``)."""
    return isinstance(spec, ArithOperator) or (isinstance(spec, str) and spec.split(":", 1)[0].strip() == "arith")


@dataclass(frozen=True)
class ArithOperator:
    """A parsed ``arith:KIND[*A]`` (module docstring): ``kind`` ``add`` | ``mul``, ``strength`` ``A``."""

    spec: str
    kind: str
    strength: float = 1.0

    @property
    def source_operator(self) -> str:
        """The single-set operator written into the source neurons."""
        A = self.strength
        return f"add:mean*{_fmt(-A)}" if self.kind == "add" else f"scale:{_fmt(max(0.0, 1.0 - A))}"

    @property
    def target_operator(self) -> str:
        """The single-set operator written into the target neurons."""
        A = self.strength
        return f"add:mean*{_fmt(A)}" if self.kind == "add" else f"scale:{_fmt(1.0 + A)}"

    @property
    def needs_stats(self) -> bool:
        return self.kind == "add"


def _fmt(x: float) -> str:
    """A float as an operator number that parses back to the same float."""
    return repr(float(x))


def parse_arith(spec: Union[str, ArithOperator]) -> ArithOperator:
    """Parse ``arith:add[*A]`` / ``arith:mul[*A]`` (``A`` a finite number >= 0, default 1); UserError
    on bad input."""
    if isinstance(spec, ArithOperator):
        return spec
    if not isinstance(spec, str) or not is_arith(spec):
        raise UserError(f"{spec!r} is not a language-arithmetic operator; use {ARITH_HELP}")
    s = spec.strip()
    arg = s.split(":", 1)[1].strip() if ":" in s else ""
    if not arg:
        raise UserError(f"operator {s!r} names no kind; use {ARITH_HELP}")
    kind, A = arg, 1.0
    if "*" in arg:
        kind, a = (p.strip() for p in arg.split("*", 1))
        if not re.fullmatch(_NUM, a):
            raise UserError(f"operator {s!r}: {a!r} is not a number; use {ARITH_HELP}")
        A = float(a)
        if not math.isfinite(A) or A < 0:
            raise UserError(f"operator {s!r}: the strength {a} must be a finite number >= 0 (to steer the other "
                            "way, swap source and target)")
    if kind not in ARITH_KINDS:
        raise UserError(f"operator {s!r}: unknown language-arithmetic kind {kind!r}; use {ARITH_HELP}")
    return ArithOperator(spec=s, kind=kind, strength=A)


# ------------------------------------------------------------------------------------------ statistics
_STAT_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _stats_label(stats) -> str:
    d = getattr(stats, "directory", None)
    return str(d) if d is not None else "the given statistics"


def statistic(stats, language: str, name: str, operator: str = "") -> torch.Tensor:
    """Per-neuron statistic ``name`` of ``language`` as float64 ``[L, I]`` (cached per object).

    Raises UserError naming the missing statistic and how to collect it.
    """
    ls = stats.get(language)
    cache = _STAT_CACHE.setdefault(ls, {})
    if name in cache:
        return cache[name]
    where = f"operator {operator!r} needs" if operator else "this needs"
    if name == "mean":
        v = ls.mean()
    elif name == "std":
        v = ls.std()
    elif name in ("min", "max"):
        v = (ls.vmin if name == "min" else ls.vmax).double()
    elif name in ("p_max", "p_median"):
        if ls.max_sentences == 0 or int(ls.n_sentences) == 0:
            raise UserError(f"{where} the statistic {name} (per-sentence mean activations), which "
                            f"{_stats_label(stats)} lacks for {language!r}; collect statistics with "
                            "'langneurons collect --unit sentence --sentences 100' and pass that directory")
        pm, pmed = ls.sentence_patch_values()
        v = (pm if name == "p_max" else pmed).double()
    else:
        m = _PCT.match(name)
        if not m:
            raise UserError(f"unknown statistic {name!r}; use one of {', '.join(STAT_NAMES)} or pXX")
        if not ls.sketch_bins:
            raise UserError(f"{where} the statistic {name} (per-neuron quantiles), but {_stats_label(stats)} "
                            f"has no quantile sketch for {language!r}; collect again with --sketch-bins 64 "
                            "(the default)")
        v = ls.quantile(float(m.group(1)) / 100.0)
    v = v.detach().to("cpu", torch.float64)
    cache[name] = v
    return v


# ------------------------------------------------------------------------------------------ the intervention
@dataclass
class _LayerPlan:
    idx: torch.Tensor                 # LongTensor [n_l], on the layer's device
    val: Optional[torch.Tensor]       # [n_l] values (set/add from stats or constants), or None


@dataclass
class Intervention:
    """One intervention: neurons of ``languages`` in ``neurons``, written by ``operator`` at ``site``.

    Parameters (see the module docstring for the exact semantics): ``neurons`` (a NeuronSet),
    ``languages`` (whose neurons; their union is written), ``operator`` (spec string),
    ``stats`` (ActivationStats; needed by statistic operators), ``site`` (``pre`` | ``act`` |
    ``product``), ``positions`` (``all`` | ``prompt`` | ``generated`` | ``last``),
    ``stats_language`` (``None``: each neuron's own language, mean over several), ``stats_site``
    (``None``: must equal ``site``; ``"pre"``: [M25] replication), ``layers`` (restrict to these
    layers; ``None`` = all), ``batch_scope`` (``batch`` | ``sequence``, batch operators only),
    ``exclude`` (languages whose neurons are left out of the written set, e.g. the target of
    language arithmetic; ``None``: none).
    """

    neurons: NeuronSet
    languages: Sequence[str]
    operator: str
    stats: object = None
    site: str = "act"
    positions: str = "all"
    stats_language: Optional[str] = None
    stats_site: Optional[str] = None
    layers: Optional[Sequence[int]] = None
    batch_scope: str = "batch"
    exclude: Optional[Sequence[str]] = None
    op: Operator = field(init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.neurons, NeuronSet):
            raise UserError(f"Intervention needs a NeuronSet, got {type(self.neurons).__name__}; "
                            "load one with NeuronSet.load(path)")
        if isinstance(self.languages, str):
            self.languages = [c.strip() for c in self.languages.split(",") if c.strip()]
        self.languages = list(self.languages)
        if not self.languages:
            raise UserError("an intervention needs at least one language whose neurons it writes")
        if len(set(self.languages)) != len(self.languages):
            raise UserError(f"a language is named twice in {self.languages}")
        if isinstance(self.exclude, str):
            self.exclude = [c.strip() for c in self.exclude.split(",") if c.strip()]
        self.exclude = list(self.exclude) if self.exclude else None
        for code in self.languages + (self.exclude or []):
            if code not in self.neurons.neurons:
                raise UserError(f"unknown language {code!r}: the neuron set {self.neurons.name} has "
                                f"{', '.join(self.neurons.languages) or 'no languages'}; pick one of those")
        self.op = parse_operator(self.operator)
        self.operator = self.op.spec
        check_site(self.site)
        if self.positions not in POSITIONS:
            raise UserError(f"unknown positions {self.positions!r}; use one of {', '.join(POSITIONS)}")
        if self.batch_scope not in BATCH_SCOPES:
            raise UserError(f"unknown batch scope {self.batch_scope!r}; use one of {', '.join(BATCH_SCOPES)}")
        if self.layers is not None:
            self.layers = sorted({int(l) for l in self.layers})
            bad = [l for l in self.layers if not 0 <= l < self.neurons.num_layers]
            if bad:
                raise UserError(f"layers {bad} are outside 0..{self.neurons.num_layers - 1}")
        if self.op.needs_stats:
            self._check_stats()
        elif self.stats_site is not None and self.stats_site != self.site:
            raise UserError(f"stats_site={self.stats_site!r} only applies to statistic operators")

    # ---- validation ----------------------------------------------------------------------------
    def _check_stats(self) -> None:
        st = self.stats
        if st is None:
            raise UserError(f"operator {self.operator!r} needs activation statistics; pass --stats DIR "
                            "(from 'langneurons collect')")
        if (st.num_layers, st.width) != (self.neurons.num_layers, self.neurons.width):
            raise UserError(f"statistics {_stats_label(st)} are for a {st.num_layers}x{st.width} model but the "
                            f"neuron set {self.neurons.name} is {self.neurons.num_layers}x{self.neurons.width}; "
                            "use statistics and neurons of the same model")
        want = self.stats_site if self.stats_site is not None else self.site
        if self.stats_site is not None:
            check_site(self.stats_site)
            if self.stats_site not in (self.site, "pre"):
                raise UserError(f"stats_site={self.stats_site!r} differs from the written site {self.site!r}; "
                                "only stats_site='pre' (the [M25] replication option) may differ")
        if st.site != want:
            if self.stats_site is None:
                raise UserError(f"the statistics in {_stats_label(st)} were collected at site {st.site!r} but the "
                                f"intervention writes at site {self.site!r}; values must come from the same site: "
                                f"collect with --site {self.site} (or pass stats_site='pre' to replicate [M25])")
            raise UserError(f"stats_site={self.stats_site!r} but {_stats_label(st)} holds statistics of site "
                            f"{st.site!r}; collect with --site {self.stats_site}")
        sources = [self.stats_language] if self.stats_language is not None else self.languages
        for code in sources:
            if code not in st.languages:
                raise UserError(f"unknown language {code!r}: the statistics in {_stats_label(st)} hold "
                                f"{', '.join(st.languages)}; collect it first or pick another")
            statistic(st, code, self.op.stat, self.operator)  # raises if the statistic is missing

    # ---- values --------------------------------------------------------------------------------
    def selection(self) -> torch.Tensor:
        """BoolTensor ``[L, I]``: the union of the selected languages' neurons, without those of
        ``exclude`` (layer-restricted)."""
        sel = torch.zeros(self.neurons.num_layers, self.neurons.width, dtype=torch.bool)
        for code in self.languages:
            sel |= self.neurons.mask(code)
        for code in self.exclude or ():
            sel &= ~self.neurons.mask(code)
        if self.layers is not None:
            keep = torch.zeros(self.neurons.num_layers, dtype=torch.bool)
            keep[self.layers] = True
            sel &= keep[:, None]
        return sel

    def value_table(self) -> Optional[torch.Tensor]:
        """float64 ``[L, I]``: the value of every selected neuron (``set``/``add``), else ``None``.

        ``set:CONST``: the constant; ``set:STAT*A``: ``A * STAT``, with STAT from ``stats_language``
        or, by default, ``sum_k m_k STAT_k / sum_k m_k`` over the selected languages ``k`` that own
        the neuron (``m_k`` their masks).
        """
        op = self.op
        L, I = self.neurons.num_layers, self.neurons.width
        if op.source == "const" and op.mode in ("set", "add"):
            return torch.full((L, I), float(op.value), dtype=torch.float64)
        if op.source != "stat":
            return None
        if self.stats_language is not None:
            return statistic(self.stats, self.stats_language, op.stat, self.operator) * op.factor
        total = torch.zeros(L, I, dtype=torch.float64)
        count = torch.zeros(L, I, dtype=torch.float64)
        for code in self.languages:
            m = self.neurons.mask(code)
            if not bool(m.any()):
                continue
            total += torch.where(m, statistic(self.stats, code, op.stat, self.operator), 0.0)
            count += m.double()
        return total / count.clamp_min(1) * op.factor

    def plan(self, adapter: Adapter) -> dict[int, _LayerPlan]:
        """``{layer: (idx, val)}`` for the layers with selected neurons, on each layer's device."""
        self.neurons.validate_for(adapter.num_layers, adapter.width)
        sel = self.selection()
        vals = self.value_table()
        out = {}
        for l in range(adapter.num_layers):
            idx = sel[l].nonzero().flatten()
            if idx.numel() == 0:
                continue
            w = adapter.layers[l].down.weight
            device = w.device
            dtype = w.dtype if w.dtype.is_floating_point else torch.float32
            val = vals[l, idx].to(device=device, dtype=dtype) if vals is not None else None
            out[l] = _LayerPlan(idx=idx.to(device), val=val)
        return out

    def describe(self) -> str:
        minus = f"-{'-'.join(self.exclude)}" if self.exclude else ""
        return f"{self.operator}[{'+'.join(self.languages)}{minus}]@{self.site}/{self.positions}"

    # ---- serialisation -------------------------------------------------------------------------
    def _neuron_digest(self) -> str:
        rows = {c: self.neurons.neurons[c].tolist() for c in self.languages + (self.exclude or [])}
        return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        """A JSON-ready record; :meth:`from_dict` rebuilds it given the same neurons and statistics."""
        ns = self.neurons
        return {
            "format": INTERVENTION_FORMAT,
            "operator": self.operator,
            "languages": list(self.languages),
            "site": self.site,
            "positions": self.positions,
            "stats_language": self.stats_language,
            "stats_site": self.stats_site,
            "layers": list(self.layers) if self.layers is not None else None,
            "batch_scope": self.batch_scope,
            **({"exclude": list(self.exclude)} if self.exclude else {}),
            "neurons": {"path": str(ns.path) if ns.path is not None else None, "method": ns.method.get("name"),
                        "model": dict(ns.model), "digest": self._neuron_digest(),
                        "counts": {c: ns.total(c) for c in self.languages}},
            "stats": (None if self.stats is None else
                      {"directory": str(self.stats.directory) if getattr(self.stats, "directory", None) else None,
                       "fingerprint": self.stats.fingerprint, "site": self.stats.site}),
        }

    @classmethod
    def from_dict(cls, d: dict, neurons: Optional[NeuronSet] = None, stats=None) -> "Intervention":
        """Rebuild from :meth:`to_dict`; ``neurons``/``stats`` default to the recorded paths."""
        if not isinstance(d, dict) or d.get("format") != INTERVENTION_FORMAT:
            raise UserError(f"not an intervention record (format {INTERVENTION_FORMAT}); "
                            "make one with Intervention.to_dict()")
        if d.get("unit") == "direction":
            raise UserError("this intervention record adds a residual-stream direction; rebuild it with "
                            "langneurons.directions.DirectionIntervention.from_dict(record)")
        if d.get("unit") == "head":
            raise UserError("this intervention record writes attention heads; rebuild it with "
                            "langneurons.heads.HeadIntervention.from_dict(record)")
        nrec = d.get("neurons") or {}
        if neurons is None:
            if not nrec.get("path"):
                raise UserError("the intervention record names no neuron-set file; pass neurons=NeuronSet.load(...)")
            neurons = NeuronSet.load(nrec["path"])
        srec = d.get("stats")
        if stats is None and srec and srec.get("directory") and parse_operator(d["operator"]).needs_stats:
            from .stats import ActivationStats
            stats = ActivationStats.load(srec["directory"])
        if stats is not None and srec and srec.get("fingerprint") and stats.fingerprint != srec["fingerprint"]:
            raise UserError(f"the intervention was made with statistics {srec.get('directory')} "
                            f"(fingerprint {srec['fingerprint']}) but {_stats_label(stats)} has fingerprint "
                            f"{stats.fingerprint}; pass the same statistics")
        iv = cls(neurons=neurons, languages=d["languages"], operator=d["operator"], stats=stats,
                 site=d.get("site", "act"), positions=d.get("positions", "all"),
                 stats_language=d.get("stats_language"), stats_site=d.get("stats_site"), layers=d.get("layers"),
                 batch_scope=d.get("batch_scope", "batch"), exclude=d.get("exclude"))
        if nrec.get("digest") and iv._neuron_digest() != nrec["digest"]:
            raise UserError(f"the neuron set {neurons.name} differs from the one the intervention was made with "
                            f"(languages {', '.join(iv.languages)}); pass the same neuron set")
        return iv


# ------------------------------------------------------------------------------------------ language arithmetic
@dataclass
class ArithmeticIntervention:
    """Language arithmetic (module docstring): deactivate the neurons of ``sources``, activate those
    of ``target``, in one forward pass.

    ``operator``: ``arith:add[*A]`` | ``arith:mul[*A]``; ``stats``: ActivationStats of ``site``
    (the per-neuron means; ``arith:add`` only); ``sources``: the languages deactivated (several:
    their union; empty: only the target part); ``site``, ``positions``, ``layers``: as in
    :class:`Intervention`, shared by both parts. ``parts`` holds the two :class:`Intervention`
    objects in the order they are installed: the source part (``sources``' neurons without the
    target's), then the target part.
    """

    neurons: NeuronSet
    target: str
    sources: Sequence[str]
    operator: str = "arith:add"
    stats: object = None
    site: str = "act"
    positions: str = "all"
    layers: Optional[Sequence[int]] = None
    arith: ArithOperator = field(init=False, repr=False)
    parts: list = field(init=False, repr=False)

    def __post_init__(self):
        self.arith = parse_arith(self.operator)
        self.operator = self.arith.spec
        if isinstance(self.sources, str):
            self.sources = [c.strip() for c in self.sources.split(",") if c.strip()]
        self.sources = list(self.sources)
        if self.target in self.sources:
            raise UserError(f"language arithmetic {self.operator!r}: the target {self.target!r} is also a source "
                            "language; the source languages are deactivated, the target activated")
        if self.arith.needs_stats and self.stats is None:
            raise UserError(f"operator {self.operator!r} needs activation statistics (the per-neuron mean of each "
                            "language); pass --stats DIR (from 'langneurons collect')")
        common = dict(stats=self.stats, site=self.site, positions=self.positions, layers=self.layers)
        parts = []
        if self.sources:
            parts.append(Intervention(self.neurons, self.sources, self.arith.source_operator, exclude=[self.target],
                                      **common))
        parts.append(Intervention(self.neurons, [self.target], self.arith.target_operator, **common))
        self.parts = parts

    def for_source(self, source: Union[str, Sequence[str]]) -> "ArithmeticIntervention":
        """The same arithmetic from other source language(s) (e.g. a prompt's language)."""
        return ArithmeticIntervention(self.neurons, self.target, [source] if isinstance(source, str) else source,
                                      self.operator, stats=self.stats, site=self.site, positions=self.positions,
                                      layers=self.layers)

    def describe(self) -> str:
        return f"{self.operator}[{'+'.join(self.sources) or '-'}->{self.target}]@{self.site}/{self.positions}"


# ------------------------------------------------------------------------------------------ batch statistics
def _sorted_quantile(xs: torch.Tensor, count: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolation quantile of sorted rows: ``xs [R, P, n]`` sorted on dim 1, the first
    ``count[r]`` entries of row ``r`` valid. Returns ``[R, n]``: ``x_(lo) + (h - lo)(x_(hi) - x_(lo))``
    with ``h = q (c - 1)``, ``lo = floor(h)``, ``hi = ceil(h)``.
    """
    c = count.clamp_min(1).double()
    h = q * (c - 1)
    lo = h.floor().long()
    hi = h.ceil().long()
    n = xs.shape[-1]
    g_lo = xs.gather(1, lo.view(-1, 1, 1).expand(-1, 1, n)).squeeze(1)
    g_hi = xs.gather(1, hi.view(-1, 1, 1).expand(-1, 1, n)).squeeze(1)
    w = (h - lo.to(h.dtype)).view(-1, 1).to(xs.dtype)
    return g_lo + w * (g_hi - g_lo)


def batch_statistic(x: torch.Tensor, real: Optional[torch.Tensor], name: str) -> torch.Tensor:
    """Per-row, per-neuron statistic of ``x [R, P, n]`` over the positions where ``real [R, P]``.

    ``name``: ``max``, ``min``, ``mean`` or ``pXX``. Returns ``[R, n]`` in ``x``'s dtype (0 for a row
    without a real position); computed in at least float32.
    """
    dtype = x.dtype
    x = x.to(torch.promote_types(dtype, torch.float32))
    R, P, n = x.shape
    if real is None:
        real = torch.ones(R, P, dtype=torch.bool, device=x.device)
    r3 = real.unsqueeze(-1)
    count = real.sum(1)
    if name == "max":
        out = x.masked_fill(~r3, float("-inf")).amax(1)
    elif name == "min":
        out = x.masked_fill(~r3, float("inf")).amin(1)
    elif name == "mean":
        out = x.masked_fill(~r3, 0).sum(1) / count.clamp_min(1).unsqueeze(-1).to(x.dtype)
    else:
        q = float(_PCT.match(name).group(1)) / 100.0
        xs = x.masked_fill(~r3, float("inf")).sort(dim=1).values
        out = _sorted_quantile(xs, count, q)
    return torch.where((count > 0).unsqueeze(-1), out, torch.zeros_like(out)).to(dtype)


# ------------------------------------------------------------------------------------------ the controller
@dataclass
class _Call:
    B: int
    T: int
    past: int
    real: Optional[torch.Tensor]      # Bool [B, T] or None (every position real)
    device: torch.device
    masks: dict = field(default_factory=dict)


@dataclass
class _Session:
    prompt_len: Optional[int] = None
    frozen: dict = field(default_factory=dict)


_EMPTY = "empty"


class Controller:
    """What ``intervene`` yields: per-call state and knobs.

    ``prompt_length``: for calls outside ``generate``, positions ``>= prompt_length`` count as
    generated (``None``: every position is prompt). ``calls``: per intervention, the per-layer count
    of writer calls. ``batch_values``: the last batch statistic per ``(intervention index, layer)``.
    """

    def __init__(self, model, adapter: Adapter, interventions: list):
        self.model = model
        self.adapter = adapter
        self.interventions = interventions
        self.prompt_length: Optional[int] = None
        self.calls: list[list[int]] = []
        self.batch_values: dict = {}
        self._call: Optional[_Call] = None
        self._depth = 0
        self._session: Optional[_Session] = None
        self._fwd_names: dict[int, list[str]] = {}

    # ---- per-call state ----------------------------------------------------------------------
    def _names(self, module) -> list[str]:
        key = id(module)
        if key not in self._fwd_names:
            try:
                params = inspect.signature(module.forward).parameters.values()
                self._fwd_names[key] = [p.name for p in params
                                        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            except (TypeError, ValueError):
                self._fwd_names[key] = []
        return self._fwd_names[key]

    def _pre_hook(self, module, args, kwargs):
        self._depth += 1
        if self._depth > 1:
            return None
        named = dict(zip(self._names(module), args))
        named.update(kwargs)
        ids = named.get("input_ids")
        emb = named.get("inputs_embeds")
        ref = ids if isinstance(ids, torch.Tensor) else emb
        if not isinstance(ref, torch.Tensor):
            self._call = None
            return None
        if ref is ids:
            B, T = (1, ref.shape[0]) if ref.dim() == 1 else (ref.shape[0], ref.shape[-1])
        else:
            B, T = ref.shape[0], ref.shape[-2]
        am = named.get("attention_mask")
        real = None
        past = None
        cp = named.get("cache_position")
        if isinstance(cp, torch.Tensor) and cp.numel() > 0:
            past = int(cp.reshape(-1)[0])
        if isinstance(am, torch.Tensor) and am.dim() == 2 and am.shape[-1] >= T:
            cur = am[:, am.shape[-1] - T:].bool()
            if not bool(cur.all()):
                real = cur
            if past is None:
                past = am.shape[-1] - T
        if past is None:
            pkv = named.get("past_key_values")
            get = getattr(pkv, "get_seq_length", None)
            past = int(get()) if callable(get) else 0
        self._call = _Call(B=B, T=T, past=past, real=real, device=ref.device)
        s = self._session
        if s is not None and s.prompt_len is None:
            s.prompt_len = past + T
        return None

    def _post_hook(self, module, args, kwargs, output):
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            self._call = None
        return None

    def positions_mask(self, kind: str):
        """Bool ``[B, T]`` of the current call's written positions, ``None`` (all) or ``"empty"``."""
        c = self._call
        if c is None:
            if kind == "all":
                return None
            raise UserError(f"positions={kind!r} needs the attention mask of the forward call, but the hooks ran "
                            "outside a call of the model given to intervene(); call that model itself")
        if kind in c.masks:
            return c.masks[kind]
        real = c.real
        if kind == "all":
            m = real
        else:
            P = self._session.prompt_len if self._session is not None else self.prompt_length
            in_gen = self._session is not None
            pos = torch.arange(c.past, c.past + c.T, device=c.device)
            if kind == "last" and not in_gen:
                if real is None:
                    last = torch.full((c.B,), c.T - 1, device=c.device)
                else:
                    ar = torch.arange(c.T, device=c.device)
                    last = torch.where(real, ar, torch.full_like(ar, -1)).amax(1)
                m = torch.arange(c.T, device=c.device)[None, :] == last[:, None]
            else:
                if P is None:
                    cols = torch.full((c.T,), kind == "prompt", dtype=torch.bool, device=c.device)
                elif kind == "prompt":
                    cols = pos < P
                elif kind == "generated":
                    cols = pos >= P
                else:  # last, inside generate
                    cols = pos >= P - 1
                m = cols[None, :].expand(c.B, c.T)
                if real is not None:
                    m = m & real
            if bool(m.all()):
                m = None
        if m is not None and not bool(m.any()):
            m = _EMPTY
        c.masks[kind] = m
        return m

    # ---- writers -------------------------------------------------------------------------------
    def _batch_value(self, k: int, iv: Intervention, layer: int, sel: torch.Tensor) -> torch.Tensor:
        """The batch statistic of ``sel`` (selected activations, current call), ``[B or 1, n]``."""
        s = self._session
        key = (k, layer)
        if s is not None and key in s.frozen:
            return s.frozen[key]
        c = self._call
        n = sel.shape[-1]
        if c is None:
            x = sel.reshape(1, -1, n)
            real = None
        else:
            x = sel.reshape(c.B, c.T, n)
            real = c.real
            if iv.batch_scope == "batch":
                x = x.reshape(1, c.B * c.T, n)
                real = real.reshape(1, -1) if real is not None else None
        v = batch_statistic(x, real, iv.op.stat) * iv.op.factor
        if s is not None:
            s.frozen[key] = v
        self.batch_values[key] = v
        return v

    def make_writer(self, k: int, iv: Intervention, plan: dict[int, _LayerPlan]):
        op = iv.op

        def fn(layer: int, t: torch.Tensor):
            lp = plan[layer]
            idx = lp.idx
            if idx.device != t.device:
                lp.idx = idx = idx.to(t.device)
            pos = self.positions_mask(iv.positions)
            if pos is _EMPTY and not op.is_batch:
                return None
            lead = t.shape[:-1]
            n = idx.numel()
            if op.is_batch:
                sel = t.index_select(-1, idx)
                v = self._batch_value(k, iv, layer, sel)            # [1 or B, n]
                if pos is _EMPTY:
                    return None
                c = self._call
                if v.shape[0] == 1 or c is None:
                    v = v.reshape(n)
                else:
                    v = v.view(c.B, 1, n).expand(c.B, c.T, n).reshape(*lead, n)
                new = v.expand(*lead, n) if op.mode == "set" else sel + v
            else:
                val = lp.val
                if val is not None and (val.dtype != t.dtype or val.device != t.device):
                    lp.val = val = val.to(device=t.device, dtype=t.dtype)
                if op.mode == "set":
                    new = val.expand(*lead, n)
                    sel = None
                else:
                    sel = t.index_select(-1, idx)
                    new = sel * op.value if op.mode == "scale" else sel + val
            if pos is not None:
                pm = pos.reshape(*lead, 1)
                if sel is None:
                    sel = t.index_select(-1, idx)
                new = torch.where(pm, new, sel)
            if t.requires_grad:
                return t.index_copy(-1, idx, new.to(t.dtype))
            t.index_copy_(-1, idx, new.to(t.dtype) if new.dtype != t.dtype else new)
            return t

        return fn

    def make_direction_writer(self, iv: DirectionIntervention, plan: dict[int, torch.Tensor]):
        """``h <- h + delta_l`` at the positions of ``iv`` (a new tensor; unselected positions keep ``h``)."""
        def fn(layer: int, h: torch.Tensor):
            d = plan[layer]
            if d.device != h.device or d.dtype != h.dtype:
                plan[layer] = d = d.to(device=h.device, dtype=h.dtype)
            pos = self.positions_mask(iv.positions)
            if pos is _EMPTY:
                return None
            new = h + d
            if pos is not None:
                new = torch.where(pos.reshape(*h.shape[:-1], 1), new, h)
            return new

        return fn

    # ---- installation --------------------------------------------------------------------------
    def install(self, stack: contextlib.ExitStack) -> None:
        model = self.model
        targets = [model]
        base = getattr(model, "base_model", None)
        if isinstance(base, torch.nn.Module) and base is not model:
            targets.append(base)
        for mod in targets:
            h1 = mod.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
            stack.callback(h1.remove)
            h2 = mod.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True)
            stack.callback(h2.remove)
        self._patch_generate(stack)
        for k, iv in enumerate(self.interventions):
            if isinstance(iv, HeadIntervention):
                hplan = iv.plan(self.adapter)
                if not hplan:
                    self.calls.append([0] * self.adapter.num_layers)
                    continue
                calls = stack.enter_context(write_heads(self.adapter, self.make_writer(k, iv, hplan), sorted(hplan)))
                self.calls.append(calls)
                continue
            if isinstance(iv, DirectionIntervention):
                dplan = iv.plan(self.adapter)
                calls = stack.enter_context(write_residual(self.adapter, self.make_direction_writer(iv, dplan),
                                                           sorted(dplan)))
                self.calls.append(calls)
                continue
            if iv.op.needs_stats and iv.stats is None:
                raise UserError(f"operator {iv.operator!r} needs statistics")
            plan = iv.plan(self.adapter)
            if not plan:
                self.calls.append([0] * self.adapter.num_layers)
                continue
            calls = stack.enter_context(write(self.adapter, iv.site, self.make_writer(k, iv, plan), sorted(plan)))
            self.calls.append(calls)

    def _patch_generate(self, stack: contextlib.ExitStack) -> None:
        model = self.model
        original = getattr(model, "generate", None)
        if original is None:
            return
        had_attr = "generate" in vars(model)
        ctl = self

        def generate(*args, **kwargs):
            outer = ctl._session
            ctl._session = _Session()
            try:
                return original(*args, **kwargs)
            finally:
                ctl._session = outer

        model.generate = generate

        def restore():
            if had_attr:
                model.generate = original
            else:
                try:
                    del model.generate
                except AttributeError:
                    pass
        stack.callback(restore)


@contextlib.contextmanager
def intervene(model, interventions: Union[Intervention, DirectionIntervention, ArithmeticIntervention,
                                          Sequence[Union[Intervention, DirectionIntervention,
                                                         ArithmeticIntervention]]],
              adapter: Optional[Adapter] = None) -> Iterator[Controller]:
    """Apply one intervention or a list of them (in list order) to every forward pass of ``model``:
    neuron interventions (:class:`Intervention`), language arithmetic (:class:`ArithmeticIntervention`,
    installed as its ``parts``: the controller's ``calls`` has one entry per part), residual-stream
    directions (:class:`~langneurons.directions.DirectionIntervention`) and attention heads
    (:class:`~langneurons.heads.HeadIntervention`: zero or scale the heads' slices of the attention output
    projection's input, written like neuron activations), mixed freely.

    Hooks are removed and ``model.generate`` restored on exit, also on exceptions.
    """
    single = isinstance(interventions, (Intervention, DirectionIntervention, ArithmeticIntervention,
                                        HeadIntervention))
    ivs = []
    for iv in ([interventions] if single else list(interventions)):
        if isinstance(iv, ArithmeticIntervention):
            ivs.extend(iv.parts)                      # source part, then target part
        elif isinstance(iv, (Intervention, DirectionIntervention, HeadIntervention)):
            ivs.append(iv)
        else:
            raise TypeError("intervene() takes Intervention, ArithmeticIntervention, DirectionIntervention or "
                            f"HeadIntervention objects, got {type(iv).__name__}")
    adapter = adapter if adapter is not None else Adapter(model)
    ctl = Controller(model, adapter, ivs)
    with contextlib.ExitStack() as stack:
        ctl.install(stack)
        yield ctl


# ------------------------------------------------------------------------------------------ stacked rows
class RowController:
    """Per-sequence interventions for one forward pass: sequence ``b`` gets row ``row_of[b]``.

    Used by the perplexity matrix to run several rows (intervened languages) in one pass. Each row
    is an Intervention (or ``None``: untouched) with a non-batch operator and ``positions="all"``.
    Every such operator is affine in the activation, so per layer the rows are three dense tables
    over the neurons: ``S [R, I]`` (selected), ``A [R, I]`` and ``C [R, I]`` with
    ``new = where(S[r], a * A[r] + C[r], a)`` (``zero``: A = 0, C = 0; ``set:v``: A = 0, C = v;
    ``scale:s``: A = s, C = 0; ``add:v``: A = 1, C = v). Pad positions are never written.
    """

    def __init__(self, model, adapter: Adapter, rows: list[Optional[Intervention]]):
        self.model = model
        self.adapter = adapter
        self.rows = rows
        self.row_of: Optional[torch.Tensor] = None
        self._inner = Controller(model, adapter, [])
        self.tables: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        L, I = adapter.num_layers, adapter.width
        R = len(rows)
        S = torch.zeros(R, L, I, dtype=torch.bool)
        A = torch.ones(R, L, I, dtype=torch.float64)
        C = torch.zeros(R, L, I, dtype=torch.float64)
        for r, iv in enumerate(rows):
            if iv is None:
                continue
            if isinstance(iv, DirectionIntervention):
                raise UserError("stacked rows take neuron interventions only; apply a direction intervention "
                                "with intervene() / Session.intervened()")
            if isinstance(iv, HeadIntervention):
                raise UserError("stacked rows take neuron interventions only; apply a head intervention "
                                "with intervene() / Session.intervened()")
            if isinstance(iv, ArithmeticIntervention):
                raise UserError("stacked rows take single-set neuron interventions; apply language arithmetic "
                                "with intervene() / Session.intervened()")
            if iv.op.is_batch:
                raise UserError(f"operator {iv.operator!r} uses batch statistics, which depend on the other rows of "
                                "a stacked pass; use a statistic or constant operator here")
            if iv.positions != "all":
                raise UserError("stacked rows support positions='all' only")
            iv.neurons.validate_for(L, I)
            sel = iv.selection()
            vals = iv.value_table()
            S[r] = sel
            if iv.op.mode == "set":
                A[r][sel] = 0.0
                C[r][sel] = vals[sel]
            elif iv.op.mode == "scale":
                A[r][sel] = iv.op.value
            else:
                C[r][sel] = vals[sel]
        for l in range(L):
            if bool(S[:, l].any()):
                w = adapter.layers[l].down.weight
                dt = w.dtype if w.dtype.is_floating_point else torch.float32
                self.tables[l] = (S[:, l].to(w.device), A[:, l].to(w.device, dt), C[:, l].to(w.device, dt))
        self.sites = sorted({iv.site for iv in rows if iv is not None}) or ["act"]
        if len(self.sites) > 1:
            raise UserError("stacked rows must all write the same site")

    def _writer(self, layer: int, t: torch.Tensor):
        if self.row_of is None:
            raise RuntimeError("RowController: call ctl.assign(row_of) before the forward pass")
        c = self._inner._call
        S, A, C = self.tables[layer]
        if S.device != t.device or A.dtype != t.dtype:
            S, A, C = S.to(t.device), A.to(t.device, t.dtype), C.to(t.device, t.dtype)
            self.tables[layer] = (S, A, C)
        r = self.row_of.to(t.device)
        B = r.shape[0]
        I = t.shape[-1]
        t3 = t.reshape(B, -1, I)
        s = S[r].unsqueeze(1)                          # [B, 1, I]
        if c is not None and c.real is not None:
            s = s & c.real.reshape(B, -1, 1)
        new = torch.where(s, t3 * A[r].unsqueeze(1) + C[r].unsqueeze(1), t3)
        return new.reshape(t.shape)

    def assign(self, row_of) -> None:
        """Row index of every sequence of the next forward pass (LongTensor ``[B]``)."""
        self.row_of = torch.as_tensor(row_of, dtype=torch.long)

    def install(self, stack: contextlib.ExitStack) -> None:
        self._inner.install(stack)
        if self.tables:
            stack.enter_context(write(self.adapter, self.sites[0], self._writer, sorted(self.tables)))


@contextlib.contextmanager
def intervene_rows(model, rows: list[Optional[Intervention]], adapter: Optional[Adapter] = None
                   ) -> Iterator[RowController]:
    """Stacked interventions: ``ctl.assign(row_of)`` then one forward pass serves several rows."""
    adapter = adapter if adapter is not None else Adapter(model)
    ctl = RowController(model, adapter, rows)
    with contextlib.ExitStack() as stack:
        ctl.install(stack)
        yield ctl
