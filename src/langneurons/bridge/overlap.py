r"""Overlap neurons of a language pair and bridge-language neurons (METHODS.md 6.3).

BridgeX-ICL does not publish which neurons form ``X`` (the "overlap" of source and target) and
``Y`` (the "bridge language neurons").  This module makes the choice explicit and parametric.
With ``T_k`` the top-prob language neurons of language ``k`` (a bool mask ``[L, I]``, from
:func:`langneurons.identify.top_prob.top_prob_masks`, i.e. the top 1% of all ``L*I`` neurons by
activation probability on the language's text):

overlap of (s, t), ``overlap=``

* ``"intersection"`` (default): ``O_st = T_s ∩ T_t``, the neurons language-active for both;
* ``"union"``: ``O_st = T_s ∪ T_t``.

bridge neurons of candidate b, ``bridge_exclude=``

* ``"none"`` (default): ``B_b = T_b``;
* ``"pair"``: ``B_b = T_b \ (T_s ∪ T_t)``, so that no neuron is in both X and Y (a shared
  neuron is perfectly dependent on itself and would pull the score up).

In layer ``l``, ``X_l`` are the rows of the probe activations ``A[l]`` (``[I, N]``) selected by
``O_st[l]`` and ``Y_l`` those selected by ``B_b[l]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import torch

from ..errors import UserError

__all__ = ["OVERLAP_MODES", "BRIDGE_EXCLUDE", "NeuronDefinition", "overlap_mask", "bridge_mask", "layer_rows",
           "layer_counts"]

OVERLAP_MODES = ("intersection", "union")
BRIDGE_EXCLUDE = ("none", "pair")


@dataclass(frozen=True)
class NeuronDefinition:
    """Which neurons form X (overlap) and Y (bridge); see the module docstring."""

    overlap: str = "intersection"
    bridge_exclude: str = "none"

    def __post_init__(self):
        if self.overlap not in OVERLAP_MODES:
            raise UserError(f"unknown --overlap {self.overlap!r}; use one of {', '.join(OVERLAP_MODES)}")
        if self.bridge_exclude not in BRIDGE_EXCLUDE:
            raise UserError(f"unknown --bridge-exclude {self.bridge_exclude!r}; use one of {', '.join(BRIDGE_EXCLUDE)}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["x"] = "T_s & T_t" if self.overlap == "intersection" else "T_s | T_t"
        d["y"] = "T_b" if self.bridge_exclude == "none" else "T_b - (T_s | T_t)"
        return d


def _get(masks: Mapping[str, torch.Tensor], code: str) -> torch.Tensor:
    if code not in masks:
        raise UserError(f"no language neurons for {code!r} (have {', '.join(masks)}); include it in the statistics")
    m = masks[code]
    if m.dtype != torch.bool or m.dim() != 2:
        raise UserError(f"the language mask of {code!r} must be a bool [L, I] tensor")
    return m


def overlap_mask(masks: Mapping[str, torch.Tensor], s: str, t: str, mode: str = "intersection") -> torch.Tensor:
    """``T_s ∩ T_t`` (``intersection``) or ``T_s ∪ T_t`` (``union``), bool ``[L, I]``."""
    NeuronDefinition(overlap=mode)
    a, b = _get(masks, s), _get(masks, t)
    return a & b if mode == "intersection" else a | b


def bridge_mask(masks: Mapping[str, torch.Tensor], b: str, s: str, t: str, exclude: str = "none") -> torch.Tensor:
    """``T_b`` (``none``) or ``T_b \\ (T_s ∪ T_t)`` (``pair``), bool ``[L, I]``."""
    NeuronDefinition(bridge_exclude=exclude)
    mb = _get(masks, b)
    if exclude == "none":
        return mb.clone()
    return mb & ~(_get(masks, s) | _get(masks, t))


def layer_rows(mask: torch.Tensor, layer: int) -> torch.Tensor:
    """Neuron indices of ``mask`` in ``layer`` (int64 ``[n]``, ascending)."""
    return mask[layer].nonzero().flatten()


def layer_counts(mask: torch.Tensor) -> list[int]:
    """Neurons per layer, ``[L]``."""
    return mask.sum(dim=1).tolist()
