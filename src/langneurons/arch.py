"""Architecture adapters: where the decoder layers are and how to reach each neuron site.

Architecture knowledge is data. One :class:`ArchSpec` per HuggingFace ``model_type`` names, relative
to ``model.base_model``, the list of decoder layers and, relative to one layer, the MLP modules:

- ``gate``: the first linear map; its output for neuron ``j`` is the ``pre`` site
  (``gate_proj`` in gated MLPs, ``fc1``/``c_fc``/``dense_h_to_4h`` otherwise).
- ``act``: the activation *module*; it receives ``pre`` and returns ``act = act_fn(pre)``.
- ``up``: gated MLPs only, the second linear map (``None`` when fused into ``gate``).
- ``down``: the output projection; its input is the ``product`` site.

Sites, for neuron ``j`` of layer ``l`` (``x`` = input of the MLP):

=========  ==============================================  ===============================
site       gated MLP (Llama, Qwen, Gemma, Phi-3, ...)       non-gated MLP (GPT-2, OPT, ...)
=========  ==============================================  ===============================
pre        ``(W_gate x)_j``                                 ``(W_fc1 x + b)_j``
act        ``act_fn(pre_j)``                                ``act_fn(pre_j)``
product    ``act_fn(pre_j) * (W_up x)_j`` (input of down)   same as ``act``
=========  ==============================================  ===============================

Weight layouts (``gate_layout``): ``linear`` (``nn.Linear``, neuron ``j`` is row ``j``),
``fused_gate_up`` (Phi-3 ``gate_up_proj``: rows ``j`` and ``I + j`` belong to neuron ``j``) and
``conv1d`` (GPT-2 ``Conv1D``, weight stored ``(in, out)``: neuron ``j`` is column ``j``).

Unknown model types are auto-detected when they follow the usual layout; otherwise the user gives
module path templates (``--arch layers=model.layers,act=mlp.act_fn,down=mlp.down_proj,...``).

Attention heads (:data:`ATTN_OUT`, :meth:`Adapter.attention`). Every family of the table has a separate
attention *output projection* (``o_proj``, GPT-2 ``c_proj``, ``dense``, OPT ``out_proj``), also those
with a fused query-key-value projection (GPT-2, GPT-NeoX, BLOOM, Falcon, Phi-3). Its input is the
concatenation of the heads' outputs, head-major: ``z = [z_0, ..., z_{n-1}]`` with ``n =
num_attention_heads`` (under grouped-query attention too: keys and values are shared, head outputs are
not), each ``z_h`` of ``head_dim`` columns. Head ``h`` adds ``c_h = W_O[:, h*d:(h+1)*d] z_h`` to the
projection's output (the bias belongs to no head); GPT-2's ``Conv1D`` stores ``W_O`` transposed.
The attention output projection is a sibling table so that the MLP spec (recorded in every statistics
file) is unchanged; unknown model types are auto-detected, ``attn_out=PATH`` overrides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .errors import UserError

SITES = ("pre", "act", "product")
LAYOUTS = ("linear", "fused_gate_up", "conv1d")


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one architecture (see the module docstring)."""

    layers: str
    act: str
    down: str
    gate: str
    up: Optional[str] = None
    gate_layout: str = "linear"
    gated: bool = True

    def describe(self) -> str:
        parts = [f"layers={self.layers}", f"gate={self.gate}", f"act={self.act}", f"down={self.down}"]
        if self.up:
            parts.append(f"up={self.up}")
        parts.append(f"layout={self.gate_layout}")
        parts.append(f"gated={'yes' if self.gated else 'no'}")
        return ",".join(parts)


def _llama_like() -> ArchSpec:
    return ArchSpec(layers="layers", gate="mlp.gate_proj", up="mlp.up_proj", act="mlp.act_fn",
                    down="mlp.down_proj")


def _plain(layers: str, gate: str, act: str, down: str, layout: str = "linear") -> ArchSpec:
    return ArchSpec(layers=layers, gate=gate, act=act, down=down, up=None, gate_layout=layout, gated=False)


#: The adapter table: HF ``model_type`` -> module paths.
ADAPTERS: dict[str, ArchSpec] = {
    **{t: _llama_like() for t in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "stablelm")},
    "phi3": ArchSpec(layers="layers", gate="mlp.gate_up_proj", up=None, act="mlp.activation_fn",
                     down="mlp.down_proj", gate_layout="fused_gate_up", gated=True),
    "phi": _plain("layers", "mlp.fc1", "mlp.activation_fn", "mlp.fc2"),
    "gpt2": _plain("h", "mlp.c_fc", "mlp.act", "mlp.c_proj", layout="conv1d"),
    "gpt_neox": _plain("layers", "mlp.dense_h_to_4h", "mlp.act", "mlp.dense_4h_to_h"),
    "bloom": _plain("h", "mlp.dense_h_to_4h", "mlp.gelu_impl", "mlp.dense_4h_to_h"),
    "opt": _plain("decoder.layers", "fc1", "activation_fn", "fc2"),
    "falcon": _plain("h", "mlp.dense_h_to_4h", "mlp.act", "mlp.dense_4h_to_h"),
}

#: The attention output projection of each model type, relative to one decoder layer (see the module
#: docstring): its input is the concatenation of the attention heads' outputs.
ATTN_OUT: dict[str, str] = {
    **{t: "self_attn.o_proj" for t in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "stablelm", "phi3")},
    "phi": "self_attn.dense",
    "gpt2": "attn.c_proj",
    "gpt_neox": "attention.dense",
    "bloom": "self_attention.dense",
    "opt": "self_attn.out_proj",
    "falcon": "self_attention.dense",
}
#: Last path components an auto-detected attention output projection may have.
_ATTN_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o", "out")

#: Model types known to route tokens through expert MLPs.
MOE_TYPES = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "dbrx", "olmoe",
             "jamba", "granitemoe", "phimoe", "jetmoe", "switch_transformers", "gpt_oss", "llama4",
             "minimax", "qwen3_next"}
_MOE_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def get_path(root: nn.Module, path: str) -> nn.Module:
    """Resolve a dotted module path (``""`` is ``root`` itself)."""
    mod = root
    for part in filter(None, path.split(".")):
        if not hasattr(mod, part):
            raise AttributeError(path)
        mod = getattr(mod, part)
    return mod


def parse_arch_override(text: str) -> ArchSpec:
    """Parse ``layers=...,gate=...,act=...,down=...[,up=...][,layout=...][,gated=yes|no]``."""
    fields: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise UserError(f"--arch item {item!r} is not KEY=PATH; write e.g. "
                            "--arch layers=model.layers,gate=mlp.gate_proj,act=mlp.act_fn,down=mlp.down_proj")
        k, v = item.split("=", 1)
        fields[k.strip()] = v.strip()
    missing = [k for k in ("layers", "gate", "act", "down") if k not in fields]
    if missing:
        raise UserError(f"--arch lacks {', '.join(missing)}; give layers=, gate=, act= and down= "
                        "(paths relative to model.base_model and to one layer)")
    unknown = set(fields) - {"layers", "gate", "act", "down", "up", "layout", "gated"}
    if unknown:
        raise UserError(f"--arch has unknown keys {sorted(unknown)}; allowed: layers, gate, up, act, down, layout, gated")
    layout = fields.get("layout", "linear")
    if layout not in LAYOUTS:
        raise UserError(f"--arch layout={layout!r} is unknown; use one of {', '.join(LAYOUTS)}")
    up = fields.get("up") or None
    gated_text = fields.get("gated", "yes" if (up or layout == "fused_gate_up") else "no")
    if gated_text not in ("yes", "no", "true", "false", "1", "0"):
        raise UserError(f"--arch gated={gated_text!r} must be yes or no")
    return ArchSpec(layers=fields["layers"], gate=fields["gate"], act=fields["act"], down=fields["down"],
                    up=up, gate_layout=layout, gated=gated_text in ("yes", "true", "1"))


def _is_moe(config) -> bool:
    mt = getattr(config, "model_type", "")
    if mt in MOE_TYPES:
        return True
    for key in _MOE_CONFIG_KEYS:
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 1:
            return True
    return False


_ACT_CLASS_HINTS = ("act", "gelu", "silu", "relu", "swish", "tanh", "sigmoid", "mish", "elu")


def _looks_like_activation(mod: nn.Module) -> bool:
    if len(list(mod.children())) > 0 or len(list(mod.parameters(recurse=False))) > 0:
        return False
    name = type(mod).__name__.lower()
    return any(h in name for h in _ACT_CLASS_HINTS) and "linear" not in name and "norm" not in name


def out_features(mod: nn.Module) -> Optional[int]:
    """Outputs of a linear-like module (``nn.Linear``: weight ``(out, in)``; GPT-2 ``Conv1D``: ``(in, out)``)."""
    w = getattr(mod, "weight", None)
    if w is None or w.dim() != 2:
        return None
    if type(mod).__name__ == "Conv1D":
        return w.shape[1]
    return w.shape[0]


def in_features(mod: nn.Module) -> Optional[int]:
    """Inputs of a linear-like module (see :func:`out_features`)."""
    w = getattr(mod, "weight", None)
    if w is None or w.dim() != 2:
        return None
    if type(mod).__name__ == "Conv1D":
        return w.shape[0]
    return w.shape[1]


def _find_layers(base: nn.Module, n_layers: Optional[int]) -> Optional[str]:
    best = None
    for name, mod in base.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if n_layers is not None and len(mod) != n_layers:
                continue
            if best is None or len(mod) > len(get_path(base, best)):
                best = name
    return best


def autodetect(model: nn.Module) -> ArchSpec:
    """Guess the adapter of a decoder model with the usual layout (a layer list holding MLPs)."""
    config = model.config
    base = getattr(model, "base_model", model)
    n_layers = getattr(config, "num_hidden_layers", None)
    layers_path = _find_layers(base, n_layers) or _find_layers(base, None)
    hint = ("give module paths with --arch layers=...,gate=...,act=...,down=...[,up=...] "
            "(relative to model.base_model and to one decoder layer)")
    if layers_path is None:
        raise UserError(f"cannot find the decoder layers of model type {config.model_type!r}; {hint}")
    layer0 = get_path(base, layers_path)[0]
    acts = [(n, m) for n, m in layer0.named_modules() if n and _looks_like_activation(m)
            and "attn" not in n and "attention" not in n]
    if len(acts) != 1:
        raise UserError(f"cannot recognise the MLP of model type {config.model_type!r} "
                        f"(found {len(acts)} activation modules outside attention); {hint}")
    act_path = acts[0][0]
    container_path = act_path.rsplit(".", 1)[0] if "." in act_path else ""
    container = get_path(layer0, container_path)
    prefix = container_path + "." if container_path else ""
    linears = [(n, m) for n, m in container.named_children() if out_features(m) is not None]
    hidden = getattr(config, "hidden_size", None)
    downs = [(n, m) for n, m in linears if out_features(m) == hidden and in_features(m) != hidden]
    if len(downs) != 1:
        raise UserError(f"cannot find the down projection of model type {config.model_type!r}; {hint}")
    down_name, down = downs[0]
    width = in_features(down)
    ins = [(n, m) for n, m in linears if in_features(m) == hidden and n != down_name]
    layout = "conv1d" if type(down).__name__ == "Conv1D" else "linear"
    fused = [n for n, m in ins if out_features(m) == 2 * width]
    plain = [n for n, m in ins if out_features(m) == width]
    if fused and not plain:
        return ArchSpec(layers=layers_path, gate=prefix + fused[0], act=act_path, down=prefix + down_name,
                        gate_layout="fused_gate_up", gated=True)
    gate = [n for n in plain if "gate" in n] or [n for n in plain if "up" not in n]
    if len(plain) == 1:
        return ArchSpec(layers=layers_path, gate=prefix + plain[0], act=act_path, down=prefix + down_name,
                        gate_layout=layout, gated=False)
    if len(plain) == 2 and len(gate) == 1:
        up = [n for n in plain if n != gate[0]][0]
        return ArchSpec(layers=layers_path, gate=prefix + gate[0], up=prefix + up, act=act_path,
                        down=prefix + down_name, gate_layout=layout, gated=True)
    raise UserError(f"cannot tell the gate and up projections of model type {config.model_type!r} apart; {hint}")


@dataclass
class LayerModules:
    """The resolved modules of one decoder layer."""

    layer: nn.Module
    gate: nn.Module
    act: nn.Module
    down: nn.Module
    up: Optional[nn.Module]


@dataclass
class AttentionLayout:
    """The attention output projections of a model and how its heads split their input.

    ``path`` (relative to one decoder layer), ``source`` (``table`` | ``auto`` | ``override``),
    ``num_heads`` ``n``, ``head_dim`` ``d``, ``layout`` (``linear`` or ``conv1d``) and ``modules`` (one
    per layer). Head ``h`` owns the input columns ``h*d .. (h+1)*d - 1``.
    """

    path: str
    source: str
    num_heads: int
    head_dim: int
    layout: str
    modules: list

    @property
    def width(self) -> int:
        """Inputs of the output projection: ``n * d``."""
        return self.num_heads * self.head_dim

    def weight(self, layer: int) -> torch.Tensor:
        """``W_O`` of ``layer`` as ``[out, n * d]`` (``out = z @ W_O.T + b``), transposed back for Conv1D."""
        w = self.modules[layer].weight
        return w.t() if self.layout == "conv1d" else w

    def head_weight(self, layer: int, head: int) -> torch.Tensor:
        """``W_O[:, h*d:(h+1)*d]``: ``[out, d]``."""
        d = self.head_dim
        return self.weight(layer)[:, head * d:(head + 1) * d]

    def columns(self, heads) -> torch.Tensor:
        """LongTensor of the input columns of ``heads`` (each head's ``d`` columns, in the given order)."""
        h = torch.as_tensor(list(heads) if not isinstance(heads, torch.Tensor) else heads, dtype=torch.long)
        return (h.reshape(-1, 1) * self.head_dim + torch.arange(self.head_dim)).reshape(-1)

    def describe(self) -> dict:
        return {"attn_out": self.path, "source": self.source, "num_heads": self.num_heads,
                "head_dim": self.head_dim, "layout": self.layout}


def _has_path(root: nn.Module, path: str) -> bool:
    try:
        get_path(root, path)
    except AttributeError:
        return False
    return True


def _num_heads(config) -> Optional[int]:
    for key in ("num_attention_heads", "n_head", "num_heads"):
        v = getattr(config, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


class Adapter:
    """A model together with its resolved architecture spec.

    ``Adapter(model)`` picks the spec by ``model.config.model_type`` (or ``spec=`` overrides it),
    checks the layout against the weights, and exposes ``num_layers``, ``width`` and per-layer modules.
    """

    def __init__(self, model: nn.Module, spec: Optional[ArchSpec] = None):
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", type(model).__name__)
        if spec is None and config is not None and _is_moe(config):
            raise UserError(f"model type {model_type!r} is a mixture-of-experts model, which is not supported "
                            "yet: its MLP neurons are split across experts; use a dense model")
        self.model = model
        self.model_type = model_type
        self.source = "override" if spec is not None else ("table" if model_type in ADAPTERS else "auto")
        self.spec = spec or ADAPTERS.get(model_type) or autodetect(model)
        base = getattr(model, "base_model", model)
        try:
            layer_list = get_path(base, self.spec.layers)
        except AttributeError:
            raise UserError(f"model type {model_type!r} has no module {self.spec.layers!r} below base_model; "
                            "check --arch layers=...") from None
        if not isinstance(layer_list, (nn.ModuleList, list, tuple)):
            raise UserError(f"{self.spec.layers!r} of model type {model_type!r} is not a list of layers; "
                            "check --arch layers=...")
        self.layers: list[LayerModules] = []
        for i, layer in enumerate(layer_list):
            try:
                mods = LayerModules(layer=layer, gate=get_path(layer, self.spec.gate), act=get_path(layer, self.spec.act),
                                    down=get_path(layer, self.spec.down),
                                    up=get_path(layer, self.spec.up) if self.spec.up else None)
            except AttributeError as e:
                raise UserError(f"layer {i} of model type {model_type!r} has no module {e.args[0]!r}; "
                                "check the --arch module paths") from None
            self.layers.append(mods)
        self.num_layers = len(self.layers)
        self.width = self._width()

    def _width(self) -> int:
        down = self.layers[0].down
        width = in_features(down)
        gate_out = out_features(self.layers[0].gate)
        expected = 2 * width if self.spec.gate_layout == "fused_gate_up" else width
        if width is None or gate_out != expected:
            raise UserError(f"the MLP of model type {self.model_type!r} does not match layout "
                            f"{self.spec.gate_layout!r} (gate has {gate_out} outputs, down has {width} inputs); "
                            "check --arch")
        return int(width)

    @property
    def gated(self) -> bool:
        return self.spec.gated

    @property
    def hidden_size(self) -> int:
        """Width ``H`` of the residual stream: the outputs of the down projection."""
        h = out_features(self.layers[0].down)
        if h is None:
            h = getattr(getattr(self.model, "config", None), "hidden_size", None)
        if not isinstance(h, int):
            raise UserError(f"cannot tell the hidden size of model type {self.model_type!r}; check --arch down=...")
        return int(h)

    def site_module(self, layer: int, site: str) -> tuple[nn.Module, str]:
        """The module to hook for ``site`` and how: ``("act", "input"|"output")`` or down's input."""
        check_site(site)
        mods = self.layers[layer]
        if site == "pre":
            return mods.act, "input"
        if site == "act" or not self.gated:
            return mods.act, "output"
        return mods.down, "input"

    def attention(self, attn_out: Optional[str] = None) -> AttentionLayout:
        """The attention output projections (:class:`AttentionLayout`), resolved on first use: ``attn_out``
        (a path relative to one decoder layer, e.g. ``self_attn.o_proj``) overrides the table
        (:data:`ATTN_OUT`) and auto-detection; the layout is kept for later calls without one.
        Raises UserError when the model has no separate output projection whose input splits into heads.
        """
        cached = getattr(self, "_attention", None)
        if cached is not None and (attn_out is None or attn_out == cached.path):
            return cached
        config = getattr(self.model, "config", None)
        hint = ("give the module path of the attention output projection with --attn-out PATH (relative to "
                "one decoder layer, e.g. self_attn.o_proj); its input must be the concatenation of the heads")
        n = _num_heads(config)
        if n is None:
            raise UserError(f"cannot tell the number of attention heads of model type {self.model_type!r} "
                            "(config.num_attention_heads); head units need it")
        if attn_out is not None:
            path, source = attn_out, "override"
        elif self.model_type in ATTN_OUT and _has_path(self.layers[0].layer, ATTN_OUT[self.model_type]):
            path, source = ATTN_OUT[self.model_type], "table"
        else:
            path, source = self._detect_attn_out(n, hint), "auto"
        modules = []
        for i, m in enumerate(self.layers):
            try:
                modules.append(get_path(m.layer, path))
            except AttributeError:
                raise UserError(f"layer {i} of model type {self.model_type!r} has no module {path!r}; {hint}") from None
        width = in_features(modules[0])
        if width is None or out_features(modules[0]) is None:
            raise UserError(f"{path!r} of model type {self.model_type!r} is not a linear map (no 2-D weight); {hint}")
        head_dim = getattr(config, "head_dim", None)
        if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0 or head_dim * n != width:
            head_dim = width // n if width % n == 0 else None
        if head_dim is None:
            raise UserError(f"the attention output projection {path!r} of model type {self.model_type!r} takes "
                            f"{width} inputs, not a multiple of its {n} heads; {hint}")
        for i, mod in enumerate(modules):
            if in_features(mod) != width:
                raise UserError(f"the attention output projection of layer {i} takes {in_features(mod)} inputs, "
                                f"layer 0's {width}; heads of differently shaped layers are not supported")
        layout = "conv1d" if type(modules[0]).__name__ == "Conv1D" else "linear"
        self._attention = AttentionLayout(path=path, source=source, num_heads=n, head_dim=int(head_dim),
                                          layout=layout, modules=modules)
        return self._attention

    def _detect_attn_out(self, n: int, hint: str) -> str:
        layer0 = self.layers[0].layer
        hidden = getattr(getattr(self.model, "config", None), "hidden_size", None)
        found = []
        for name, mod in layer0.named_modules():
            low = name.lower()
            if not name or ("attn" not in low and "attention" not in low):
                continue
            if name.rsplit(".", 1)[-1] not in _ATTN_OUT_NAMES:
                continue
            i, o = in_features(mod), out_features(mod)
            if i is None or o is None or i % n != 0 or (isinstance(hidden, int) and o != hidden):
                continue
            found.append(name)
        if len(found) != 1:
            what = "no" if not found else f"{len(found)} candidate ({', '.join(found[:3])})"
            raise UserError(f"cannot find the attention output projection of model type {self.model_type!r} "
                            f"({what} modules); {hint}")
        return found[0]

    def describe(self) -> dict:
        return {"model_type": self.model_type, "num_layers": self.num_layers, "width": self.width,
                "gated": self.gated, "adapter": self.source, "spec": dataclasses.asdict(self.spec)}

    # Weight access used by the brute-force checks, LoRA masking and documentation.
    def gate_rows(self, layer: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(W, b)`` with ``W`` of shape ``[I, hidden]`` so that ``pre = x @ W.T + b``."""
        g = self.layers[layer].gate
        w = g.weight
        b = getattr(g, "bias", None)
        if self.spec.gate_layout == "conv1d":
            return w.t(), b
        if self.spec.gate_layout == "fused_gate_up":
            return w[: self.width], (b[: self.width] if b is not None else None)
        return w, b

    def up_rows(self, layer: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(W_up, b_up)`` of a gated MLP, ``(None, None)`` otherwise."""
        if not self.gated:
            return None, None
        if self.spec.gate_layout == "fused_gate_up":
            g = self.layers[layer].gate
            b = getattr(g, "bias", None)
            return g.weight[self.width:], (b[self.width:] if b is not None else None)
        u = self.layers[layer].up
        w = u.weight.t() if self.spec.gate_layout == "conv1d" else u.weight
        return w, getattr(u, "bias", None)


def check_site(site: str) -> str:
    if site not in SITES:
        raise UserError(f"unknown site {site!r}; use one of {', '.join(SITES)}")
    return site
