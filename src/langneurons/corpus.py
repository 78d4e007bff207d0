"""Corpus sources, tokenisation into packed token windows, and the on-disk token cache.

A language is given as ``CODE=SOURCE``. SOURCE is a ``.txt`` file (one document or sentence per
line), a ``.jsonl`` file (field ``text``), a directory of those (recursively, sorted), a
comma-separated list of any of those, or ``hf:DATASET[:CONFIG[:SPLIT]]`` (streamed with ``datasets``).

Window unit (default): every document is tokenised without special tokens, documents are joined
into one stream with the tokenizer's EOS token between them (``separator="eos"``, when it has
one), and the stream is cut into windows of ``T`` tokens. With ``bos="window"`` (default when the
tokenizer has a BOS token) every window starts with BOS followed by ``T - 1`` stream tokens, as the
model sees text in training. No padding: every position of every window is counted. With
``max_tokens``, a seeded random subset of windows (sorted) is kept. Streams are cached as uint32
``.npy`` keyed by the tokenizer, corpus and packing fingerprints.

Sentence unit: every non-empty line is one sequence, tokenised with the tokenizer's own special
tokens and truncated to ``T``; sequences are kept in corpus order up to ``max_tokens``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .errors import UserError
from .jsonl import iter_jsonl

_CODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TEXT_SUFFIXES = (".txt", ".jsonl")


@dataclass
class LanguageSource:
    code: str
    spec: str
    items: list[str] = field(default_factory=list)  # resolved files and hf: specs


def parse_lang_arg(arg: str) -> LanguageSource:
    """Parse ``CODE=SOURCE`` and resolve the files it names (they must exist)."""
    if "=" not in arg:
        raise UserError(f"--lang {arg!r} is not CODE=SOURCE; write e.g. --lang en=data/en.txt")
    code, spec = arg.split("=", 1)
    code, spec = code.strip(), spec.strip()
    if not _CODE_RE.match(code):
        raise UserError(f"--lang {arg!r}: language code {code!r} must be letters, digits, '_', '-' or '.'; "
                        "write e.g. --lang en=data/en.txt")
    if not spec:
        raise UserError(f"--lang {arg!r} names no source; write e.g. --lang {code}=data/{code}.txt")
    return LanguageSource(code, spec, resolve_source(spec, code))


def parse_lang_args(args: list[str]) -> list[LanguageSource]:
    sources = [parse_lang_arg(a) for a in args]
    seen = set()
    for s in sources:
        if s.code in seen:
            raise UserError(f"language {s.code!r} is given twice; give each --lang CODE once "
                            "(comma-join several files in one SOURCE)")
        seen.add(s.code)
    if not sources:
        raise UserError("no languages given; add --lang CODE=SOURCE (one per language)")
    return sources


def resolve_source(spec: str, code: str = "?") -> list[str]:
    items: list[str] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part.startswith("hf:"):
            if len(part) <= 3:
                raise UserError(f"language {code}: {part!r} names no dataset; write hf:DATASET[:CONFIG[:SPLIT]]")
            items.append(part)
            continue
        p = Path(part).expanduser()
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in _TEXT_SUFFIXES)
            if not found:
                raise UserError(f"language {code}: directory {p} holds no .txt or .jsonl files")
            items.extend(found)
        elif p.is_file():
            items.append(str(p))
        else:
            raise UserError(f"language {code}: corpus file {p} does not exist; check the path in --lang {code}=...")
    if not items:
        raise UserError(f"language {code}: no corpus source given")
    return items


def _parse_hf(spec: str) -> tuple[str, Optional[str], str]:
    parts = spec[3:].split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


def iter_documents(items: list[str], text_field: str = "text", code: str = "?") -> Iterator[str]:
    """Yield the non-empty documents (stripped lines of .txt, ``text_field`` of .jsonl, hf: rows)."""
    for item in items:
        if item.startswith("hf:"):
            try:
                import datasets  # noqa: F401  (optional dependency)
            except ImportError:
                raise UserError("hf: sources need the 'datasets' package; pip install 'langneurons[data]'") from None
            name, config, split = _parse_hf(item)
            try:
                ds = datasets.load_dataset(name, config, split=split, streaming=True)
            except Exception as e:  # datasets raises many kinds
                raise UserError(f"language {code}: cannot load {item} ({e.__class__.__name__}: "
                                f"{str(e).splitlines()[0][:200]}); check the dataset name, config and split") from None
            for row in ds:
                text = row.get(text_field)
                if isinstance(text, str) and text.strip():
                    yield text.strip()
            continue
        path = Path(item)
        if path.suffix == ".jsonl":
            hint = f"each line of a .jsonl corpus must be an object with a {text_field!r} field"
            for where, rec in iter_jsonl(path, hint):
                text = rec.get(text_field)
                if not isinstance(text, str):
                    raise UserError(f"{where} has no string field {text_field!r}; fix the file or pass --text-field")
                if text.strip():
                    yield text.strip()
            continue
        try:
            with open(path, "r", encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if line:
                        yield line
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text; convert it to UTF-8") from None


def corpus_fingerprint(items: list[str], extra: str = "") -> str:
    """sha256 over the bytes of every file (and the text of every hf: spec), in order."""
    h = hashlib.sha256()
    for item in items:
        h.update(item.encode() if item.startswith("hf:") else os.path.basename(item).encode())
        h.update(b"\0")
        if not item.startswith("hf:"):
            with open(item, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        h.update(b"\1")
    h.update(extra.encode())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                         getattr(tokenizer, "padding_side", None)]).encode())
    return h.hexdigest()[:16]


@dataclass
class Packing:
    """How documents become windows: recorded in stats.json."""

    window: int = 512
    bos: str = "window"        # "window": BOS opens every window; "none"
    separator: str = "eos"     # "eos": EOS between documents; "none"

    def resolve(self, tokenizer) -> "Packing":
        bos = self.bos if tokenizer.bos_token_id is not None else "none"
        sep = self.separator if tokenizer.eos_token_id is not None else "none"
        return Packing(self.window, bos, sep)

    def as_dict(self) -> dict:
        return {"window": self.window, "bos": self.bos, "separator": self.separator}


def tokenize_stream(tokenizer, docs: Iterator[str], separator_id: Optional[int], max_tokens: Optional[int] = None,
                    batch_docs: int = 512) -> np.ndarray:
    """Tokenise documents into one uint32 stream (separator after every document)."""
    chunks: list[np.ndarray] = []
    total = 0
    batch: list[str] = []

    def flush():
        nonlocal total
        enc = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for ids in enc:
            if separator_id is not None:
                ids = list(ids) + [separator_id]
            arr = np.asarray(ids, dtype=np.uint32)
            chunks.append(arr)
            total += arr.size
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) >= batch_docs:
            flush()
            if max_tokens is not None and total >= max_tokens:
                break
    if batch and (max_tokens is None or total < max_tokens):
        flush()
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint32)


def default_cache_dir() -> Path:
    return Path(os.environ.get("LANGNEURONS_CACHE", Path.home() / ".cache" / "langneurons"))


def load_stream(source: LanguageSource, tokenizer, packing: Packing, cache_dir: Optional[Path],
                text_field: str = "text", stream_cap: Optional[int] = None) -> tuple[np.ndarray, str]:
    """The language's token stream (cached) and its corpus fingerprint.

    ``stream_cap`` stops reading streamed (``hf:``) sources after that many tokens.
    """
    hf = any(i.startswith("hf:") for i in source.items)
    cfp = corpus_fingerprint(source.items, extra=f"{text_field}|{stream_cap if hf else ''}")
    key = hashlib.sha256(f"{tokenizer_fingerprint(tokenizer)}|{cfp}|{packing.separator}".encode()).hexdigest()[:24]
    path = Path(cache_dir) / "tokens" / f"{key}.npy" if cache_dir else None
    if path is not None and path.is_file():
        try:
            return np.load(path, mmap_mode="r"), cfp
        except (ValueError, OSError):
            pass  # a damaged cache entry is rebuilt below
    sep = tokenizer.eos_token_id if packing.separator == "eos" else None
    stream = tokenize_stream(tokenizer, iter_documents(source.items, text_field, source.code), sep,
                             max_tokens=stream_cap if hf else None)
    if stream.size == 0:
        raise UserError(f"language {source.code}: the corpus {source.spec} is empty (no non-empty lines); "
                        "give a file with text")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, stream)
        os.replace(tmp, path)
    return stream, cfp


def cut_windows(stream: np.ndarray, packing: Packing, bos_id: Optional[int], code: str = "?") -> np.ndarray:
    """Cut a stream into ``[n_windows, T]`` uint32 windows (BOS first when ``packing.bos == 'window'``)."""
    T = packing.window
    body = T - 1 if packing.bos == "window" else T
    n = len(stream) // body
    if n == 0:
        raise UserError(f"language {code} has {len(stream)} tokens, fewer than one window of {T}; "
                        "add text or lower --window")
    w = np.asarray(stream[: n * body], dtype=np.uint32).reshape(n, body)
    if packing.bos == "window":
        w = np.concatenate([np.full((n, 1), bos_id, dtype=np.uint32), w], axis=1)
    return w


def select_windows(n_windows: int, window: int, max_tokens: Optional[int], seed: int) -> np.ndarray:
    """Indices of the windows to use: all, or a seeded random subset of ``max_tokens // window``."""
    if max_tokens is None or max_tokens >= n_windows * window:
        return np.arange(n_windows)
    k = max(1, max_tokens // window)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_windows, size=k, replace=False))


def load_sentences(source: LanguageSource, tokenizer, max_len: int, max_tokens: Optional[int],
                   text_field: str = "text") -> tuple[list[list[int]], str]:
    """Sentences (one per non-empty line) tokenised with special tokens, in corpus order."""
    cfp = corpus_fingerprint(source.items, extra=f"{text_field}|sentence")
    out: list[list[int]] = []
    total = 0
    batch: list[str] = []

    def flush() -> bool:
        nonlocal total
        for ids in tokenizer(batch, add_special_tokens=True, truncation=True, max_length=max_len)["input_ids"]:
            if max_tokens is not None and total + len(ids) > max_tokens and out:
                return True
            out.append(list(ids))
            total += len(ids)
        batch.clear()
        return False

    done = False
    for doc in iter_documents(source.items, text_field, source.code):
        batch.append(doc)
        if len(batch) >= 512 and flush():
            done = True
            break
    if batch and not done:
        flush()
    if not out:
        raise UserError(f"language {source.code}: the corpus {source.spec} is empty (no non-empty lines); "
                        "give a file with text")
    return out, cfp
