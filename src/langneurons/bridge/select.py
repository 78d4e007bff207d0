r"""Bridge-language selection by HSIC between overlap and bridge neurons (METHODS.md 6.3-6.4).

For a pair (s, t) with probe activations ``A`` (float ``[L, I, N]``, :mod:`.probe`) and a
candidate bridge ``b``, for every layer ``l`` of the layer window ``W``:

* ``X_l = A[l, O_st[l], :]`` ``[n1, N]`` (overlap neurons, :func:`.overlap.overlap_mask`),
* ``Y_l = A[l, B_b[l], :]`` ``[n2, N]`` (bridge neurons, :func:`.overlap.bridge_mask`),
* ``s_l = layer_score(hsic_matrix(X_l, Y_l, variant, sigma))``
  ``= 1/2 (mean_i max_j HSIC_ij + mean_j max_i HSIC_ij)`` (:mod:`.hsic`).

The candidate's score is the mean of ``s_l`` over the NON-EMPTY layers of ``W`` (layers with
``n1 = 0`` or ``n2 = 0`` are skipped, they neither count as 0 nor shrink the denominator), using
the model's true layer ids.  If every layer of ``W`` is empty the score is NaN and the candidate
is ranked last.  The bridge is the candidate with the highest score (ties keep the candidates'
order).

Layer window: by default layers 10-21 (inclusive) of a 32-layer model, scaled by depth to
``round_half_up(10/32 * L) .. round_half_up(21/32 * L)`` (:func:`window_layers`), or an explicit
list (:func:`parse_layers`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from ..artifacts import RANKING_FORMAT
from ..errors import UserError
from ..atomic import atomic_write_text
from .hsic import VARIANTS, hsic_matrix, layer_score
from .overlap import NeuronDefinition, bridge_mask, layer_rows, overlap_mask

__all__ = ["DEFAULT_CANDIDATES", "DEFAULT_WINDOW", "window_layers", "parse_layers", "bridge_score", "rank_bridges",
           "save_ranking", "plot_ranking"]

DEFAULT_CANDIDATES = ("en", "de", "fr", "it", "pt", "es")
#: (first, last, reference depth): layers 10..21 of 32.
DEFAULT_WINDOW = (10, 21, 32)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def window_layers(num_layers: int, start: int = 10, end: int = 21, ref: int = 32) -> list[int]:
    """Layers ``round_half_up(start/ref*L) .. round_half_up(end/ref*L)``, inclusive, clipped to ``[0, L-1]``.

    ``window_layers(32) == list(range(10, 22))``; ``window_layers(4) == [1, 2, 3]``.
    """
    if num_layers < 1 or ref < 1 or not (0 <= start <= end):
        raise UserError(f"bad layer window {start}-{end} of {ref} for {num_layers} layers; use 0 <= start <= end")
    lo = min(_round_half_up(start / ref * num_layers), num_layers - 1)
    hi = min(_round_half_up(end / ref * num_layers), num_layers - 1)
    return list(range(lo, hi + 1))


def parse_layers(text: str, num_layers: int) -> list[int]:
    """``"3-7,9"`` -> ``[3, 4, 5, 6, 7, 9]`` (sorted, unique, each < ``num_layers``)."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(v) for v in part.split("-", 1))
                if a > b:
                    raise ValueError
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise UserError(f"bad --layers item {part!r}; write e.g. 10-21 or 3,5,7") from None
    bad = [v for v in out if v < 0 or v >= num_layers]
    if bad or not out:
        raise UserError(f"--layers {text!r} must name layers 0..{num_layers - 1}; the model has {num_layers} layers")
    return sorted(out)


def bridge_score(acts: torch.Tensor, x_mask: torch.Tensor, y_mask: torch.Tensor, layers: Sequence[int],
                 variant: str = "biased", sigma: Optional[float] = None) -> dict:
    """Mean layer score over the non-empty layers of ``layers`` (module docstring).

    Args:
        acts: probe activations ``[L, I, N]``.
        x_mask, y_mask: bool ``[L, I]`` (overlap and bridge neurons).
        layers: true layer ids of the window.

    Returns:
        ``{"score": float (NaN if no layer is usable), "layers_used": [ids], "per_layer": [{"layer",
        "n_overlap", "n_bridge", "score" (None if skipped)}]}``.
    """
    if acts.dim() != 3 or tuple(x_mask.shape) != tuple(acts.shape[:2]) or tuple(y_mask.shape) != tuple(acts.shape[:2]):
        raise UserError(f"probe activations {tuple(acts.shape)} do not match the neuron masks "
                        f"{tuple(x_mask.shape)}; use probes and statistics of the same model")
    per_layer, used = [], []
    for l in layers:
        xi, yi = layer_rows(x_mask, l), layer_rows(y_mask, l)
        entry = {"layer": int(l), "n_overlap": int(xi.numel()), "n_bridge": int(yi.numel()), "score": None}
        if xi.numel() and yi.numel():
            a = acts[l].to(torch.float64)
            try:
                entry["score"] = layer_score(hsic_matrix(a[xi], a[yi], variant=variant, sigma=sigma))
            except ValueError as e:  # too few probes for the estimator, non-finite activations, bad sigma
                raise UserError(f"HSIC in layer {l} failed: {e}; use more probes (--limit, --filter all) "
                                "or another --hsic/--sigma") from None
            used.append(int(l))
        per_layer.append(entry)
    scores = [e["score"] for e in per_layer if e["score"] is not None]
    score = sum(scores) / len(scores) if scores else float("nan")
    return {"score": score, "layers_used": used, "per_layer": per_layer}


def rank_bridges(acts: torch.Tensor, masks: Mapping[str, torch.Tensor], s: str, t: str, candidates: Sequence[str],
                 layers: Sequence[int], definition: NeuronDefinition = NeuronDefinition(), variant: str = "biased",
                 sigma: Optional[float] = None) -> dict:
    """Score every candidate bridge for ``s -> t`` and rank them (highest first, NaN last).

    Candidates equal to ``s`` or ``t`` are dropped (a bridge must be a third language).

    Returns ``{"format", "src", "trg", "selected" (code or None if every score is NaN), "ranking":
    [{"bridge", "score", "rank", "layers_used", "per_layer"}], "overlap_per_layer", "layers", "definition",
    "hsic"}``.
    """
    if variant not in VARIANTS:
        raise UserError(f"unknown --hsic {variant!r}; use one of {', '.join(VARIANTS)}")
    cands = [c for c in dict.fromkeys(candidates) if c not in (s, t)]
    if not cands:
        raise UserError(f"no candidate bridge besides {s} and {t}; give --candidates with other languages")
    x = overlap_mask(masks, s, t, definition.overlap)
    rows = []
    for k, b in enumerate(cands):
        y = bridge_mask(masks, b, s, t, definition.bridge_exclude)
        r = bridge_score(acts, x, y, layers, variant, sigma)
        rows.append({"bridge": b, "order": k, **r})
    rows.sort(key=lambda r: (math.isnan(r["score"]), -r["score"] if not math.isnan(r["score"]) else 0.0, r["order"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
        del r["order"]
    selected = rows[0]["bridge"] if not math.isnan(rows[0]["score"]) else None
    return {"format": RANKING_FORMAT, "src": s, "trg": t, "selected": selected, "ranking": rows,
            "layers": [int(l) for l in layers],
            "overlap_per_layer": {int(l): int(x[l].sum()) for l in layers}, "definition": definition.as_dict(),
            "hsic": variant, "sigma": sigma if sigma is not None else "median"}


def _json_safe(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def save_ranking(result: dict, path) -> Path:
    """Write a ranking as JSON (format ``langneurons.bridge.ranking.v1``; NaN scores as ``null``)."""
    doc = {"format": RANKING_FORMAT, **result}
    atomic_write_text(path, json.dumps(_json_safe(doc), ensure_ascii=False, indent=1))
    return Path(path)


def plot_ranking(result: dict, path, title: Optional[str] = None) -> Path:
    """Bar chart of the candidates' scores, best first; NaN candidates drawn as empty bars labelled n/a."""
    from ..plots import plot_bars

    rows = result["ranking"]
    layers = result.get("layers") or []
    span = f"layers {layers[0]}-{layers[-1]}" if layers else ""
    return plot_bars([r["score"] for r in rows], [r["bridge"] for r in rows], path,
                     highlight=result.get("selected"), value_fmt=".3g",
                     ylabel=f"mean layer score (HSIC {result.get('hsic', '')})",
                     title=title or f"bridge candidates for {result['src']}->{result['trg']} ({span})")
