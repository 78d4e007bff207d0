r"""Probe data for BridgeX-ICL: word-translation prompts and their mean activations (METHODS.md 6.2).

For a language pair (s, t):

1. Word pairs come from a bilingual dictionary (:func:`load_dictionary`): a MUSE file
   (``src trg`` per line) or, for MUSE's English-centred layout, ``en-xx`` files read directly
   (en->x), reversed (x->en) or triangulated through English (x->y: every x word and y word that
   translate the same English word form a pair).  Each source word becomes one candidate probe,
   with all its translations as references.
2. Each word is put in the prompt ``{S}:"{w}"→{T}:`` and the model translates it greedily
   (:class:`~langneurons.bridge.icl.HFGenerator`).  ``filter`` decides which words stay:

   * ``correct`` (default): only words the model translates correctly (exact match of the
     extracted answer with a reference, case-insensitive, quotes/whitespace stripped:
     :func:`~langneurons.bridge.icl.is_correct`);
   * ``all``: every word, the translation and its correctness still recorded;
   * ``none``: every word, without generating (prediction and correctness recorded as null).

   Small or untrained models translate almost nothing; use ``all``/``none`` to run the
   pipeline anyway, and read the recorded ``filter`` before interpreting results.
3. For the kept probes, one forward pass over the prompt (left-padded batches with attention
   mask and mask-derived position ids) records the activation at ``site`` and averages it over
   the prompt tokens (:meth:`langneurons.runtime.Session.mean_activations`):

   ``A[l, j, n] = (1/|P_n|) * sum_{p in P_n} act_{l, j}(prompt_n, p)``

   where ``P_n`` is the set of the prompt's token positions (special tokens such as BOS are left
   out unless ``include_special=True``).  Result: ``A`` float32 ``[L, I, N]``.

Files (:class:`ProbeSet`): ``probes-{s}-{t}.safetensors`` (tensor ``acts`` ``[L, I, N]``) and
``probes-{s}-{t}.json`` (settings, the filter and its outcome, and the probe list: word,
references, prompt, model output, prediction, correct).
"""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from ..errors import UserError
from ..atomic import atomic_write_text
from ..stats import atomic_save_tensors
from .icl import Generate, extract_answer, group_pairs, is_correct, translation_prompt

__all__ = ["FILTERS", "SPLITS", "PROBE_FORMAT", "read_dictionary_file", "muse_file", "load_dictionary",
           "ProbeSet", "build_probes", "probe_paths"]

FILTERS = ("correct", "all", "none")
#: MUSE splits: the full dictionary, the 0-5000 (train) and 5000-6500 (test) source-word ranges.
SPLITS = {"full": None, "train": "0-5000", "test": "5000-6500"}
from ..artifacts import PROBE_FORMAT  # noqa: E402 - the tag is defined in the artifact registry


# ------------------------------------------------------------------------------------- dictionaries
def read_dictionary_file(path) -> list[tuple[str, str]]:
    """Word pairs of a MUSE-format file: ``source target`` per line (whitespace-separated; a tab
    separates them if present, so multi-word entries survive).  Empty and malformed lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"dictionary file {p} does not exist; give a MUSE-format file ('source target' per line)")
    pairs = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            continue
        pairs.append((parts[0].strip(), parts[1].strip()))
    return pairs


def muse_file(muse_dir, a: str, b: str, split: str = "full") -> Optional[Path]:
    """The MUSE file for ``a-b`` under ``muse_dir``, or ``None``.

    Looks for ``{a}-{b}.txt`` (full) or ``{a}-{b}.{0-5000|5000-6500}.txt`` (splits) directly in
    ``muse_dir`` (MUSE's own layout) and in its ``full/`` or ``splits_reconstructed/`` subfolder.
    """
    if split not in SPLITS:
        raise UserError(f"unknown dictionary split {split!r}; use one of {', '.join(SPLITS)}")
    root = Path(muse_dir)
    rng = SPLITS[split]
    name = f"{a}-{b}.txt" if rng is None else f"{a}-{b}.{rng}.txt"
    sub = "full" if rng is None else "splits_reconstructed"
    for cand in (root / name, root / sub / name):
        if cand.is_file():
            return cand
    return None


def load_dictionary(src: str, trg: str, muse_dir=None, split: str = "full", path=None,
                    pivot: str = "en") -> "OrderedDict[str, list[str]]":
    """``{source word: [reference translations]}`` for ``src -> trg``, source words unique, file order.

    With ``path``: that file, read as ``src trg`` pairs.  Otherwise from ``muse_dir``: the file
    ``src-trg``; else ``trg-src`` reversed; else triangulated through ``pivot`` (English):
    ``{(x, y) : exists e with (e, x) in pivot-src and (e, y) in pivot-trg}``, in the order of the
    pivot-src file.  Triangulated pairs are noisier than direct ones (polysemous English words).
    The ``split`` (``train`` = MUSE 0-5000, ``test`` = 5000-6500, ``full``) selects the file that
    supplies the source words (``src-trg``, ``trg-src`` or ``pivot-src``); when triangulating, the
    references come from the FULL ``pivot-trg`` dictionary (the split one if no full file exists),
    because the split files of two languages cover different English words (the test ranges of
    en-de and en-zh share none).
    """
    if path is not None:
        return group_pairs(read_dictionary_file(path))
    if muse_dir is None:
        raise UserError("no dictionary given; pass --muse-dir DIR (MUSE en-xx files) or --dict FILE")
    f = muse_file(muse_dir, src, trg, split)
    if f is not None:
        return group_pairs(read_dictionary_file(f))
    f = muse_file(muse_dir, trg, src, split)
    if f is not None:
        return group_pairs((b, a) for a, b in read_dictionary_file(f))
    fs = muse_file(muse_dir, pivot, src, split)
    ft = muse_file(muse_dir, pivot, trg, "full") or muse_file(muse_dir, pivot, trg, split)
    if fs is None or ft is None:
        missing = [f"{pivot}-{c}" for c, f_ in ((src, fs), (trg, ft)) if f_ is None]
        raise UserError(f"no {split} dictionary for {src}-{trg} under {muse_dir} (missing {', '.join(missing)}); "
                        "give --dict FILE or another --split/--muse-dir")
    to_trg = group_pairs(read_dictionary_file(ft))
    out: "OrderedDict[str, list[str]]" = OrderedDict()
    for e, x in read_dictionary_file(fs):
        for y in to_trg.get(e, ()):
            lst = out.setdefault(x, [])
            if y not in lst:
                lst.append(y)
    return out


def select_words(entries: Mapping[str, Sequence[str]], limit: Optional[int], shuffle: bool = False,
                 seed: int = 0, skip_identical: bool = False) -> "OrderedDict[str, list[str]]":
    """The first ``limit`` source words (file order, or a seeded shuffle), optionally without
    words whose references include the word itself (copy-translations such as numbers and names)."""
    words = list(entries)
    if skip_identical:
        words = [w for w in words if w.casefold() not in {r.casefold() for r in entries[w]}]
    if shuffle:
        random.Random(seed).shuffle(words)
    if limit is not None:
        if limit < 1:
            raise UserError("--limit must be at least 1")
        words = words[:limit]
    return OrderedDict((w, list(entries[w])) for w in words)


# ------------------------------------------------------------------------------------- probe sets
def probe_paths(directory, src: str, trg: str) -> tuple[Path, Path]:
    d = Path(directory)
    return d / f"probes-{src}-{trg}.safetensors", d / f"probes-{src}-{trg}.json"


@dataclass
class ProbeSet:
    """Probe activations ``acts`` float32 ``[L, I, N]`` of pair ``src -> trg`` and their description."""

    acts: torch.Tensor
    meta: dict
    probes: list[dict] = field(default_factory=list)

    @property
    def src(self) -> str:
        return self.meta["src"]

    @property
    def trg(self) -> str:
        return self.meta["trg"]

    @property
    def n(self) -> int:
        return int(self.acts.shape[2])

    def save(self, directory) -> tuple[Path, Path]:
        ft, fj = probe_paths(directory, self.src, self.trg)
        atomic_save_tensors({"acts": self.acts.contiguous()}, ft, metadata={"format": PROBE_FORMAT})
        doc = dict(self.meta, format=PROBE_FORMAT, n_probes=self.n, probes=self.probes)
        atomic_write_text(fj, json.dumps(doc, ensure_ascii=False, indent=1))
        return ft, fj

    @classmethod
    def load(cls, directory, src: str, trg: str) -> "ProbeSet":
        from safetensors.torch import load_file
        ft, fj = probe_paths(directory, src, trg)
        if not ft.is_file() or not fj.is_file():
            raise UserError(f"no probes for {src}-{trg} in {directory} (expected {ft.name} and {fj.name}); "
                            f"run 'langneurons bridge probe --pair {src}-{trg} --out {directory}' first")
        try:
            doc = json.loads(fj.read_text(encoding="utf-8"))
            acts = load_file(str(ft))["acts"]
        except Exception as e:  # corrupt JSON or safetensors
            raise UserError(f"probe files {ft.name}/{fj.name} are unreadable ({e.__class__.__name__}); "
                            "run 'langneurons bridge probe' again") from None
        if doc.get("format") != PROBE_FORMAT or acts.dim() != 3 or acts.shape[2] != len(doc.get("probes", [])):
            raise UserError(f"{fj} is not a langneurons probe file or does not match {ft.name}; run probe again")
        probes = doc.pop("probes")
        return cls(acts, doc, probes)


def build_probes(session, entries: Mapping[str, Sequence[str]], src: str, trg: str,
                 names: Mapping[str, str], filter: str = "correct", generate: Optional[Generate] = None,
                 site: str = "act", include_special: bool = False,
                 max_probes: Optional[int] = None, extra_meta: Optional[dict] = None) -> ProbeSet:
    """Translate, filter and record probes for ``src -> trg`` (steps 2-3 of the module docstring).

    ``generate`` is needed unless ``filter == "none"``.  ``max_probes`` caps the kept probes
    (first ones in word order).  Raises :class:`UserError` when no probe survives.
    """
    if filter not in FILTERS:
        raise UserError(f"unknown --filter {filter!r}; use one of {', '.join(FILTERS)}")
    words = list(entries)
    if not words:
        raise UserError(f"the {src}-{trg} dictionary selection is empty; check the dictionary and --limit")
    S, T = names[src], names[trg]
    prompts = [translation_prompt(S, w, T) for w in words]
    records = [{"word": w, "references": list(entries[w]), "prompt": p, "output": None, "prediction": None,
                "correct": None} for w, p in zip(words, prompts)]
    if filter != "none":
        if generate is None:
            raise UserError("filtering probes needs a generator")
        for r, o in zip(records, generate(prompts)):
            pred = extract_answer(o)
            r.update(output=o, prediction=pred, correct=is_correct(pred, r["references"]))
    n_correct = sum(1 for r in records if r["correct"])
    kept = [r for r in records if r["correct"]] if filter == "correct" else records
    if max_probes is not None:
        kept = kept[:max_probes]
    if not kept:
        raise UserError(f"the model translated none of the {len(records)} {src}->{trg} words correctly, so no probe "
                        "is left; use --filter all (keep every word) or a larger --limit/model")
    adapter = session.adapter
    acts = session.mean_activations([r["prompt"] for r in kept], site=site, include_special=include_special)
    meta = {"src": src, "trg": trg, "names": {src: S, trg: T}, "site": site, "filter": filter,
            "filter_rule": "exact match after stripping quotes/whitespace, case-insensitive (NFC, casefold), "
                           "against any reference translation",
            "n_candidates": len(records), "n_correct": n_correct if filter != "none" else None,
            "translation_accuracy": n_correct / len(records) if filter != "none" else None,
            "include_special_tokens": include_special, "num_layers": adapter.num_layers, "width": adapter.width,
            "model_type": adapter.model_type}
    meta.update(extra_meta or {})
    return ProbeSet(acts, meta, kept)
