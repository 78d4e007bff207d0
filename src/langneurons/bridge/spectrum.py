r"""Linguistic spectrum: language-by-language similarity of language neurons (METHODS.md 3.3, 6).

For the K languages with top-prob masks ``T_k`` (bool ``[L, I]``) and activation probabilities
``p_k`` (``[L, I]``):

* ``overlap[k, k'] = |T_k ∩ T_k'|`` (int; the diagonal is ``|T_k|``);
* ``cosine[k, k']`` = cosine of ``p_k`` and ``p_k'`` restricted to ``T_k ∩ T_k'``
  (both from :func:`langneurons.identify.top_prob.overlap_similarity`);
* ``jaccard[k, k'] = |T_k ∩ T_k'| / |T_k ∪ T_k'|``;
* ``hsic[k, k']`` (optional, needs probe activations ``A`` ``[L, I, N]``): the mean over the
  non-empty layers ``l`` of the window of ``layer_score(hsic_matrix(A[l, T_k[l]], A[l, T_k'[l]]))``,
  NaN when no layer has neurons of both languages.  The score is symmetric in (k, k'), so only
  ``k <= k'`` is computed.

:func:`save_spectrum` writes ``spectrum.json`` (format ``langneurons.bridge.spectrum.v1``) and one
heatmap PNG per matrix.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from ..artifacts import SPECTRUM_FORMAT
from ..errors import UserError
from ..atomic import atomic_write_text
from .select import bridge_score

__all__ = ["jaccard_from_overlap", "hsic_language_matrix", "compute_spectrum", "save_spectrum"]


def jaccard_from_overlap(overlap: torch.Tensor) -> torch.Tensor:
    """``J = O / (diag_k + diag_k' - O)`` from the overlap-count matrix (0 where both sets are empty)."""
    o = overlap.to(torch.float64)
    d = torch.diagonal(o)
    union = d[:, None] + d[None, :] - o
    return torch.where(union > 0, o / union.clamp_min(1), torch.zeros_like(o))


def hsic_language_matrix(acts: torch.Tensor, masks: Mapping[str, torch.Tensor], langs: Sequence[str],
                         layers: Sequence[int], variant: str = "biased", sigma: Optional[float] = None) -> torch.Tensor:
    """``H[k, k']``, float64 ``[K, K]`` (definition in the module docstring)."""
    K = len(langs)
    out = torch.full((K, K), float("nan"), dtype=torch.float64)
    for i in range(K):
        for j in range(i, K):
            r = bridge_score(acts, masks[langs[i]], masks[langs[j]], layers, variant, sigma)
            out[i, j] = out[j, i] = r["score"]
    return out


def compute_spectrum(probs: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                     acts: Optional[torch.Tensor] = None, layers: Optional[Sequence[int]] = None,
                     variant: str = "biased", sigma: Optional[float] = None) -> dict:
    """All spectrum matrices: ``{"languages", "overlap", "cosine", "jaccard", "hsic" (or None)}``."""
    from ..identify.top_prob import overlap_similarity

    langs, O, S = overlap_similarity(probs, masks)
    langs = list(langs)
    result = {"languages": langs, "overlap": O, "cosine": S, "jaccard": jaccard_from_overlap(O), "hsic": None,
              "layers": None, "hsic_variant": None}
    if acts is not None:
        if layers is None:
            raise UserError("the HSIC spectrum needs a layer window")
        result["hsic"] = hsic_language_matrix(acts, masks, langs, layers, variant, sigma)
        result["layers"] = [int(l) for l in layers]
        result["hsic_variant"] = variant
    return result


def _rows(m: torch.Tensor) -> list:
    return [[None if (isinstance(v, float) and math.isnan(v)) else v for v in row] for row in m.tolist()]


def save_spectrum(result: dict, out_dir, plots: bool = True) -> list[Path]:
    """Write ``spectrum.json`` and heatmaps ``spectrum_{overlap,cosine,jaccard,hsic}.png``; return the paths."""
    from ..plots import plot_heatmap

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    langs = result["languages"]
    doc = {"format": SPECTRUM_FORMAT, **{k: v for k, v in result.items() if not isinstance(v, torch.Tensor)}}
    for key in ("overlap", "cosine", "jaccard", "hsic"):
        if isinstance(result.get(key), torch.Tensor):
            doc[key] = _rows(result[key])
    paths = [out / "spectrum.json"]
    atomic_write_text(paths[0], json.dumps(doc, ensure_ascii=False, indent=1))
    if plots:
        specs = [("overlap", "d", "top-prob neuron overlap |T_k ∩ T_k'|"),
                 ("cosine", ".2f", "cosine of activation probabilities on T_k ∩ T_k'"),
                 ("jaccard", ".2f", "Jaccard of top-prob neuron sets")]
        if result.get("hsic") is not None:
            specs.append(("hsic", ".2e", f"HSIC ({result['hsic_variant']}) layer score, layers "
                                         f"{result['layers'][0]}-{result['layers'][-1]}"))
        for key, fmt, title in specs:
            p = out / f"spectrum_{key}.png"
            plot_heatmap(result[key], langs, langs, p, title=title, fmt=fmt)
            paths.append(p)
    return paths
