"""Per-language additive sums of unit statistics collected through the runtime.

The machinery the unit kinds beyond MLP neurons share (residual-stream directions,
:mod:`langneurons.directions`; attention heads, :mod:`langneurons.heads`); each kind supplies only what
differs: its sums, the pass that fills them, its artifact's names and its model-dependent settings.

- :class:`UnitSums`: the additive tensors of one language (float64 sums, int64 ``count``): add, merge,
  torchrun all-reduce, the tensors of the artifact (``name.CODE``) and of a checkpoint, atomic save/load.
  A subclass names its tensors (``FIELDS``, ``count`` last) and defines ``__init__(*dims, device=...)``,
  ``dims`` and ``add``.
- :func:`accumulate_windows`: the pass over packed windows (batches split over the ranks, real positions
  only, resumable at a batch, ``after_batch`` hook), calling ``add(layer, x [N, W])`` with what a hook of
  :mod:`langneurons.hooks` observes.
- :class:`UnitStats`: the artifact, ``OUT/KIND.json`` and ``OUT/KIND.safetensors`` (per language the
  tensors of its sums): load, save, full validation of the document, fingerprint.
- :class:`UnitConfig`, :class:`UnitKind`, :class:`Layout`, :func:`collect_units`: ``langneurons KIND
  collect``: per-language collection into OUT, skipping languages already there (same model, settings
  and corpus), resuming an interrupted language from its checkpoint (``OUT/.partial/``), sums all-reduced
  over the ranks; :func:`existing_out` checks OUT before any model is loaded.
- :func:`add_collect_command`, :func:`add_corpus_options`, :func:`run_collect`: the ``collect``
  subcommand's options and its run.

Nothing heavy (torch, numpy) is imported at module level: the command line registers its options from here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from .atomic import atomic_write, atomic_write_text
from .errors import UserError

if TYPE_CHECKING:
    import torch


# ------------------------------------------------------------------------------------------ sums
class UnitSums:
    """The additive statistics of one language: the tensors ``FIELDS`` (``count``, int64 ``[1]``, the
    positions counted, last). A subclass sets ``FIELDS``, ``WHAT`` (its name in messages) and
    ``MERGE_HINT``, and defines ``__init__(*dims, device=...)``, ``dims`` and ``add(layer, x)``;
    ``derived()`` gives the artifact's tensors beyond the sums."""

    FIELDS: tuple = ("count",)
    WHAT = "sums"
    MERGE_HINT = "merge sums of the same model"
    count: torch.Tensor

    @property
    def dims(self) -> tuple:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return getattr(self, self.FIELDS[0]).device

    def _fields(self) -> list[torch.Tensor]:
        return [getattr(self, f) for f in self.FIELDS]

    def add_tokens(self, n: int) -> None:
        self.count += int(n)

    def merge(self, other: "UnitSums") -> "UnitSums":
        """Add another shard (in place); returns self."""
        if [t.shape for t in other._fields()] != [t.shape for t in self._fields()]:
            raise UserError(f"cannot merge {self.WHAT} of shape {list(other.dims)} into {list(self.dims)}; "
                            f"{self.MERGE_HINT}")
        for mine, theirs in zip(self._fields(), other._fields()):
            mine += theirs.to(self.device)
        return self

    def all_reduce(self) -> None:
        """Sum the shards of every rank (torch.distributed; a no-op outside a process group)."""
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for t in self._fields():
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    @property
    def n_tokens(self) -> int:
        return int(self.count.sum())

    def derived(self) -> dict[str, torch.Tensor]:
        """The artifact's tensors computed from the sums (e.g. means), in file order."""
        return {}

    def tensors(self, code: Optional[str] = None) -> dict[str, torch.Tensor]:
        """The tensors of the artifact (``name.CODE``), or of a checkpoint (``code=None``: sums only)."""
        t = {f: getattr(self, f).cpu() for f in self.FIELDS}
        if code is None:
            return {k: v.contiguous() for k, v in t.items()}
        t.update(self.derived())
        return {f"{k}.{code}": v.contiguous() for k, v in t.items()}

    @classmethod
    def from_tensors(cls, t: dict, code: Optional[str] = None, where: str = "", device="cpu", **kw) -> "UnitSums":
        """The sums stored in ``t`` (``FIELDS`` with suffix ``.CODE``, or none for a checkpoint); ``kw`` go to
        the constructor. The dims are those of the first field, ``[dim0, dim1]``."""
        sfx = "" if code is None else f".{code}"
        try:
            got = {f: t[f + sfx] for f in cls.FIELDS}
        except KeyError as e:
            raise UserError(f"{where} lacks the tensor {e.args[0]!r}; it is damaged, collect again") from None
        first = got[cls.FIELDS[0]]
        out = cls(*(first.shape if first.dim() == 2 else (0, 0)), device=device, **kw)
        if got["count"].numel() != 1 or any(tuple(v.shape) != tuple(getattr(out, f).shape)
                                            for f, v in got.items() if f != "count"):
            raise UserError(f"{where}: the tensors of {code or 'the checkpoint'} have inconsistent shapes; "
                            "it is damaged, collect again")
        for f, v in got.items():
            dst = getattr(out, f)
            dst.copy_(v.reshape(dst.shape).to(dst.dtype))
        return out

    def save(self, path) -> None:
        """An atomic safetensors checkpoint of the sums."""
        from safetensors.torch import save_file
        tensors = self.tensors()
        atomic_write(path, lambda tmp: save_file(tensors, tmp))

    @classmethod
    def load(cls, path, device="cpu", **kw) -> "UnitSums":
        from safetensors.torch import load_file
        try:
            t = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any read failure means a damaged file
            raise UserError(f"{path} is corrupt ({e.__class__.__name__}); remove it and collect again") from None
        return cls.from_tensors(t, None, str(path), device, **kw)


# ------------------------------------------------------------------------------------------ the pass
def accumulate_windows(session, windows, sums: UnitSums, observe: Callable, add: Callable[[int, torch.Tensor], None],
                       repeated: str, mask=None, start: int = 0, after_batch: Optional[Callable[[int], None]] = None,
                       progress=None) -> UnitSums:
    """Run ``windows`` through the model, calling ``add(layer, x)`` with what ``observe`` (a hook of
    :mod:`langneurons.hooks`, ``observe(adapter, fn)`` yielding per-layer call counts) sees at the real
    positions (``x [N, W]``), and count those positions into ``sums``.

    ``windows``: token ids ``[N, T]`` (numpy, uint32 windows of :mod:`langneurons.corpus`, or a
    tensor); ``mask``: ``[N, T]`` (1 = real; ``None`` = every position). Batches of
    ``session.batch_size`` windows in input order run through ``model.base_model`` (no LM head) and
    are split over the ranks by :meth:`~langneurons.runtime.Session.map_batches`; this rank's sums
    are **not** reduced here (:meth:`UnitSums.all_reduce`). Batches before ``start`` are skipped
    (resume); ``after_batch(k)`` runs after batch ``k`` of this rank. A hook that did not run exactly
    once per layer raises ``repeated`` formatted with ``layers`` (the first five) and ``n`` (the calls).
    """
    import numpy as np
    import torch
    from .runtime import forward_kwargs
    adapter = session.adapter
    L = adapter.num_layers
    base = getattr(session.model, "base_model", session.model)
    ids_all = torch.as_tensor(np.asarray(windows, dtype=np.int64)) if not isinstance(windows, torch.Tensor) \
        else windows.long()
    mask_all = torch.as_tensor(mask).long() if mask is not None else None
    n = ids_all.shape[0]
    B = session.batch_size
    batches = [list(range(s, min(s + B, n))) for s in range(0, n, B)]

    def run(k: int, idx: list[int]) -> dict:
        if k < start:
            return {}
        ids = ids_all[idx]
        m = mask_all[idx] if mask_all is not None else None
        flat = m.reshape(-1).bool() if m is not None else None
        counted = int(flat.sum()) if flat is not None else ids.numel()

        def fn(layer: int, h: torch.Tensor) -> None:
            x = h.reshape(-1, h.shape[-1])
            if flat is not None:
                x = x[flat.to(x.device)]
            add(layer, x)

        dev = session.device
        with observe(adapter, fn) as calls, torch.no_grad():
            base(input_ids=ids.to(dev), use_cache=False, **forward_kwargs(base, m.to(dev) if m is not None else None))
        bad = [l for l in range(L) if calls[l] != 1]
        if bad:
            raise UserError(repeated.format(layers=bad[:5], n=calls[bad[0]]))
        sums.add_tokens(counted)
        if after_batch is not None:
            after_batch(k)
        return {}

    session.map_batches(batches, run, progress)
    return sums


# ------------------------------------------------------------------------------------------ the artifact
def _json_path(path, name: str) -> Path:
    p = Path(path)
    return p / name if p.is_dir() or p.suffix != ".json" else p


def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


class UnitStats:
    """Per-language sums of one model: ``OUT/KIND.json`` (the document ``meta``) and ``OUT/KIND.safetensors``.

    A subclass sets ``KIND`` (the artifact kind and file stem; ``langneurons KIND collect``), ``WHAT``
    (its name in messages), ``LABEL`` (in "a langneurons LABEL directory", "a LABEL file"), ``DAMAGED``,
    ``FORMAT``, ``SUMS`` (its :class:`UnitSums`), ``DIMS`` (the document keys of the sums' dims),
    ``DOC_INTS`` (keys that must be positive integers), ``FINGERPRINT_FIELDS`` and ``DEFINITION``; it may
    add checks (:meth:`check_doc`) and constructor arguments of the sums (:meth:`sums_kwargs`).
    ``.languages``; ``.num_layers``; ``.count(code)``; ``.mean_norm(code)``; ``.sums[code]``.
    """

    KIND = ""
    WHAT = ""
    LABEL = ""
    DAMAGED = ""
    FORMAT = ""
    SUMS: type = UnitSums
    DIMS: tuple = ("num_layers",)
    DOC_INTS: tuple = ("num_layers",)
    FINGERPRINT_FIELDS: tuple = ()
    DEFINITION: dict = {}

    def __init__(self, meta: dict, sums: dict, path: Optional[Path] = None):
        self.meta = meta
        self.sums = dict(sums)
        self.path = path
        self._fingerprint: Optional[str] = None

    @classmethod
    def json_name(cls) -> str:
        return f"{cls.KIND}.json"

    @classmethod
    def tensors_name(cls) -> str:
        return f"{cls.KIND}.safetensors"

    # ---- shape and content ---------------------------------------------------------------------
    @property
    def languages(self) -> list[str]:
        return list(self.sums)

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_layers"])

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else f"the given {self.WHAT}"

    def check_language(self, code: str) -> str:
        if code not in self.sums:
            raise UserError(f"unknown language {code!r}: the {self.WHAT} in {self.name} hold "
                            f"{', '.join(self.languages) or 'no languages'}; pick one of those or collect it")
        return code

    def mean_norm(self, code: str) -> torch.Tensor:
        return self.sums[self.check_language(code)].mean_norm()

    def count(self, code: str) -> int:
        return self.sums[self.check_language(code)].n_tokens

    @property
    def fingerprint(self) -> str:
        """A digest of the sums (changes when any language's data changes)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for code in sorted(self.sums):
                s = self.sums[code]
                h.update(code.encode() + b"\0" + str(s.n_tokens).encode())
                for f in self.FINGERPRINT_FIELDS:
                    h.update(getattr(s, f).cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    # ---- the document --------------------------------------------------------------------------
    @classmethod
    def validate_doc(cls, doc: dict, where: Optional[str] = None) -> dict:
        """Check a ``KIND.json`` document in full (the registry's loader); return it."""
        where = where or cls.json_name()

        def bad(what: str):
            raise UserError(f"{where}: {what}; {cls.DAMAGED}, run 'langneurons {cls.KIND} collect' again")
        if not isinstance(doc, dict) or doc.get("format") != cls.FORMAT:
            raise UserError(f"{where} is not a {cls.LABEL} file ({cls.FORMAT}); give the directory written by "
                            f"'langneurons {cls.KIND} collect'")
        for key in cls.DOC_INTS:
            if not _pos_int(doc.get(key)):
                bad(f"{key!r} must be a positive integer")
        if not isinstance(doc.get("model"), dict):
            bad("'model' must be an object")
        langs = doc.get("languages")
        if (not isinstance(langs, list) or not all(isinstance(c, str) and c for c in langs)
                or len(set(langs)) != len(langs)):
            bad("'languages' must be distinct language codes")
        counts = doc.get("token_counts")
        if not isinstance(counts, dict):
            bad("'token_counts' must be an object")
        for c in langs:
            if not _pos_int(counts.get(c)):
                bad(f"the token count of {c!r} must be a positive integer")
        cls.check_doc(doc, bad)
        return doc

    @classmethod
    def check_doc(cls, doc: dict, bad: Callable[[str], None]) -> None:
        """The kind's own checks of a document (``bad(what)`` raises)."""

    @classmethod
    def sums_kwargs(cls, meta: dict) -> dict:
        """Constructor arguments of the sums read from the document."""
        return {}

    # ---- files ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path):
        """Read ``DIR`` (or ``DIR/KIND.json``) with its ``KIND.safetensors``."""
        from .artifacts import load
        jp = _json_path(path, cls.json_name())
        if not jp.parent.is_dir():
            raise UserError(f"{jp.parent} does not exist; give the directory written by 'langneurons {cls.KIND} collect'")
        if not jp.is_file():
            raise UserError(f"{jp.parent} holds no {cls.json_name()}; give the directory written by "
                            f"'langneurons {cls.KIND} collect'")
        meta = load(jp, cls.KIND)
        tp = jp.parent / cls.tensors_name()
        if not tp.is_file():
            raise UserError(f"{tp} is missing beside {jp}; collect the {cls.WHAT} again")
        from safetensors.torch import load_file
        try:
            t = load_file(str(tp))
        except Exception as e:  # noqa: BLE001 - any read failure means a damaged file
            raise UserError(f"{tp} is corrupt ({e.__class__.__name__}); collect the {cls.WHAT} again") from None
        want = tuple(meta[k] for k in cls.DIMS)
        sums = {}
        for code in meta["languages"]:
            s = cls.SUMS.from_tensors(t, code, str(tp), **cls.sums_kwargs(meta))
            if tuple(s.dims) != want:
                raise UserError(f"{tp}: the sums of {code!r} have shape {list(s.dims)} but "
                                f"{jp.name} says {list(want)}; it is damaged, collect again")
            sums[code] = s
        return cls(meta, sums, jp.parent)

    def save(self, out) -> Path:
        """Write ``OUT/KIND.safetensors`` then ``OUT/KIND.json`` (each atomically)."""
        from safetensors.torch import save_file
        out = Path(out)
        tensors: dict[str, torch.Tensor] = {}
        for code, s in self.sums.items():
            tensors.update(s.tensors(code))
        meta = dict(self.meta)
        meta.update(format=self.FORMAT, languages=list(self.sums),
                    token_counts={c: s.n_tokens for c, s in self.sums.items()})
        self.validate_doc(meta, str(out / self.json_name()))
        atomic_write(out / self.tensors_name(), lambda tmp: save_file(tensors, tmp, metadata={"format": self.FORMAT}))
        atomic_write_text(out / self.json_name(), json.dumps(meta, indent=1, ensure_ascii=False))
        self.meta, self.path, self._fingerprint = meta, out, None
        return out / self.json_name()


# ------------------------------------------------------------------------------------------ collection
def _default_cache_dir() -> Optional[Path]:
    from .corpus import default_cache_dir
    return default_cache_dir()


@dataclass
class UnitConfig:
    """``langneurons KIND collect`` (the options mean what they mean for ``collect``)."""

    model: str
    languages: list                      # [LanguageSource]
    out: Path
    window: int = 512
    max_tokens: Optional[int] = None
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    device_map: Optional[str] = None
    arch: Optional[str] = None
    trust_remote_code: bool = False
    seed: int = 0
    bos: str = "window"
    separator: str = "eos"
    cache_dir: Optional[Path] = field(default_factory=_default_cache_dir)
    checkpoint_every: float = 300.0
    text_field: str = "text"
    progress: bool = True

    def validate(self) -> None:
        from .collect import check_run_options
        check_run_options(self.window, self.batch_size, self.max_tokens, self.dtype)
        if self.bos not in ("window", "none") or self.separator not in ("eos", "none"):
            raise UserError("--bos must be window or none and --separator eos or none")
        if not self.languages:
            raise UserError("no languages given; add --lang CODE=SOURCE (one per language)")


@dataclass
class Layout:
    """What a kind reads off the opened model for one collection (the keys of the artifact, in order)."""

    dims: tuple                          # the sums' constructor dims
    site: str
    settings: dict                       # identity entries beyond the shared ones (and of the checkpoint key)
    model_shape: dict                    # the model block's shape entries
    shape: dict                          # the document's shape entries
    model_extra: dict = field(default_factory=dict)   # the model block's last entries
    extra: dict = field(default_factory=dict)         # the document's entries after tokenizer_fingerprint


@dataclass(frozen=True)
class UnitKind:
    """One kind of unit statistics: its artifact class, its config class, its pass
    ``accumulate(session, windows, sums, start=, after_batch=, progress=)``, its ``layout(cfg, session)``,
    its checkpoint format and its version (bump when a change alters the sums the same command
    collects; checkpoint keys include it)."""

    stats: type
    config: type
    accumulate: Callable
    layout: Callable
    checkpoint_format: str
    version: int


def existing_out(out, stats: type) -> Optional[dict]:
    """The ``KIND.json`` of ``stats`` already in OUT (None for a new or empty directory); raises when OUT holds
    something else. Cheap: the command calls it before any model is loaded."""
    out = Path(out)
    f = out / stats.json_name()
    if not f.exists():
        if out.is_dir() and any(p.name != ".partial" for p in out.iterdir()):
            raise UserError(f"--out {out} exists and is not a langneurons {stats.LABEL} directory; "
                            "choose a new or empty directory")
        return None
    from .artifacts import load
    return load(f, stats.KIND)


def _crash() -> None:
    """Test hook (``LANGNEURONS_FAULT_AFTER_BATCHES``): die like ``kill -9`` after a checkpoint."""
    os.kill(os.getpid(), signal.SIGKILL)


def collect_units(cfg: UnitConfig, kind: UnitKind, model=None, tokenizer=None):
    """Collect the sums of every language of ``cfg`` into ``cfg.out`` and return the loaded ``kind.stats``.
    Languages already in OUT (same model, settings and corpus) are skipped; an interrupted language resumes
    from its checkpoint."""
    from . import __version__
    from .collect import check_corpora_not_empty
    from .corpus import Packing, tokenizer_fingerprint
    from .runtime import ModelOptions, model_fingerprint, open_session
    S = kind.stats
    cfg.validate()
    check_corpora_not_empty(cfg.languages, cfg.text_field)
    out = Path(cfg.out)
    existing = existing_out(out, S)
    session = open_session(ModelOptions(cfg.model, cfg.arch, cfg.dtype, cfg.device, cfg.device_map,
                                        cfg.trust_remote_code), batch_size=cfg.batch_size, model=model,
                           tokenizer=tokenizer)
    model, tokenizer, adapter = session.model, session.tokenizer, session.adapter
    layout = kind.layout(cfg, session)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and cfg.window > max_pos:
        raise UserError(f"--window {cfg.window} exceeds the model's {max_pos} positions; lower --window")
    packing = Packing(cfg.window, cfg.bos, cfg.separator).resolve(tokenizer)
    model_fp = model_fingerprint(model)
    ident = {"model_fingerprint": model_fp, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
             "window": cfg.window, "packing": packing.as_dict(), "site": layout.site, **layout.settings}
    if existing is not None:
        theirs = existing.get("identity") or {}
        diff = [k for k in ident if theirs.get(k) != ident[k]]
        if diff:
            shown = ", ".join(f"{k}: {theirs.get(k)!r} there vs {ident[k]!r} now" for k in diff[:2])
            raise UserError(f"--out {out} holds {S.WHAT} of another model or settings ({shown}); "
                            "use a new --out directory")
        stats = S.load(out)
    else:
        meta = {
            "format": S.FORMAT, "library_version": __version__,
            "model": {"name_or_path": cfg.model, "model_type": adapter.model_type, "fingerprint": model_fp,
                      **layout.model_shape, "adapter": adapter.source, "arch": dataclasses.asdict(adapter.spec),
                      **layout.model_extra},
            "identity": ident, "site": layout.site, **layout.shape,
            "window": cfg.window, "packing": packing.as_dict(), "dtype": str(model.dtype).replace("torch.", ""),
            "tokenizer_fingerprint": ident["tokenizer_fingerprint"], **layout.extra,
            "languages": [], "token_counts": {}, "sources": {}, "corpora": {}, "definition": dict(S.DEFINITION),
        }
        stats = S(meta, {}, out)
    batches_run = [0]                   # over every language of this call (the fault-injection counter)
    for src in cfg.languages:
        _collect_language(cfg, kind, layout, src, session, packing, stats, out, model_fp, batches_run)
    if session.world > 1:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    return S.load(out) if (out / S.json_name()).is_file() else stats


def _collect_language(cfg: UnitConfig, kind: UnitKind, layout: Layout, src, session, packing, stats: UnitStats,
                      out: Path, model_fp: str, batches_run: list) -> None:
    from .corpus import cut_windows, load_stream, select_windows
    code = src.code
    tokenizer = session.tokenizer
    stream, cfp = load_stream(src, tokenizer, packing, cfg.cache_dir, cfg.text_field,
                              stream_cap=(cfg.max_tokens * 4 if cfg.max_tokens else None))
    all_windows = cut_windows(stream, packing, tokenizer.bos_token_id, code)
    chosen = select_windows(len(all_windows), cfg.window, cfg.max_tokens, cfg.seed)
    windows = all_windows[chosen]
    corpus = {"source": src.spec, "corpus_fingerprint": cfp, "max_tokens": cfg.max_tokens, "seed": cfg.seed,
              "n_windows_total": int(len(all_windows)), "n_windows": int(len(chosen)), "stream_tokens": int(len(stream))}
    done = (stats.meta.get("corpora") or {}).get(code)
    if code in stats.sums:
        if isinstance(done, dict) and all(done.get(k) == v for k, v in corpus.items()):
            _log(cfg, session, f"{code}: already collected in {out}, skipped")
            return
        raise UserError(f"--out {out} already holds {stats.WHAT} of {code!r} from another corpus or settings; "
                        "use a new --out directory")
    rank, world = session.rank, session.world
    key = hashlib.sha256(json.dumps(dict(model=model_fp, corpus=cfp, window=cfg.window, packing=packing.as_dict(),
                                         max_tokens=cfg.max_tokens, seed=cfg.seed, batch=cfg.batch_size,
                                         world=world, rank=rank, dtype=str(session.model.dtype),
                                         **layout.settings, version=kind.version),
                                    sort_keys=True).encode()).hexdigest()[:16]
    partial = out / ".partial"
    ckpt = partial / f"{stats.KIND}.{code}.rank{rank}.safetensors"
    ckpt_meta = partial / f"{stats.KIND}.{code}.rank{rank}.json"
    sums, start = None, 0
    if ckpt.is_file() and ckpt_meta.is_file():
        try:
            m = json.loads(ckpt_meta.read_text(encoding="utf-8"))
            if isinstance(m, dict) and m.get("key") == key:
                sums = stats.SUMS.load(ckpt, device=session.device)
                start = int(m["next_batch"])
                _log(cfg, session, f"{code}: resuming at batch {start}")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, ValueError, UserError):
            sums, start = None, 0
    if sums is None or tuple(sums.dims) != tuple(layout.dims):
        sums, start = stats.SUMS(*layout.dims, device=session.device), 0
    fault = int(os.environ.get("LANGNEURONS_FAULT_AFTER_BATCHES", "0") or 0)
    last = [time.monotonic()]

    def after_batch(k: int) -> None:
        batches_run[0] += 1
        crash = fault and batches_run[0] == fault
        if crash or time.monotonic() - last[0] >= cfg.checkpoint_every:
            sums.save(ckpt)
            atomic_write_text(ckpt_meta, json.dumps({"format": kind.checkpoint_format, "key": key,
                                                     "next_batch": k + 1}))
            last[0] = time.monotonic()
        if crash:
            _crash()

    bar = None
    if cfg.progress and session.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(windows), unit="win", desc=f"{stats.KIND} {code}", dynamic_ncols=True, mininterval=1.0)
    kind.accumulate(session, windows, sums, start=start, after_batch=after_batch,
                    progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    sums.all_reduce()
    if session.is_main:
        stats.sums[code] = sums
        meta = stats.meta
        corpus["n_tokens"] = sums.n_tokens
        meta.setdefault("corpora", {})[code] = corpus
        meta.setdefault("sources", {})[code] = src.spec
        stats.save(out)
    for f in (ckpt, ckpt_meta):
        if f.exists():
            f.unlink()
    if partial.is_dir() and not any(partial.iterdir()):
        partial.rmdir()


def _log(cfg: UnitConfig, session, msg: str) -> None:
    if cfg.progress and session.is_main:
        import sys
        print(f"langneurons: {msg}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ command line
def add_corpus_options(p, max_tokens_help: str) -> None:
    """``--lang --window --max-tokens --seed --bos --separator --cache-dir --no-cache --text-field``."""
    from .commands.options import add_seed
    p.add_argument("--lang", action="append", required=True, metavar="CODE=SOURCE",
                   help="a language and its corpus (repeat per language; sources as for 'collect')")
    p.add_argument("--window", type=int, default=512, help="tokens per window [512]")
    p.add_argument("--max-tokens", type=int, default=None, help=max_tokens_help)
    add_seed(p, 0, "window selection seed")
    p.add_argument("--bos", default="window", choices=("window", "none"), help="BOS at the start of every window")
    p.add_argument("--separator", default="eos", choices=("eos", "none"), help="token between documents")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="token cache [$LANGNEURONS_CACHE or ~/.cache/langneurons]")
    p.add_argument("--no-cache", action="store_true", help="do not cache token streams")
    p.add_argument("--text-field", default="text", help="field of .jsonl and hf: records [text]")


def add_collect_command(cmds, what: str, epilog: str, run: Callable, unit_options: Optional[Callable] = None):
    """The ``collect`` subcommand of a unit kind (``what``: e.g. "per-language residual means"): the model,
    corpus and output options, ``unit_options(parser)`` after the corpus options, ``--checkpoint-every``,
    ``--quiet``; ``run(args)`` runs it. Returns the parser."""
    import argparse
    from .commands.options import add_model_options, add_out
    co = cmds.add_parser("collect", help=f"collect {what} (resumable, torchrun-aware)",
                         description=f"collect {what}", epilog=epilog,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(co, batch_size=8, batch_help="windows per forward pass")
    add_corpus_options(co, "cap per language (a seeded random subset of windows)")
    if unit_options is not None:
        unit_options(co)
    add_out(co, "output directory (a rerun of the same collection resumes in it; new languages are added)",
            overwrite=False)
    co.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds between checkpoints [300]")
    co.add_argument("--quiet", action="store_true", help="no progress bar")
    co.set_defaults(func=run)
    return co


def run_collect(args, kind: UnitKind, **unit_args) -> int:
    """Run ``langneurons KIND collect`` (``unit_args``: the config fields of the kind's own options): check
    OUT and the inputs before the model loads, collect, print the token counts (stderr) and the
    ``KIND.json`` path (stdout)."""
    import sys
    from .corpus import parse_lang_args
    from .outputs import check_dir, lang_inputs
    from .runtime import dist_info
    S = kind.stats
    check_dir(args.out, inputs=[("model directory", args.model), *lang_inputs(args.lang)], what=f"the {S.WHAT}")
    existing_out(args.out, S)
    cfg = kind.config(
        model=args.model, languages=parse_lang_args(args.lang), out=args.out, window=args.window,
        max_tokens=args.max_tokens, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        device_map=args.device_map, arch=args.arch, trust_remote_code=args.trust_remote_code, seed=args.seed,
        bos=args.bos, separator=args.separator,
        cache_dir=None if args.no_cache else (args.cache_dir or _default_cache_dir()),
        checkpoint_every=args.checkpoint_every, text_field=args.text_field, progress=not args.quiet, **unit_args)
    stats = collect_units(cfg, kind)
    if dist_info()[0] != 0:
        return 0
    for code in stats.languages:
        print(f"{code}\t{stats.count(code)} tokens", file=sys.stderr)
    print(str(Path(args.out) / S.json_name()))
    return 0
