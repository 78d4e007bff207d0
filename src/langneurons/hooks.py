"""Hooks on neuron sites, as context managers that always remove themselves.

Observer hooks return ``None`` and never change a model's outputs. Writer hooks (used by
interventions) return a replacement tensor. Both reach a site through :class:`~langneurons.arch.Adapter`:

- ``pre``: the input of the activation module;
- ``act``: the output of the activation module;
- ``product``: the input of the down projection (gated MLPs; equal to ``act`` otherwise).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from .arch import Adapter, check_site
from .errors import UserError

#: ``fn(layer, activations)`` with activations ``[..., I]`` (batch and sequence dims first).
Observer = Callable[[int, torch.Tensor], None]
#: ``fn(layer, activations) -> new activations`` of the same shape.
Writer = Callable[[int, torch.Tensor], torch.Tensor]


def _register(adapter: Adapter, layer: int, site: str, fn: Callable[[torch.Tensor], Optional[torch.Tensor]]):
    module, where = adapter.site_module(layer, site)
    if where == "output":
        def hook(mod, args, output):
            return fn(output)
        return module.register_forward_hook(hook)

    def pre_hook(mod, args):
        new = fn(args[0])
        if new is None:
            return None
        return (new,) + tuple(args[1:])
    return module.register_forward_pre_hook(pre_hook)


@contextlib.contextmanager
def _hooked(adapter: Adapter, site: str, layers: list[int], fn: Callable[[int, torch.Tensor], Optional[torch.Tensor]]):
    """Register ``fn(layer, tensor)`` at ``site`` of ``layers``; yield per-layer call counts; always remove."""
    check_site(site)
    calls = [0] * adapter.num_layers
    handles = []

    def make(l: int):
        def f(t: torch.Tensor):
            calls[l] += 1
            return fn(l, t)
        return f

    try:
        for l in layers:
            handles.append(_register(adapter, l, site, make(l)))
        yield calls
    finally:
        for h in handles:
            h.remove()


def observe(adapter: Adapter, site: str, fn: Observer, layers: Optional[list[int]] = None):
    """Call ``fn(layer, activations)`` on every forward pass at ``site``; outputs are untouched.

    A context manager yielding a list of per-layer call counts, so callers can check that every
    layer fired.
    """
    layers = list(range(adapter.num_layers)) if layers is None else layers

    def watch(l: int, t: torch.Tensor) -> None:
        fn(l, t.detach())
        return None
    return _hooked(adapter, site, layers, watch)


def write(adapter: Adapter, site: str, fn: Writer, layers: list[int]):
    """Replace the activations at ``site`` of ``layers`` by ``fn(layer, activations)`` (a context manager)."""
    return _hooked(adapter, site, layers, fn)


def check_fired(calls: list[int], layers: list[int], expected: int = 1) -> None:
    """Raise if a hooked layer did not run exactly ``expected`` times in one forward pass.

    A fused MLP kernel that bypasses the activation module would otherwise yield silent zeros.
    """
    bad = [l for l in layers if calls[l] != expected]
    if bad:
        raise UserError(f"the activation hook of layer(s) {bad[:5]} ran {calls[bad[0]]} time(s) per forward "
                        f"pass instead of {expected}; the model bypasses its activation module (a fused kernel?). "
                        "Load it without custom kernels, or give module paths with --arch")
