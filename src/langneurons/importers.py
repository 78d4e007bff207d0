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

Resources are bounded before anything is allocated: the file size (:data:`MAX_IMPORT_BYTES`), the
storage sizes a ``torch.save`` blob or zip record declares (against the blob's bytes), and each
tensor's dtype, size, stride and offset (the view must lie inside its storage, may not expand it
through zero strides, and all tensors together may not hold more elements than the file has
bytes). A file-declared model shape that the file's size cannot justify, and a language listed
twice, are refused. Every failure is one UserError line.

Each importer returns a :class:`~langneurons.neuronset.NeuronSet` whose ``method.params`` records
the source file and how the model shape was determined.
"""

from __future__ import annotations

import collections
import contextlib
import io
import pathlib
import pickle
import re
import warnings
import zipfile
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
    twice = _first_repeat(languages)
    if twice is not None:
        raise UserError(f"importing {path}: language {twice!r} is given twice ({languages}); give each code once")
    if len(languages) != n:
        raise UserError(f"{path} holds {n} languages but {len(languages)} codes were given ({languages}); "
                        f"give exactly one code per entry, in file order")
    return languages


def _first_repeat(items):
    """The first item that occurs a second time in ``items`` (hashable items), else None."""
    seen = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def _weights_only_refusal(exc: BaseException) -> str | None:
    """If ``exc`` is torch.load's weights_only refusal, name what it refused (else None).

    torch's own message advises retrying with weights_only=False; that advice must not reach users.
    """
    text = str(exc)
    if not isinstance(exc, pickle.UnpicklingError) or "weights only" not in text.lower():
        return None
    found = re.search(r"GLOBAL\s+([\w.]+)", text)
    return found.group(1) if found else "an object that weights_only loading does not allow"


def _describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (just the type when the message is empty)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {_first_line(exc)}" if text else type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# resource bounds: every size a file declares is checked against the file's own bytes before
# anything of that size is allocated

#: Largest neuron file the importers read (the published ones are under 400 KB).
MAX_IMPORT_BYTES = 256 * 2**20

#: A tensor view may hold more elements than its storage only through zero (or overlapping)
#: strides; neuron files never do that, so such a view is refused beyond this many elements.
MAX_EXPANDED_ELEMENTS = 2**24

#: A file-declared model shape must be describable by the file: at most this many neurons per
#: byte of the file (the published files need fewer than 10), and never refused below
#: :data:`SHAPE_FLOOR_NEURONS` (larger than any real model's L x I).
NEURONS_PER_FILE_BYTE = 2**12
SHAPE_FLOOR_NEURONS = 2**24

#: dtypes of neuron index tensors.
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

#: Storage classes a legacy ``torch.save`` blob may name, and their dtypes.
_STORAGE_DTYPES = {
    "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16, "CharStorage": torch.int8,
    "ByteStorage": torch.uint8, "BoolStorage": torch.bool, "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
}


class _BoundsError(pickle.UnpicklingError):
    """A size, stride, offset or dtype in the file is out of bounds (checked before allocating)."""


class _DuplicateKey(pickle.UnpicklingError):
    """A pickled dict sets one key twice (the second value would silently replace the first)."""


def _is_plain_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_view(storage_numel: int, storage_offset, size, stride) -> int:
    """Check a strided view over a storage of ``storage_numel`` elements; return its element count.

    All arithmetic is on Python ints, so nothing overflows and nothing is allocated.
    """
    if not isinstance(size, tuple) or not all(_is_plain_int(v) for v in size):
        raise _BoundsError(f"a tensor has size {size!r:.80}, not a tuple of integers")
    if not isinstance(stride, tuple) or not all(_is_plain_int(v) for v in stride):
        raise _BoundsError(f"a tensor has stride {stride!r:.80}, not a tuple of integers")
    if len(size) != len(stride):
        raise _BoundsError(f"a tensor's size {size} and stride {stride} differ in length")
    if any(v < 0 for v in size):
        raise _BoundsError(f"a tensor has a negative size {size}")
    if any(v < 0 for v in stride):
        raise _BoundsError(f"a tensor has a negative stride {stride}")
    if not _is_plain_int(storage_offset) or storage_offset < 0:
        raise _BoundsError(f"a tensor has storage offset {storage_offset!r:.80}, not a non-negative integer")
    numel = 1
    for v in size:
        numel *= v
    if numel == 0:
        if storage_offset > storage_numel:
            raise _BoundsError(f"a tensor's storage offset {storage_offset} is beyond its {storage_numel}-element "
                               f"storage")
        return 0
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if storage_offset >= storage_numel:
        raise _BoundsError(f"a tensor's storage offset {storage_offset} is beyond its {storage_numel}-element "
                           f"storage")
    if last >= storage_numel:
        raise _BoundsError(f"a tensor of size {size} with stride {stride} and offset {storage_offset} reaches "
                           f"element {last} of a {storage_numel}-element storage")
    if numel > storage_numel and numel > MAX_EXPANDED_ELEMENTS:
        raise _BoundsError(f"a tensor of size {size} with stride {stride} expands a {storage_numel}-element "
                           f"storage to {numel} elements")
    return numel


class _Budget:
    """Running count of tensor elements, bounded by the bytes of the file they come from."""

    def __init__(self, nbytes: int):
        self.limit, self.used = max(nbytes, 1), 0

    def charge(self, numel: int) -> None:
        self.used += numel
        if self.used > self.limit:
            raise _BoundsError(f"its tensors hold more than {self.limit} elements in all, more than a "
                               f"{self.limit}-byte file can store (storages shared between tensors)")


def _read_bounded(path: Path) -> bytes:
    """The file's bytes, refused before reading when it is larger than any neuron file."""
    data = b""
    try:
        size = path.stat().st_size
        if size <= MAX_IMPORT_BYTES:
            with open(path, "rb") as handle:
                data = handle.read(MAX_IMPORT_BYTES + 1)
    except OSError as exc:
        raise UserError(f"cannot read neuron file {path} ({exc.strerror or exc}); check the path and its "
                        f"permissions") from None
    if size > MAX_IMPORT_BYTES or len(data) > MAX_IMPORT_BYTES:
        raise UserError(f"neuron file {path} has {max(size, len(data))} bytes, more than any neuron file "
                        f"(at most {MAX_IMPORT_BYTES}); check that it is the right file")
    return data


@contextlib.contextmanager
def _one_line_errors(path: Path, kind: str):
    """Turn any failure while decoding ``path`` (torch, pickle, zip, struct, ...) into one UserError line."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here means a bad file, reported in one line
        raise UserError(f"cannot import {path} as {kind} ({_describe(exc)}); the file "
                        f"is corrupt, truncated or of another kind: re-download it") from None


def _refused(path: Path, what: str, allowed: str) -> UserError:
    """The one line for a file that asks for a global ``what`` outside ``allowed`` (nothing ran)."""
    return UserError(f"refusing to load {path}: it asks for {what}, which {allowed} (nothing was executed); "
                     "use the published file")


def _out_of_bounds(path: Path, exc: BaseException) -> UserError:
    """The one line for a file whose tensors exceed their bounds (refused before any allocation)."""
    return UserError(f"refusing to load {path}: {exc}; the file is damaged or hostile (refused before "
                     "allocating it): re-download it")


def _check_shape_justified(path: Path, num_layers: int, width: int, nbytes: int, fix: str) -> None:
    """Refuse a file-declared model shape whose masks would need far more memory than the file justifies."""
    from .neuronset import _normalise_model  # the general bounds (beyond any real model) come first
    _normalise_model({"num_layers": num_layers, "width": width}, f"importing {path}")
    neurons = num_layers * width
    limit = max(SHAPE_FLOOR_NEURONS, NEURONS_PER_FILE_BYTE * nbytes)
    if neurons > limit:
        raise UserError(f"{path} declares a {num_layers}x{width} model ({neurons} neurons, one mask byte each), "
                        f"more than a {nbytes}-byte neuron file can describe (at most {limit}); {fix}")


# --------------------------------------------------------------------------------------------
# restricted unpickling (pure-Python unpickler: reads never allocate more than the data holds)


def _refuse_opcode(name: str):
    def refuse(self):
        raise pickle.UnpicklingError(f"pickle opcode {name}, which neuron files never use")
    return refuse


def _key_text(key) -> str:
    text = repr(key)
    return text if len(text) <= 60 else text[:57] + "..."


class _RestrictedUnpickler(pickle._Unpickler):  # noqa: SLF001 - the pure-Python unpickler, on purpose
    """Base of the allow-list unpicklers: no globals, no persistent ids, no BUILD (``__setstate__``),
    no extension registry, no pre-allocated bytearrays, and a dict may not set one key twice.

    The pure-Python unpickler reads counted bytes with ``file.read(n)`` on an in-memory buffer, so a
    declared length larger than the data fails without allocating it (the C unpickler allocates first).
    """

    dispatch = dict(pickle._Unpickler.dispatch)  # noqa: SLF001
    for _name in ("BUILD", "EXT1", "EXT2", "EXT4", "BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER"):
        dispatch[getattr(pickle, _name)[0]] = _refuse_opcode(_name)
    del _name

    def _set_items(self, items):
        target = self.stack[-1]
        if not isinstance(target, dict) or len(items) % 2:
            raise pickle.UnpicklingError("SETITEM(S) on something that is not a dict")
        for i in range(0, len(items), 2):
            if items[i] in target:
                raise _DuplicateKey(f"sets key {_key_text(items[i])} twice in one dict")
            target[items[i]] = items[i + 1]

    def _load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._set_items([key, value])

    def _load_setitems(self):
        self._set_items(self.pop_mark())

    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems

    def find_class(self, module, name):
        raise _RefusedGlobal(f"{module}.{name}")


class _StorageDecl:
    """What a storage persistent id of a legacy ``torch.save`` blob declares (nothing allocated)."""

    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel = key, dtype, numel


class _LegacyScanner(_RestrictedUnpickler):
    """Reads the object pickle of a legacy ``torch.save`` blob, recording the storages it declares
    and checking every tensor view against them, without creating any storage or tensor."""

    def __init__(self, file, nbytes: int, tensors: bool):
        super().__init__(file)
        self.nbytes, self.tensors, self.storages = nbytes, tensors, {}

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if self.tensors and (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild
        if self.tensors and (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise _RefusedGlobal(f"{module}.{name}")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) != 6 or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        _, dtype, key, location, numel, view = pid
        if (not isinstance(dtype, torch.dtype) or not isinstance(key, str) or not isinstance(location, str)
                or not _is_plain_int(numel) or numel < 0 or view is not None):
            raise pickle.UnpicklingError(f"unexpected storage record {pid!r:.80}")
        if numel * dtype.itemsize > self.nbytes:
            raise _BoundsError(f"a storage declares {numel} {_dtype_name(dtype)} elements, more than its "
                               f"{self.nbytes}-byte blob holds")
        if self.storages.setdefault(key, (dtype, numel)) != (dtype, numel):
            raise pickle.UnpicklingError(f"storage {key!r:.40} is declared twice with different sizes")
        return _StorageDecl(key, dtype, numel)

    def _rebuild(self, storage, storage_offset, size, stride, *rest):
        if not isinstance(storage, _StorageDecl):
            raise _bad_arg("torch._utils._rebuild_tensor_v2")
        _check_view(storage.numel, storage_offset, size, stride)


def _check_legacy_blob(data: bytes, tensors: bool) -> None:
    """Check a legacy (non-zip) ``torch.save`` blob before ``torch.load`` allocates its storages.

    Layout: magic number, protocol version, sys info, object pickle (storages as persistent ids),
    list of storage keys, then per key an 8-byte element count and the raw elements. Every declared
    storage must be backed by exactly that many bytes of the blob.
    """
    handle = io.BytesIO(data)
    if _RestrictedUnpickler(handle).load() != torch.serialization.MAGIC_NUMBER:
        raise pickle.UnpicklingError("not a torch.save blob (bad magic number)")
    if _RestrictedUnpickler(handle).load() != torch.serialization.PROTOCOL_VERSION:
        raise pickle.UnpicklingError("unsupported torch.save protocol version")
    if not isinstance(_RestrictedUnpickler(handle).load(), dict):
        raise pickle.UnpicklingError("bad torch.save header")
    scanner = _LegacyScanner(handle, len(data), tensors)
    result = scanner.load()
    if not tensors and not isinstance(result, _StorageDecl):
        raise pickle.UnpicklingError("a nested blob does not hold a tensor storage")
    keys = _RestrictedUnpickler(handle).load()
    if (not isinstance(keys, list) or len(set(keys)) != len(keys)
            or set(keys) != set(scanner.storages)):
        raise pickle.UnpicklingError("the storage keys of a torch.save blob do not match its storages")
    pos = handle.tell()
    for key in keys:
        dtype, numel = scanner.storages[key]
        if pos + 8 > len(data) or int.from_bytes(data[pos:pos + 8], "little", signed=True) != numel:
            raise _BoundsError(f"storage {key!r:.40} is truncated or its size record is wrong")
        pos += 8 + numel * dtype.itemsize
        if pos > len(data):
            raise _BoundsError(f"storage {key!r:.40} declares {numel} elements but the blob is truncated")
    if pos != len(data):
        raise pickle.UnpicklingError("a torch.save blob has data after its last storage")


def _check_zip_blob(data: bytes) -> None:
    """Check a zip ``torch.save`` archive: records stored uncompressed, their sizes within the archive.

    ``torch.load`` then allocates each storage from its record and checks the declared size
    against the record's size, so its allocations stay within the archive's bytes.
    """
    total = 0
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                raise _BoundsError(f"record {info.filename!r:.60} is compressed (torch.save stores records "
                                   f"uncompressed)")
            total += info.file_size
    if total > len(data):
        raise _BoundsError(f"its records declare {total} bytes, more than the {len(data)}-byte archive holds")


def _torch_load_checked(data: bytes, tensors: bool = True):
    """``torch.load(weights_only=True)`` of ``data`` after checking every size it declares."""
    if data[:4] == b"PK\x03\x04":
        _check_zip_blob(data)
    else:
        _check_legacy_blob(data, tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


# --------------------------------------------------------------------------------------------
# [T24] LAPE masks


def import_tang2024_pth(path, languages: Sequence[str] | str | None = None, model: Mapping | None = None) -> NeuronSet:
    """Import a [T24] ``.pth`` mask file (``mask[language][layer]`` = 1-D int64 indices).

    ``languages`` defaults to en, zh, fr, es, vi, id, ja truncated to the file's length. The layer
    count is the length of the per-language lists. The width is not stored: it comes from
    ``model["width"]``, else from :data:`TANG2024_MODELS` by file stem, else it is inferred as the
    largest index + 1 (a lower bound; recorded in ``method.params.width_source``). ``model`` may
    also set ``name_or_path``, ``model_type`` and ``site`` (default ``act``, as in [T24]).

    The file is read with ``torch.load(weights_only=True)`` after its size and the sizes of its
    records are checked; the loaded tensors are checked (shape, dtype, element count against their
    storage and against the file's bytes) before any mask is built. Every failure is one UserError.
    """
    path = _open_check(path)
    override = _check_model_arg(model, path)
    data = _read_bounded(path)
    try:
        obj = _torch_load_checked(data)
    except _RefusedGlobal as exc:
        raise _refused(path, str(exc), "a [T24] mask file never holds") from None
    except _BoundsError as exc:
        raise _out_of_bounds(path, exc) from None
    except Exception as exc:  # noqa: BLE001 - anything torch.load raises means an unreadable file
        refused = _weights_only_refusal(exc)
        if refused is not None:
            raise _refused(path, refused, "a [T24] mask file never holds") from None
        raise UserError(f"cannot read {path} as a [T24] torch.save file ({_first_line(exc)}); the file is "
                        f"corrupt, truncated or not a neuron mask file: re-download it") from None
    with _one_line_errors(path, "a [T24] mask file"):
        return _tang2024_from_object(obj, path, len(data), languages, override)


def _tang2024_from_object(obj, path: Path, nbytes: int, languages, override: dict) -> NeuronSet:
    from .neuronset import MAX_LAYERS

    if not isinstance(obj, (list, tuple)) or not obj:
        raise UserError(f"{path} does not hold a list over languages of lists over layers of index tensors; "
                        f"it is not a [T24] mask file")
    langs = _language_list(languages, len(obj), path)
    budget = _Budget(nbytes)
    num_layers = None
    for k, per_layer in enumerate(obj):
        if not isinstance(per_layer, (list, tuple)) or not per_layer:
            raise UserError(f"{path}: entry {k} is not a list over layers; it is not a [T24] mask file")
        if num_layers is None:
            num_layers = len(per_layer)
            if num_layers > MAX_LAYERS:
                raise UserError(f"{path} lists {num_layers} layers, beyond any real model (at most {MAX_LAYERS}); "
                                f"the file is damaged: re-download it")
        elif len(per_layer) != num_layers:
            raise UserError(f"{path}: language entries have different layer counts ({num_layers} and "
                            f"{len(per_layer)}); the file is damaged")
        for layer, idx in enumerate(per_layer):
            if (not isinstance(idx, torch.Tensor) or idx.layout != torch.strided or idx.device.type != "cpu"
                    or idx.dim() != 1 or idx.dtype not in _INDEX_DTYPES):
                got = f" (dtype {_dtype_name(idx.dtype)})" if isinstance(idx, torch.Tensor) else ""
                raise UserError(f"{path}: entry {k}, layer {layer} is not a 1-D integer tensor of indices{got}; "
                                f"it is not a [T24] mask file")
            try:
                held = idx.untyped_storage().nbytes() // idx.element_size()
                budget.charge(_check_view(held, idx.storage_offset(), tuple(idx.shape), tuple(idx.stride())))
            except _BoundsError as exc:
                raise UserError(f"refusing to load {path}: entry {k}, layer {layer}: {exc}; the file is damaged "
                                f"or hostile: re-download it") from None

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
        _check_shape_justified(path, num_layers, width, nbytes,
                               "the file is damaged, or pass model={'width': ...} with the model's real MLP width")
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
    """Stand-in for ``torch.storage._load_from_bytes``: the blob's declared storage sizes are checked
    against its bytes, then it is read with ``torch.load(weights_only=True)``."""
    if not isinstance(data, (bytes, bytearray)):
        raise _bad_arg("torch.storage._load_from_bytes")
    try:
        storage = _torch_load_checked(bytes(data), tensors=False)
    except _RefusedGlobal as exc:
        raise _RefusedGlobal(f"{exc} (inside a nested tensor blob)") from None
    except pickle.UnpicklingError as exc:
        refused = _weights_only_refusal(exc)
        if refused is not None:
            raise _RefusedGlobal(f"{refused} (inside a nested tensor blob)") from None
        raise
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"a nested blob held {type(storage).__name__}, not a tensor storage")
    return storage


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stand-in for ``torch._utils._rebuild_tensor_v2`` that accepts only plain CPU integer tensors.

    dtype, size, stride and offset are checked against the storage (Python ints, nothing allocated)
    before the view is made: the view never needs more than the storage holds.
    """
    if (not isinstance(storage, torch.TypedStorage) or not isinstance(requires_grad, bool)
            or (backward_hooks is not None and (not isinstance(backward_hooks, dict) or len(backward_hooks) != 0))
            or metadata not in (None, {})):
        raise _bad_arg("torch._utils._rebuild_tensor_v2")
    if storage.dtype not in _INDEX_DTYPES:
        raise _BoundsError(f"a tensor has dtype {_dtype_name(storage.dtype)}; [M25] neuron files hold only "
                           f"integer index tensors")
    held = storage._untyped_storage.nbytes() // storage.dtype.itemsize
    _check_view(held, storage_offset, size, stride)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tensor = torch.empty(0, dtype=storage.dtype)
        tensor.set_(storage._untyped_storage, storage_offset, size, stride)  # within the storage: checked above
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


class _NeuronPickleUnpickler(_RestrictedUnpickler):
    """Unpickler that resolves only the globals the [M25] neuron files use.

    Allowed: ``torch._utils._rebuild_tensor_v2``, ``torch.storage._load_from_bytes``,
    ``collections.OrderedDict``, ``torch.device`` and ``pathlib.PosixPath``; each maps to a checked
    stand-in above. Everything else raises :class:`_RefusedGlobal`. Persistent ids, BUILD and the
    extension registry are refused too, a dict may not set a key twice, and the elements of all
    tensors together are bounded by ``budget`` (the file's bytes).
    """

    ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch", "device"): _device_name,
        ("pathlib", "PosixPath"): _pure_path,
    }

    def __init__(self, file, budget: _Budget | None = None):
        super().__init__(file)
        self.budget = budget

    def _rebuild_charged(self, *args):
        tensor = _rebuild_tensor(*args)
        if self.budget is not None:
            self.budget.charge(tensor.numel())
        return tensor

    def find_class(self, module, name):
        try:
            found = self.ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise _RefusedGlobal(f"{module}.{name}") from None
        return self._rebuild_charged if found is _rebuild_tensor else found


def _safe_unpickle(path: Path, data: bytes):
    handle = io.BytesIO(data)
    try:
        obj = _NeuronPickleUnpickler(handle, _Budget(len(data))).load()
    except _RefusedGlobal as exc:
        raise _refused(path, str(exc), "is not on the allow-list of the [M25] neuron files") from None
    except _BoundsError as exc:
        raise _out_of_bounds(path, exc) from None
    except _DuplicateKey as exc:
        raise UserError(f"{path}: the pickle {exc} (one language listed twice?); the file is damaged: "
                        f"re-download it") from None
    except Exception as exc:  # noqa: BLE001 - any failure while decoding means a bad file
        raise UserError(f"cannot read {path} as an [M25] neuron pickle ({_describe(exc)}); "
                        f"the file is corrupt, truncated or of another kind: re-download it") from None
    if handle.read(1):
        raise UserError(f"{path} has data after the end of its pickle; the file is damaged: re-download it")
    return obj


def import_mondal2025_pkl(path, model: Mapping | None = None) -> NeuronSet:
    """Import an [M25] ``.pkl`` file: a dict with ``lang_to_neuron``, ``L``, ``int_d``, ``m``, ``lang_list``.

    The model shape comes from ``L`` x ``int_d``. The site is ``act`` for LAPE files (activation
    probability: ``act > 0`` iff ``pre > 0``) and ``pre`` for Act-Prob-90p files (thresholds on the
    pre-activation, as [M25] computed them); ``model={"site": ...}`` overrides it.

    The file size, every declared storage size, and each tensor's dtype, shape, stride and offset
    are checked before anything of that size is allocated; a language listed twice is refused.
    """
    path = _open_check(path)
    override = _check_model_arg(model, path)
    data = _read_bounded(path)
    doc = _safe_unpickle(path, data)
    with _one_line_errors(path, "an [M25] neuron pickle"):
        return _mondal2025_from_object(doc, path, len(data), override)


def _mondal2025_from_object(doc, path: Path, nbytes: int, override: dict) -> NeuronSet:
    if not isinstance(doc, dict) or "lang_to_neuron" not in doc:
        raise UserError(f"{path} does not hold a dict with 'lang_to_neuron'; it is not an [M25] neuron file")
    num_layers, width = doc.get("L"), doc.get("int_d")
    for key, value in (("L", num_layers), ("int_d", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{path}: '{key}' must be a positive integer, got {value!r:.80}; the file is damaged")
    _check_shape_justified(path, num_layers, width, nbytes, "its 'L' or 'int_d' is damaged: re-download the file")
    for key, value in (("num_layers", num_layers), ("width", width)):
        if key in override and override[key] != value:
            raise UserError(f"{path} was made for a {num_layers}x{width} model but model {key} = "
                            f"{override[key]}; drop the override or use the right file")

    table = doc["lang_to_neuron"]
    if not isinstance(table, dict):
        raise UserError(f"{path}: 'lang_to_neuron' is not a dict; it is not an [M25] neuron file")
    rows = {}
    for lang, tensor in table.items():
        if (not isinstance(lang, str) or not isinstance(tensor, torch.Tensor) or tensor.dtype not in _INDEX_DTYPES
                or (tensor.numel() and (tensor.dim() != 2 or tensor.shape[1] != 2))):
            raise UserError(f"{path}: lang_to_neuron[{_key_text(lang)}] is not an integer tensor of shape (N, 2)")
        rows[lang] = tensor.to(torch.int64).reshape(-1, 2)

    lang_list = doc.get("lang_list")
    if isinstance(lang_list, (list, tuple)) and all(isinstance(x, str) for x in lang_list):
        twice = _first_repeat(lang_list)
        if twice is not None:
            raise UserError(f"{path}: lang_list lists language {_key_text(twice)} twice; the file is damaged: "
                            f"re-download it")
        listed = set(lang_list)
        languages = list(lang_list) + [lang for lang in rows if lang not in listed]
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
        try:
            with open(path, "rb") as handle:
                head = handle.read(4)
        except OSError as exc:
            raise UserError(f"cannot read neuron file {path} ({exc.strerror or exc}); check the path and its "
                            f"permissions") from None
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
