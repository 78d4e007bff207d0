"""Loading a model for the runtime: the shared model options, devices and dtypes, ``--arch`` read back
from statistics and neuron sets, and :func:`open_session`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from ..errors import UserError
from .parallel import init_distributed, rank_device
from .session import Session

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


# ---------------------------------------------------------------------------------------- options
@dataclass
class ModelOptions:
    """What every model-loading command shares (the README's table of shared options)."""

    model: str
    arch: Optional[str] = None
    dtype: str = "auto"
    device: str = "auto"
    device_map: Optional[str] = None
    trust_remote_code: bool = False

    def check(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise UserError(f"unknown --dtype {self.dtype!r}; use auto, {', '.join(sorted(set(DTYPES)))}")
        if self.arch:
            from ..arch import parse_arch_override
            parse_arch_override(self.arch)

    @classmethod
    def from_args(cls, args) -> "ModelOptions":
        return cls(model=args.model, arch=getattr(args, "arch", None), dtype=getattr(args, "dtype", "auto") or "auto",
                   device=getattr(args, "device", "auto") or "auto", device_map=getattr(args, "device_map", None),
                   trust_remote_code=bool(getattr(args, "trust_remote_code", False)))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown --device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for CUDA but no GPU is available; use --device cpu")
    return d


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; use auto, {', '.join(sorted(set(DTYPES)))}")
    return DTYPES[dtype]


def quiet_transformers() -> None:
    """No weight-loading progress bars: our own progress goes to stderr, errors are one line."""
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass


def _first_line(e: Exception) -> str:
    text = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{e.__class__.__name__}: {text}"


def load_model(name_or_path: str, device: torch.device, dtype: torch.dtype, device_map: Optional[str] = None,
               trust_remote_code: bool = False):
    """``AutoModelForCausalLM`` and ``AutoTokenizer`` from a hub id or a local directory, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import transformers
    quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"cannot load the tokenizer of {name_or_path!r} ({_first_line(e)}); give a local model "
                        "directory or a hub id that is cached") from None
    major = int(transformers.__version__.split(".")[0]) if transformers.__version__[0].isdigit() else 5
    kwargs = {"trust_remote_code": trust_remote_code, ("dtype" if major >= 5 else "torch_dtype"): dtype}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except Exception as e:
        raise UserError(f"cannot load model {name_or_path!r} ({_first_line(e)}); give a local model directory "
                        "or a hub id that is cached") from None
    if not device_map:
        model.to(device)
    model.eval()
    return model, tok


def recorded_arch(*paths) -> Optional[str]:
    """The ``--arch`` spec recorded in a statistics directory (``stats.json``) or a neuron-set file.

    Only specs given explicitly at collect time are recorded (``model.arch`` with ``model.adapter ==
    "override"`` in ``stats.json``; ``model.arch`` in a neuron set); the first path that has one wins.
    """
    from ..arch import ArchSpec
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        f = p / "stats.json" if p.is_dir() else p
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        m = doc.get("model") if isinstance(doc, dict) else None
        if not isinstance(m, dict):
            continue
        arch = m.get("arch")
        if isinstance(arch, str) and arch:
            return arch
        if isinstance(arch, dict) and m.get("adapter") == "override":
            try:
                return ArchSpec(**arch).describe()
            except TypeError:
                continue
    return None


def model_fingerprint(model) -> str:
    """A digest of the config and of a sample of the weights (tells two models apart cheaply)."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    params = list(model.parameters())
    for p in (params[0], params[len(params) // 2], params[-1]):
        h.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def open_session(options: ModelOptions, arch_from: Iterable = (), batch_size: int = 8, model=None, tokenizer=None
                 ) -> Session:
    """Load the model of ``options`` (or wrap a given one) into a :class:`Session`.

    ``arch_from``: statistics directories or neuron-set files whose recorded ``--arch`` applies when
    ``options.arch`` is not given. Under torchrun this joins the process group.
    """
    options.check()
    device = rank_device(resolve_device(options.device))
    if model is None:
        model, tokenizer = load_model(options.model, device, resolve_dtype(options.dtype, device),
                                      options.device_map, options.trust_remote_code)
    init_distributed(device)
    arch = options.arch or recorded_arch(*arch_from)
    return Session(model, tokenizer, arch=arch, batch_size=batch_size)
