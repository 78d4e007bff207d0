"""Helpers of the tests of the unit kinds beyond neurons (test_directions, test_heads): a small tokenizer and
tiny models, the embedded corpus as language sources, a collect config, the packed windows of a language,
logits, one-line command-line errors."""

from __future__ import annotations

import numpy as np
import torch

from langneurons.cli import main
from langneurons.corpus import LanguageSource, Packing, cut_windows, load_stream, select_windows
from langneurons.testing import tiny_model

from conftest import DEMO_CORPUS

LANGS = ("en", "fr", "zh")
WINDOW = 16


def small_tokenizer(langs=LANGS):
    """A small byte-level BPE tokenizer trained on a few lines of the embedded corpus (seconds)."""
    from langneurons.tiny import train_tokenizer
    docs = {c: (DEMO_CORPUS / f"{c}.txt").read_text(encoding="utf-8").splitlines()[:120] for c in langs}
    return train_tokenizer(docs, vocab_size=300)


def model(arch, tok, dtype=torch.float64, seed=0, **kw):
    return tiny_model(arch, dtype=dtype, seed=seed, vocab_size=len(tok), **kw)


def save_models(d, tok, variants: dict):
    """``{name: tiny_model kwargs}`` saved (float32 Llama) under ``d/name`` with the tokenizer; returns ``d``."""
    for name, kw in variants.items():
        model("llama", tok, dtype=torch.float32, **kw).save_pretrained(d / name)
        tok.save_pretrained(d / name)
    return d


def sources(langs=LANGS):
    return [LanguageSource(c, str(DEMO_CORPUS / f"{c}.txt"), [str(DEMO_CORPUS / f"{c}.txt")]) for c in langs]


def unit_config(cls, out, langs=LANGS, **kw):
    """A collect config of ``cls`` (DirectionsConfig, HeadsConfig) on the embedded corpus, small and on the CPU."""
    base = dict(model="tiny", languages=sources(langs), out=out, window=WINDOW, max_tokens=WINDOW * 10,
                batch_size=4, device="cpu", cache_dir=None, progress=False)
    base.update(kw)
    return cls(**base)


def windows_of(code, tok, max_tokens=WINDOW * 10, seed=0):
    """The windows of ``code`` that collection with :func:`unit_config` reads, int64 ``[N, WINDOW]``."""
    packing = Packing(WINDOW).resolve(tok)
    stream, _ = load_stream(sources([code])[0], tok, packing, None, stream_cap=max_tokens * 4)
    w = cut_windows(stream, packing, tok.bos_token_id, code)
    return torch.from_numpy(w[select_windows(len(w), WINDOW, max_tokens, seed)].astype(np.int64))


def logits(session, ids, mask=None):
    return session.forward(ids, mask).double()


def one_line_error(capsys, args):
    """Run ``langneurons ARGS``; assert exit 2 with one ``langneurons: error:`` line on stderr; return it."""
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("langneurons: error:"), (rc, err)
    return err[0]
