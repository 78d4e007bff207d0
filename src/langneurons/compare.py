"""One scoreboard for every way of localising a language: neuron sets under steering operators, their
matched random controls, residual-stream DiffMean directions, language arithmetic and attention-head
sets, measured by **one** code path (``langneurons compare``).

Methods
-------
Each method gives, per target language ``t``, a *steering* intervention, a *deactivation*
intervention and a *budget*:

* ``NAME:OP`` (a neuron set given as ``--neurons NAME=FILE``, a steering operator): steering writes
  ``t``'s neurons of NAME with ``OP``; deactivation writes ``zero`` into them; budget ``|N(t)|`` neurons.
* ``random:NAME``: the same operator on a matched random control of NAME
  (:func:`~langneurons.neuronset.random_control`, one per ``--random-seeds`` seed; the per-unit values
  are averaged over the seeds); deactivation ``zero`` on the control's neurons; the same budget.
* ``diffmean``: steering ``h_L <- h_L + alpha * rbar_L * v_L(t) / ||v_L(t)||``
  (:class:`~langneurons.directions.DirectionIntervention` with ``normalise=True``); deactivation the
  directional ablation ``h_L <- h_L - (h_L . u) u``, ``u = v_L(t) / ||v_L(t)||``
  (:class:`DirectionAblation`); budget one direction, ``H`` numbers.
* ``arith:add[*A]``, ``arith:mul[*A]`` (``NAME:arith:...`` for a set other than the first): language
  arithmetic (:class:`~langneurons.intervene.ArithmeticIntervention`, built by
  :func:`langneurons.steer.build_interventions`): the other targets' neurons down, ``t``'s up;
  deactivation ``zero`` on ``t``'s neurons (the rows of ``NAME:OP``); budget ``|N(t) u N(others)|``.
* ``heads:NAME`` (a head set given as ``--heads NAME=FILE``, from ``langneurons heads identify``):
  steering ``HeadIntervention(heads, t, "scale:A")``, ``z_h <- A z_h`` so ``c_h <- A c_h`` for every head
  ``h`` of ``t`` (``A`` = ``--head-scale``, default :data:`DEFAULT_HEAD_SCALE` = 2): amplifying the target's
  heads is the head analogue of activating its neurons (a head has no natural "on" value to set, only
  its contribution to scale); deactivation ``HeadIntervention(heads, t, "zero")`` (``c_h <- 0``);
  budget ``|Heads(t)|`` heads (units) and ``|Heads(t)| * head_dim * H`` parameters (the columns of the
  attention output projection ``W_O`` the heads' outputs pass through).
* ``random-heads:NAME``: the same on a matched random control of the head set
  (:func:`random_head_control`: per language and layer as many heads as NAME has there, drawn
  uniformly without replacement among that layer's heads of **no** language of NAME; one per
  ``--random-seeds`` seed, seeded as :func:`~langneurons.neuronset.random_control` is); the same budget.

Steering operators of neuron methods (``--operator``): ``set:p_max`` when sentence statistics are
given ([R25]'s choice: per neuron the largest per-sentence mean activation of ``t``), else
``set:max`` with window statistics (the largest activation of ``t``'s tokens, the window-statistic
counterpart), else ``scale:4`` (no statistics needed). ``p_max``/``p_median`` values come from
``--sentence-stats``, every other statistic from ``--stats`` (or the sentence statistics when that
is all there is). Head sets are written at every non-pad position (``positions="all"``, as neuron
steering). Language arithmetic is used only when the installed
:mod:`langneurons.intervene` provides it (``steer.build_interventions`` builds it); otherwise the
method is listed under ``skipped`` with the reason.

DiffMean layer ``L`` (``--direction-layer``; default chosen on the artifact, before any model pass):
``L = argmax_l mean_t ||v_l(t)|| / rbar_l`` over the targets ``t`` (``v`` the DiffMean over every
language of the artifact, ``rbar_l`` the artifact's mean residual norm at layer ``l``): the layer
where the languages' mean states are furthest apart relative to the stream's scale. ``alpha``
(``--alpha``, default :data:`DEFAULT_ALPHA` = 0.5) is in units of ``rbar_L``.

Metrics (per method and target; :data:`METRICS`)
------------------------------------------------
Every number ``x`` comes with ``x_ci95``, the 95% percentile bootstrap interval of
:mod:`langneurons.uncertainty` (``B = 2000`` replicates, seeded with ``--seed``), resampling the
metric's own units: generation runs (``N = prompts x samples``, run ``i`` has the same prompt and
sampling seed for every method and for the unsteered model, so deltas are paired), held-out windows
(:func:`langneurons.ppl.replicate_nll`: one draw per column shared by every row, so ΔNLL is paired
with the baseline) or cloze items (:func:`langneurons.steer.lss_intervals`). The mean over targets
(``summary``) uses the same draws for every target (runs and windows are shared), so its interval
is joint. A method with several replicas (the random control's seeds) averages the per-unit values
over the replicas before resampling.

* ``share``: fraction of the ``N`` generations from neutral prompts identified as ``t`` (langid,
  restricted to the targets) under ``t``'s steering (:func:`langneurons.steer.generation_shares`);
  ``share_delta = share - share`` of the same runs unsteered.
* ``lss`` (with ``--cloze``/``--muse``): ``lss_by_target[t]`` of :func:`langneurons.steer.lss`, the
  mean over sources ``s != t`` of ``mean_i [D1 - D0 > 0]``.
* ``fluency_nll``: the steered generations scored by the **unsteered** model:
  ``sum_i NLL_i / sum_i m_i`` with ``NLL_i = -sum_j log p(x_j | <s>, x_<j)`` over the ``m_i`` tokens of
  generation ``i`` re-tokenised after the start token ``<s>`` (empty generations count 0 tokens);
  ``fluency_delta`` = that minus the same quantity of the unsteered generations (paired by run).
* ``steer_own_dnll`` / ``steer_other_dnll``: ``ΔNLL_u = NLL_u(intervention) - NLL_u(baseline)``, the
  mean NLL per predicted token of language ``u``'s held-out windows (:mod:`langneurons.ppl`), under
  ``t``'s steering, for ``u = t`` and averaged over every held-out language ``u != t`` (collateral).
* ``deact_own_dnll`` / ``deact_other_dnll``: the same under ``t``'s deactivation;
  ``deact_selectivity = own - other``; ``deact_own_vs_random`` (neuron and head methods):
  ``deact_own_dnll`` minus the mean over ``--random-seeds`` of ``ΔNLL_t`` with ``zero`` on a matched
  random control of the same neuron (head) set (paired over windows, seeds averaged, not resampled);
  ``None`` when no control can be drawn (the reason is in the method's ``details``).
* ``budget_units`` (neurons written, directions, or heads) and ``budget_params`` (neurons: one number
  per neuron written per position; directions: ``H`` per residual direction; heads: the parameters of
  ``W_O`` touched, ``head_dim * H`` per head); exact, no interval.

Windows under neuron interventions are scored in stacked passes
(:func:`langneurons.ppl.perplexity_matrix`); direction, head, arithmetic and batch-statistic rows
cannot be stacked and run one :func:`intervened` pass each, through the same token-NLL pass.

Output: ``compare.json`` (``"format": "langneurons.compare.v1"``)::

    {"methods": [...], "targets": [...], "metrics": {name: definition},
     "rows": [{"method", "target", "kind", METRIC: value, METRIC_ci95: [lo, hi], ...}],
     "summary": {method: {METRIC: mean over targets, METRIC_ci95: [lo, hi]}},
     "baseline": {...unsteered shares, fluency and held-out NLL...},
     "details": {method: {...what was written...}}, "skipped": {method: reason},
     "generations": {"prompts": [...], "baseline": [...], "steered": {method: {t: [[texts of replica k]]}}},
     "settings": {...}}

and ``compare.png`` (per method: target share against collateral ΔNLL under steering, and own
against other-language ΔNLL under deactivation, with 95% interval bars).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .artifacts import COMPARE_FORMAT
from .errors import UserError

#: Metric name -> definition (the ``--help`` text, ``compare.json``'s ``metrics`` and the report).
METRICS = {
    "share": "target share of sampled generations from neutral prompts under t's steering (langid among "
             "the targets): (1/N) sum_i [label_i = t]",
    "share_delta": "share - share of the same runs unsteered (paired by run)",
    "lss": "Language Steering Shift toward t on cloze items: mean over sources s != t of "
           "mean_i [D1 - D0 > 0], D = ll(o_t | q_s) - ll(o_s | q_s)",
    "fluency_nll": "steered generations under the UNSTEERED model: sum_i NLL_i / sum_i m_i, NLL_i = "
                   "-sum_j log p(x_j | <s>, x_<j) over the m_i tokens of generation i",
    "fluency_delta": "fluency_nll - the same of the unsteered generations (paired by run)",
    "steer_own_dnll": "NLL_t(steering) - NLL_t(baseline): mean NLL per token of t's held-out windows",
    "steer_other_dnll": "mean over held-out languages u != t of NLL_u(steering) - NLL_u(baseline) (collateral)",
    "deact_own_dnll": "NLL_t(deactivation) - NLL_t(baseline) on t's held-out windows",
    "deact_other_dnll": "mean over u != t of NLL_u(deactivation) - NLL_u(baseline)",
    "deact_selectivity": "deact_own_dnll - deact_other_dnll",
    "deact_own_vs_random": "deact_own_dnll - mean over random seeds of the own ΔNLL with zero on a matched "
                           "random control of the same neuron or head set (neuron and head methods)",
    "budget_units": "units written: neurons of t (neuron methods, random control), neurons of t and of the "
                    "sources (arithmetic), 1 direction (diffmean), heads of t (head methods)",
    "budget_params": "neurons: numbers written per position, 1 per neuron; diffmean: H per direction; heads: "
                     "parameters of W_O touched, heads x head_dim x H",
}
#: Metrics with a 95% interval (the budget is exact).
INTERVAL_METRICS = tuple(k for k in METRICS if not k.startswith("budget_"))
#: Neuron-set names that would clash with other methods.
RESERVED = ("random", "diffmean", "arith", "baseline", "heads", "random-heads")
#: ``--head-scale``: the factor ``A`` of the ``heads:NAME`` steering ``scale:A`` (amplify t's heads).
DEFAULT_HEAD_SCALE = 2.0
#: Measured on the demo model (10 targets, last layer): alpha 0.5 gave a mean target share of 0.76
#: [0.65, 0.85] at an other-language ΔNLL of 0.54 under steering; alpha 1, 0.86 at 2.28; alpha 4
#: wrecked the other languages (ΔNLL ~6). 0.5 is the default; sweep it on your model.
DEFAULT_ALPHA = 0.5
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


# ------------------------------------------------------------------------------------------ directional ablation
@dataclass(eq=False)
class DirectionAblation:
    """Remove a language's DiffMean direction from the residual stream output of ``layers``:
    ``h_l <- h_l - (h_l . u_l) u_l`` with ``u_l = v_l(language) / ||v_l(language)||`` (a zero vector
    leaves ``h`` unchanged). Like :class:`~langneurons.directions.DirectionIntervention` it writes the
    decoder layers' outputs (:func:`langneurons.hooks.write_residual`) at the non-pad ``positions``
    of an :class:`~langneurons.intervene.Controller`; apply it with :func:`intervened` (alone or
    mixed with any intervention ``Session.intervened`` takes)."""

    directions: object
    language: str
    layers: Sequence[int]
    contrast: Optional[Sequence[str]] = None
    positions: str = "all"
    _units: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self):
        from .directions import Directions, diffmean
        if not isinstance(self.directions, Directions):
            self.directions = Directions.load(self.directions)
        d = self.directions
        d.check_language(self.language)
        self.layers = sorted({int(l) for l in ([self.layers] if isinstance(self.layers, int) else self.layers)})
        bad = [l for l in self.layers if not 0 <= l < d.num_layers]
        if bad or not self.layers:
            raise UserError(f"ablation layers {bad or '[]'} are outside 0..{d.num_layers - 1}")
        if self.positions != "all":
            raise UserError("a directional ablation writes every non-pad position (positions='all')")
        u = diffmean(d, self.language, normalise=True, languages=self.contrast)          # [L, H] float64
        self._units = {l: u[l].clone() for l in self.layers}
        self.num_layers, self.hidden_size = d.num_layers, d.hidden_size

    def units(self) -> dict[int, torch.Tensor]:
        """``{layer: u_l}``, float64 unit vectors ``[H]``."""
        return {l: v.clone() for l, v in self._units.items()}

    def plan(self, adapter) -> dict[int, torch.Tensor]:
        L, H = adapter.num_layers, adapter.hidden_size
        if (self.num_layers, self.hidden_size) != (L, H):
            raise UserError(f"the directions ({self.num_layers}x{self.hidden_size}) do not fit this model ({L} layers, "
                            f"hidden size {H}); use directions collected from the same model")
        return {l: v.to(torch.float32) for l, v in self._units.items()}

    def writer(self, ctl, plan: dict[int, torch.Tensor]):
        def fn(layer: int, h: torch.Tensor):
            u = plan[layer]
            if u.device != h.device:
                plan[layer] = u = u.to(h.device)
            pos = ctl.positions_mask(self.positions)
            if isinstance(pos, str):                     # no position of this call is written
                return None
            x = h.to(torch.promote_types(h.dtype, torch.float32))
            new = (x - (x @ u).unsqueeze(-1) * u).to(h.dtype)
            if pos is not None:
                new = torch.where(pos.reshape(*h.shape[:-1], 1), new, h)
            return new
        return fn

    def describe(self) -> str:
        return f"ablate:diffmean[{self.language}]@residual:{','.join(map(str, self.layers))}"


@contextlib.contextmanager
def intervened(session, interventions):
    """``Session.intervened`` that also takes :class:`DirectionAblation` objects (in a list with anything
    ``Session.intervened`` takes, or alone; ``None``: nothing)."""
    from .hooks import write_residual
    from .intervene import Controller
    ivs = [] if interventions is None else (list(interventions) if isinstance(interventions, (list, tuple))
                                            else [interventions])
    ablations = [iv for iv in ivs if isinstance(iv, DirectionAblation)]
    others = [iv for iv in ivs if not isinstance(iv, DirectionAblation)]
    with contextlib.ExitStack() as stack:
        stack.enter_context(session.intervened(others or None))
        if ablations:
            ctl = Controller(session.model, session.adapter, [])     # per-call position masks only
            ctl.install(stack)
            for ab in ablations:
                plan = ab.plan(session.adapter)
                stack.enter_context(write_residual(session.adapter, ab.writer(ctl, plan), sorted(plan)))
        yield


# ------------------------------------------------------------------------------------------ methods
@dataclass
class Method:
    """One localisation method: per target, its steering interventions (one per replica: the random
    control's seeds, else one), its deactivation rows (keys of the shared window rows) and budget."""

    name: str
    kind: str                                   # neurons | random | diffmean | arith | heads | random-heads
    steer: dict = field(default_factory=dict)   # t -> [intervention per replica]
    deact: dict = field(default_factory=dict)   # t -> [row key per replica]
    control: dict = field(default_factory=dict)  # t -> [row keys of the matched random controls] (neurons, heads)
    budget: dict = field(default_factory=dict)  # t -> {"units", "params"}
    detail: dict = field(default_factory=dict)


def _finite(flag: str, text, what: str, example: float) -> float:
    """``FLAG TEXT`` -> a finite float, or one error line naming the flag and what it means."""
    try:
        a = float(str(text).strip())
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a number; give {what}, e.g. {flag} {example:g}") from None
    if not math.isfinite(a):
        raise UserError(f"{flag} {text!r} is not a finite number")
    return a


def parse_alpha(text) -> float:
    """``--alpha A`` -> ``A`` (a finite number)."""
    return _finite("--alpha", text, "the steering strength in units of the mean residual norm", DEFAULT_ALPHA)


def parse_head_scale(text) -> float:
    """``--head-scale A`` -> ``A`` (a finite number)."""
    return _finite("--head-scale", text, "the factor the target's heads are scaled by", DEFAULT_HEAD_SCALE)


def parse_named_files(specs: Sequence[str], option: str = "--neurons") -> dict[str, Path]:
    """``NAME=FILE`` arguments -> ``{NAME: Path}`` (names checked, each once)."""
    out: dict[str, Path] = {}
    example = "lape-heads=heads/lape.json" if option == "--heads" else "lape=neurons/lape.json"
    what = "head set" if option == "--heads" else "neuron set"
    for spec in specs or []:
        if "=" not in spec:
            raise UserError(f"{option} {spec!r} is not NAME=FILE; write e.g. {option} {example}")
        name, path = (p.strip() for p in spec.split("=", 1))
        if not _NAME_RE.match(name) or not path:
            raise UserError(f"{option} {spec!r}: give NAME=FILE with NAME of letters, digits, '_', '-' or '.'")
        if name in RESERVED:
            raise UserError(f"{option} {spec!r}: the name {name!r} is reserved (a method of its own); pick another")
        if name in out:
            raise UserError(f"{option}: the name {name!r} is given twice; give each {what} once")
        out[name] = Path(path)
    return out


def default_operator(have_stats: bool, have_sentence_stats: bool) -> str:
    """The steering operator of neuron methods when ``--operator`` is not given (module docstring)."""
    return "set:p_max" if have_sentence_stats else ("set:max" if have_stats else "scale:4")


def default_methods(sets: Sequence[str], operators: Sequence[str], seeds: Sequence[int], have_directions: bool,
                    head_sets: Sequence[str] = ()) -> list[str]:
    out = [f"{n}:{op}" for n in sets for op in operators]
    if sets and seeds:
        out.append(f"random:{sets[0]}")
    if have_directions:
        out.append("diffmean")
    out += [f"heads:{n}" for n in head_sets]
    if head_sets and seeds:
        out.append(f"random-heads:{head_sets[0]}")
    if sets:
        out += ["arith:add", "arith:mul"]
    return out


def _available(sets, seeds, have_directions, head_sets=()) -> str:
    parts = [f"NAME:OP (NAME one of {', '.join(sets)})" if sets else None,
             "random:NAME" if sets and seeds else None, "diffmean" if have_directions else None,
             f"heads:NAME (NAME one of {', '.join(head_sets)})" if head_sets else None,
             "random-heads:NAME" if head_sets and seeds else None,
             "arith:add[*A], arith:mul[*A]" if sets else None]
    return ", ".join(p for p in parts if p) or ("none (give --neurons NAME=FILE, --heads NAME=FILE and/or "
                                                "--directions DIR)")


def parse_method(spec: str, sets: Sequence[str], seeds: Sequence[int], have_directions: bool,
                 head_sets: Sequence[str] = ()) -> dict:
    """``{"name", "kind", "set", "operator"}`` of one ``--methods`` entry; UserError when it is unknown
    or its inputs are missing."""
    from .intervene import parse_operator
    s = spec.strip()
    avail = _available(sets, seeds, have_directions, head_sets)
    if s == "diffmean":
        if not have_directions:
            raise UserError("method 'diffmean' needs --directions DIR (from 'langneurons directions collect')")
        return {"name": s, "kind": "diffmean", "set": None, "operator": None}
    head, _, rest = s.partition(":")
    if head in ("heads", "random-heads"):
        if not head_sets:
            raise UserError(f"method {s!r} needs a head set: give --heads NAME=FILE (from 'langneurons heads "
                            "identify')")
        if rest not in head_sets:
            raise UserError(f"unknown method {s!r}: no head set named {rest!r}; methods: {avail}")
        if head == "random-heads" and not seeds:
            raise UserError(f"method {s!r} needs random-control seeds; give --random-seeds 0,1,2")
        return {"name": s, "kind": head, "set": rest, "operator": None}
    if head == "arith" or rest.split(":", 1)[0] == "arith":
        name = sets[0] if head == "arith" and sets else head
        if not sets or name not in sets:
            raise UserError(f"unknown method {s!r}: language arithmetic needs a neuron set (--neurons NAME=FILE); "
                            f"methods: {avail}")
        op = s if head == "arith" else rest
        try:
            from .intervene import parse_arith
        except ImportError:         # an older langneurons: the method is skipped with the reason later
            parse_arith = None
        if parse_arith is not None:
            try:
                op = parse_arith(op).spec
            except UserError as e:
                raise UserError(f"unknown method {s!r}: {e}") from None
        return {"name": s, "kind": "arith", "set": name, "operator": op}
    if head == "random" and rest:
        if rest not in sets:
            raise UserError(f"unknown method {s!r}: no neuron set named {rest!r}; methods: {avail}")
        if not seeds:
            raise UserError(f"method {s!r} needs random-control seeds; give --random-seeds 0,1,2")
        return {"name": s, "kind": "random", "set": rest, "operator": None}
    if rest and head in sets:
        try:
            op = parse_operator(rest).spec
        except UserError as e:
            raise UserError(f"unknown method {s!r}: {e}") from None
        return {"name": s, "kind": "neurons", "set": head, "operator": op}
    raise UserError(f"unknown method {s!r}; methods: {avail}")


def choose_direction_layer(dirs, targets: Sequence[str]) -> tuple[int, list[float]]:
    """``argmax_l mean_t ||v_l(t)|| / rbar_l`` (module docstring) and the ratio of every layer."""
    from .directions import diffmean
    norms = torch.stack([torch.linalg.vector_norm(diffmean(dirs, t), dim=-1) for t in targets], 1)   # [L, K]
    rbar = dirs.residual_norm()
    ratio = norms.mean(1) / torch.where(rbar > 0, rbar, torch.ones_like(rbar))
    return int(ratio.argmax()), [round(float(x), 6) for x in ratio]


def budget_of(iv, adapter=None) -> dict:
    """``{"units", "params"}`` of a steering intervention (metric definitions in :data:`METRICS`); a
    :class:`~langneurons.heads.HeadIntervention` needs the model's ``adapter`` (``head_dim``, ``H``)."""
    from .directions import DirectionIntervention
    from .heads import HeadIntervention
    if isinstance(iv, (DirectionIntervention, DirectionAblation)):
        return {"units": len(iv.layers), "params": int(iv.hidden_size) * len(iv.layers)}
    if isinstance(iv, HeadIntervention):
        if adapter is None:
            raise UserError("the budget of a head intervention needs the model (head_dim x hidden size)")
        n = int(iv.rows.shape[0])
        return {"units": n, "params": n * int(adapter.attention().head_dim) * int(adapter.hidden_size)}
    parts = getattr(iv, "parts", None)
    ivs = parts if parts is not None else [iv]
    sel = None
    for p in ivs:
        s = p.selection()
        sel = s if sel is None else (sel | s)
    n = int(sel.sum()) if sel is not None else 0
    return {"units": n, "params": n}


def _describe(iv) -> str:
    return iv.describe() if hasattr(iv, "describe") else type(iv).__name__


def _stackable(iv) -> bool:
    """Whether a row can go into the stacked passes of ``perplexity_matrix`` (plain neuron interventions
    with a non-batch operator at every position)."""
    from .intervene import Intervention
    return iv is None or (type(iv) is Intervention and not iv.op.is_batch and iv.positions == "all")


def random_head_control(hs, seed: int):
    """Matched random control of a :class:`~langneurons.heads.HeadSet` (the head counterpart of
    :func:`langneurons.neuronset.random_control`): for each language and each layer, as many heads as
    ``hs`` has for that language in that layer, drawn uniformly without replacement among the heads
    of that layer that belong to **no** language of ``hs``. One ``torch.Generator`` seeded with
    ``seed``, used in language order then layer order (the same seed gives the same set). UserError
    when a layer has too few free heads."""
    from .heads import HeadSet
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"random head control: seed must be a non-negative integer, got {seed!r}")
    L, n = hs.num_layers, hs.num_heads
    masks = hs.masks()
    taken = torch.zeros(L, n, dtype=torch.bool)
    for m in masks.values():
        taken |= m
    free_per_layer = [(~taken[l]).nonzero().flatten() for l in range(L)]
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    out = {}
    for lang in hs.languages:
        counts = masks[lang].sum(1).tolist()
        parts = []
        for layer, need in enumerate(counts):
            if need == 0:
                continue
            free = free_per_layer[layer]
            if free.numel() < need:
                raise UserError(f"random head control: layer {layer} has {free.numel()} heads outside every "
                                f"language of the head set {hs.name}, but {lang!r} needs {need}; the set is too "
                                "dense for a matched control")
            pick = free[torch.randperm(free.numel(), generator=gen)[:need]]
            parts.append(torch.stack([torch.full_like(pick, layer), pick], dim=1))
        out[lang] = torch.cat(parts) if parts else torch.empty((0, 2), dtype=torch.int64)
    method = {"name": "random", "languages": hs.languages,
              "params": {"seed": seed, "matched_to": {"name": hs.method.get("name"),
                                                      "path": str(hs.path) if hs.path is not None else None},
                         "sampling": "per language and layer, uniform without replacement among the heads of no "
                                     "language of the set"}}
    return HeadSet(out, dict(hs.model), method)


# ------------------------------------------------------------------------------------------ configuration
@dataclass
class CompareConfig:
    model: str
    targets: list
    held_out: list                              # [LanguageSource]
    out: Path
    neurons: dict = field(default_factory=dict)  # name -> path
    heads: dict = field(default_factory=dict)    # name -> head-set path
    head_scale: float = DEFAULT_HEAD_SCALE
    stats: Optional[Path] = None
    sentence_stats: Optional[Path] = None
    directions: Optional[Path] = None
    direction_layer: Optional[int] = None
    alpha: float = DEFAULT_ALPHA
    methods: Optional[list] = None
    operators: Optional[list] = None
    site: str = "act"
    random_seeds: list = field(default_factory=lambda: [0, 1, 2])
    cloze: Optional[Path] = None
    muse: Optional[Path] = None
    items: int = 100
    samples: int = 8
    max_new_tokens: int = 32
    neutral_prompts: Optional[list] = None
    window: int = 512
    max_tokens: Optional[int] = None
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"
    arch: Optional[str] = None
    device_map: Optional[str] = None
    trust_remote_code: bool = False
    seed: int = 0
    n_boot: int = 2000
    cache_dir: Optional[Path] = None
    progress: bool = True
    command_key: Optional[str] = None


def _log(cfg: CompareConfig, msg: str) -> None:
    if cfg.progress:
        print(f"langneurons: compare: {msg}", file=sys.stderr, flush=True)


def check_config(cfg: CompareConfig) -> None:
    """Checks that need no file or model (run first, before anything is loaded)."""
    from .collect import check_run_options
    check_run_options(cfg.window, cfg.batch_size, cfg.max_tokens, cfg.dtype)
    if cfg.samples < 1 or cfg.max_new_tokens < 1 or cfg.items < 1:
        raise UserError("--samples, --max-new-tokens and --items must be at least 1")
    if any((not isinstance(s, int)) or s < 0 for s in cfg.random_seeds):
        raise UserError("--random-seeds must be non-negative integers")
    if len(set(cfg.targets)) != len(cfg.targets):
        raise UserError("a language is named twice in --languages")
    if len(cfg.targets) < 2:
        raise UserError("compare needs at least two target languages (--languages a,b,...): the metrics contrast them")
    if cfg.cloze is not None and cfg.muse is not None:
        raise UserError("give at most one of --cloze and --muse")
    if not cfg.neurons and not cfg.heads and cfg.directions is None:
        raise UserError("nothing to compare: give --neurons NAME=FILE, --heads NAME=FILE (repeatable) and/or "
                        "--directions DIR")
    if not math.isfinite(float(cfg.alpha)):
        raise UserError(f"--alpha {cfg.alpha} is not a finite number")
    if not math.isfinite(float(cfg.head_scale)):
        raise UserError(f"--head-scale {cfg.head_scale} is not a finite number")
    held = [s.code for s in cfg.held_out]
    missing = [t for t in cfg.targets if t not in held]
    if missing:
        raise UserError(f"no held-out text for target(s) {', '.join(missing)}; add --held-out CODE=FILE for each "
                        "target (the deactivation and collateral metrics are measured on it)")


# ------------------------------------------------------------------------------------------ window NLL
def window_matrix(session, rows: list, columns: dict, progress: bool = False):
    """NLL of every row (``(name, intervention or None)``) on every column's windows, as one
    :class:`~langneurons.ppl.MatrixResult`: neuron rows stacked (``perplexity_matrix``), the others
    (directions, ablations, arithmetic, batch operators) one :func:`intervened` pass each."""
    from .ppl import MatrixResult, perplexity_matrix
    t0 = time.perf_counter()
    stack = [i for i, (_, iv) in enumerate(rows) if _stackable(iv)]
    solo = [i for i in range(len(rows)) if i not in set(stack)]
    R, C = len(rows), len(columns)
    nll = torch.zeros(R, C, dtype=torch.float64)
    wn = [torch.zeros(R, len(w), dtype=torch.float64) for w in columns.values()]
    tokens, nwin = [0] * C, [len(w) for w in columns.values()]
    passes = seqs = 0
    if stack:
        res = perplexity_matrix(session, [rows[i] for i in stack], columns, progress=progress)
        idx = torch.tensor(stack)
        nll[idx] = res.nll_sum
        for c in range(C):
            wn[c][idx] = res.window_nll[c]
        tokens = list(res.tokens)
        passes, seqs = res.passes, res.sequences
    B = session.batch_size
    for i in solo:
        with intervened(session, [rows[i][1]]):
            for c, windows in enumerate(columns.values()):
                W = torch.from_numpy(np.asarray(windows, dtype=np.int64))
                n = W.shape[0]
                batches = [list(range(s, min(s + B, n))) for s in range(0, n, B)]

                def run(k: int, ix: list[int]) -> dict:
                    seq_nll, seq_n = session.token_nll(W[ix])
                    return {k: (seq_nll.cpu().to(torch.float64), int(seq_n[0]))}
                per = session.map_batches(batches, run)
                if batches:
                    wn[c][i] = torch.cat([per[k][0] for k in range(len(batches))])
                    nll[i, c] = wn[c][i].sum()
                    tokens[c] = per[0][1] * n
                passes += len(batches)
                seqs += n
    return MatrixResult(rows=[name for name, _ in rows], columns=list(columns), nll_sum=nll, tokens=tokens,
                        windows=nwin, passes=passes, sequences=seqs, seconds=time.perf_counter() - t0, window_nll=wn)


# ------------------------------------------------------------------------------------------ generations
class _Recorder:
    """A language identifier that keeps what it labels, per target being steered (``current``)."""

    def __init__(self, idf):
        self.idf = idf
        self.languages = list(idf.languages)
        self.current = None
        self.texts: dict = {}
        self.labels_of: dict = {}

    def labels(self, texts):
        texts = list(texts)
        labels = list(self.idf.labels(texts))
        self.texts[self.current] = texts
        self.labels_of[self.current] = labels
        return labels


def text_nll(session, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``NLL_i`` and ``m_i`` of every text under the session's model as it is (module docstring,
    ``fluency_nll``): the text's tokens after the start token, right-padded batches of
    ``session.batch_size``. float64 ``[n]`` and int64 ``[n]``."""
    from .runtime.session import pad_rows
    start = session.prompt_ids("")
    rows = [(start + session.encode(t))[: session.max_length] for t in texts]
    B = session.batch_size
    batches = [list(range(s, min(s + B, len(rows)))) for s in range(0, len(rows), B)]

    def run(k: int, ix: list[int]) -> dict:
        ids, mask = pad_rows([rows[i] for i in ix], session.pad_id, "right")
        nll, n = session.token_nll(ids, mask)
        return {i: (float(nll[b]), int(n[b])) for b, i in enumerate(ix)}
    res = session.map_batches(batches, run)
    return (np.array([res[i][0] for i in range(len(rows))], dtype=np.float64),
            np.array([res[i][1] for i in range(len(rows))], dtype=np.int64))


def _weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[B, n]`` multiplicity of each unit in each replicate of :func:`langneurons.uncertainty.resample_indices`."""
    from .uncertainty import resample_indices
    idx = resample_indices(n, n_boot, seed)
    return np.bincount((idx + n * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * n
                       ).reshape(n_boot, n).astype(np.float64)


def _ratio(num: np.ndarray, den: np.ndarray):
    with np.errstate(all="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


# ------------------------------------------------------------------------------------------ rounding
def _r(v, nd: int = 6):
    if v is None:
        return None
    v = float(v)
    return round(v, nd) if math.isfinite(v) else None


def _round_ci(ci) -> Optional[list]:
    return None if not ci or any(_r(x) is None for x in ci) else [_r(ci[0]), _r(ci[1])]


def _iv(reps) -> Optional[list]:
    from .uncertainty import interval
    r = np.asarray(reps, dtype=np.float64)
    if r.size == 0 or np.isnan(r).all():
        return None
    lo, hi = interval(r)
    return None if not (math.isfinite(lo) and math.isfinite(hi)) else [round(lo, 6), round(hi, 6)]


# ------------------------------------------------------------------------------------------ the run
def run_compare(cfg: CompareConfig, model=None, tokenizer=None) -> dict:
    """Build every method, measure every metric, write ``OUT/compare.json`` and ``OUT/compare.png``;
    return the record (module docstring)."""
    from . import steer as S
    from .directions import DirectionIntervention, Directions
    from .heads import HeadIntervention, HeadSet, head_operator
    from .intervene import Intervention, parse_operator
    from .neuronset import NeuronSet, random_control
    from .ppl import heldout_windows, replicate_nll
    from .runtime import ModelOptions, model_fingerprint, open_session
    from .stats import ActivationStats

    check_config(cfg)
    targets = list(cfg.targets)
    seeds = list(dict.fromkeys(cfg.random_seeds))
    # ---- inputs (all read and checked before the model is loaded)
    sets = {name: NeuronSet.load(p) for name, p in cfg.neurons.items()}
    for name, ns in sets.items():
        miss = [t for t in targets if t not in ns.neurons]
        if miss:
            raise UserError(f"the neuron set {name} ({cfg.neurons[name]}) has no language {', '.join(miss)}; it holds "
                            f"{', '.join(ns.languages)}")
    head_sets = {name: HeadSet.load(p) for name, p in cfg.heads.items()}
    for name, hs in head_sets.items():
        miss = [t for t in targets if t not in hs.heads]
        if miss:
            raise UserError(f"the head set {name} ({cfg.heads[name]}) has no language {', '.join(miss)}; it holds "
                            f"{', '.join(hs.languages)}")
    head_op = head_operator(f"scale:{float(cfg.head_scale):g}").spec
    stats = ActivationStats.load(cfg.stats) if cfg.stats is not None else None
    sstats = ActivationStats.load(cfg.sentence_stats) if cfg.sentence_stats is not None else None
    dirs = Directions.load(cfg.directions) if cfg.directions is not None else None
    if dirs is not None:
        for t in targets:
            dirs.check_language(t)
        if len(dirs.languages) < 2:
            raise UserError(f"the directions in {cfg.directions} hold one language; DiffMean needs another")
        if cfg.direction_layer is not None and not 0 <= cfg.direction_layer < dirs.num_layers:
            raise UserError(f"--direction-layer {cfg.direction_layer} is outside 0..{dirs.num_layers - 1}")
    operators = list(cfg.operators) if cfg.operators else [default_operator(stats is not None, sstats is not None)]
    operators = [parse_operator(o).spec for o in operators]
    names, hnames = list(sets), list(head_sets)
    explicit = cfg.methods is not None
    specs = (list(dict.fromkeys(cfg.methods)) if explicit
             else default_methods(names, operators, seeds, dirs is not None, hnames))
    if not specs:
        raise UserError("--methods names no method")
    parsed = [parse_method(s, names, seeds, dirs is not None, hnames) for s in specs]
    items, data = None, None
    if cfg.cloze is not None or cfg.muse is not None:
        if cfg.cloze is not None:
            items = S.load_cloze_jsonl(cfg.cloze, targets)
            data = {"kind": "cloze", "path": str(cfg.cloze)}
        else:
            items = S.build_muse_cloze(cfg.muse, targets, n_items=cfg.items, seed=cfg.seed)
            data = {"kind": "muse", "path": str(cfg.muse), "context_words": 3, "seed": cfg.seed}
        data["items"] = len(items)
        # target t is scored on items holding t's object and another target's prompt and object
        miss = [t for t in targets if not any(t in it.objects and any(s != t and s in it.prompts and s in it.objects
                                                                        for s in targets) for it in items)]
        if miss:
            raise UserError(f"the cloze data has no item for target(s) {', '.join(miss)} (an item with the target's "
                            "object and another target's prompt and object); add items or drop them from --languages")
    from .langid import LanguageIdentifier
    idf = LanguageIdentifier(targets)       # fails early on a missing package or an unknown language
    prompts = list(cfg.neutral_prompts) if cfg.neutral_prompts else list(S.DEFAULT_NEUTRAL_PROMPTS)
    if not prompts:
        raise UserError("the neutral-prompt file holds no prompt")

    def stats_for(op: str):
        o = parse_operator(op)
        if not o.needs_stats:
            return None
        if o.stat in ("p_max", "p_median"):
            if sstats is None:
                raise UserError(f"operator {op!r} needs per-sentence statistics; pass --sentence-stats DIR "
                                "(from 'langneurons collect --unit sentence')")
            return sstats
        if stats is None and sstats is None:
            raise UserError(f"operator {op!r} needs activation statistics; pass --stats DIR")
        return stats if stats is not None else sstats

    # ---- the model
    session = open_session(ModelOptions(cfg.model, cfg.arch, cfg.dtype, cfg.device, cfg.device_map,
                                        cfg.trust_remote_code),
                           arch_from=tuple(p for p in (*cfg.neurons.values(), cfg.stats) if p is not None),
                           batch_size=cfg.batch_size, model=model, tokenizer=tokenizer)
    adapter = session.adapter
    for name, ns in sets.items():
        ns.validate_for(adapter.num_layers, adapter.width, site=cfg.site)
    att = adapter.attention() if head_sets else None
    for name, hs in head_sets.items():
        try:
            hs.validate_for(adapter.num_layers, att.num_heads, att.head_dim)
        except UserError as e:
            raise UserError(f"--heads {name}: {e}") from None
    if dirs is not None:
        if (dirs.num_layers, dirs.hidden_size) != (adapter.num_layers, adapter.hidden_size):
            m = dirs.meta.get("model") or {}
            raise UserError(f"the directions in {cfg.directions} were collected from another model "
                            f"({m.get('name_or_path')}: {dirs.num_layers} layers, hidden size {dirs.hidden_size}); "
                            f"this model has {adapter.num_layers} layers, hidden size {adapter.hidden_size}; "
                            "collect directions on this model")
        fp, here = dirs.model_fingerprint, model_fingerprint(session.model)
        same_dtype = dirs.meta.get("dtype") == str(session.model.dtype).replace("torch.", "")
        if fp and fp != here and same_dtype:
            raise UserError(f"the directions in {cfg.directions} were collected from another model (fingerprint {fp}, "
                            f"this model {here}); collect directions on this model")
    layer, ratios = (None, None)
    if dirs is not None:
        layer, ratios = choose_direction_layer(dirs, targets)
        if cfg.direction_layer is not None:
            layer = int(cfg.direction_layer)

    # ---- methods -> interventions; window rows (deduplicated)
    rows: dict[str, object] = {"baseline": None}
    methods: dict[str, Method] = {}
    skipped: dict[str, str] = {}
    controls: dict[str, dict] = {}

    def control_sets(name: str):
        if name not in controls:
            try:
                controls[name] = {s: random_control(sets[name], s) for s in seeds}
            except UserError as e:
                controls[name] = {"error": str(e)}
        return controls[name]

    head_controls: dict[str, dict] = {}

    def head_control_sets(name: str):
        if name not in head_controls:
            try:
                head_controls[name] = {s: random_head_control(head_sets[name], s) for s in seeds}
            except UserError as e:
                head_controls[name] = {"error": str(e)}
        return head_controls[name]

    def head_zero_rows(label: str, hs) -> dict[str, str]:
        out = {}
        for t in targets:
            key = f"deact|{label}|{t}"
            if key not in rows:
                rows[key] = HeadIntervention(hs, t, "zero")
            out[t] = key
        return out

    def head_detail(hname: str, hs) -> dict:
        return {"heads": hname, "path": str(cfg.heads[hname]), "operator": head_op, "positions": "all",
                "deactivation": "zero (z_h <- 0, removes c_h)", "num_heads": att.num_heads,
                "head_dim": att.head_dim, "hidden_size": adapter.hidden_size, "attn_out": att.path,
                "heads_of": {t: hs.heads[t].tolist() for t in targets},
                "budget": "units: heads of t; params: heads x head_dim x H, the parameters of W_O touched",
                "steering": "scale:A amplifies t's heads (c_h <- A c_h): the head analogue of activating its "
                            "neurons"}

    def zero_rows(label: str, ns) -> dict[str, str]:
        out = {}
        for t in targets:
            key = f"deact|{label}|{t}"
            if key not in rows:
                rows[key] = Intervention(neurons=ns, languages=[t], operator="zero", site=cfg.site)
            out[t] = key
        return out

    for p in parsed:
        name, kind = p["name"], p["kind"]
        m = Method(name, kind)
        try:
            if kind == "neurons":
                ns = sets[p["set"]]
                ivs, _ = S.build_interventions(ns, stats_for(p["operator"]), targets, [p["operator"]], site=cfg.site)
                m.steer = {t: [ivs[p["operator"]][t]] for t in targets}
                z = zero_rows(p["set"], ns)
                m.deact = {t: [z[t]] for t in targets}
                m.detail = {"neurons": p["set"], "path": str(cfg.neurons[p["set"]]), "operator": p["operator"],
                            "deactivation": "zero"}
            elif kind == "random":
                ctl = control_sets(p["set"])
                if "error" in ctl:
                    raise UserError(ctl["error"])
                op = next((q["operator"] for q in parsed if q["kind"] == "neurons" and q["set"] == p["set"]),
                          operators[0])
                per = {}
                for s in seeds:
                    ivs, _ = S.build_interventions(ctl[s], stats_for(op), targets, [op], site=cfg.site)
                    per[s] = ivs[op]
                m.steer = {t: [per[s][t] for s in seeds] for t in targets}
                zs = {s: zero_rows(f"random[{s}]:{p['set']}", ctl[s]) for s in seeds}
                m.deact = {t: [zs[s][t] for s in seeds] for t in targets}
                m.detail = {"neurons": p["set"], "control_of": str(cfg.neurons[p["set"]]), "operator": op,
                            "seeds": seeds, "deactivation": "zero"}
            elif kind == "heads":
                hs = head_sets[p["set"]]
                m.steer = {t: [HeadIntervention(hs, t, head_op)] for t in targets}
                z = head_zero_rows(f"heads:{p['set']}", hs)
                m.deact = {t: [z[t]] for t in targets}
                m.detail = head_detail(p["set"], hs)
            elif kind == "random-heads":
                ctl = head_control_sets(p["set"])
                if "error" in ctl:
                    raise UserError(ctl["error"])
                m.steer = {t: [HeadIntervention(ctl[s], t, head_op) for s in seeds] for t in targets}
                zs = {s: head_zero_rows(f"random-heads[{s}]:{p['set']}", ctl[s]) for s in seeds}
                m.deact = {t: [zs[s][t] for s in seeds] for t in targets}
                m.detail = {**head_detail(p["set"], head_sets[p["set"]]), "control_of": str(cfg.heads[p["set"]]),
                            "seeds": seeds, "control_heads": {s: {t: ctl[s].heads[t].tolist() for t in targets}
                                                              for s in seeds}}
                m.detail.pop("heads_of")
            elif kind == "diffmean":
                m.steer = {t: [DirectionIntervention(dirs, t, [layer], cfg.alpha, normalise=True)] for t in targets}
                for t in targets:
                    key = f"deact|ablate@{layer}|{t}"
                    rows.setdefault(key, DirectionAblation(dirs, t, [layer]))
                    m.deact[t] = [key]
                m.detail = {"directions": str(cfg.directions), "layer": layer, "alpha": cfg.alpha, "normalise": True,
                            "deactivation": "directional ablation h - (h.u)u at the same layer"}
            else:   # arith
                ns = sets[p["set"]]
                spec = p["operator"]
                try:
                    from . import intervene as _intervene
                    if not hasattr(_intervene, "ArithmeticIntervention"):
                        raise AttributeError("langneurons.intervene has no ArithmeticIntervention")
                    ar_stats = stats if stats is not None else sstats
                    ivs, _ = S.build_interventions(ns, ar_stats, targets, [spec], site=cfg.site)
                except (ImportError, AttributeError, TypeError) as e:
                    raise UserError(f"language arithmetic is not available in this version of langneurons "
                                    f"({e.__class__.__name__}: {e})") from None
                m.steer = {t: [ivs[spec][t]] for t in targets}
                z = zero_rows(p["set"], ns)
                m.deact = {t: [z[t]] for t in targets}
                m.detail = {"neurons": p["set"], "path": str(cfg.neurons[p["set"]]), "operator": spec,
                            "sources": "the other targets", "deactivation": "zero (the neuron set's rows)"}
        except UserError as e:
            if kind in ("arith", "random", "random-heads"):   # unavailable arithmetic, sets too dense for a control
                skipped[name] = str(e)
                continue
            raise
        if kind in ("neurons", "arith"):
            ctl = control_sets(p["set"]) if seeds else {"error": "no --random-seeds"}
            if "error" not in ctl:
                zs = {s: zero_rows(f"random[{s}]:{p['set']}", ctl[s]) for s in seeds}
                m.control = {t: [zs[s][t] for s in seeds] for t in targets}
            else:
                m.detail["random_control"] = ctl["error"]
        if kind == "heads":
            ctl = head_control_sets(p["set"]) if seeds else {"error": "no --random-seeds"}
            if "error" not in ctl:
                zs = {s: head_zero_rows(f"random-heads[{s}]:{p['set']}", ctl[s]) for s in seeds}
                m.control = {t: [zs[s][t] for s in seeds] for t in targets}
            else:
                m.detail["random_control"] = ("deact_own_vs_random is None: no matched random head control: "
                                              + ctl["error"])
        for t in targets:
            m.budget[t] = budget_of(m.steer[t][0], adapter)
            m.detail.setdefault("steer", {})[t] = _describe(m.steer[t][0])
        for t in targets:
            for k, iv in enumerate(m.steer[t]):
                rows[f"steer|{name}|{t}|{k}"] = iv
        methods[name] = m
    if not methods:
        raise UserError("no method could be built: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    for k, v in skipped.items():
        _log(cfg, f"skipped {k}: {v}")

    # ---- held-out windows and every row's NLL
    columns = {}
    for src in cfg.held_out:
        w = heldout_windows(src, session.tokenizer, cfg.window, cfg.max_tokens, cfg.seed, cfg.cache_dir)
        if len(w) == 0:
            raise UserError(f"the held-out text of {src.code} ({src.spec}) is shorter than one window of {cfg.window} "
                            "tokens; give more text or a smaller --window")
        columns[src.code] = w
    row_list = list(rows.items())
    _log(cfg, f"{len(row_list)} rows x {len(columns)} held-out languages")
    res = window_matrix(session, row_list, columns, progress=cfg.progress)
    rep = replicate_nll(res, cfg.seed, cfg.n_boot)                          # [B, R, C]
    point = res.mean_nll.numpy()                                            # [R, C]
    ri = {name: i for i, name in enumerate(res.rows)}
    cols = list(columns)

    def window_stats(keys: Sequence[str], t: str):
        """ΔNLL own / other (point, replicates [B]) of the rows ``keys`` averaged (replicas)."""
        ix = [ri[k] for k in keys]
        d_pt = point[ix].mean(0) - point[ri["baseline"]]                     # [C]
        d_rep = rep[:, ix].mean(1) - rep[:, ri["baseline"]]                  # [B, C]
        c = cols.index(t)
        others = [j for j in range(len(cols)) if j != c]
        own = (d_pt[c], d_rep[:, c])
        other = (d_pt[others].mean(), d_rep[:, others].mean(1)) if others else (None, None)
        return own, other

    # ---- generations (one baseline, shared and paired) and their fluency under the unsteered model
    rec = _Recorder(idf)
    gen0 = None
    labels: dict = {}
    texts: dict = {}
    for name, m in methods.items():
        reps_ = len(next(iter(m.steer.values())))
        labels[name], texts[name] = {t: [] for t in targets}, {t: [] for t in targets}
        for k in range(reps_):
            def make(t, m=m, k=k):
                rec.current = t
                return m.steer[t][k]
            rec.current = None
            g = S.generation_shares(session, targets, make, prompts, cfg.samples, cfg.max_new_tokens, cfg.seed,
                                    identifier=rec, baseline=gen0, n_boot=cfg.n_boot)
            gen0 = g["_baseline"]
            for t in targets:
                labels[name][t].append(rec.labels_of[t])
                texts[name][t].append(rec.texts[t])
        _log(cfg, f"generated under {name}")
    runs = list(gen0["_prompts"])
    base_labels, base_texts = list(gen0["_labels"]), list(gen0["_texts"])
    n = len(runs)
    everything = list(base_texts) + [x for name in methods for t in targets for r in texts[name][t] for x in r]
    all_nll, all_tok = text_nll(session, everything)
    fl0 = (all_nll[:n], all_tok[:n].astype(np.float64))
    pos = n
    fluency: dict = {}
    for name in methods:
        fluency[name] = {}
        for t in targets:
            nl, tk = np.zeros(n), np.zeros(n)
            for _ in texts[name][t]:
                nl += all_nll[pos:pos + n]
                tk += all_tok[pos:pos + n]
                pos += n
            fluency[name][t] = (nl, tk)
    W = _weights(n, cfg.n_boot, cfg.seed)                                    # one draw of runs for everything
    base_ind = {t: np.array([x == t for x in base_labels], dtype=np.float64) for t in targets}
    fl0_pt = fl0[0].sum() / fl0[1].sum() if fl0[1].sum() > 0 else None
    fl0_rep = _ratio(W @ fl0[0], W @ fl0[1])

    # ---- LSS (one unsteered pass per target, shared)
    lss_out: dict = {}
    if items:
        ll0 = None
        K = len(targets)
        for name, m in methods.items():
            reps_ = len(next(iter(m.steer.values())))
            cells_all = []
            for k in range(reps_):
                r = S.lss(session, items, targets, lambda t, m=m, k=k: m.steer[t][k], baseline=ll0, seed=cfg.seed,
                          n_boot=cfg.n_boot)
                ll0 = r["_ll0"]
                cells_all.append(r["_wins"])
            cells = [[None] * K for _ in range(K)]
            for a in range(K):
                for b in range(K):
                    cs = [c[a][b] for c in cells_all]
                    if cs[0] is not None:
                        cells[a][b] = {"items": cs[0]["items"],
                                       "wins": np.mean([c["wins"] for c in cs], axis=0).tolist() if cs[0]["wins"]
                                       else []}
            ci = S.lss_intervals(cells, len(items), targets, seed=cfg.seed, n_boot=cfg.n_boot)
            by_t, allv = {}, []
            for b, t in enumerate(targets):
                vals = [float(np.mean(cells[a][b]["wins"])) for a in range(K)
                        if a != b and cells[a][b] is not None and cells[a][b]["wins"]]
                allv += vals
                by_t[t] = sum(vals) / len(vals) if vals else None
            lss_out[name] = {"by_target": by_t, "by_target_ci95": ci["lss_by_target_ci95"],
                             "mean": sum(allv) / len(allv) if allv else None, "mean_ci95": ci["lss_mean_ci95"]}
            _log(cfg, f"LSS under {name}")

    # ---- rows of the scoreboard
    out_rows, summary = [], {}
    for name, m in methods.items():
        acc: dict = {k: ([], []) for k in INTERVAL_METRICS}          # metric -> (points, replicate arrays)
        budgets = []
        for t in targets:
            row = {"method": name, "target": t, "kind": m.kind}

            def put(key, pt, reps):
                row[key] = _r(pt)
                row[key + "_ci95"] = _iv(reps) if reps is not None and pt is not None else None
                if pt is not None and reps is not None:
                    acc[key][0].append(float(pt))
                    acc[key][1].append(np.asarray(reps, dtype=np.float64))
            ind = np.mean([[x == t for x in lab] for lab in labels[name][t]], axis=0).astype(np.float64)
            put("share", ind.mean(), W @ ind / n)
            put("share_delta", ind.mean() - base_ind[t].mean(), W @ (ind - base_ind[t]) / n)
            if items:
                lo = lss_out[name]
                v = lo["by_target"].get(t)
                row["lss"] = _r(v)
                row["lss_ci95"] = _round_ci(lo["by_target_ci95"].get(t)) if v is not None else None
            nl, tk = fluency[name][t]
            f_pt = nl.sum() / tk.sum() if tk.sum() > 0 else None
            f_rep = _ratio(W @ nl, W @ tk)
            put("fluency_nll", f_pt, f_rep)
            put("fluency_delta", None if f_pt is None or fl0_pt is None else f_pt - fl0_pt, f_rep - fl0_rep)
            keys = [f"steer|{name}|{t}|{k}" for k in range(len(m.steer[t]))]
            (own_pt, own_rep), (oth_pt, oth_rep) = window_stats(keys, t)
            put("steer_own_dnll", own_pt, own_rep)
            put("steer_other_dnll", oth_pt, oth_rep)
            (d_own, d_own_rep), (d_oth, d_oth_rep) = window_stats(m.deact[t], t)
            put("deact_own_dnll", d_own, d_own_rep)
            put("deact_other_dnll", d_oth, d_oth_rep)
            put("deact_selectivity", None if d_oth is None else d_own - d_oth,
                None if d_oth is None else d_own_rep - d_oth_rep)
            if m.control.get(t):
                (c_own, c_own_rep), _ = window_stats(m.control[t], t)
                put("deact_own_vs_random", d_own - c_own, d_own_rep - c_own_rep)
            else:
                row["deact_own_vs_random"], row["deact_own_vs_random_ci95"] = None, None
            row["budget_units"] = m.budget[t]["units"]
            row["budget_params"] = m.budget[t]["params"]
            budgets.append(m.budget[t])
            out_rows.append(row)
        s: dict = {}
        for key in INTERVAL_METRICS:
            pts, reps = acc[key]
            if key == "lss":
                if items:
                    s["lss"], s["lss_ci95"] = _r(lss_out[name]["mean"]), _round_ci(lss_out[name]["mean_ci95"])
                continue
            if len(pts) == len(targets):
                s[key] = _r(float(np.mean(pts)))
                s[key + "_ci95"] = _iv(np.mean(np.stack(reps, 0), 0))
            else:
                s[key], s[key + "_ci95"] = None, None
        for key in ("units", "params"):
            v = _r(np.mean([b[key] for b in budgets]), 3)
            s["budget_" + key] = int(v) if v == int(v) else v
        summary[name] = s

    base_nll = {c: _r(point[ri["baseline"], j]) for j, c in enumerate(cols)}
    base_nll_ci = {c: _iv(rep[:, ri["baseline"], j]) for j, c in enumerate(cols)}
    record = {
        "format": COMPARE_FORMAT,
        "methods": list(methods),
        "targets": targets,
        "metrics": {k: METRICS[k] for k in METRICS if items or k != "lss"},
        "rows": out_rows,
        "summary": summary,
        "baseline": {"share": {t: _r(base_ind[t].mean()) for t in targets},
                     "share_ci95": {t: _iv(W @ base_ind[t] / n) for t in targets},
                     "fluency_nll": _r(fl0_pt), "fluency_nll_ci95": _iv(fl0_rep) if fl0_pt is not None else None,
                     "mean_nll": base_nll, "mean_nll_ci95": base_nll_ci},
        "details": {name: {"kind": m.kind, **m.detail} for name, m in methods.items()},
        "skipped": skipped,
        "generations": {"prompts": runs, "baseline": base_texts, "steered": {name: texts[name] for name in methods}},
        "settings": {
            "model": cfg.model, "model_type": adapter.model_type, "neurons": {k: str(v) for k, v in cfg.neurons.items()},
            "heads": {k: str(v) for k, v in cfg.heads.items()}, "head_scale": cfg.head_scale if head_sets else None,
            "stats": str(cfg.stats) if cfg.stats else None,
            "sentence_stats": str(cfg.sentence_stats) if cfg.sentence_stats else None,
            "directions": str(cfg.directions) if cfg.directions else None,
            "direction_layer": layer, "direction_layer_given": cfg.direction_layer is not None,
            "direction_layer_rule": "argmax_l mean_t ||v_l(t)|| / rbar_l (DiffMean over every language of the "
                                    "artifact; rbar_l its mean residual norm)",
            "direction_layer_ratios": ratios, "alpha": cfg.alpha, "alpha_units": "mean residual norm of the layer",
            "operators": operators, "methods_requested": specs, "site": cfg.site, "random_seeds": seeds,
            "held_out": {s.code: s.spec for s in cfg.held_out}, "windows": dict(zip(cols, res.windows)),
            "tokens": dict(zip(cols, res.tokens)), "window": cfg.window, "max_tokens": cfg.max_tokens,
            "samples": cfg.samples, "max_new_tokens": cfg.max_new_tokens, "neutral_prompts": prompts,
            "generations_per_target": n, "cloze": data, "seed": cfg.seed, "batch_size": cfg.batch_size,
            "intervals": f"95% percentile bootstrap, B={cfg.n_boot}, seeded with --seed: runs (generation metrics), "
                         "held-out windows paired with the baseline (ΔNLL), cloze items (LSS)",
            "work": {"rows": len(row_list), "forward_passes": res.passes, "sequences": res.sequences,
                     "seconds": round(res.seconds, 2)},
        },
    }
    if cfg.command_key:
        from .outputs import KEY_FIELD
        record[KEY_FIELD] = cfg.command_key
    if not session.is_main:
        return record
    from .atomic import atomic_write_text
    from .outputs import ensure_dir
    out = ensure_dir(cfg.out)
    atomic_write_text(out / "compare.json", json.dumps(record, indent=1, ensure_ascii=False))
    plot_compare(record, out / "compare.png")
    return record


# ------------------------------------------------------------------------------------------ validation
def validate_doc(doc: dict, where: str = "compare.json") -> dict:
    """Check a ``compare.json`` document in full (the registry's loader); return it."""
    def bad(what: str):
        raise UserError(f"{where}: {what}; the file is damaged, rerun 'langneurons compare'")
    methods, targets = doc.get("methods"), doc.get("targets")
    if not all(isinstance(x, str) for x in methods) or not all(isinstance(x, str) for x in targets):
        bad("'methods' and 'targets' must be lists of names")
    for i, row in enumerate(doc.get("rows") or []):
        if not isinstance(row, dict) or row.get("method") not in methods or row.get("target") not in targets:
            bad(f"row {i} must be an object naming one of the methods and one of the targets")
        for k, v in row.items():
            if k.endswith("_ci95") and v is not None and not (
                    isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)):
                bad(f"row {i}: {k} must be [lo, hi] or null")
    for key in ("summary", "skipped"):
        if key in doc and not isinstance(doc[key], dict):
            bad(f"{key!r} must be an object")
    return doc


# ------------------------------------------------------------------------------------------ output
def _cell(v, ci, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    s = f"{v:.{digits}f}"
    return s + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


#: The columns of the printed table and of the report's summary table.
TABLE = (("share", "target share"), ("share_delta", "Δshare"), ("lss", "LSS"), ("fluency_delta", "Δfluency NLL"),
         ("steer_other_dnll", "steer ΔNLL other"), ("deact_own_dnll", "deact ΔNLL own"),
         ("deact_other_dnll", "deact ΔNLL other"), ("deact_own_vs_random", "own - random"),
         ("budget_units", "units"))


def print_table(record: dict, file=None) -> None:
    """Per method, the mean over targets of each headline metric and, on the line below, its 95% interval."""
    file = file if file is not None else sys.stdout
    cols = [(k, h) for k, h in TABLE if any(k in s for s in record["summary"].values())]
    w = max(10, max(len(m) for m in record["methods"]) + 2)
    cw = 18
    print(f"scoreboard: mean over {len(record['targets'])} targets ({', '.join(record['targets'])}); "
          "95% bootstrap intervals below each value", file=file)
    print("method".ljust(w) + "".join(h.rjust(cw) for _, h in cols), file=file)
    for m in record["methods"]:
        s = record["summary"][m]
        vals = ["-" if s.get(k) is None else (f"{s[k]:g}" if k.startswith("budget") else f"{s[k]:.3f}")
                for k, _ in cols]
        cis = [("" if not s.get(k + "_ci95") else f"[{s[k + '_ci95'][0]:.2f},{s[k + '_ci95'][1]:.2f}]") for k, _ in cols]
        print(m.ljust(w) + "".join(v.rjust(cw) for v in vals), file=file)
        print("".ljust(w) + "".join(c.rjust(cw) for c in cis), file=file)
    b = record.get("baseline") or {}
    if b.get("fluency_nll") is not None:
        print(f"unsteered: fluency NLL {_cell(b['fluency_nll'], b.get('fluency_nll_ci95'), 3)}; target share "
              + ", ".join(f"{t} {_cell(v, (b.get('share_ci95') or {}).get(t))}" for t, v in b["share"].items()),
              file=file)
    for m, why in (record.get("skipped") or {}).items():
        print(f"skipped {m}: {why}", file=file)


def plot_compare(record: dict, path) -> Path:
    """``compare.png``: per method (mean over targets), target share against collateral ΔNLL under
    steering, and own against other-language ΔNLL under deactivation, with 95% interval bars."""
    from .plots import _new_figure, _save_png
    nan = float("nan")
    fig = _new_figure((11.0, 4.6))
    panels = ((("steer_other_dnll", "collateral ΔNLL on the other languages under steering"),
               ("share", "target share of generations")),
              (("deact_other_dnll", "other-language ΔNLL under deactivation"),
               ("deact_own_dnll", "own-language ΔNLL under deactivation")))
    titles = ("steering: success vs collateral cost", "deactivation: own vs other damage")
    markers = "osD^v<>ph*xP"
    for k, ((xk, xl), (yk, yl)) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        for j, m in enumerate(record["methods"]):
            s = record["summary"].get(m) or {}
            x, y = s.get(xk), s.get(yk)
            if x is None or y is None:
                continue
            xc, yc = s.get(xk + "_ci95") or [nan, nan], s.get(yk + "_ci95") or [nan, nan]
            xerr = [[max(x - xc[0], 0.0)], [max(xc[1] - x, 0.0)]] if not math.isnan(xc[0]) else None
            yerr = [[max(y - yc[0], 0.0)], [max(yc[1] - y, 0.0)]] if not math.isnan(yc[0]) else None
            ax.errorbar([x], [y], xerr=xerr, yerr=yerr, marker=markers[j % len(markers)], linestyle="none",
                        capsize=3, label=m)
        if k == 0:
            b = (record.get("baseline") or {}).get("share") or {}
            if b:
                ax.axhline(sum(b.values()) / len(b), color="grey", linestyle="--", linewidth=0.8, label="unsteered")
        else:
            lim = ax.get_xlim()
            lo, hi = min(lim[0], ax.get_ylim()[0]), max(lim[1], ax.get_ylim()[1])
            ax.plot([lo, hi], [lo, hi], color="grey", linestyle=":", linewidth=0.8, label="own = other")
        ax.axvline(0.0, color="black", linewidth=0.5)
        ax.set_xlabel(xl, fontsize=8)
        ax.set_ylabel(yl, fontsize=8)
        ax.set_title(titles[k], fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"localisation methods, mean over {len(record['targets'])} targets (95% bootstrap intervals)",
                 fontsize=10)
    return _save_png(fig, path)
