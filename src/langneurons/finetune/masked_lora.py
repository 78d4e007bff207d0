"""Neuron-masked LoRA on PEFT: an MLP update that is non-zero only for a chosen set of neurons.

The maths
---------
LoRA adapts a linear map ``y = W x (+ b)`` (``W`` of shape ``[out, in]``) by

    y = W x + s * B (A drop(x)),     A: [r, in],  B: [out, r],  s = alpha / r  (alpha / sqrt(r) with rslora)

so the merged weight is ``W' = W + s * B A``. For neuron ``j`` of layer ``l`` (``I`` = MLP width) and a
neuron set ``S_l`` of that layer:

=========  ==========================================  ============================================
module     neuron j is                                  masked factor (outside ``S_l`` kept at zero)
=========  ==========================================  ============================================
gate, up   output row ``j`` (``nn.Linear``); column     ``B[j, :] = 0`` for ``j`` not in ``S_l``:
           ``j`` of a GPT-2 ``Conv1D`` weight ``(in,    ``(B A)[j, :] = 0``, so only rows in ``S_l`` of
           out)`` (PEFT's ``B`` still has one row per   ``W'`` differ from ``W``
           output); Phi-3 ``gate_up_proj``: row ``j``
           (gate) and row ``I + j`` (up)
down       input column ``j``                           ``A[:, j] = 0`` for ``j`` not in ``S_l``:
                                                        ``(B A)[:, j] = 0``
=========  ==========================================  ============================================

PEFT keeps ``B`` and ``A`` in the ``nn.Linear`` orientation for every layout (for ``Conv1D`` it sets
``fan_in_fan_out`` and transposes ``B A`` when merging), so the masks are always rows of ``B``
(``[out, 1]``) or columns of ``A`` (``[1, in]``).

How the zeros are kept (and why this way)
-----------------------------------------
Invariant: every masked entry has value exactly 0 and gradient exactly 0 at every step.

1. At set-up the masked entries are set to 0 (PEFT's default init already zeroes ``B``; the
   columns of ``A`` of ``down`` are not zero and are cleared here).
2. A tensor hook on each masked parameter multiplies its gradient by the mask, so the gradient of a
   masked entry is exactly 0 before accumulation, clipping or any optimizer sees it.
3. With value 0, gradient 0 and zero moment estimates, AdamW leaves the entry at 0: the decoupled
   decay is ``p * (1 - lr * wd) = 0`` and the step ``m / (sqrt(v) + eps)`` is ``0 / eps = 0``. The same
   holds for SGD (with momentum, with coupled L2 decay), Adam, gradient clipping and loss scaling.
4. Belt and braces: :meth:`NeuronMask.attach` registers an optimizer step post-hook that multiplies
   each masked parameter by its mask, so even an optimizer that would move a zero (or optimizer
   state loaded from elsewhere) cannot break the invariant. The trainer of this package attaches it.

Cost per step: one element-wise multiply of an ``[out, r]`` or ``[r, in]`` tensor per masked module in
the backward pass and after the step (``out * r`` is about ``r / hidden`` of the base weight), nothing
in the forward pass. A ``torch.nn.utils.parametrize`` mask was rejected: it renames the parameters
(``...weight.original``), so the saved file would no longer be a standard PEFT adapter, and it adds a
multiply to every forward pass.

Options that cannot keep the mask are refused with a :class:`~langneurons.errors.UserError`: DoRA
(its magnitude vector rescales every row of ``W'``), any LoRA variant, initialisations that change the
base weights or start with a non-zero ``B`` (``False``, ``pissa``, ``olora``, ``corda``, ``loftq``,
``eva``, ``orthogonal``, ...), and trained biases (``bias != "none"``, ``lora_bias=True``), which shift
every output row. ``use_rslora`` only changes the scale ``s`` and is fine; so is ``"gaussian"``, whose
``B`` starts at zero like the default (PEFT initialises only ``A`` from a Gaussian).

On disk
-------
A standard PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``, which loads with
``PeftModel.from_pretrained``) plus ``langneurons_mask.json``: the neuron set it was masked to, the
languages and MLP modules chosen, and per adapted module its role, layer and the kept rows/columns.
:func:`load_adapter` re-applies that mask (and re-installs the hooks when trainable).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from ..arch import Adapter, in_features, out_features
from ..errors import UserError
from ..neuronset import NeuronSet
from ..atomic import atomic_write_text

MASK_FILE = "langneurons_mask.json"
from ..artifacts import MASK_FORMAT  # noqa: E402 - the tag is defined in the artifact registry
MLP_ROLES = ("gate", "up", "down")
ATTN_ROLES = ("q", "k", "v", "o")
#: LoRA initialisations whose ``B`` starts at zero and that leave the base weights alone.
SAFE_INITS = (True, "gaussian")

# Attention projection names (leaf module names) by role; fused q/k/v projections take part when any
# of q, k, v is asked for (they cannot be split).
_ATTN_NAMES = {
    "q": {"q_proj", "query", "q", "wq", "q_lin"},
    "k": {"k_proj", "key", "k", "wk", "k_lin"},
    "v": {"v_proj", "value", "v", "wv", "v_lin"},
    "o": {"o_proj", "out_proj", "dense", "c_proj", "o", "wo", "out_lin", "out"},
    "qkv": {"qkv_proj", "c_attn", "query_key_value", "wqkv", "qkv", "w_pack"},
}
_ATTN_CONTAINERS = ("self_attn", "attn", "attention", "self_attention")


# ------------------------------------------------------------------------------------ parsing helpers
def parse_roles(text: str | Sequence[str] | None, allowed: Sequence[str], option: str) -> tuple[str, ...]:
    """``"gate,up"`` -> ``("gate", "up")`` in canonical order; ``"none"``/empty -> ``()``."""
    if text is None:
        return ()
    items = [s.strip().lower() for s in (text.split(",") if isinstance(text, str) else text)]
    items = [s for s in items if s and s != "none"]
    alias = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "q_proj": "q", "k_proj": "k",
             "v_proj": "v", "o_proj": "o"}
    items = [alias.get(s, s) for s in items]
    bad = [s for s in items if s not in allowed]
    if bad:
        raise UserError(f"{option} {','.join(bad)} is unknown; use a comma-separated subset of "
                        f"{','.join(allowed)} (or none)")
    return tuple(r for r in allowed if r in items)


def _is_linear_like(mod: nn.Module) -> bool:
    w = getattr(mod, "weight", None)
    return (isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D") and w is not None and w.dim() == 2


# ------------------------------------------------------------------------------------ targets
@dataclass
class MaskTarget:
    """One masked MLP module: ``kind`` "rows" masks ``B[keep^c, :]``; "cols" masks ``A[:, keep^c]``.

    ``keep`` is a BoolTensor over the module's outputs (rows) or inputs (cols) in the ``nn.Linear``
    orientation: ``[I]`` for gate/up/down, ``[2I]`` for Phi-3's fused ``gate_up_proj``.
    """

    name: str          # module name relative to the HF model (what PEFT's target_modules matches)
    roles: tuple[str, ...]
    layer: int
    kind: str          # "rows" | "cols"
    keep: torch.Tensor

    def to_json(self) -> dict:
        return {"roles": list(self.roles), "layer": self.layer, "kind": self.kind, "size": int(self.keep.numel()),
                "keep": self.keep.nonzero().flatten().tolist()}

    @classmethod
    def from_json(cls, name: str, d: dict) -> "MaskTarget":
        keep = torch.zeros(int(d["size"]), dtype=torch.bool)
        if d["keep"]:
            keep[torch.tensor(d["keep"], dtype=torch.long)] = True
        return cls(name=name, roles=tuple(d["roles"]), layer=int(d["layer"]), kind=d["kind"], keep=keep)


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def mlp_mask_targets(model: nn.Module, neuron_mask: torch.Tensor, roles: Sequence[str],
                     adapter: Optional[Adapter] = None) -> list[MaskTarget]:
    """The MLP modules to adapt and their masks, for a neuron mask ``[L, I]`` (True = selected).

    Layers without selected neurons get no MLP adapter at all. ``roles`` is a subset of gate, up,
    down; ``up`` needs a gated MLP. For Phi-3's fused ``gate_up_proj`` ``gate`` keeps rows ``j`` and
    ``up`` rows ``I + j`` of the one module.
    """
    adapter = adapter or Adapter(model)
    L, I = adapter.num_layers, adapter.width
    if tuple(neuron_mask.shape) != (L, I):
        raise UserError(f"the neuron set has shape {tuple(neuron_mask.shape)} but the model has {L} layers x "
                        f"{I} neurons; use a neuron set made from statistics of this model")
    if "up" in roles and not adapter.gated:
        raise UserError(f"--mlp-modules up: model type {adapter.model_type!r} has no up projection "
                        "(non-gated MLP); use gate and/or down")
    names = _module_names(model)
    fused = adapter.spec.gate_layout == "fused_gate_up"
    out: list[MaskTarget] = []
    for l in range(L):
        m = neuron_mask[l].bool().cpu()
        if not bool(m.any()):
            continue
        mods = adapter.layers[l]
        if fused and ("gate" in roles or "up" in roles):
            keep = torch.zeros(2 * I, dtype=torch.bool)
            if "gate" in roles:
                keep[:I] = m
            if "up" in roles:
                keep[I:] = m
            out.append(MaskTarget(names[id(mods.gate)], tuple(r for r in ("gate", "up") if r in roles), l, "rows", keep))
        else:
            if "gate" in roles:
                out.append(MaskTarget(names[id(mods.gate)], ("gate",), l, "rows", m.clone()))
            if "up" in roles:
                out.append(MaskTarget(names[id(mods.up)], ("up",), l, "rows", m.clone()))
        if "down" in roles:
            out.append(MaskTarget(names[id(mods.down)], ("down",), l, "cols", m.clone()))
    for t in out:   # sanity: the mask length matches the module
        mod = model.get_submodule(t.name)
        o, i = out_features(mod), in_features(mod)
        size = o if t.kind == "rows" else i
        if size != t.keep.numel():
            raise UserError(f"module {t.name} has {size} {'outputs' if t.kind == 'rows' else 'inputs'} but the mask "
                            f"has {t.keep.numel()}; the architecture adapter does not match this model (check --arch)")
    return out


def attention_targets(model: nn.Module, roles: Sequence[str] = ATTN_ROLES,
                      adapter: Optional[Adapter] = None) -> list[str]:
    """Full names of the attention projections for ``roles`` (subset of q, k, v, o) in every layer.

    The attention block of each decoder layer (the adapter's layer) is its child named ``self_attn``,
    ``attn``, ``attention`` or ``self_attention``; its linear leaves are classified by name. A fused
    q/k/v projection (``qkv_proj``, ``c_attn``, ``query_key_value``) is adapted when any of q, k, v is
    asked for.
    """
    roles = tuple(roles)
    if not roles:
        return []
    adapter = adapter or Adapter(model)
    names = _module_names(model)
    out: list[str] = []
    for l, mods in enumerate(adapter.layers):
        layer = mods.layer
        attn = None
        for cname in _ATTN_CONTAINERS:
            if hasattr(layer, cname) and isinstance(getattr(layer, cname), nn.Module):
                attn = getattr(layer, cname)
                break
        if attn is None:
            raise UserError(f"cannot find the attention block of layer {l} of model type {adapter.model_type!r}; "
                            "give PEFT module names with --attn-targets NAME,NAME or use --attn-modules none")
        found: dict[str, list[str]] = {}
        for leaf, mod in attn.named_modules():
            if not leaf or not _is_linear_like(mod):
                continue
            short = leaf.rsplit(".", 1)[-1].lower()
            role = next((r for r, ns in _ATTN_NAMES.items() if short in ns), None)
            if role is not None:
                found.setdefault(role, []).append(names[id(mod)])
        wanted = [r for r in roles if r in found]
        if any(r in roles for r in ("q", "k", "v")) and "qkv" in found:
            wanted.append("qkv")
        missing = [r for r in roles if r not in found and not (r in ("q", "k", "v") and "qkv" in found)]
        if missing:
            raise UserError(f"cannot find attention projection(s) {','.join(missing)} in layer {l} of model type "
                            f"{adapter.model_type!r}; give PEFT module names with --attn-targets NAME,NAME")
        for r in wanted:
            out.extend(found[r])
    return sorted(set(out), key=out.index)


# ------------------------------------------------------------------------------------ config checks
def check_lora_options(*, use_dora: bool = False, init_lora_weights=True, bias: str = "none",
                       lora_bias: bool = False) -> None:
    """Refuse LoRA options under which a masked update cannot stay masked (see the module docstring)."""
    if use_dora:
        raise UserError("DoRA cannot be neuron-masked (its magnitude vector rescales every row of the merged "
                        "weight); drop --use-dora or train without --neurons")
    if isinstance(init_lora_weights, str) and init_lora_weights.lower() in ("true", "default"):
        init_lora_weights = True
    if init_lora_weights not in SAFE_INITS:
        raise UserError(f"init_lora_weights={init_lora_weights!r} cannot be neuron-masked (it starts with a non-zero "
                        "B or changes the base weights in every row); use the default init (true) or gaussian")
    if bias != "none":
        raise UserError(f"LoRA bias={bias!r} trains biases of every output row, which a neuron mask cannot "
                        "restrict; use bias none")
    if lora_bias:
        raise UserError("lora_bias=True adds a bias to every output row of the adapted modules; "
                        "a neuron mask cannot restrict it: drop --lora-bias")


def check_peft_config(config) -> None:
    """:func:`check_lora_options` on a ``peft.LoraConfig``."""
    check_lora_options(use_dora=bool(getattr(config, "use_dora", False)),
                       init_lora_weights=getattr(config, "init_lora_weights", True),
                       bias=getattr(config, "bias", "none"), lora_bias=bool(getattr(config, "lora_bias", False)))


# ------------------------------------------------------------------------------------ the mask object
def _lora_factors(layer: nn.Module, adapter_name: str) -> tuple[nn.Parameter, nn.Parameter]:
    if not hasattr(layer, "lora_A") or adapter_name not in getattr(layer, "lora_A", {}):
        raise UserError(f"module {type(layer).__name__} carries no LoRA adapter {adapter_name!r}; "
                        "the adapter does not cover the masked module (was it saved by langneurons?)")
    variants = getattr(layer, "lora_variant", {}) or {}
    if adapter_name in variants:
        raise UserError(f"the LoRA variant {type(variants[adapter_name]).__name__} cannot be neuron-masked; "
                        "use plain LoRA (no DoRA or other variant) for masked modules")
    return layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight


class NeuronMask:
    """The masked factors of an adapted model, with their masks; keeps the masked entries at zero.

    ``entries``: list of ``(parameter, mask)`` with ``mask`` of shape ``[out, 1]`` (rows of ``B``) or
    ``[1, in]`` (columns of ``A``), in the parameter's dtype and device (1 = kept, 0 = masked).
    """

    def __init__(self, peft_model: nn.Module, targets: list[MaskTarget], adapter_name: str = "default",
                 neurons: Optional[NeuronSet] = None, languages: Sequence[str] = (), roles: Sequence[str] = ()):
        self.targets = targets
        self.neurons = neurons
        self.languages = list(languages)
        self.roles = tuple(roles)
        self.adapter_name = adapter_name
        self.entries: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._grad_handles: list = []
        self._opt_handles: list = []
        inner = _inner_model(peft_model)
        for t in targets:
            layer = inner.get_submodule(t.name)
            A, B = _lora_factors(layer, adapter_name)
            if t.kind == "rows":
                if B.shape[0] != t.keep.numel():
                    raise UserError(f"LoRA B of {t.name} has {B.shape[0]} rows but the mask has {t.keep.numel()}")
                mask = t.keep.to(device=B.device, dtype=B.dtype).reshape(-1, 1)
                self.entries.append((B, mask))
            else:
                if A.shape[1] != t.keep.numel():
                    raise UserError(f"LoRA A of {t.name} has {A.shape[1]} columns but the mask has {t.keep.numel()}")
                mask = t.keep.to(device=A.device, dtype=A.dtype).reshape(1, -1)
                self.entries.append((A, mask))

    # -- invariant maintenance
    @torch.no_grad()
    def apply_(self) -> None:
        """Multiply every masked factor by its mask (masked entries become exactly 0)."""
        for p, m in self.entries:
            if m.device != p.device or m.dtype != p.dtype:
                m = m.to(device=p.device, dtype=p.dtype)
            p.mul_(m)

    def install_grad_hooks(self) -> None:
        """Zero the gradient of masked entries as it is computed: ``grad <- grad * mask``."""
        self.remove_grad_hooks()
        for p, m in self.entries:
            def hook(g, m=m):
                return g * m.to(device=g.device, dtype=g.dtype)
            self._grad_handles.append(p.register_hook(hook))

    def remove_grad_hooks(self) -> None:
        for h in self._grad_handles:
            h.remove()
        self._grad_handles = []

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-apply the mask after every ``optimizer.step()`` (step post-hook)."""
        self._opt_handles.append(optimizer.register_step_post_hook(lambda *_: self.apply_()))

    def detach(self) -> None:
        for h in self._opt_handles:
            h.remove()
        self._opt_handles = []
        self.remove_grad_hooks()

    def max_masked(self) -> float:
        """Largest absolute value of any masked entry (0.0 when the invariant holds)."""
        worst = 0.0
        with torch.no_grad():
            for p, m in self.entries:
                v = (p * (1 - m)).abs().max() if p.numel() else torch.tensor(0.0)
                worst = max(worst, float(v))
        return worst

    def check(self) -> None:
        v = self.max_masked()
        if v != 0.0:
            raise RuntimeError(f"neuron-masked LoRA: a masked entry holds {v:g} instead of 0")

    # -- serialisation
    def to_json(self) -> dict:
        return {
            "format": MASK_FORMAT,
            "languages": self.languages,
            "mlp_modules": list(self.roles),
            "neurons": self.neurons.to_dict() if self.neurons is not None else None,
            "targets": {t.name: t.to_json() for t in self.targets},
            "note": "rows: LoRA B rows outside 'keep' are zero (gate/up outputs); "
                    "cols: LoRA A columns outside 'keep' are zero (down inputs)",
        }

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MASK_FILE
        atomic_write_text(path, json.dumps(self.to_json(), indent=1))
        return path


def _inner_model(peft_model: nn.Module) -> nn.Module:
    """The HF model inside a ``PeftModel`` (module names there equal those of the bare model)."""
    get = getattr(peft_model, "get_base_model", None)
    return get() if callable(get) else peft_model


# ------------------------------------------------------------------------------------ building
@dataclass
class LoraSpec:
    """What to adapt, and how (PEFT ``LoraConfig`` fields that matter here).

    ``neurons``/``neuron_languages``/``mlp_roles``: the masked MLP part (none when ``neurons`` is None).
    ``attn_roles``: attention projections (subset of q, k, v, o); ``attn_targets`` overrides them with
    explicit PEFT target names.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    attn_roles: tuple[str, ...] = ATTN_ROLES
    attn_targets: Optional[list[str]] = None
    neurons: Optional[NeuronSet] = None
    neuron_languages: tuple[str, ...] = ()
    mlp_roles: tuple[str, ...] = ("gate",)
    use_dora: bool = False
    init_lora_weights: object = True
    bias: str = "none"
    lora_bias: bool = False
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.r < 1:
            raise UserError(f"--lora-r must be at least 1, got {self.r}")
        if not (0.0 <= self.dropout < 1.0):
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if self.neurons is not None:
            if not self.mlp_roles:
                raise UserError("--neurons was given but --mlp-modules is empty; name gate, up and/or down")
            check_lora_options(use_dora=self.use_dora, init_lora_weights=self.init_lora_weights, bias=self.bias,
                               lora_bias=self.lora_bias)


def neuron_mask_of(ns: NeuronSet, languages: Sequence[str]) -> torch.Tensor:
    """Union over ``languages`` of the set's masks: BoolTensor ``[L, I]``."""
    if not languages:
        raise UserError("--languages is empty; name the language(s) whose neurons the MLP LoRA may change")
    missing = [c for c in languages if c not in ns.languages]
    if missing:
        raise UserError(f"the neuron set has no language {','.join(missing)}; it has {','.join(ns.languages)}: "
                        "fix --languages")
    out = torch.zeros(ns.num_layers, ns.width, dtype=torch.bool)
    for c in languages:
        out |= ns.mask(c)
    return out


def apply_lora(model: nn.Module, spec: LoraSpec, adapter_name: str = "default", adapter: Optional[Adapter] = None):
    """Wrap ``model`` with PEFT LoRA on attention (+ masked MLP); returns ``(peft_model, NeuronMask|None)``.

    The MLP modules are given to PEFT by their full names (one per adapted layer), the attention
    projections by their full names too, so no other module with the same short name is touched.
    The mask is applied, gradient hooks installed; call ``mask.attach(optimizer)`` after building
    the optimizer.
    """
    from peft import LoraConfig, get_peft_model
    spec.validate()
    adapter = adapter or Adapter(model)
    targets: list[MaskTarget] = []
    if spec.neurons is not None:
        spec.neurons.validate_for(adapter.num_layers, adapter.width)
        nmask = neuron_mask_of(spec.neurons, spec.neuron_languages)
        targets = mlp_mask_targets(model, nmask, spec.mlp_roles, adapter)
        if not targets:
            raise UserError(f"the neuron set has no neuron for {','.join(spec.neuron_languages)}: nothing to adapt "
                            "in the MLP; pick other --languages or drop --neurons")
    attn = list(spec.attn_targets) if spec.attn_targets else attention_targets(model, spec.attn_roles, adapter)
    names = set(_module_names(model).values())
    unknown = [n for n in (spec.attn_targets or []) if not any(x == n or x.endswith("." + n) for x in names)]
    if unknown:
        raise UserError(f"--attn-targets {','.join(unknown)} matches no module of the model; give module names "
                        "such as q_proj,v_proj")
    mlp_names = [t.name for t in targets]
    target_modules = attn + [n for n in mlp_names if n not in attn]
    if not target_modules:
        raise UserError("nothing to adapt: --attn-modules is none and no --neurons were given")
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, use_rslora=spec.use_rslora,
                     target_modules=target_modules, use_dora=spec.use_dora, init_lora_weights=spec.init_lora_weights,
                     bias=spec.bias, lora_bias=spec.lora_bias, **spec.extra)
    if targets:
        check_peft_config(cfg)
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, cfg, adapter_name=adapter_name)
    mask = None
    if targets:
        ns = spec.neurons.select(spec.neuron_languages)
        mask = NeuronMask(peft_model, targets, adapter_name, neurons=ns, languages=spec.neuron_languages,
                          roles=spec.mlp_roles)
        mask.apply_()
        mask.install_grad_hooks()
    return peft_model, mask


def save_adapter(peft_model, directory: str | os.PathLike, mask: Optional[NeuronMask]) -> Path:
    """``peft_model.save_pretrained(directory)`` plus ``langneurons_mask.json`` when masked.

    The mask is re-applied first, so the file never holds a non-zero masked entry.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if mask is not None:
        mask.apply_()
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    if mask is not None:
        mask.save(directory)
    elif (directory / MASK_FILE).exists():
        (directory / MASK_FILE).unlink()
    return directory


def read_mask_file(directory: str | os.PathLike) -> Optional[dict]:
    path = Path(directory) / MASK_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}; the adapter directory is damaged, train it again") from None
    if doc.get("format") != MASK_FORMAT:
        raise UserError(f"{path} is not a {MASK_FORMAT} file; the adapter directory is damaged")
    return doc


def load_adapter(model: nn.Module, directory: str | os.PathLike, is_trainable: bool = False,
                 adapter_name: str = "default"):
    """``PeftModel.from_pretrained`` plus the neuron mask saved beside it; ``(peft_model, mask|None)``.

    The mask is re-applied (a no-op for files written by :func:`save_adapter`); when trainable the
    gradient hooks are installed as well.
    """
    from peft import PeftModel
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise UserError(f"{directory} holds no adapter_config.json; give the output directory of "
                        "'langneurons finetune train'")
    doc = read_mask_file(directory)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = PeftModel.from_pretrained(model, str(directory), adapter_name=adapter_name,
                                               is_trainable=is_trainable)
    if doc is None:
        return peft_model, None
    targets = [MaskTarget.from_json(n, d) for n, d in doc["targets"].items()]
    ns = NeuronSet.from_dict(doc["neurons"]) if doc.get("neurons") else None
    mask = NeuronMask(peft_model, targets, adapter_name, neurons=ns, languages=doc.get("languages", []),
                      roles=doc.get("mlp_modules", []))
    mask.apply_()
    if is_trainable:
        mask.install_grad_hooks()
    return peft_model, mask


def lora_parameters(peft_model: nn.Module) -> Iterable[nn.Parameter]:
    return [p for p in peft_model.parameters() if p.requires_grad]
