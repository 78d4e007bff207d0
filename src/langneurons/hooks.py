"""Hooks on neuron sites, as context managers that always remove themselves.

Observer hooks return ``None`` and never change a model's outputs. Writer hooks (used by
interventions) return a replacement tensor. Both reach a site through :class:`~langneurons.arch.Adapter`:

- ``pre``: the input of the activation module;
- ``act``: the output of the activation module;
- ``product``: the input of the down projection (gated MLPs; equal to ``act`` otherwise).

Residual-stream hooks (:func:`observe_residual`, :func:`write_residual`) sit on the decoder layers
themselves and see the hidden states each layer outputs, ``[B, T, H]`` (the first element when a
layer returns a tuple): what ``output_hidden_states=True`` returns at index ``layer + 1``, except
that HF applies the final norm to its last entry.

Attention-head hooks (:func:`observe_heads`, :func:`write_heads`) are forward pre-hooks on each
layer's attention output projection (:meth:`~langneurons.arch.Adapter.attention`) and see its input
``z [B, T, n * d]``, the concatenation of the ``n`` heads' outputs (head ``h``: columns ``h*d .. (h+1)*d - 1``).

Shape contract: every hook function sees ``[B, T, I]``. Architectures that run their MLP on
flattened tokens (OPT hands its MLP ``[B*T, I]``) are viewed back as ``[B, T, I]`` with the batch
shape of the current layer call (recorded by pre-hooks on the decoder layers), and a tensor a
writer returns is reshaped to the module's own shape. A layer called on its own, outside a model
call, shows its flat tokens as ``[1, N, I]``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from .arch import Adapter, check_site
from .errors import UserError

#: ``fn(layer, activations)`` with activations ``[B, T, I]``.
Observer = Callable[[int, torch.Tensor], None]
#: ``fn(layer, activations) -> new activations`` of the same shape.
Writer = Callable[[int, torch.Tensor], torch.Tensor]


class _CallShape:
    """The ``(B, T)`` of the forward pass in progress, read by pre-hooks on the decoder layers from
    their hidden states ``[B, T, H]`` (OPT flattens tokens inside the layer, not before it)."""

    def __init__(self, adapter: Adapter):
        self.shape: Optional[tuple[int, int]] = None
        self.users = 0
        self.handles: list = []
        self.adapter = adapter

    def _pre(self, module, args, kwargs):
        h = args[0] if args else kwargs.get("hidden_states")
        self.shape = (int(h.shape[0]), int(h.shape[1])) if isinstance(h, torch.Tensor) and h.dim() == 3 else None
        return None

    def acquire(self) -> None:
        if self.users == 0:
            self.handles = [m.layer.register_forward_pre_hook(self._pre, with_kwargs=True)
                            for m in self.adapter.layers]
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            for h in self.handles:
                h.remove()
            self.handles = []
            self.shape = None


def _call_shape(adapter: Adapter) -> _CallShape:
    cs = getattr(adapter, "_call_shape", None)
    if cs is None:
        cs = _CallShape(adapter)
        adapter._call_shape = cs
    return cs


def _as_btI(t: torch.Tensor, cs: _CallShape) -> torch.Tensor:
    """``t`` as ``[B, T, I]`` (flattened tokens viewed back; see the module docstring)."""
    if t.dim() != 2:
        return t
    s = cs.shape
    if s is not None and s[0] * s[1] == t.shape[0]:
        return t.view(s[0], s[1], t.shape[1])
    return t.view(1, t.shape[0], t.shape[1])


def _register(adapter: Adapter, layer: int, site: str, fn: Callable[[torch.Tensor], Optional[torch.Tensor]]):
    module, where = adapter.site_module(layer, site)
    cs = _call_shape(adapter)

    def call(t: torch.Tensor) -> Optional[torch.Tensor]:
        new = fn(_as_btI(t, cs))
        return new.reshape(t.shape) if new is not None and new.shape != t.shape else new

    if where == "output":
        def hook(mod, args, output):
            return call(output)
        return module.register_forward_hook(hook)

    def pre_hook(mod, args):
        new = call(args[0])
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
    cs = _call_shape(adapter)
    cs.acquire()

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
        cs.release()


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


# ------------------------------------------------------------------------------------------ residual stream
#: ``fn(layer, hidden)`` with hidden ``[B, T, H]``: ``None`` (observe) or the new hidden states.
ResidualFn = Callable[[int, torch.Tensor], Optional[torch.Tensor]]


@contextlib.contextmanager
def _residual_hooked(adapter: Adapter, layers: list[int], fn: ResidualFn):
    """Forward hooks on the decoder layers ``layers``: ``fn(layer, h)`` sees the residual stream the
    layer outputs, ``h [B, T, H]`` (element 0 when the layer returns a tuple). A tensor ``fn``
    returns replaces it (the rest of a tuple is kept). Yields per-layer call counts; always removes."""
    calls = [0] * adapter.num_layers
    handles = []
    cs = _call_shape(adapter)
    cs.acquire()

    def make(l: int):
        def hook(mod, args, output):
            calls[l] += 1
            packed = isinstance(output, (tuple, list))
            h = output[0] if packed else output
            if not isinstance(h, torch.Tensor):
                raise UserError(f"decoder layer {l} of model type {adapter.model_type!r} returned "
                                f"{type(h).__name__}, not its hidden states; check --arch layers=...")
            new = fn(l, _as_btI(h, cs))
            if new is None:
                return None
            if new.shape != h.shape:
                new = new.reshape(h.shape)
            return (new, *output[1:]) if packed else new
        return hook

    try:
        for l in layers:
            handles.append(adapter.layers[l].layer.register_forward_hook(make(l)))
        yield calls
    finally:
        for h in handles:
            h.remove()
        cs.release()


def observe_residual(adapter: Adapter, fn: Callable[[int, torch.Tensor], None], layers: Optional[list[int]] = None):
    """Call ``fn(layer, hidden)`` with the residual stream each decoder layer outputs, ``[B, T, H]``
    (detached); outputs are untouched. A context manager yielding per-layer call counts."""
    layers = list(range(adapter.num_layers)) if layers is None else layers

    def watch(l: int, h: torch.Tensor) -> None:
        fn(l, h.detach())
        return None
    return _residual_hooked(adapter, layers, watch)


def write_residual(adapter: Adapter, fn: Writer, layers: list[int]):
    """Replace the residual stream output of decoder ``layers`` by ``fn(layer, hidden)`` (a context manager)."""
    return _residual_hooked(adapter, layers, fn)


# ------------------------------------------------------------------------------------------ attention heads
@contextlib.contextmanager
def _heads_hooked(adapter: Adapter, layers: list[int], fn: Callable[[int, torch.Tensor], Optional[torch.Tensor]]):
    """Forward pre-hooks on the attention output projections of ``layers``: ``fn(layer, z)`` sees their
    input ``z [B, T, n * d]``; a tensor it returns replaces it. Yields per-layer call counts; always removes."""
    att = adapter.attention()
    calls = [0] * adapter.num_layers
    handles = []
    cs = _call_shape(adapter)
    cs.acquire()

    def make(l: int):
        def pre_hook(mod, args, kwargs):
            calls[l] += 1
            key = None
            if args:
                z = args[0]
            else:
                key = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
                z = kwargs.get(key) if key is not None else None
            if not isinstance(z, torch.Tensor) or z.shape[-1] != att.width:
                got = list(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                raise UserError(f"the attention output projection {att.path!r} of layer {l} received {got}, not the "
                                f"{att.num_heads} x {att.head_dim} head outputs; check --attn-out")
            new = fn(l, _as_btI(z, cs))
            if new is None:
                return None
            if new.shape != z.shape:
                new = new.reshape(z.shape)
            if key is not None:
                return args, {**kwargs, key: new}
            return (new,) + tuple(args[1:]), kwargs
        return pre_hook

    try:
        for l in layers:
            handles.append(att.modules[l].register_forward_pre_hook(make(l), with_kwargs=True))
        yield calls
    finally:
        for h in handles:
            h.remove()
        cs.release()


def observe_heads(adapter: Adapter, fn: Callable[[int, torch.Tensor], None], layers: Optional[list[int]] = None):
    """Call ``fn(layer, z)`` with the input of each layer's attention output projection, ``[B, T, n * d]``
    (detached; the heads' outputs side by side); outputs are untouched. Yields per-layer call counts."""
    layers = list(range(adapter.num_layers)) if layers is None else layers

    def watch(l: int, z: torch.Tensor) -> None:
        fn(l, z.detach())
        return None
    return _heads_hooked(adapter, layers, watch)


def write_heads(adapter: Adapter, fn: Writer, layers: list[int]):
    """Replace the input of the attention output projection of ``layers`` by ``fn(layer, z)`` (a context manager)."""
    return _heads_hooked(adapter, layers, fn)
