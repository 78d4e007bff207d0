"""Task heads on a decoder LM: sequence classification with a linear head, and causal-LM QA loss.

Classification
--------------
``h = backbone(input_ids, attention_mask, position_ids)`` is the final hidden state ``[B, T, H]``
(after the final norm: the input of the LM head, whose width ``H`` is read from the LM head). A
pooled vector per sequence goes through ``logits = W h_pool + b`` (``W``: ``[C, H]``).

Pooling (``pooling=``):

- ``last-token`` (default): ``h[b, t_b]`` with ``t_b = max{t : mask[b, t] = 1}``, the last *real* token.
  Because position ids are counted over real tokens (:func:`langneurons.runtime.forward_kwargs`),
  left and right padding give the same vector.
- ``last-position`` (alias ``m25``): ``h[b, T - 1]``, the last position of the padded batch. With
  right padding this is a pad position for every sequence shorter than the longest one: what
  [M25]'s classifier did; offered for replication only.
- ``mean``: mean of ``h`` over real tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from ..runtime import forward_kwargs
from ..errors import UserError

POOLINGS = {"last-token": "last-token", "last-position": "last-position", "m25": "last-position", "mean": "mean"}


def resolve_pooling(name: str) -> str:
    if name not in POOLINGS:
        raise UserError(f"unknown --pooling {name!r}; use last-token (default), last-position (alias m25) or mean")
    return POOLINGS[name]


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[B, T, H]`` hidden states and ``[B, T]`` mask -> ``[B, H]`` (see the module docstring)."""
    pooling = resolve_pooling(pooling)
    B, T, _ = hidden.shape
    if pooling == "last-position":
        return hidden[:, -1]
    m = mask.to(hidden.device)
    if pooling == "mean":
        w = m.to(hidden.dtype).unsqueeze(-1)
        return (hidden * w).sum(1) / w.sum(1).clamp_min(1)
    pos = torch.arange(T, device=hidden.device).unsqueeze(0)             # [1, T]
    last = (pos * (m > 0)).amax(dim=1)                                  # [B]: last real position
    return hidden[torch.arange(B, device=hidden.device), last]


def lm_hidden_size(model: nn.Module) -> int:
    """Width of the final hidden state = the LM head's input width (handles OPT's projection)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    w = getattr(head, "weight", None)
    if w is not None and w.dim() == 2:
        return int(w.shape[1])
    return int(model.config.hidden_size)


class SequenceClassifier(nn.Module):
    """A linear head on a pooled final hidden state of ``model.base_model`` (LoRA layers included).

    ``model`` is the (possibly PEFT-injected) ``*ForCausalLM``; only its backbone runs, so no
    vocabulary-sized logits are computed. The head is kept in float32.
    """

    def __init__(self, model: nn.Module, num_labels: int, pooling: str = "last-token"):
        super().__init__()
        self.pooling = resolve_pooling(pooling)
        self.lm = model
        hidden = lm_hidden_size(model)
        self.head = nn.Linear(hidden, num_labels)
        dev = next(model.parameters()).device
        self.head.to(device=dev, dtype=torch.float32)

    @property
    def backbone(self) -> nn.Module:
        inner = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        return inner.base_model

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        out = bb(input_ids=input_ids, **forward_kwargs(bb, attention_mask), use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return pool(hidden, attention_mask, self.pooling).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` (float32)."""
        return self.head(self.features(input_ids, attention_mask))

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}


def lm_token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over positions whose label is not -100, and their count.

    ``loss_sum = sum_{b,t: y[b,t+1] != -100} -log softmax(z[b,t])[y[b,t+1]]`` (``z``: logits ``[B, T, V]``),
    so that a gradient-accumulated step divides by the token count of the whole effective batch.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    kw = forward_kwargs(inner, batch["attention_mask"])
    logits = inner(input_ids=batch["input_ids"], use_cache=False, **kw).logits
    labels = batch["labels"][:, 1:]
    z = logits[:, :-1].float()
    loss = nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                       reduction="sum")
    return loss, int((labels != -100).sum())
