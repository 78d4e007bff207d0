"""Neuron sets: the interchange format between identification, intervention and analysis.

A *neuron* is a pair ``(layer, index)`` with ``0 <= layer < L`` and ``0 <= index < I`` (``I`` is the
MLP intermediate width). A :class:`NeuronSet` holds, for each language, the sorted unique rows
``[layer, index]`` of the neurons attributed to that language, together with the model shape and
activation site they refer to and a record of how they were made.

File format (JSON, public contract)::

    {"format": "langneurons.neuronset.v1",
     "model": {"name_or_path": "...", "model_type": "llama", "num_layers": 4, "width": 768, "site": "act"},
     "method": {"name": "lape", "params": {...}, "languages": ["en", "zh"], "stats_fingerprint": "..."},
     "neurons": {"en": [[0, 17], [3, 402]], "zh": [[1, 5]]}}

Rows are ``[layer, index]``, sorted lexicographically and unique. Every language listed in
``method.languages`` has a key in ``neurons`` (possibly an empty list), and ``neurons`` has no
other keys. A file holds at least one language, and no JSON object in it repeats a key.

Files are validated in one place, :meth:`NeuronSet.from_dict` (which :meth:`NeuronSet.load` and the
artifact registry use): any departure from the format above, a model shape beyond
:data:`MAX_LAYERS` x :data:`MAX_WIDTH` (at most :data:`MAX_NEURONS` neurons), or a row outside the
model shape is refused with one :class:`~langneurons.errors.UserError` line. The constructor is
lenient where a program may be: it sorts rows and drops duplicates.

Besides the container this module provides set algebra (union, intersection, difference,
selection, renaming), overlap measures (Jaccard index, overlap counts, layer distributions) and
the matched random control of METHODS.md section 3.4.
"""

from __future__ import annotations

import copy
import json
import numbers
from pathlib import Path
from collections.abc import Iterable, Mapping, Sequence

import torch

from .atomic import atomic_write_text
from .errors import UserError

from .artifacts import NEURONSET_FORMAT as FORMAT  # noqa: E402 - the tag is defined in the artifact registry
from .artifacts import loads_json
SITES = ("pre", "act", "product")

#: Bounds on the model shape a set may record: far beyond any real model (the largest MLPs have
#: about 130 layers of width 5e4), small enough that an [L, I] mask fits in memory.
MAX_LAYERS = 10**6
MAX_WIDTH = 10**8
MAX_NEURONS = 2**32

_NORMALISE_FIX = "NeuronSet.load(path, normalise=True).save(path) rewrites the file sorted and unique"

_MODEL_KEYS = ("name_or_path", "model_type", "num_layers", "width", "site")
_METHOD_KEYS = ("name", "params", "languages", "stats_fingerprint")

__all__ = [
    "FORMAT",
    "NeuronSet",
    "jaccard",
    "jaccard_matrix",
    "jaccard_between",
    "overlap_matrix",
    "layer_distribution",
    "random_control",
]


# --------------------------------------------------------------------------------------------
# helpers


def _is_int(value) -> bool:
    """True for Python/numpy-style integers, False for bools and floats."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _normalise_model(model: Mapping, where: str) -> dict:
    """Check the ``model`` block and return a copy with every standard key present."""
    if not isinstance(model, Mapping):
        raise UserError(f"{where}: 'model' must be a dict with num_layers, width and site; got {type(model).__name__}")
    out = dict(model)
    for key in ("num_layers", "width"):
        value = out.get(key)
        if not _is_int(value) or value <= 0:
            raise UserError(f"{where}: model.{key} must be a positive integer, got {value!r}; "
                            f"give the model shape (layers x MLP width)")
    for key, limit in (("num_layers", MAX_LAYERS), ("width", MAX_WIDTH)):
        if out[key] > limit:
            raise UserError(f"{where}: model.{key} = {out[key]} is beyond any real model (at most {limit}); "
                            f"the model shape is damaged: give the real layers x MLP width")
    if out["num_layers"] * out["width"] > MAX_NEURONS:
        raise UserError(f"{where}: model shape {out['num_layers']}x{out['width']} has more than {MAX_NEURONS} "
                        f"neurons, beyond any real model; the model shape is damaged: give the real one")
    site = out.get("site", "act")
    if site is None:
        site = "act"
    if site not in SITES:
        raise UserError(f"{where}: model.site must be one of {', '.join(SITES)}, got {site!r}")
    out["site"] = site
    for key in ("name_or_path", "model_type"):
        value = out.get(key)
        if value is not None and not isinstance(value, str):
            raise UserError(f"{where}: model.{key} must be a string or null, got {value!r}")
        out.setdefault(key, None)
    # Standard keys first, in contract order; anything extra is kept after them.
    return {**{k: out[k] for k in _MODEL_KEYS}, **{k: v for k, v in out.items() if k not in _MODEL_KEYS}}


def _normalise_method(method: Mapping | None, where: str) -> dict:
    if method is None:
        method = {}
    if not isinstance(method, Mapping):
        raise UserError(f"{where}: 'method' must be a dict with name and params; got {type(method).__name__}")
    out = dict(method)
    name = out.get("name", "unknown")
    if not isinstance(name, str) or not name:
        raise UserError(f"{where}: method.name must be a non-empty string, got {name!r}")
    out["name"] = name
    params = out.get("params")
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise UserError(f"{where}: method.params must be a dict, got {type(params).__name__}")
    out["params"] = dict(params)
    langs = out.get("languages")
    if langs is not None:
        if not isinstance(langs, (list, tuple)) or not all(isinstance(x, str) and x for x in langs):
            raise UserError(f"{where}: method.languages must be a list of language codes, got {langs!r}")
        if len(set(langs)) != len(langs):
            raise UserError(f"{where}: method.languages lists a language twice: {list(langs)!r}")
        out["languages"] = list(langs)
    fp = out.get("stats_fingerprint")
    if fp is not None and not isinstance(fp, str):
        raise UserError(f"{where}: method.stats_fingerprint must be a string or null, got {fp!r}")
    out["stats_fingerprint"] = fp
    return {**{k: out.get(k) for k in _METHOD_KEYS}, **{k: v for k, v in out.items() if k not in _METHOD_KEYS}}


def _outside(where: str, lang: str, row, L: int, I: int) -> UserError:
    return UserError(f"{where}: neurons[{lang!r}] has row {row} outside the model shape "
                     f"{L}x{I} (layer < {L}, index < {I}); fix the row or the model shape")


def _rows_to_tensor(rows, lang: str, where: str, L: int, I: int) -> torch.Tensor:
    """Turn a LongTensor [n, 2] or a sequence of pairs into an int64 tensor [n, 2] inside ``L x I``."""
    if not isinstance(rows, torch.Tensor) and type(rows).__module__ == "numpy" and hasattr(rows, "dtype"):
        try:
            rows = torch.as_tensor(rows)
        except (TypeError, ValueError, RuntimeError):
            raise UserError(f"{where}: neurons[{lang!r}] is an array torch cannot read; give int pairs") from None
    if isinstance(rows, torch.Tensor):
        if rows.dtype == torch.bool or rows.dtype.is_floating_point or rows.dtype.is_complex:
            raise UserError(f"{where}: neurons[{lang!r}] must hold integers, got a {rows.dtype} tensor")
        tensor = rows.detach().to(device="cpu", dtype=torch.int64)
        if tensor.numel() == 0:
            return torch.empty((0, 2), dtype=torch.int64)
        if tensor.dim() != 2 or tensor.shape[1] != 2:
            raise UserError(f"{where}: neurons[{lang!r}] must have shape [n, 2] (layer, index), "
                            f"got {tuple(tensor.shape)}")
        bad = (tensor[:, 0] < 0) | (tensor[:, 0] >= L) | (tensor[:, 1] < 0) | (tensor[:, 1] >= I)
        if bool(bad.any()):
            raise _outside(where, lang, tensor[int(bad.nonzero()[0, 0])].tolist(), L, I)
        return tensor.clone()
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Iterable):
        raise UserError(f"{where}: neurons[{lang!r}] must be a list of [layer, index] pairs, got {type(rows).__name__}")
    flat: list[int] = []
    for row in rows:
        if (isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or len(row) != 2
                or not all(_is_int(v) for v in row)):
            raise UserError(f"{where}: neurons[{lang!r}] has a bad row {row!r}; "
                            f"every row must be a pair of integers [layer, index]")
        layer, index = int(row[0]), int(row[1])
        if not (0 <= layer < L and 0 <= index < I):  # checked here: beyond int64 is no tensor
            raise _outside(where, lang, [layer, index], L, I)
        flat.extend((layer, index))
    return torch.tensor(flat, dtype=torch.int64).reshape(-1, 2)


def _check_sorted_unique(rows: torch.Tensor, width: int, lang: str, where: str) -> None:
    """Refuse rows that are not strictly increasing in (layer, index), as files must be."""
    if rows.shape[0] < 2:
        return
    keys = rows[:, 0] * width + rows[:, 1]
    step = keys[1:] - keys[:-1]
    bad = (step <= 0).nonzero()
    if bad.numel() == 0:
        return
    i = int(bad[0, 0])
    a, b = rows[i].tolist(), rows[i + 1].tolist()
    if a == b:
        raise UserError(f"{where}: neurons[{lang!r}] lists row {a} twice; rows must be unique and sorted by "
                        f"(layer, index): drop the duplicate ({_NORMALISE_FIX})")
    raise UserError(f"{where}: neurons[{lang!r}] has row {b} after {a}; rows must be sorted by (layer, index) "
                    f"and unique: sort them ({_NORMALISE_FIX})")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


def _sorted_unique_rows(rows: torch.Tensor, width: int) -> torch.Tensor:
    """Sort rows lexicographically by (layer, index) and drop duplicates (range already checked)."""
    if rows.shape[0] == 0:
        return torch.empty((0, 2), dtype=torch.int64)
    keys = torch.unique(rows[:, 0] * width + rows[:, 1])  # sorted ascending
    return torch.stack([keys // width, keys % width], dim=1)


# --------------------------------------------------------------------------------------------
# the container


class NeuronSet:
    """Per-language sets of MLP neurons of one model at one activation site.

    Parameters
    ----------
    neurons:
        ``{language: rows}`` where rows is an int64 tensor ``[n, 2]`` or a list of
        ``[layer, index]`` pairs. Rows are sorted and de-duplicated; out-of-range or negative
        rows raise :class:`~langneurons.errors.UserError`.
    model:
        ``{"num_layers": L, "width": I, "site": "act", "name_or_path": ..., "model_type": ...}``;
        ``num_layers`` and ``width`` are required, ``site`` defaults to ``"act"``.
    method:
        ``{"name": ..., "params": {...}, "languages": [...], "stats_fingerprint": ...}``; only
        informative, except ``languages`` which fixes the language order (languages listed there
        but absent from ``neurons`` get an empty set).

    Attributes
    ----------
    neurons: ``dict[str, LongTensor [n, 2]]`` in language order; ``model``; ``method``;
    ``languages``; ``num_layers``; ``width``; ``site``; ``path`` (the file it was loaded from or
    last saved to, else ``None``).
    """

    def __init__(self, neurons: Mapping, model: Mapping, method: Mapping | None = None, *, _where: str | None = None,
                 _strict: bool = False):
        where = _where or "neuron set"
        if not isinstance(neurons, Mapping):
            raise UserError(f"{where}: 'neurons' must be a dict mapping language -> [[layer, index], ...]")
        self.model = _normalise_model(model, where)
        self.method = _normalise_method(method, where)
        for lang in neurons:
            if not isinstance(lang, str) or not lang:
                raise UserError(f"{where}: language codes must be non-empty strings, got {lang!r}")
        declared = self.method["languages"]
        if declared is None:
            languages = list(neurons)
        else:
            extra = [lang for lang in neurons if lang not in declared]
            if extra:
                raise UserError(f"{where}: neurons has languages {extra} that method.languages {declared} "
                                f"does not list; add them to method.languages or drop them")
            languages = list(declared)
        self.method["languages"] = list(languages)
        self.path: Path | None = None

        L, I = self.model["num_layers"], self.model["width"]
        self.neurons: dict[str, torch.Tensor] = {}
        for lang in languages:
            rows = _rows_to_tensor(neurons.get(lang, []), lang, where, L, I)
            if _strict:  # a file: rows must already be sorted and unique
                _check_sorted_unique(rows, I, lang, where)
            self.neurons[lang] = _sorted_unique_rows(rows, I)

    # ---- basic properties ------------------------------------------------------------------

    @property
    def languages(self) -> list[str]:
        return list(self.neurons)

    @property
    def num_layers(self) -> int:
        return self.model["num_layers"]

    @property
    def width(self) -> int:
        return self.model["width"]

    @property
    def site(self) -> str:
        return self.model["site"]

    @property
    def name(self) -> str:
        """A short label for messages: the file path if known, else the method name."""
        return str(self.path) if self.path is not None else self.method["name"]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{lang}={self.total(lang)}" for lang in self.languages)
        return (f"NeuronSet({self.method['name']!r}, {self.num_layers}x{self.width} site={self.site}, "
                f"{sizes}, unique={self.unique_total()})")

    def __eq__(self, other) -> bool:
        if not isinstance(other, NeuronSet):
            return NotImplemented
        return (self.model == other.model and self.method == other.method
                and self.languages == other.languages
                and all(torch.equal(self.neurons[k], other.neurons[k]) for k in self.languages))

    __hash__ = None  # mutable container

    def _check_lang(self, lang: str) -> None:
        if lang not in self.neurons:
            raise UserError(f"neuron set {self.name} has no language {lang!r}; "
                            f"it has {', '.join(self.languages) or 'none'}")

    def _keys(self, lang: str) -> torch.Tensor:
        """Flat keys ``layer * width + index`` (sorted) of one language."""
        rows = self.neurons[lang]
        return rows[:, 0] * self.width + rows[:, 1]

    def _derive(self, neurons: Mapping, method: Mapping, model: Mapping | None = None) -> "NeuronSet":
        return NeuronSet(neurons, copy.deepcopy(dict(model or self.model)), method)

    # ---- masks and counts ------------------------------------------------------------------

    @classmethod
    def from_masks(cls, masks: Mapping[str, torch.Tensor], model: Mapping, method: Mapping | None = None) -> "NeuronSet":
        """Build a set from boolean masks ``{language: BoolTensor [L, I]}``.

        ``model.num_layers`` and ``model.width`` are taken from the masks when missing and must
        agree with them when given.
        """
        model = dict(model or {})
        shape = None
        rows = {}
        for lang, mask in masks.items():
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
                raise UserError(f"mask for language {lang!r} must be a 2-D bool tensor [layers, width]")
            if shape is None:
                shape = tuple(mask.shape)
            elif tuple(mask.shape) != shape:
                raise UserError(f"mask for language {lang!r} has shape {tuple(mask.shape)}, others {shape}; "
                                f"all masks must share one model shape")
            rows[lang] = mask.detach().cpu().nonzero()
        if shape is not None:
            for key, value in (("num_layers", shape[0]), ("width", shape[1])):
                if model.get(key) is None:
                    model[key] = value
                elif model[key] != value:
                    raise UserError(f"model.{key} = {model[key]} disagrees with the masks' shape {shape}")
        return cls(rows, model, method)

    def mask(self, lang: str) -> torch.Tensor:
        """BoolTensor ``[L, I]``, True at the neurons of ``lang``."""
        self._check_lang(lang)
        out = torch.zeros((self.num_layers, self.width), dtype=torch.bool)
        rows = self.neurons[lang]
        out[rows[:, 0], rows[:, 1]] = True
        return out

    def masks(self) -> dict[str, torch.Tensor]:
        return {lang: self.mask(lang) for lang in self.languages}

    def union_mask(self) -> torch.Tensor:
        """BoolTensor ``[L, I]``, True at neurons of any language."""
        out = torch.zeros((self.num_layers, self.width), dtype=torch.bool)
        for rows in self.neurons.values():
            out[rows[:, 0], rows[:, 1]] = True
        return out

    def per_layer(self, lang: str) -> dict[int, torch.Tensor]:
        """``{layer: sorted LongTensor of indices}`` for every layer ``0..L-1`` (empty where none)."""
        self._check_lang(lang)
        rows = self.neurons[lang]
        counts = torch.bincount(rows[:, 0], minlength=self.num_layers).tolist()
        chunks = torch.split(rows[:, 1], counts)  # rows are sorted by layer, then index
        return {layer: chunk.clone() for layer, chunk in enumerate(chunks)}

    def counts(self) -> dict[str, torch.Tensor]:
        """``{language: LongTensor [L]}`` number of neurons per layer."""
        return {lang: torch.bincount(rows[:, 0], minlength=self.num_layers) for lang, rows in self.neurons.items()}

    def total(self, lang: str) -> int:
        self._check_lang(lang)
        return int(self.neurons[lang].shape[0])

    def unique_total(self) -> int:
        """Number of distinct ``(layer, index)`` pairs over all languages."""
        if not self.neurons:
            return 0
        return int(torch.unique(torch.cat([self._keys(lang) for lang in self.languages])).numel())

    # ---- file I/O --------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The JSON-ready document (plain Python types)."""
        return {
            "format": FORMAT,
            "model": copy.deepcopy(self.model),
            "method": copy.deepcopy(self.method),
            "neurons": {lang: rows.tolist() for lang, rows in self.neurons.items()},
        }

    def save(self, path) -> Path:
        """Write the set as JSON, atomically (temporary file + ``os.replace``). Returns the path."""
        path = Path(path)
        if not self.neurons:
            raise UserError(f"cannot save neuron set to {path}: it holds no languages, and a neuron-set file "
                            f"needs at least one; select languages the set has")
        doc = self.to_dict()
        try:
            head = json.dumps({k: doc[k] for k in ("format", "model", "method")}, indent=2, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise UserError(f"cannot save neuron set to {path}: model/method hold a value JSON cannot store "
                            f"({exc}); keep params to plain numbers, strings, lists and dicts") from None
        # One line per language keeps files compact yet diff-friendly.
        lines = [f"    {json.dumps(lang, ensure_ascii=False)}: {json.dumps(rows, separators=(',', ':'))}"
                 for lang, rows in doc["neurons"].items()]
        neurons = "{\n" + ",\n".join(lines) + "\n  }" if lines else "{}"
        text = head[:-2] + ',\n  "neurons": ' + neurons + "\n}\n"
        atomic_write_text(path, text, create_dirs=False)
        self.path = path
        return path

    @classmethod
    def from_dict(cls, doc, where: str = "neuron set", *, normalise: bool = False) -> "NeuronSet":
        """Validate a parsed document (see the module docstring) and build the set.

        Rows must be sorted by ``(layer, index)`` and unique, as files are written; with
        ``normalise=True`` they are sorted and de-duplicated instead (to repair a file).
        """
        if not isinstance(doc, dict):
            raise UserError(f"{where}: expected a JSON object with format/model/method/neurons, "
                            f"got {type(doc).__name__}")
        fmt = doc.get("format")
        if fmt != FORMAT:
            raise UserError(f"{where}: format is {fmt!r}, expected {FORMAT!r}; is this a langneurons neuron-set "
                            f"file? (import published files with langneurons.importers)")
        missing = [k for k in ("model", "method", "neurons") if k not in doc]
        if missing:
            raise UserError(f"{where}: missing key(s) {', '.join(missing)}; the file is incomplete")
        method = doc["method"]
        if not isinstance(method, dict) or "name" not in method or "languages" not in method:
            raise UserError(f"{where}: 'method' must be an object with at least 'name' and 'languages'")
        neurons = doc["neurons"]
        if not isinstance(neurons, dict):
            raise UserError(f"{where}: 'neurons' must be an object mapping language -> [[layer, index], ...]")
        languages = method["languages"]
        if not isinstance(languages, list) or not all(isinstance(x, str) and x for x in languages):
            raise UserError(f"{where}: method.languages must be a list of language codes (the keys of "
                            f"'neurons'), got {languages!r}")
        absent = [lang for lang in languages if lang not in neurons]
        if absent:
            raise UserError(f"{where}: method.languages lists {absent} but 'neurons' has no key for them; "
                            f"every listed language needs a key (an empty list if it has no neurons)")
        if not languages and not neurons:
            raise UserError(f"{where}: the set holds no languages (method.languages and 'neurons' are empty); "
                            f"a neuron-set file needs at least one: regenerate it")
        model = doc["model"]
        if isinstance(model, dict) and "site" not in model:
            raise UserError(f"{where}: model.site is missing; add one of {', '.join(SITES)}")
        return cls(neurons, model, method, _where=where, _strict=not normalise)

    @classmethod
    def load(cls, path, *, normalise: bool = False) -> "NeuronSet":
        """Read and validate a neuron-set JSON file (see :meth:`from_dict`; ``normalise`` sorts rows)."""
        path = Path(path)
        where = f"neuron set {path}"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{where} does not exist; check the path") from None
        except IsADirectoryError:
            raise UserError(f"{where} is a directory; give the .json file") from None
        except MemoryError:
            raise UserError(f"{where} is too large to read; it is not a neuron-set file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read {where}: {_one_line(exc)}") from None
        try:
            doc = loads_json(text, where)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                            f"the file is corrupt or truncated: regenerate it") from None
        ns = cls.from_dict(doc, where=where, normalise=normalise)
        ns.path = path
        return ns

    # ---- validation against a model ----------------------------------------------------------

    def validate_for(self, num_layers: int, width: int, site: str | None = None) -> None:
        """Raise UserError unless the set was made for a ``num_layers x width`` model (and ``site``)."""
        same_shape = (self.num_layers, self.width) == (num_layers, width)
        same_site = site is None or site == self.site
        if same_shape and same_site:
            return
        here = f"{num_layers}x{width}" + (f" at site {site}" if site is not None else "")
        fix = ("use a neuron set identified on this model" if not same_shape
               else f"use a neuron set identified at site {site} (or run with --site {self.site})")
        raise UserError(f"neuron set {self.name} was made for a {self.num_layers}x{self.width} model at site "
                        f"{self.site}; this model is {here}; {fix}")

    # ---- set algebra -------------------------------------------------------------------------

    def _check_compatible(self, other: "NeuronSet", op: str) -> list[str]:
        if not isinstance(other, NeuronSet):
            raise TypeError(f"{op} needs another NeuronSet, got {type(other).__name__}")
        if (self.num_layers, self.width) != (other.num_layers, other.width):
            raise UserError(f"cannot take the {op} of neuron sets for different model shapes: "
                            f"{self.name} is {self.num_layers}x{self.width}, {other.name} is "
                            f"{other.num_layers}x{other.width}; use sets made for the same model")
        if self.site != other.site:
            raise UserError(f"cannot take the {op} of neuron sets at different sites ({self.name}: {self.site}, "
                            f"{other.name}: {other.site}); relabel one with .with_model(site=...) if they "
                            f"share an index space on purpose")
        return [lang for lang in self.languages if lang in other.neurons]

    def _combine(self, other: "NeuronSet", op: str) -> "NeuronSet":
        langs = self._check_compatible(other, op)
        out = {}
        for lang in langs:
            a, b = self._keys(lang), other._keys(lang)
            if op == "union":
                keys = torch.cat([a, b])
            elif op == "intersection":
                keys = a[torch.isin(a, b)]
            else:  # difference
                keys = a[~torch.isin(a, b)]
            out[lang] = torch.stack([keys // self.width, keys % self.width], dim=1)
        fp_a, fp_b = self.method.get("stats_fingerprint"), other.method.get("stats_fingerprint")
        method = {
            "name": op,
            "params": {"left": copy.deepcopy(self.method), "right": copy.deepcopy(other.method)},
            "languages": langs,
            "stats_fingerprint": fp_a if fp_a == fp_b else None,
        }
        return self._derive(out, method)

    def union(self, other: "NeuronSet") -> "NeuronSet":
        """Per-language union ``A_k ∪ B_k`` over the languages both sets have (order of ``self``)."""
        return self._combine(other, "union")

    def intersection(self, other: "NeuronSet") -> "NeuronSet":
        """Per-language intersection ``A_k ∩ B_k`` over the common languages."""
        return self._combine(other, "intersection")

    def difference(self, other: "NeuronSet") -> "NeuronSet":
        """Per-language difference ``A_k \\ B_k`` over the common languages."""
        return self._combine(other, "difference")

    def select(self, languages: Iterable[str]) -> "NeuronSet":
        """A copy restricted to ``languages`` (in the order given)."""
        if isinstance(languages, str):
            languages = [x for x in languages.split(",") if x]
        languages = list(languages)
        for lang in languages:
            self._check_lang(lang)
        if len(set(languages)) != len(languages):
            raise UserError(f"select: a language is listed twice in {languages}")
        method = copy.deepcopy(self.method)
        method["languages"] = languages
        return self._derive({lang: self.neurons[lang] for lang in languages}, method)

    def rename(self, mapping: Mapping[str, str]) -> "NeuronSet":
        """A copy with languages renamed by ``mapping`` (languages not in it keep their code)."""
        for old in mapping:
            self._check_lang(old)
        new_names = [mapping.get(lang, lang) for lang in self.languages]
        if len(set(new_names)) != len(new_names):
            raise UserError(f"rename: renaming {dict(mapping)} makes two languages share a code ({new_names})")
        method = copy.deepcopy(self.method)
        method["languages"] = new_names
        return self._derive({mapping.get(lang, lang): self.neurons[lang] for lang in self.languages}, method)

    def with_model(self, **updates) -> "NeuronSet":
        """A copy with fields of ``model`` replaced (e.g. ``site="act"`` or ``name_or_path=...``)."""
        model = dict(self.model)
        model.update(updates)
        return self._derive(self.neurons, copy.deepcopy(self.method), model)


# --------------------------------------------------------------------------------------------
# overlap measures


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """Jaccard index ``|a ∩ b| / |a ∪ b|`` of two boolean masks of one shape.

    Defined as 0.0 when both masks are empty (0/0): two empty sets share nothing worth counting,
    and a 0 keeps empty languages from looking identical to each other in a matrix.
    """
    if a.shape != b.shape:
        raise UserError(f"jaccard: masks have different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.bool(), b.bool()
    union = int((a | b).sum())
    if union == 0:
        return 0.0
    return int((a & b).sum()) / union


def _key_sets(ns: NeuronSet) -> list[torch.Tensor]:
    return [ns._keys(lang) for lang in ns.languages]


def _inter_size(a: torch.Tensor, b: torch.Tensor) -> int:
    """Size of the intersection of two sorted unique key tensors."""
    if a.numel() == 0 or b.numel() == 0:
        return 0
    return int(torch.isin(a, b).sum())


def overlap_matrix(ns: NeuronSet) -> tuple[list[str], torch.Tensor]:
    """``(languages, LongTensor [K, K])`` with ``O[k, k'] = |A_k ∩ A_k'|`` (diagonal: set sizes)."""
    keys = _key_sets(ns)
    K = len(keys)
    out = torch.zeros((K, K), dtype=torch.int64)
    for i in range(K):
        for j in range(i, K):
            out[i, j] = out[j, i] = _inter_size(keys[i], keys[j])
    return ns.languages, out


def jaccard_matrix(ns: NeuronSet) -> tuple[list[str], torch.Tensor]:
    """``(languages, float64 [K, K])`` of Jaccard indices between the languages of one set.

    ``J[k, k'] = |A_k ∩ A_k'| / |A_k ∪ A_k'|``, 0 where both are empty (so an empty language has
    0 on the diagonal too).
    """
    langs, inter = overlap_matrix(ns)
    sizes = inter.diagonal().clone()
    union = sizes[:, None] + sizes[None, :] - inter
    out = torch.where(union > 0, inter.double() / union.clamp(min=1).double(), torch.zeros((), dtype=torch.float64))
    return langs, out


def jaccard_between(ns_a: NeuronSet, ns_b: NeuronSet) -> tuple[list[str], torch.Tensor]:
    """``(languages, float64 [K])``: per common language, Jaccard of ``ns_a``'s and ``ns_b``'s sets.

    Compares two methods (or seeds, or files) on the same model shape; sites may differ (the
    index space is the same). Languages are those of ``ns_a`` that ``ns_b`` also has.
    """
    if (ns_a.num_layers, ns_a.width) != (ns_b.num_layers, ns_b.width):
        raise UserError(f"cannot compare neuron sets for different model shapes: {ns_a.name} is "
                        f"{ns_a.num_layers}x{ns_a.width}, {ns_b.name} is {ns_b.num_layers}x{ns_b.width}")
    langs = [lang for lang in ns_a.languages if lang in ns_b.neurons]
    values = []
    for lang in langs:
        a, b = ns_a._keys(lang), ns_b._keys(lang)
        inter = _inter_size(a, b)
        union = a.numel() + b.numel() - inter
        values.append(inter / union if union else 0.0)
    return langs, torch.tensor(values, dtype=torch.float64)


def layer_distribution(ns: NeuronSet) -> dict[str, list[int]]:
    """``{language: [count in layer 0, ..., count in layer L-1]}`` as plain ints."""
    return {lang: counts.tolist() for lang, counts in ns.counts().items()}


# --------------------------------------------------------------------------------------------
# matched random control


def random_control(ns: NeuronSet, seed: int) -> NeuronSet:
    """Matched random control set (METHODS.md 3.4).

    For each language and each layer, draw as many neurons as ``ns`` has for that language in that
    layer, uniformly without replacement among the neurons of that layer that belong to *no*
    language of ``ns``. One ``torch.Generator`` seeded with ``seed`` is used in language order,
    then layer order, so the same seed gives the same set and different seeds give different ones.
    Draws for different languages are independent (they may share neurons, as real sets can).
    """
    if not _is_int(seed) or seed < 0:
        raise UserError(f"random control: seed must be a non-negative integer, got {seed!r}")
    taken = ns.union_mask()
    free_per_layer = [(~taken[layer]).nonzero().flatten() for layer in range(ns.num_layers)]
    counts = ns.counts()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    out = {}
    for lang in ns.languages:
        parts = []
        for layer, need in enumerate(counts[lang].tolist()):
            if need == 0:
                continue
            free = free_per_layer[layer]
            if free.numel() < need:
                raise UserError(f"random control: layer {layer} has {free.numel()} neurons outside every "
                                f"language set of {ns.name}, but {lang!r} needs {need}; "
                                f"the sets are too dense for a matched control (use fewer languages)")
            pick = free[torch.randperm(free.numel(), generator=gen)[:need]]
            parts.append(torch.stack([torch.full_like(pick, layer), pick], dim=1))
        out[lang] = torch.cat(parts) if parts else torch.empty((0, 2), dtype=torch.int64)
    method = {
        "name": "random",
        "params": {
            "seed": seed,
            "matched_to": {
                "name": ns.method["name"],
                "params": copy.deepcopy(ns.method["params"]),
                "path": str(ns.path) if ns.path is not None else None,
            },
            "sampling": "per language and layer, uniform without replacement among neurons outside every language set",
        },
        "languages": ns.languages,
        "stats_fingerprint": ns.method.get("stats_fingerprint"),
    }
    return NeuronSet(out, copy.deepcopy(ns.model), method)
