"""Neuron-selection methods: one module per method, registered in :data:`METHODS`.

Every method module provides

- ``NAME``: the name on the command line (``langneurons identify NAME``);
- ``HELP``: one line for ``--help``;
- ``add_arguments(parser)``: the method's own options, every parameter with its default in the help;
- ``run(stats, languages, args) -> NeuronSet``: reads what it needs from an
  :class:`~langneurons.stats.ActivationStats`, records every parameter and derived threshold in
  ``method.params``, the language list in ``method.languages`` and ``stats.fingerprint`` in
  ``method.stats_fingerprint``; the ``model`` block is ``stats.model_info``;
- pure tensor functions doing the maths, testable on hand-made tables.

Shared rules used by every method and documented once here:

- **Ranks.** A "value of rank r" is ``torch.kthvalue(x, r)``: the r-th smallest, 1-indexed, no
  interpolation. Ranks computed from rates use Python's ``round`` (half to even, as the
  reference implementations do) and are clamped into ``[1, N]``.
- **Ties.** Wherever a fixed number of neurons is taken by score, ties are broken by the flat index
  ``layer * I + index`` (smaller first), through a stable sort. Results are therefore identical
  for identical inputs, on any machine.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import UserError


# ------------------------------------------------------------------------------------ helpers

def check_open_unit(name: str, value: float) -> float:
    """``value`` must be a finite number strictly inside (0, 1), else UserError naming the option."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"--{name.replace('_', '-')} must be a number in (0, 1), got {value!r}") from None
    if not (math.isfinite(v) and 0.0 < v < 1.0):
        raise UserError(f"--{name.replace('_', '-')} must be strictly between 0 and 1, got {value}; "
                        f"e.g. --{name.replace('_', '-')} 0.01")
    return v


def rank_of(rate: float, n: int) -> int:
    """1-indexed rank ``round(rate * n)`` clamped into ``[1, n]`` (``n >= 1``)."""
    return min(max(int(round(rate * n)), 1), n)


def kth_value(values: torch.Tensor, rank: int) -> float:
    """The value of 1-indexed rank ``rank`` among all elements of ``values`` (``torch.kthvalue``)."""
    flat = values.reshape(-1)
    return float(torch.kthvalue(flat.cpu(), int(rank)).values)


def top_count_mask(scores: torch.Tensor, count: int, eligible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean mask (shape of ``scores``) of the ``count`` largest scores among ``eligible`` ones.

    Ties are broken by flat index (smaller first): a stable sort of ``-score``. Ineligible
    elements are never selected, so fewer than ``count`` come back when fewer are eligible.
    """
    flat = scores.reshape(-1).double()
    ok = ~torch.isnan(flat)
    if eligible is not None:
        ok &= eligible.reshape(-1).bool()
    key = torch.where(ok, -flat, torch.full_like(flat, math.inf))
    order = torch.sort(key, stable=True).indices
    n = min(int(count), int(ok.sum()))
    out = torch.zeros_like(flat, dtype=torch.bool)
    out[order[:n]] = True
    return out.reshape(scores.shape)


def parse_language_list(text: Optional[str]) -> Optional[list[str]]:
    """``"en,fr, zh"`` -> ``["en", "fr", "zh"]``; ``None`` stays ``None`` (= every language)."""
    if text is None:
        return None
    langs = [x.strip() for x in str(text).split(",") if x.strip()]
    if not langs:
        raise UserError("--languages is empty; give comma-separated codes, e.g. --languages en,fr,zh")
    return langs


def require_tokens(stats, languages: list[str]) -> None:
    """UserError if a chosen language counted no tokens (its probabilities would be 0/0)."""
    empty = [c for c in languages if int(stats.get(c).n_tokens) == 0]
    if empty:
        raise UserError(f"language(s) {', '.join(empty)} have no counted tokens in these statistics; "
                        f"collect them again or leave them out of --languages")


def prob_table(stats, languages: list[str]) -> torch.Tensor:
    """Activation probabilities ``p[l, j, k] = count_pos_k[l, j] / n_k``, float64 ``[L, I, K]``."""
    require_tokens(stats, languages)
    return torch.stack([stats.get(c).prob().double().cpu() for c in languages], dim=-1)


def base_method(name: str, stats, languages: list[str], params: dict) -> dict:
    """The ``method`` block of a neuron-set file made from ``stats``."""
    return {"name": name, "params": params, "languages": list(languages),
            "stats_fingerprint": stats.fingerprint}


def stats_record(stats, languages: list[str]) -> dict:
    """Facts about the statistics worth keeping next to the parameters."""
    meta = stats.meta
    out = {"site": stats.site, "unit": meta.get("unit"), "window": meta.get("window"),
           "n_tokens": {c: meta["languages"][c].get("n_tokens") for c in languages}}
    if getattr(stats, "directory", None) is not None:
        out["directory"] = str(stats.directory)
    if meta.get("sources"):
        out["directories"] = list(meta["sources"])
    return out


# ------------------------------------------------------------------------------------ registry
# Imported after the helpers above, which the method modules use.
from . import act_prob, ap, language_activated, lape, random_set, top_prob  # noqa: E402

#: CLI name -> method module, in the order ``--help`` lists them.
METHODS = {m.NAME: m for m in (lape, act_prob, top_prob, language_activated, ap, random_set)}



def select(method: str, stats, languages: Optional[list[str]] = None, **params):
    """Run a selection method from Python, exactly as ``langneurons identify METHOD`` would.

    ``stats`` is an :class:`~langneurons.stats.ActivationStats` (or a directory to load);
    ``params`` are the method's options with underscores (``top_rate=0.05``); options not given take
    the command-line defaults. Returns the :class:`~langneurons.neuronset.NeuronSet`.

    >>> ns = select("lape", "runs/stats", top_rate=0.05)          # doctest: +SKIP
    """
    import argparse
    from pathlib import Path as _Path
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    module = METHODS[method]
    parser = argparse.ArgumentParser(prog=f"identify {method}")
    module.add_arguments(parser)
    defaults = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise UserError(f"{method} has no option {', '.join(unknown)}; it takes {', '.join(sorted(defaults))}")
    args = argparse.Namespace(**{**defaults, **params})
    if isinstance(stats, (str, _Path)):
        from ..stats import ActivationStats
        stats = ActivationStats.load(stats)
    if stats is not None:
        languages = stats.check_languages(languages)
    return module.run(stats, languages, args)


__all__ = ["METHODS", "select", "check_open_unit", "rank_of", "kth_value", "top_count_mask", "prob_table"]
