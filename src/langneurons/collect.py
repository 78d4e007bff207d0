"""Collect activation statistics of a model on per-language corpora.

One forward pass per batch of windows (or padded sentences) through ``model.base_model`` (the LM
head is never needed), with observer hooks at the chosen site that feed :class:`LanguageStats`.

Resumable: partial statistics are checkpointed atomically to ``OUT/.partial/`` every
``checkpoint_every`` seconds; rerunning the same command continues from the last checkpoint and
ends with exactly the statistics of an uninterrupted run (the batches, their order and the sketch
calibration are deterministic).

Data-parallel: under ``torchrun``/``accelerate launch`` (``WORLD_SIZE > 1``) rank ``r`` takes
batches ``r, r + W, ...``, accumulates on its device, and the shards are all-reduced once per
language. The sketch edges are calibrated once per language, before the counting pass, on
``CALIBRATION_TOKENS`` seeded token positions of ``CALIBRATION_ITEMS`` windows (or sentences) spread
evenly over the whole selection (edges fitted to one batch miss the corpus's spread: a neuron whose
values drift between documents would put much of its mass in the open tail bins); rank 0's edges
are broadcast, so the merged sketch equals a one-process run.

Sampled sketch: counts and moments see every token; the quantile sketch sees a seeded sample of
positions at rate ``min(1, m / n)`` for a language of ``n`` tokens, with ``m`` from the accuracy
guarantee of :mod:`langneurons.stats` (``--sketch-error``, default 0.3 percentile points), or at a
fixed ``--sketch-rate``. Batch ``i`` samples with a generator seeded by ``(seed, i)``, so ranks and
resumes sample exactly what one uninterrupted process does.
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
from typing import Optional

import numpy as np
import torch

from . import __version__
from .arch import Adapter, check_site, parse_arch_override
from .corpus import (LanguageSource, Packing, cut_windows, default_cache_dir, iter_documents, load_sentences,
                     load_stream, select_windows, tokenizer_fingerprint)
from .artifacts import COLLECT_CHECKPOINT_FORMAT
from .atomic import atomic_write_text
from .errors import UserError
from .hooks import check_fired, observe
from .runtime import (DTYPES, dist_info, forward_kwargs, init_distributed, load_model, model_fingerprint, pad_id,
                      pad_rows, rank_device, resolve_device, resolve_dtype)
from .stats import (CALIBRATION_TOKENS, DEFAULT_SKETCH_BINS, SKETCH_DELTA, SKETCH_ERROR_PP, SKETCH_KINDS,
                    SKETCH_LEVELS, STATS_FORMAT, ActivationStats, LanguageStats, calibration_edges, sample_positions,
                    sketch_error_bound, sketch_rate, sketch_sample_size)

#: Bump when a change alters the statistics the same command collects (caches key on it).
COLLECT_VERSION = 3



@dataclass
class CollectConfig:
    model: str
    languages: list[LanguageSource]
    out: Path
    site: str = "act"
    unit: str = "window"
    window: int = 512
    sentences: int = 100
    max_tokens: Optional[int] = None
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    device_map: Optional[str] = None
    seed: int = 0
    sketch_bins: int = DEFAULT_SKETCH_BINS
    sketch_kind: str = "quantile"
    sketch_rate: Optional[float] = None        # None: from the accuracy guarantee (sketch_error)
    sketch_error: float = SKETCH_ERROR_PP      # percentile points, with probability 1 - SKETCH_DELTA
    bos: str = "window"
    separator: str = "eos"
    cache_dir: Optional[Path] = field(default_factory=default_cache_dir)
    checkpoint_every: float = 300.0
    arch: Optional[str] = None
    text_field: str = "text"
    trust_remote_code: bool = False
    progress: bool = True

    def validate(self) -> None:
        check_site(self.site)
        if self.unit not in ("window", "sentence"):
            raise UserError(f"unknown --unit {self.unit!r}; use window or sentence")
        check_run_options(self.window, self.batch_size, self.max_tokens, self.dtype)
        if self.sketch_bins < 0 or self.sketch_bins == 1:
            raise UserError("--sketch-bins must be 0 (no sketch) or at least 2")
        if self.sketch_rate is not None and not 0.0 < self.sketch_rate <= 1.0:
            raise UserError(f"--sketch-rate {self.sketch_rate} must be in (0, 1]; 1 sketches every token")
        if not 0.0 < self.sketch_error < 50.0:
            raise UserError(f"--sketch-error {self.sketch_error} must be between 0 and 50 percentile points")
        if self.sketch_kind not in SKETCH_KINDS:
            raise UserError(f"unknown --sketch {self.sketch_kind!r}; use one of {', '.join(SKETCH_KINDS)}")
        if self.bos not in ("window", "none") or self.separator not in ("eos", "none"):
            raise UserError("--bos must be window or none and --separator eos or none")


def check_run_options(window: int, batch_size: int, max_tokens: Optional[int], dtype: str) -> None:
    """The options every command that runs a model over text windows shares, checked the same way."""
    if window < 2:
        raise UserError(f"--window {window} is too small; use at least 2 tokens")
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if max_tokens is not None and max_tokens < 1:
        raise UserError("--max-tokens must be positive")
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; use auto, {', '.join(sorted(set(DTYPES)))}")


# ---------------------------------------------------------------------------------------- checks
def check_corpora_not_empty(sources: list[LanguageSource], text_field: str) -> None:
    """Fail before loading a model when a local corpus has no text (streamed sources are checked later)."""
    for src in sources:
        local = [i for i in src.items if not i.startswith("hf:")]
        if local and len(local) == len(src.items) and next(iter_documents(local, text_field, src.code), None) is None:
            raise UserError(f"language {src.code}: the corpus {src.spec} is empty (no non-empty lines); "
                            "give a file with text")


# ---------------------------------------------------------------------------------------- distributed
def _all_reduce_stats(ls: LanguageStats) -> None:
    import torch.distributed as dist
    for name in ("n_tokens", "count_pos", "count_neg", "sum", "sumsq", "hist", "sketch_tokens", "sketch_zeros",
                 "n_sentences", "sentence_mean"):
        t = getattr(ls, name)
        if t is not None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    dist.all_reduce(ls.vmin, op=dist.ReduceOp.MIN)
    dist.all_reduce(ls.vmax, op=dist.ReduceOp.MAX)


# ---------------------------------------------------------------------------------------- batches
@dataclass
class Batch:
    input_ids: torch.Tensor                    # [B, T]
    attention_mask: Optional[torch.Tensor]     # [B, T] (sentence unit only)
    first_sentence: int = 0
    index: Optional[int] = None                # position in the selection: seeds the sketch sample


#: windows (or sentences) the sketch edges are calibrated on, spread evenly over the selection
CALIBRATION_ITEMS = 64
#: bytes of pooled calibration activations held at once (float32, CPU); deeper models take more passes
CALIBRATION_MEMORY = 1 << 30


class _EnoughLayers(Exception):
    """Raised by a calibration hook after the last layer a calibration pass needs."""


def _calibration_items(batches_np: list, batch_size: int) -> list[tuple[int, int]]:
    """(batch, row) of up to CALIBRATION_ITEMS items at evenly spaced positions of the selection."""
    n = sum(len(b) for b in batches_np)
    picks = np.unique(np.round(np.linspace(0, n - 1, min(n, CALIBRATION_ITEMS))).astype(np.int64))
    return [(int(k) // batch_size, int(k) % batch_size) for k in picks]


def calibration_batches(batches_np: list, batch_size: int, make_batch) -> list[Batch]:
    """Batches of the calibration items, built like the collection batches (``make_batch``)."""
    items = _calibration_items(batches_np, batch_size)
    rows = [batches_np[b][r] for b, r in items]
    calib = ([np.stack(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
             if isinstance(batches_np[0], np.ndarray) else
             [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)])
    return [make_batch(None, b) for b in calib]


def calibration_rows(batches_np: list, batch_size: int) -> int:
    """Token positions kept per calibration batch, so that about CALIBRATION_TOKENS are pooled."""
    n_batches = -(-len(_calibration_items(batches_np, batch_size)) // batch_size)
    return -(-CALIBRATION_TOKENS // max(1, n_batches))


def window_batches(windows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]


# ---------------------------------------------------------------------------------------- the collector
class Collector:
    """Runs forward passes with observer hooks that accumulate into a :class:`LanguageStats`."""

    def __init__(self, model, adapter: Adapter, site: str, input_device: torch.device):
        self.model = model
        self.base = getattr(model, "base_model", model)
        self.adapter = adapter
        self.site = site
        self.input_device = input_device
        self.stats: Optional[LanguageStats] = None
        self._mask: Optional[torch.Tensor] = None      # flat bool mask of real tokens, or None
        self._sentence_mask: Optional[torch.Tensor] = None
        self._first_sentence = 0
        self._calibrate_only = False
        self._calibration: dict[int, list[torch.Tensor]] = {}   # layer -> sampled rows (calibration)
        self._calibration_last = -1
        self._calibration_rows = 0
        self._calibration_gen: Optional[torch.Generator] = None
        self._calibration_pick: Optional[torch.Tensor] = None
        self._sketch_pick: Optional[torch.Tensor] = None
        self.sketch_seed = 0
        self.batches_run = 0

    def _observe(self, layer: int, t: torch.Tensor) -> None:
        ls = self.stats
        I = t.shape[-1]
        x = t.reshape(-1, I)
        if self._mask is not None:
            x = x[self._mask]
        if self._calibrate_only:
            if layer in self._calibration:
                if self._calibration_pick is not None:   # the same seeded positions in every layer
                    x = x[self._calibration_pick.to(x.device)]
                self._calibration[layer].append(x.float().cpu())
            if layer == self._calibration_last:
                raise _EnoughLayers                      # the later layers are not needed in this pass
            return
        ls.add_layer(layer, x.to(ls.device), sketch_rows=self._sketch_pick)
        if ls.sentence_mean is not None and self._first_sentence < ls.max_sentences:
            mask = self._sentence_mask
            m = mask.to(torch.float32).unsqueeze(-1)                        # [B, T, 1]
            tt = t.float()                                                  # [B, T, I] on every architecture
            means = (tt * m).sum(1) / m.sum(1).clamp_min(1)
            ls.add_sentence_means(layer, means.to(ls.device), self._first_sentence)

    @torch.no_grad()
    def calibrate(self, batches: list[Batch], rows_per_batch: int, seed: int) -> None:
        """Set the sketch edges of every layer from activations of ``batches`` (spread over the corpus):
        ``rows_per_batch`` seeded token positions of each batch, pooled, then :func:`calibration_edges`.

        The pooled sample of a layer is ``rows x width`` float32 on the CPU; layers are calibrated in
        groups that keep it under CALIBRATION_MEMORY (one group for small models; 8 passes over the
        calibration batches, each stopped after its last layer, for a 32-layer model of width 14336),
        so memory does not grow with depth."""
        ls = self.stats
        L = ls.num_layers
        per_layer = max(1, rows_per_batch * len(batches) * ls.width * 4)
        group = max(1, min(L, CALIBRATION_MEMORY // per_layer))
        self._calibration_rows = rows_per_batch
        try:
            for start in range(0, L, group):
                layers = list(range(start, min(L, start + group)))
                self._calibration = {layer: [] for layer in layers}
                self._calibration_last = layers[-1]
                self._calibration_gen = torch.Generator().manual_seed(seed)   # same positions every pass
                self._calibrate_only = True
                for b in batches:
                    try:
                        self.run_batch(b)
                    except _EnoughLayers:
                        pass
                self._calibrate_only = False
                for layer in layers:
                    sample = torch.cat(self._calibration[layer]).to(ls.device)
                    ls.set_edges(layer, calibration_edges(sample, ls.sketch_bins, ls.sketch_kind))
        finally:
            self._calibrate_only = False
            self._calibration, self._calibration_last, self._calibration_pick = {}, -1, None

    @torch.no_grad()
    def run_batch(self, batch: Batch) -> int:
        ids = batch.input_ids.to(self.input_device)
        mask = batch.attention_mask
        if mask is not None:
            mask = mask.to(self.input_device)
            self._mask = mask.reshape(-1).bool()
            self._sentence_mask = mask
            n = int(mask.sum())
        else:
            self._mask = None
            self._sentence_mask = None
            n = ids.numel()
        self._first_sentence = batch.first_sentence
        sketched = None
        self._sketch_pick = None
        if self._calibrate_only:
            self._calibration_pick = (torch.randperm(n, generator=self._calibration_gen)[:self._calibration_rows]
                                      .sort().values if n > self._calibration_rows else None)
        elif self.stats.sketch_tokens is not None:
            index = batch.index if batch.index is not None else self.batches_run
            pick = sample_positions(n, self.stats.sketch_rate, self.sketch_seed, index)   # rate < 1 here
            sketched = len(pick)
            self._sketch_pick = pick.to(self.stats.device)
        with observe(self.adapter, self.site, self._observe) as calls:
            self.base(input_ids=ids, use_cache=False, **forward_kwargs(self.base, mask))
        check_fired(calls, list(range(self.adapter.num_layers)))
        if not self._calibrate_only:
            self.batches_run += 1
            self.stats.add_tokens(n, sketched)
            if mask is not None:
                self.stats.add_sentences(ids.shape[0])
        return n


# ---------------------------------------------------------------------------------------- the command
def _lang_key(cfg: CollectConfig, model_fp: str, cfp: str, world: int, rank: int) -> str:
    key = dict(model=model_fp, site=cfg.site, unit=cfg.unit, window=cfg.window, bos=cfg.bos, sep=cfg.separator,
               max_tokens=cfg.max_tokens, seed=cfg.seed, batch=cfg.batch_size, corpus=cfp, bins=cfg.sketch_bins,
               kind=cfg.sketch_kind, rate=cfg.sketch_rate, error=cfg.sketch_error, sentences=cfg.sentences,
               world=world, rank=rank, dtype=cfg.dtype, version=COLLECT_VERSION)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def existing_out(out: Path) -> Optional[dict]:
    """The metadata of the statistics already in OUT (None for a new or empty directory); raises
    when OUT holds something else. Cheap: the command calls it before any model is loaded."""
    out = Path(out)
    f = out / "stats.json"
    if not f.exists():
        if out.is_dir() and any(p.name != ".partial" for p in out.iterdir()):
            raise UserError(f"--out {out} exists and is not a langneurons statistics directory; "
                            "choose a new or empty directory")
        return None
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{f} is corrupt; choose a new --out directory") from None
    if not isinstance(meta, dict) or meta.get("format") != STATS_FORMAT:
        raise UserError(f"{f} is not a langneurons statistics file; choose a new --out directory")
    return meta


def _check_out(out: Path, ident: dict) -> Optional[dict]:
    """Existing metadata of OUT if it holds statistics of the same model and settings; else raise."""
    meta = existing_out(out)
    if meta is None:
        return None
    theirs = meta.get("identity", {})
    diff = [k for k in ident if theirs.get(k) != ident[k]]
    if diff:
        shown = ", ".join(f"{k}: {theirs.get(k)!r} there vs {ident[k]!r} now" for k in diff[:3])
        raise UserError(f"--out {out} holds statistics of another model or settings ({shown}); "
                        "use a new --out directory")
    return meta


def collect(cfg: CollectConfig, model=None, tokenizer=None) -> ActivationStats:
    """Run a collection (see the module docstring) and return the loaded statistics."""
    cfg.validate()
    check_corpora_not_empty(cfg.languages, cfg.text_field)
    rank, world = dist_info()
    device = rank_device(resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device)
    if model is None:
        model, tokenizer = load_model(cfg.model, device, dtype, cfg.device_map, cfg.trust_remote_code)
    spec = parse_arch_override(cfg.arch) if cfg.arch else None
    adapter = Adapter(model, spec)
    if world > 1:
        init_distributed(device)
    input_device = model.get_input_embeddings().weight.device
    stats_device = input_device
    packing = Packing(cfg.window, cfg.bos, cfg.separator).resolve(tokenizer)
    model_fp = model_fingerprint(model)
    tok_fp = tokenizer_fingerprint(tokenizer)
    ident = {"model_fingerprint": model_fp, "tokenizer_fingerprint": tok_fp, "site": cfg.site, "unit": cfg.unit,
             "window": cfg.window, "packing": packing.as_dict(), "sketch_bins": cfg.sketch_bins,
             "sketch_kind": cfg.sketch_kind, "sketch_rate": cfg.sketch_rate, "sketch_error": cfg.sketch_error}
    out = Path(cfg.out)
    existing = _check_out(out, ident)
    meta = existing or {
        "format": STATS_FORMAT,
        "library_version": __version__,
        "model": {"name_or_path": cfg.model, "model_type": adapter.model_type, "num_layers": adapter.num_layers,
                  "width": adapter.width, "site": cfg.site, "gated": adapter.gated, "adapter": adapter.source,
                  "arch": dataclasses.asdict(adapter.spec)},
        "identity": ident,
        "tokenizer_fingerprint": tok_fp,
        "unit": cfg.unit, "window": cfg.window, "packing": packing.as_dict(),
        "dtype": str(dtype).replace("torch.", ""),
        "sketch": {"bins": cfg.sketch_bins, "kind": cfg.sketch_kind,
                   "rate": "auto" if cfg.sketch_rate is None else cfg.sketch_rate,
                   "error_pp": cfg.sketch_error, "delta": SKETCH_DELTA, "levels": SKETCH_LEVELS,
                   "sample_target": sketch_sample_size(adapter.num_layers * adapter.width, cfg.sketch_error)},
        "languages": {},
    }
    collector = Collector(model, adapter, cfg.site, input_device)
    partial_dir = out / ".partial"
    for src in cfg.languages:
        _collect_language(cfg, src, tokenizer, packing, collector, meta, out, partial_dir, model_fp,
                          stats_device, rank, world)
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
    return ActivationStats.load(out)


def _collect_language(cfg, src: LanguageSource, tokenizer, packing: Packing, collector: Collector, meta: dict,
                      out: Path, partial_dir: Path, model_fp: str, stats_device, rank: int, world: int) -> None:
    code = src.code
    if cfg.unit == "window":
        stream, cfp = load_stream(src, tokenizer, packing, cfg.cache_dir, cfg.text_field,
                                  stream_cap=(cfg.max_tokens * 4 if cfg.max_tokens else None))
        all_windows = cut_windows(stream, packing, tokenizer.bos_token_id, code)
        chosen = select_windows(len(all_windows), cfg.window, cfg.max_tokens, cfg.seed)
        batches_np = window_batches(all_windows[chosen], cfg.batch_size)
        total_tokens = int(len(chosen) * cfg.window)
        info = {"n_windows_total": int(len(all_windows)), "n_windows": int(len(chosen)),
                "stream_tokens": int(len(stream))}
    else:
        sents, cfp = load_sentences(src, tokenizer, cfg.window, cfg.max_tokens, cfg.text_field)
        batches_np = [sents[i:i + cfg.batch_size] for i in range(0, len(sents), cfg.batch_size)]
        total_tokens = sum(len(s) for s in sents)
        info = {"n_sentences": len(sents)}
    done = meta["languages"].get(code)
    lang_meta = {"source": src.spec, "corpus_fingerprint": cfp, "max_tokens": cfg.max_tokens, "seed": cfg.seed,
                 **info}
    if done is not None:
        if all(done.get(k) == v for k, v in lang_meta.items()) and (out / f"{code}.safetensors").is_file():
            _log(cfg, rank, f"{code}: already collected in {out}, skipped")
            return
        raise UserError(f"--out {out} already holds statistics of {code!r} from another corpus or settings; "
                        f"use a new --out directory or remove {out / (code + '.safetensors')}")
    key = _lang_key(cfg, model_fp, cfp, world, rank)
    ckpt = partial_dir / f"{code}.rank{rank}.safetensors"
    ckpt_meta = partial_dir / f"{code}.rank{rank}.json"
    ls = None
    next_batch = 0
    if ckpt.is_file() and ckpt_meta.is_file():
        try:
            m = json.loads(ckpt_meta.read_text())
            if m.get("key") == key:
                ls = LanguageStats.load(ckpt, device=stats_device)
                next_batch = int(m["next_batch"])
                _log(cfg, rank, f"{code}: resuming at batch {next_batch} of {len(batches_np)}")
        except (json.JSONDecodeError, KeyError, UserError):
            ls, next_batch = None, 0
    n_neurons = collector.adapter.num_layers * collector.adapter.width
    rate = cfg.sketch_rate if cfg.sketch_rate is not None else sketch_rate(total_tokens, n_neurons, cfg.sketch_error)
    if ls is None:
        S = cfg.sentences if cfg.unit == "sentence" else 0
        ls = LanguageStats(collector.adapter.num_layers, collector.adapter.width, cfg.sketch_bins, sentences=S,
                           device=stats_device, sketch_kind=cfg.sketch_kind, sketch_rate=rate)
    collector.stats = ls
    collector.sketch_seed = cfg.seed

    def make_batch(i: Optional[int], items=None) -> Batch:
        """Batch ``i`` of the selection, or a batch of the given ``items`` (calibration)."""
        items = batches_np[i] if items is None else items
        if cfg.unit == "window":
            return Batch(torch.from_numpy(items.astype(np.int64)), None, index=i)
        fill = pad_id(tokenizer)
        # Statistics passes always pad on the right: no query row is fully masked (left padding makes
        # some models, e.g. BLOOM, produce NaN that leaks into real positions), and the statistics of
        # real tokens do not depend on the tokenizer's padding side.
        ids, mask = pad_rows(items, fill, "right")
        return Batch(ids, mask, first_sentence=0 if i is None else i * cfg.batch_size, index=i)

    # Sketch calibration on windows (sentences) spread evenly over the whole selection, so that edges
    # fit the corpus rather than its first batch; identical on every rank (rank 0's edges are
    # broadcast) and across resumes (edges are checkpointed).
    if cfg.sketch_bins and not all(ls._calibrated) and batches_np:
        collector.calibrate(calibration_batches(batches_np, cfg.batch_size, make_batch),
                            rows_per_batch=calibration_rows(batches_np, cfg.batch_size), seed=cfg.seed)
        if world > 1:
            import torch.distributed as dist
            dist.broadcast(ls.edges, src=0)
            for l in range(ls.num_layers):
                ls.set_edges(l, ls.edges[l])

    mine = [i for i in range(len(batches_np)) if i % world == rank]
    todo = [i for i in mine if i >= next_batch]
    # test hook: checkpoint, then SIGKILL this process after its N-th batch (counted over all languages)
    fault = int(os.environ.get("LANGNEURONS_FAULT_AFTER_BATCHES", "0"))
    bar = _progress(cfg, rank, code, total_tokens // world, done_tokens=(len(mine) - len(todo)) * (total_tokens // max(1, len(batches_np))))
    last_ckpt = time.monotonic()
    for i in todo:
        n = collector.run_batch(make_batch(i))
        if bar is not None:
            bar.update(n)
        crash = fault and collector.batches_run == fault
        if time.monotonic() - last_ckpt >= cfg.checkpoint_every or crash:
            ls.save(ckpt)
            atomic_write_text(ckpt_meta, json.dumps({"format": COLLECT_CHECKPOINT_FORMAT,
                                                     "key": key, "next_batch": i + 1}))
            last_ckpt = time.monotonic()
        if crash:
            os.kill(os.getpid(), signal.SIGKILL)
    if bar is not None:
        bar.close()
    if world > 1:
        _all_reduce_stats(ls)
    if rank == 0:
        lang_meta["n_tokens"] = int(ls.n_tokens)
        if cfg.sketch_bins:
            sampled = int(ls.n_tokens if ls.sketch_tokens is None else ls.sketch_tokens)
            lang_meta["sketch"] = {"rate": ls.sketch_rate, "sampled_tokens": sampled,
                                   "error_bound_pp": round(sketch_error_bound(n_neurons, sampled, int(ls.n_tokens)), 4)}
        if cfg.unit == "sentence":
            lang_meta["n_sentence_means"] = int(min(int(ls.n_sentences), ls.max_sentences))
        ls.save(out / f"{code}.safetensors")
        meta["languages"][code] = lang_meta
        atomic_write_text(out / "stats.json", json.dumps(meta, indent=1, sort_keys=False))
    for f in (ckpt, ckpt_meta):
        if f.exists():
            f.unlink()
    if partial_dir.is_dir() and not any(partial_dir.iterdir()):
        partial_dir.rmdir()


def _progress(cfg: CollectConfig, rank: int, code: str, total: int, done_tokens: int = 0):
    if not cfg.progress or rank != 0:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=min(done_tokens, total), unit="tok", unit_scale=True, desc=f"collect {code}",
                dynamic_ncols=True, mininterval=1.0)


def _log(cfg: CollectConfig, rank: int, msg: str) -> None:
    if cfg.progress and rank == 0:
        import sys
        print(f"langneurons: {msg}", file=sys.stderr)
