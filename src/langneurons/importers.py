"""Importers for the neuron sets published with [T24] (Tang et al. 2024) and [M25] (Mondal et al. 2025).

Both papers released Python pickles. Pickles can run arbitrary code when loaded, so neither is
ever read with plain ``pickle.load``:

* [T24] ``*.pth`` files were written by ``torch.save`` (zip format) and are read with
  ``torch.load(path, weights_only=True)``, PyTorch's own restricted loader.
* [M25] ``*.pkl`` files are plain pickles of a dict whose tensors were pickled through
  ``torch.storage._load_from_bytes`` (each storage is a nested legacy ``torch.save`` blob).
  ``torch.load`` cannot read the outer file, so :class:`_NeuronPickleUnpickler` reads it with a
  strict allow-list: every global the files need is mapped to a small stand-in that checks its
  arguments, and the nested storage blobs go through ``torch.load(weights_only=True)``. Any other
  global (``os.system``, ``builtins.eval``, ...) stops the load with a UserError before anything runs.

Each importer returns a :class:`~langneurons.neuronset.NeuronSet` whose ``method.params`` records
the source file and how the model shape was determined.
"""

from __future__ import annotations

import collections
import io
import pathlib
import pickle
import re
import warnings
from pathlib import Path
from collections.abc import Mapping, Sequence

import torch

from .errors import UserError
from .neuronset import NeuronSet, SITES

__all__ = [
    "TANG2024_LANGUAGES",
    "TANG2024_MODELS",
    "import_tang2024_pth",
    "import_mondal2025_pkl",
    "import_auto",
]

#: Language order of the [T24] mask files (files with six entries have no ``ja``).
TANG2024_LANGUAGES = ("en", "zh", "fr", "es", "vi", "id", "ja")

#: Models of the [T24] release, keyed by file stem. Widths are not stored in the files.
TANG2024_MODELS = {
    "LLaMA-2-7B": {"name_or_path": "meta-llama/Llama-2-7b-hf", "model_type": "llama", "num_layers": 32, "width": 11008},
    "LLaMA-2-13B": {"name_or_path": "meta-llama/Llama-2-13b-hf", "model_type": "llama", "num_layers": 40, "width": 13824},
    "LLaMA-2-70B": {"name_or_path": "meta-llama/Llama-2-70b-hf", "model_type": "llama", "num_layers": 80, "width": 28672},
    "BLOOM-7B": {"name_or_path": "bigscience/bloom-7b1", "model_type": "bloom", "num_layers": 30, "width": 16384},
    "Mistral-7B": {"name_or_path": "mistralai/Mistral-7B-v0.1", "model_type": "mistral", "num_layers": 32, "width": 14336},
    "OPT-6.7B": {"name_or_path": "facebook/opt-6.7b", "model_type": "opt", "num_layers": 32, "width": 16384},
    "Phi-2-2.7B": {"name_or_path": "microsoft/phi-2", "model_type": "phi", "num_layers": 32, "width": 10240},
}

_TANG2024_PARAMS = {"top_rate": 0.01, "filter_rate": 0.95, "activation_bar_ratio": 0.95}

#: model_type of the [M25] models, keyed by the HF id stored in the files.
_MONDAL2025_MODEL_TYPES = {
    "meta-llama/Meta-Llama-3.1-8B": "llama",
    "mistralai/Mistral-Nemo-Base-2407": "mistral",
}

_MODEL_ARG_KEYS = ("name_or_path", "model_type", "num_layers", "width", "site")


def _check_model_arg(model, path: Path) -> dict:
    if model is None:
        return {}
    if not isinstance(model, Mapping):
        raise UserError(f"importing {path}: 'model' must be a dict with some of {', '.join(_MODEL_ARG_KEYS)}")
    unknown = [k for k in model if k not in _MODEL_ARG_KEYS]
    if unknown:
        raise UserError(f"importing {path}: unknown model field(s) {unknown}; use {', '.join(_MODEL_ARG_KEYS)}")
    if model.get("site") is not None and model["site"] not in SITES:
        raise UserError(f"importing {path}: model site must be one of {', '.join(SITES)}, got {model['site']!r}")
    return {k: v for k, v in model.items() if v is not None}


def _open_check(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"neuron file {path} does not exist; check the path")
    if not path.is_file():
        raise UserError(f"neuron file {path} is not a regular file; give the file itself")
    return path


def _language_list(languages, n: int, path: Path) -> list[str]:
    if languages is None:
        if n > len(TANG2024_LANGUAGES):
            raise UserError(f"{path} holds {n} languages but the default [T24] order has only "
                            f"{len(TANG2024_LANGUAGES)}; pass languages=... (one code per entry)")
        return list(TANG2024_LANGUAGES[:n])
    if isinstance(languages, str):
        languages = [x.strip() for x in languages.split(",") if x.strip()]
    languages = list(languages)
    if len(languages) != n:
        raise UserError(f"{path} holds {n} languages but {len(languages)} codes were given ({languages}); "
                        f"give exactly one code per entry, in file order")
    return languages


def _weights_only_refusal(exc: BaseException) -> str | None:
    """If ``exc`` is torch.load's weights_only refusal, name what it refused (else None).

    torch's own message advises retrying with weights_only=False; that advice must not reach users.
    """
    text = str(exc)
    if not isinstance(exc, pickle.UnpicklingError) or "weights only" not in text.lower():
        return None
    found = re.search(r"GLOBAL\s+([\w.]+)", text)
    return found.group(1) if found else "an object that weights_only loading does not allow"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# [T24] LAPE masks


def import_tang2024_pth(path, languages: Sequence[str] | str | None = None, model: Mapping | None = None) -> NeuronSet:
    """Import a [T24] ``.pth`` mask file (``mask[language][layer]`` = 1-D int64 indices).

    ``languages`` defaults to en, zh, fr, es, vi, id, ja truncated to the file's length. The layer
    count is the length of the per-language lists. The width is not stored: it comes from
    ``model["width"]``, else from :data:`TANG2024_MODELS` by file stem, else it is inferred as the
    largest index + 1 (a lower bound; recorded in ``method.params.width_source``). ``model`` may
    also set ``name_or_path``, ``model_type`` and ``site`` (default ``act``, as in [T24]).
    """
    path = _open_check(path)
    override = _check_model_arg(model, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - anything torch.load raises means an unreadable file
        refused = _weights_only_refusal(exc)
        if refused is not None:
            raise UserError(f"refusing to load {path}: it asks for {refused}, which a [T24] mask file never "
                            f"holds (nothing was executed); use the published file") from None
        raise UserError(f"cannot read {path} as a [T24] torch.save file ({_first_line(exc)}); the file is "
                        f"corrupt, truncated or not a neuron mask file: re-download it") from None

    if not isinstance(obj, (list, tuple)) or not obj:
        raise UserError(f"{path} does not hold a list over languages of lists over layers of index tensors; "
                        f"it is not a [T24] mask file")
    num_layers = None
    for k, per_layer in enumerate(obj):
        if not isinstance(per_layer, (list, tuple)) or not per_layer:
            raise UserError(f"{path}: entry {k} is not a list over layers; it is not a [T24] mask file")
        if num_layers is None:
            num_layers = len(per_layer)
        elif len(per_layer) != num_layers:
            raise UserError(f"{path}: language entries have different layer counts ({num_layers} and "
                            f"{len(per_layer)}); the file is damaged")
        for layer, idx in enumerate(per_layer):
            if (not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype.is_floating_point
                    or idx.dtype.is_complex or idx.dtype == torch.bool):
                raise UserError(f"{path}: entry {k}, layer {layer} is not a 1-D integer tensor of indices; "
                                f"it is not a [T24] mask file")
    langs = _language_list(languages, len(obj), path)

    rows = {}
    max_index = -1
    for lang, per_layer in zip(langs, obj):
        parts = []
        for layer, idx in enumerate(per_layer):
            idx = idx.to(torch.int64)
            if idx.numel():
                if int(idx.min()) < 0:
                    raise UserError(f"{path}: language {lang!r}, layer {layer} has a negative index "
                                    f"{int(idx.min())}; the file is damaged")
                max_index = max(max_index, int(idx.max()))
            parts.append(torch.stack([torch.full_like(idx, layer), idx], dim=1))
        rows[lang] = torch.cat(parts)

    known = TANG2024_MODELS.get(path.stem)
    if known is None:  # tolerate case differences in the stem
        known = next((v for k, v in TANG2024_MODELS.items() if k.lower() == path.stem.lower()), None)
    if "num_layers" in override and override["num_layers"] != num_layers:
        raise UserError(f"{path} has {num_layers} layers but model num_layers = {override['num_layers']}; "
                        f"pass the model the file was made for")
    if "width" in override:
        width, width_source = override["width"], "model argument"
    elif known is not None and known["num_layers"] == num_layers:
        width, width_source = known["width"], f"known [T24] model table ({path.stem})"
    else:
        width = max_index + 1 if max_index >= 0 else 1
        width_source = ("inferred as the largest index + 1 (a lower bound: the file does not store the "
                        "width); pass model={'width': ...} to set it")
    if max_index >= width:
        raise UserError(f"{path} has neuron index {max_index} but the width is {width} ({width_source}); "
                        f"pass model={{'width': ...}} with the model's real MLP width")

    info = dict(known) if known is not None and known["num_layers"] == num_layers else {}
    model_block = {
        "name_or_path": override.get("name_or_path", info.get("name_or_path")),
        "model_type": override.get("model_type", info.get("model_type")),
        "num_layers": num_layers,
        "width": width,
        "site": override.get("site", "act"),
    }
    method = {
        "name": "lape",
        "params": {
            **_TANG2024_PARAMS,
            "source": "tang2024",
            "repository": "RUCAIBox/Language-Specific-Neurons",
            "file": path.name,
            "width_source": width_source,
        },
        "languages": langs,
        "stats_fingerprint": None,
    }
    return NeuronSet(rows, model_block, method, _where=f"importing {path}")


# --------------------------------------------------------------------------------------------
# [M25] plain pickles, read with an allow-list


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list."""


def _bad_arg(what: str):
    return pickle.UnpicklingError(f"unexpected arguments to {what}")


def _storage_from_bytes(data):
    """Stand-in for ``torch.storage._load_from_bytes``: the blob is read with weights_only=True."""
    if not isinstance(data, (bytes, bytearray)):
        raise _bad_arg("torch.storage._load_from_bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        refused = _weights_only_refusal(exc)
        if refused is not None:
            raise _RefusedGlobal(f"{refused} (inside a nested tensor blob)") from None
        raise
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"a nested blob held {type(storage).__name__}, not a tensor storage")
    return storage


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stand-in for ``torch._utils._rebuild_tensor_v2`` that accepts only plain CPU tensors."""
    ints = lambda seq: isinstance(seq, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in seq)
    if (not isinstance(storage, torch.TypedStorage) or not isinstance(storage_offset, int)
            or not ints(size) or not ints(stride) or len(size) != len(stride)
            or not isinstance(requires_grad, bool) or (backward_hooks is not None and len(backward_hooks) != 0)
            or metadata not in (None, {})):
        raise _bad_arg("torch._utils._rebuild_tensor_v2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tensor = torch.empty(0, dtype=storage.dtype)
        tensor.set_(storage._untyped_storage, storage_offset, size, stride)  # bounds-checked by torch
    return tensor


def _device_name(*args):
    """Stand-in for ``torch.device``: keep the name as a string (nothing is moved to a device)."""
    if not 1 <= len(args) <= 2 or not isinstance(args[0], str) or (len(args) == 2 and not isinstance(args[1], int)):
        raise _bad_arg("torch.device")
    return args[0] if len(args) == 1 else f"{args[0]}:{args[1]}"


def _pure_path(*parts):
    """Stand-in for ``pathlib.PosixPath``: a pure path (no file-system access)."""
    if not all(isinstance(p, str) for p in parts):
        raise _bad_arg("pathlib.PosixPath")
    return pathlib.PurePosixPath(*parts)


class _NeuronPickleUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals the [M25] neuron files use.

    Allowed: ``torch._utils._rebuild_tensor_v2``, ``torch.storage._load_from_bytes``,
    ``collections.OrderedDict``, ``torch.device`` and ``pathlib.PosixPath``; each maps to a checked
    stand-in above. Everything else raises :class:`_RefusedGlobal`. Persistent ids are refused too
    (the base class raises for them).
    """

    ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch", "device"): _device_name,
        ("pathlib", "PosixPath"): _pure_path,
    }

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise _RefusedGlobal(f"{module}.{name}") from None


def _safe_unpickle(path: Path):
    try:
        with open(path, "rb") as handle:
            obj = _NeuronPickleUnpickler(handle).load()
            trailing = handle.read(1)
    except _RefusedGlobal as exc:
        raise UserError(f"refusing to load {path}: it asks for {exc}, which is not on the allow-list of "
                        f"the [M25] neuron files (nothing was executed); use the published file") from None
    except Exception as exc:  # noqa: BLE001 - any failure while decoding means a bad file
        raise UserError(f"cannot read {path} as an [M25] neuron pickle ({type(exc).__name__}: {_first_line(exc)}); "
                        f"the file is corrupt, truncated or of another kind: re-download it") from None
    if trailing:
        raise UserError(f"{path} has data after the end of its pickle; the file is damaged: re-download it")
    return obj


def import_mondal2025_pkl(path, model: Mapping | None = None) -> NeuronSet:
    """Import an [M25] ``.pkl`` file: a dict with ``lang_to_neuron``, ``L``, ``int_d``, ``m``, ``lang_list``.

    The model shape comes from ``L`` x ``int_d``. The site is ``act`` for LAPE files (activation
    probability: ``act > 0`` iff ``pre > 0``) and ``pre`` for Act-Prob-90p files (thresholds on the
    pre-activation, as [M25] computed them); ``model={"site": ...}`` overrides it.
    """
    path = _open_check(path)
    override = _check_model_arg(model, path)
    doc = _safe_unpickle(path)
    if not isinstance(doc, dict) or "lang_to_neuron" not in doc:
        raise UserError(f"{path} does not hold a dict with 'lang_to_neuron'; it is not an [M25] neuron file")
    num_layers, width = doc.get("L"), doc.get("int_d")
    for key, value in (("L", num_layers), ("int_d", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{path}: '{key}' must be a positive integer, got {value!r}; the file is damaged")
    for key, value in (("num_layers", num_layers), ("width", width)):
        if key in override and override[key] != value:
            raise UserError(f"{path} was made for a {num_layers}x{width} model but model {key} = "
                            f"{override[key]}; drop the override or use the right file")

    table = doc["lang_to_neuron"]
    if not isinstance(table, dict):
        raise UserError(f"{path}: 'lang_to_neuron' is not a dict; it is not an [M25] neuron file")
    rows = {}
    for lang, tensor in table.items():
        if (not isinstance(lang, str) or not isinstance(tensor, torch.Tensor) or tensor.dtype.is_floating_point
                or tensor.dtype == torch.bool or (tensor.numel() and (tensor.dim() != 2 or tensor.shape[1] != 2))):
            raise UserError(f"{path}: lang_to_neuron[{lang!r}] is not an integer tensor of shape (N, 2)")
        rows[lang] = tensor.to(torch.int64).reshape(-1, 2)

    lang_list = doc.get("lang_list")
    if isinstance(lang_list, (list, tuple)) and all(isinstance(x, str) for x in lang_list):
        languages = list(dict.fromkeys(list(lang_list) + [lang for lang in rows if lang not in lang_list]))
    else:
        languages = list(rows)

    raw_method = doc.get("method")
    raw_method = raw_method if isinstance(raw_method, str) else ""
    m = doc.get("m") if isinstance(doc.get("m"), int) else None
    params = {"source": "mondal2025", "repository": "soumenkm/LSN", "file": path.name, "m": m,
              "original_method": raw_method or None}
    if raw_method.startswith("lape"):
        name, site = "lape", "act"
        set_name = raw_method.split("/", 1)[1] if "/" in raw_method else None
        params["language_set"] = set_name
    elif raw_method.startswith("act_prob"):
        name, site = "act-prob-percentile", "pre"
        params.update({"percentile": 90, "threshold": "own", "top_rate": 0.00125})
    else:
        name, site = (raw_method.replace("_", "-") or "mondal2025"), "act"

    model_name = doc.get("model_name") if isinstance(doc.get("model_name"), str) else None
    model_block = {
        "name_or_path": override.get("name_or_path", model_name),
        "model_type": override.get("model_type", _MONDAL2025_MODEL_TYPES.get(model_name)),
        "num_layers": num_layers,
        "width": width,
        "site": override.get("site", site),
    }
    method = {"name": name, "params": params, "languages": languages, "stats_fingerprint": None}
    return NeuronSet(rows, model_block, method, _where=f"importing {path}")


# --------------------------------------------------------------------------------------------
# dispatch


def import_auto(path, languages: Sequence[str] | str | None = None, model: Mapping | None = None) -> NeuronSet:
    """Load any supported neuron file: ``.json`` (langneurons), ``.pth``/``.pt`` ([T24]), ``.pkl`` ([M25]).

    Files with another extension are recognised by their first bytes (zip: torch.save; ``{``: JSON;
    a pickle protocol marker: [M25]).
    """
    path = _open_check(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".pth", ".pt", ".pkl", ".pickle"):
        with open(path, "rb") as handle:
            head = handle.read(4)
        if head.startswith(b"PK\x03\x04"):
            suffix = ".pth"
        elif head.lstrip()[:1] == b"{":
            suffix = ".json"
        elif head[:1] == b"\x80":
            suffix = ".pkl"
        else:
            raise UserError(f"cannot tell what kind of neuron file {path} is; give a .json (langneurons), "
                            f".pth ([T24]) or .pkl ([M25]) file")
    if suffix == ".json":
        ns = NeuronSet.load(path)
        if model:
            ns.validate_for(model.get("num_layers", ns.num_layers), model.get("width", ns.width), model.get("site"))
        if languages is not None:
            ns = ns.select(languages)
        return ns
    if suffix in (".pth", ".pt"):
        return import_tang2024_pth(path, languages=languages, model=model)
    ns = import_mondal2025_pkl(path, model=model)
    if languages is not None:
        ns = ns.select(languages)
    return ns
