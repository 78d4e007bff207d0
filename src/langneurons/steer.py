"""Language steering: generations under an intervention, the Language Steering Shift (LSS, [R25],
METHODS.md 4.2) on parallel cloze data, a generation-based steering score, and an operator sweep.

Parallel cloze data
-------------------
One item is one fact (or word) expressed in several languages. The JSONL format, one item per line::

    {"id": "P19:Q937", "lang": {"en": {"prompt": "Albert Einstein was born in", "object": "Ulm"},
                                "zh": {"prompt": "阿尔伯特·爱因斯坦出生于", "object": "乌尔姆", "sep": ""}}}

``prompt`` is the query ``q`` without the object; ``object`` is the answer ``o``. The continuation
scored after a prompt of language ``s`` is ``sep_s + o`` for an object of *any* language, where
``sep_s`` is the prompt entry's optional ``"sep"`` (default ``""`` for languages written without
spaces, zh ja th lo km my bo, else ``" "``). Items may lack languages; a pair of languages uses the
items that have both. Loaders: :func:`load_cloze_jsonl`, :func:`load_mlama`, :func:`build_muse_cloze`.

Reconstructed mLAMA layout assumed by :func:`load_mlama` (the mLAMA release layout)::

    ROOT/<lang>/templates.jsonl    {"relation": "P19", "template": "[X] was born in [Y] ."}
    ROOT/<lang>/<relation>.jsonl   {"sub_label": "Albert Einstein", "obj_label": "Ulm", "uuid": "..."}

Facts are aligned across languages by ``(relation, uuid)`` (``(relation, sub_uri, obj_uri)`` when
there is no uuid). The prompt is the template with ``[X]`` filled in, cut before ``[Y]``
(``mode="prefix"``, default; templates whose ``[X]`` comes after ``[Y]`` are skipped), or with
``" [Y]"`` deleted and the rest kept (``mode="remove"``, [R25]'s wording).

MUSE word-list cloze (:func:`build_muse_cloze`): from bilingual dictionaries ``en-xx.txt`` (lines
"english_word other_word"), English words whose first listed translation exists in every
language, is alphabetic and differs from the English word and from the other translations. An
item is ``c + 1`` such words: the prompt in language ``s`` is the list of the first ``c`` words in
``s`` joined by the language's list separator (``", "``; ``"、"`` for zh/ja; ``"، "`` for ar/fa/ur)
and ending with it, and the object is the last word in ``s``: a list in ``s`` should continue in
``s``, and steering toward ``t`` should make the word in ``t`` more likely.

LSS
---
For source ``s``, target ``t != s`` and item ``i``: ``D = ll(o_t | q_s) - ll(o_s | q_s)`` where ``ll`` is
the log-likelihood of the continuation tokens summed (right padding, continuation offset =
prompt length, positions from the mask), ``D0`` without intervention, ``D1`` with ``t``'s neurons
written by the operator (``set:p_max`` of ``t`` in [R25]; any operator here):
``LSS(s -> t) = mean_i [D1 - D0 > 0]`` (ties fail). The diagonal is excluded; ``lss_by_target[t]``
is the mean over ``s != t`` and ``lss_mean`` the mean over every off-diagonal cell.

Language arithmetic
-------------------
``arith:add[*A]`` and ``arith:mul[*A]`` (:class:`langneurons.intervene.ArithmeticIntervention`)
deactivate a source language's neurons while activating the target's. The source is the
language of the prompt where it is known: in LSS, cell ``(s, t)`` scores the prompts ``q_s`` under
the arithmetic from ``s`` to ``t`` (each source's pairs in their own passes, with their own
unsteered pass in the same batches). Neutral prompts have no language: for the generation score the
source is every other compared language (the union of their neurons, without the target's). Other
operators write the target's neurons only and are scored as before.

Generation score
----------------
From neutral prompts (default: BOS alone and a few punctuation/number starts), sample
``samples`` continuations per prompt (seeded; the same seeds with and without intervention) and
identify their language (:mod:`langneurons.langid`, restricted to the compared languages):
``share[t]`` = fraction of outputs identified as ``t`` under ``t``'s intervention, against the
baseline fraction. Run ``i`` (prompt ``i // samples``, sampling seed of its batch) is the same
with and without intervention, so steered and unsteered generations form pairs; ``pairs[t]`` shows
the first three runs with distinct prompts side by side.

Uncertainty
-----------
Every headline number ``x`` has a sibling ``x_ci95 = [lo, hi]``: the 2.5 and 97.5 percentiles of
``x`` recomputed on ``B = 2000`` bootstrap resamples (:mod:`langneurons.uncertainty`), drawn with
the run's ``seed`` (``--seed``), so a rerun gives the same interval.

* Generation: the unit is the run (``n = len(prompts) * samples`` per target). One draw of run
  indices per replicate serves the baseline and every target, so ``delta_ci95`` (and
  ``delta_mean_ci95``) are *paired* intervals: identical steered and unsteered labels give
  ``[0, 0]``. ``share_mean_ci95``, ``baseline_share_mean_ci95`` come from the same draw;
  ``separated`` says the two mean intervals do not overlap and the steered mean is higher.
  ``generation_baseline.share_ci95`` uses that same draw (equal to ``baseline_share_ci95``).
* LSS: the unit is the cloze item (by position in the item list). ``lss_ci95[s][t]`` resamples the
  items of cell ``(s, t)`` alone. ``lss_by_target_ci95`` and ``lss_mean_ci95`` draw item indices
  once per replicate over the whole list (items are shared by the sources): each cell counts the
  drawn items valid for it, with their multiplicity, and the replicate averages the cells as the
  point value does (a cell without a valid drawn item sits that replicate out).

Sweep
-----
Evaluate several operators (``DEFAULT_SWEEP``: patch values, their multiples, scaling, zero, batch
P10) and pick, per target language, the operator with the highest ``lss_by_target`` (ties: the
first listed), as [R25] picks the best amplification per language.
"""

from __future__ import annotations

import json
import math
import random
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .errors import UserError
from .jsonl import iter_jsonl, read_jsonl
from .intervene import ArithmeticIntervention, Intervention, is_arith
from .uncertainty import N_BOOT, interval, mean_ci, overlap, resample_indices

from .artifacts import STEER_FORMAT  # noqa: E402 - the tag is defined in the artifact registry
NO_SPACE = {"zh", "ja", "th", "lo", "km", "my", "bo", "yue", "wuu"}
LIST_SEP = {"zh": "、", "ja": "、", "ar": "، ", "fa": "، ", "ur": "، "}
DEFAULT_SWEEP = ("set:p_max", "set:p_median", "set:p_max*2", "set:p_max*4", "set:p90", "scale:2", "scale:4",
                 "zero", "set:batch-p10")
DEFAULT_NEUTRAL_PROMPTS = ("", "1.", "-", "\"", "(", "*", ":", "#")


def _base(code: str) -> str:
    return code.replace("_", "-").split("-")[0].lower()


def default_sep(code: str) -> str:
    """Separator between a prompt of language ``code`` and its continuation."""
    return "" if _base(code) in NO_SPACE else " "


# ------------------------------------------------------------------------------------------ cloze data
@dataclass
class ClozeItem:
    id: str
    prompts: dict[str, str]
    objects: dict[str, str]
    seps: dict[str, str] = field(default_factory=dict)

    def sep(self, lang: str) -> str:
        return self.seps.get(lang, default_sep(lang))

    def to_json(self) -> dict:
        return {"id": self.id, "lang": {k: {"prompt": self.prompts[k], "object": self.objects[k],
                                            **({"sep": self.seps[k]} if k in self.seps else {})}
                                        for k in self.prompts}}


def load_cloze_jsonl(path, languages: Optional[Sequence[str]] = None) -> list[ClozeItem]:
    """Read the JSONL cloze format (module docstring); keep ``languages`` if given."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"cloze file {path} does not exist; check --cloze")
    items = []
    hint = 'each line must be an object {"id": ..., "lang": {"en": {"prompt": ..., "object": ...}, ...}}'
    for where, rec in iter_jsonl(path, hint):
        lang = rec.get("lang")
        if not isinstance(lang, dict):
            raise UserError(f"{where} has no 'lang' object; see the cloze format in 'langneurons steer --help'")
        prompts, objects, seps = {}, {}, {}
        for code, entry in lang.items():
            if languages is not None and code not in languages:
                continue
            if (not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str)
                    or not isinstance(entry.get("object"), str) or not entry["object"].strip()):
                raise UserError(f"{where}: lang.{code} needs string fields 'prompt' and 'object'")
            prompts[code], objects[code] = entry["prompt"], entry["object"]
            if isinstance(entry.get("sep"), str):
                seps[code] = entry["sep"]
        if len(prompts) >= 2:
            items.append(ClozeItem(str(rec.get("id", where.rsplit(":", 1)[1])), prompts, objects, seps))
    if not items:
        raise UserError(f"{path} holds no item with at least two of the requested languages")
    return items


def save_cloze_jsonl(items: Sequence[ClozeItem], path) -> None:
    from .atomic import atomic_write_text
    atomic_write_text(path, "".join(json.dumps(it.to_json(), ensure_ascii=False) + "\n" for it in items))


def mlama_prompt(template: str, subject: str, mode: str = "prefix") -> Optional[str]:
    """The query of a template: ``[X]`` filled, then cut before ``[Y]`` (prefix) or ``" [Y]"`` removed."""
    if "[X]" not in template or "[Y]" not in template:
        return None
    if mode == "prefix":
        if template.index("[X]") > template.index("[Y]"):
            return None
        text = template.split("[Y]", 1)[0].replace("[X]", subject).rstrip()
    elif mode == "remove":
        text = template.replace(" [Y]", "").replace("[Y]", "").replace("[X]", subject).strip()
    else:
        raise UserError(f"unknown mLAMA prompt mode {mode!r}; use prefix or remove")
    return text or None


def load_mlama(root, languages: Sequence[str], relations: Optional[Sequence[str]] = None,
               mode: str = "prefix", max_items: Optional[int] = None) -> list[ClozeItem]:
    """Parallel cloze items from the mLAMA layout (module docstring)."""
    root = Path(root)
    facts: dict[tuple, dict[str, tuple[str, str]]] = {}
    for code in languages:
        d = root / code
        tfile = d / "templates.jsonl"
        if not tfile.is_file():
            raise UserError(f"{tfile} is missing; --mlama expects ROOT/<lang>/templates.jsonl and "
                            "ROOT/<lang>/<relation>.jsonl per language")
        templates = {r["relation"]: r["template"] for r in read_jsonl(tfile) if "relation" in r and "template" in r}
        for rel, tpl in templates.items():
            if relations is not None and rel not in relations:
                continue
            f = d / f"{rel}.jsonl"
            if not f.is_file():
                continue
            for r in read_jsonl(f):
                sub, obj = r.get("sub_label"), r.get("obj_label")
                if not isinstance(sub, str) or not isinstance(obj, str) or not obj.strip():
                    continue
                key = (rel, r["uuid"]) if "uuid" in r else (rel, r.get("sub_uri", sub), r.get("obj_uri", obj))
                prompt = mlama_prompt(tpl, sub, mode)
                if prompt is not None:
                    facts.setdefault(key, {})[code] = (prompt, obj)
    items = []
    for key in sorted(facts, key=str):
        per = facts[key]
        if len(per) < 2:
            continue
        items.append(ClozeItem(":".join(map(str, key)), {c: p for c, (p, _) in per.items()},
                               {c: o for c, (_, o) in per.items()}))
        if max_items and len(items) >= max_items:
            break
    if not items:
        raise UserError(f"no fact of {root} exists in two or more of {', '.join(languages)}; check the layout")
    return items


def _muse_file(muse_dir: Path, code: str) -> Path:
    for p in (muse_dir / f"en-{code}.txt", muse_dir / "full" / f"en-{code}.txt"):
        if p.is_file():
            return p
    raise UserError(f"no MUSE dictionary en-{code}.txt in {muse_dir} (or its full/ folder); "
                    "give the directory holding en-xx.txt files")


def _is_word(w: str) -> bool:
    """Letters (and combining marks, as in Devanagari), starting with a letter; at least two
    characters unless it is a CJK character."""
    if not w or not w[0].isalpha() or not all(unicodedata.category(ch)[0] in "LM" for ch in w):
        return False
    return len(w) >= 2 or ord(w[0]) >= 0x2E80


def build_muse_cloze(muse_dir, languages: Sequence[str], n_items: int = 100, context: int = 3, pool: int = 3000,
                     seed: int = 0) -> list[ClozeItem]:
    """Word-list cloze items from MUSE ``en-xx`` dictionaries (module docstring).

    English words are taken in the order of the first non-English dictionary (MUSE lists frequent
    words first), the first ``pool`` usable ones are shuffled with ``seed`` and grouped.
    """
    muse_dir = Path(muse_dir)
    langs = list(languages)
    if len(langs) < 2:
        raise UserError("the MUSE cloze builder needs at least two languages")
    if context < 1 or n_items < 1:
        raise UserError("--items and the context size must be at least 1")
    first: dict[str, dict[str, str]] = {}
    for code in langs:
        if _base(code) == "en":
            continue
        table: dict[str, str] = {}
        with open(_muse_file(muse_dir, _base(code)), encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[0] not in table:
                    table[parts[0]] = parts[1]
        first[code] = table
    if not first:
        raise UserError("the MUSE cloze builder needs at least one language other than English")
    order = list(next(iter(first.values())))
    words = []
    for en in order:
        if not _is_word(en) or en.lower() != en:
            continue
        trans = {}
        for code in langs:
            trans[code] = en if _base(code) == "en" else first[code].get(en)
        vals = list(trans.values())
        if any(v is None or not _is_word(v) for v in vals):
            continue
        if len({v.lower() for v in vals}) != len(vals):
            continue
        words.append(trans)
        if len(words) >= pool:
            break
    need = n_items * (context + 1)
    if len(words) < context + 1:
        raise UserError(f"only {len(words)} usable words are shared by {', '.join(langs)} in {muse_dir}; "
                        "use fewer or other languages")
    rng = random.Random(seed)
    rng.shuffle(words)
    usable = min(need, len(words))
    words = words[: usable - usable % (context + 1)]
    items = []
    for i in range(0, len(words), context + 1):
        group = words[i: i + context + 1]
        prompts, objects, seps = {}, {}, {}
        for code in langs:
            ls = LIST_SEP.get(_base(code), ", ")
            prompts[code] = ls.join(w[code] for w in group[:context]) + ls.rstrip()
            objects[code] = group[context][code]
            seps[code] = ls[len(ls.rstrip()):]          # the list separator's trailing space, if any
        items.append(ClozeItem(f"muse:{i // (context + 1)}", prompts, objects, seps))
    return items


# ------------------------------------------------------------------------------------------ scoring
def continuation_loglik(session, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
    """``sum_t log p(c_t | context, c_<t)`` of every ``(context, continuation)``: float64 ``[N]``.

    The runtime's one log-likelihood pass (:meth:`langneurons.runtime.Session.loglikelihood`).
    """
    return torch.tensor([ll for ll, _ in session.loglikelihood(pairs)], dtype=torch.float64)


def _cell_pairs(items: Sequence[ClozeItem], s: str, t: str, keep: Sequence[int]) -> list[tuple[str, str]]:
    """``(q_s, o_t)`` of the items ``keep``, then their ``(q_s, o_s)``."""
    return ([(items[i].prompts[s], items[i].sep(s) + items[i].objects[t]) for i in keep]
            + [(items[i].prompts[s], items[i].sep(s) + items[i].objects[s]) for i in keep])


def lss(session, items: Sequence[ClozeItem], languages: Sequence[str],
        make_intervention: Callable[[str], Optional[Intervention]], baseline: Optional[dict] = None,
        seed: int = 0, n_boot: int = N_BOOT) -> dict:
    """Language Steering Shift of every (source, target) pair (module docstring).

    ``make_intervention(t)`` gives the intervention that steers toward ``t``. An
    :class:`~langneurons.intervene.ArithmeticIntervention` is specialised to each source ``s``
    (``for_source(s)``: ``s``'s neurons down, ``t``'s up) and each source's pairs are scored in their
    own passes. ``baseline``: a dict from a previous call (key ``"_ll0"``) to reuse the unsteered
    log-likelihoods (keyed by ``t``, and by ``(s, t)`` for per-source passes). The unsteered pass of
    target ``t`` (or cell ``(s, t)``) scores exactly the pairs of the steered pass in the same batches,
    so an intervention that changes nothing gives ``D1 == D0`` bit for bit (a tie, which fails)
    whatever the batching.
    Returns ``{"lss": [K][K] (None on the diagonal), "lss_by_target", "lss_mean", "mean_shift",
    "items": [K][K] item counts, "lss_ci95", "lss_by_target_ci95", "lss_mean_ci95" (bootstrap over
    items seeded with ``seed``, see :func:`lss_intervals`), "_wins": [K][K] of None or
    ``{"items": [item positions], "wins": [0/1 per item]}``, "_ll0": cache}``.
    """
    langs = list(languages)
    K = len(langs)
    ll0 = dict(baseline or {})

    M = [[None] * K for _ in range(K)]
    shift = [[None] * K for _ in range(K)]
    counts = [[0] * K for _ in range(K)]
    cells = [[None] * K for _ in range(K)]
    for b, t in enumerate(langs):
        iv = make_intervention(t)
        srcs = [s for s in langs if s != t]
        # pairs needed under the intervention: (q_s, o_t) and (q_s, o_s) on items having s and t
        jobs = []
        for s in srcs:
            keep = [i for i, it in enumerate(items) if s in it.prompts and t in it.objects and s in it.objects]
            jobs.append((s, keep))
        if isinstance(iv, ArithmeticIntervention):
            # the source is the prompt's language: one intervention (and one unsteered pass) per cell
            ll1, base = [], []
            for s, keep in jobs:
                if not keep:
                    continue
                cp = _cell_pairs(items, s, t, keep)
                with session.intervened(iv.for_source(s)):
                    ll1 += continuation_loglik(session, cp).tolist()
                if (s, t) not in ll0:
                    ll0[(s, t)] = continuation_loglik(session, cp).tolist()
                base += ll0[(s, t)]
        else:
            pairs = []
            for s, keep in jobs:
                pairs += _cell_pairs(items, s, t, keep)
            with session.intervened(iv):
                ll1 = continuation_loglik(session, pairs).tolist()
            if t not in ll0:
                ll0[t] = continuation_loglik(session, pairs).tolist()
            base = ll0[t]
        pos = 0
        for s, keep in jobs:
            n = len(keep)
            to_t, to_s = ll1[pos:pos + n], ll1[pos + n:pos + 2 * n]
            b0t, b0s = base[pos:pos + n], base[pos + n:pos + 2 * n]
            pos += 2 * n
            win, d = [], 0.0
            for j in range(n):
                d1 = to_t[j] - to_s[j]
                d0 = b0t[j] - b0s[j]
                win.append(int((d1 - d0) > 0))
                d += d1 - d0
            a = langs.index(s)
            counts[a][b] = n
            cells[a][b] = {"items": list(keep), "wins": win}
            if n:
                M[a][b] = sum(win) / n
                shift[a][b] = d / n
    by_target = {}
    for b, t in enumerate(langs):
        vals = [M[a][b] for a in range(K) if a != b and M[a][b] is not None]
        by_target[t] = sum(vals) / len(vals) if vals else None
    off = [M[a][b] for a in range(K) for b in range(K) if a != b and M[a][b] is not None]
    return {"lss": M, "lss_by_target": by_target, "lss_mean": sum(off) / len(off) if off else None,
            "mean_shift": shift, "items": counts,
            **lss_intervals(cells, len(items), langs, seed=seed, n_boot=n_boot),
            "_wins": cells, "_ll0": ll0}


def _draw_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n]`` float64: how often each unit occurs in each replicate's draw
    (:func:`langneurons.uncertainty.resample_indices` with ``seed``)."""
    idx = resample_indices(n, n_boot, seed)
    flat = (np.arange(n_boot)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Mean over axis 1 ignoring NaN (NaN where a row has no value), without warnings."""
    ok = ~np.isnan(x)
    cnt = ok.sum(axis=1)
    tot = np.where(ok, x, 0.0).sum(axis=1)
    with np.errstate(all="ignore"):
        return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


def lss_intervals(cells: list, n_items: int, languages: Sequence[str], seed: int = 0,
                  n_boot: int = N_BOOT) -> dict:
    """95% bootstrap intervals of the LSS numbers from per-item wins (module docstring).

    ``cells[a][b]``: None or ``{"items": positions in the item list, "wins": 0/1 per item}`` for
    source ``a`` and target ``b``. Returns ``{"lss_ci95": [K][K] of [lo, hi] or None (diagonal, empty
    cells), "lss_by_target_ci95": {t: [lo, hi] or None}, "lss_mean_ci95": [lo, hi] or None}``.
    ``lss_ci95`` resamples each cell's own items; the other two draw item indices once per
    replicate over all ``n_items`` items, shared by every cell, and weight each cell's valid items
    by their multiplicity in the draw.
    """
    langs = list(languages)
    K = len(langs)
    cell_ci = [[None] * K for _ in range(K)]
    live = [(a, b) for a in range(K) for b in range(K)
            if a != b and cells[a][b] is not None and cells[a][b]["wins"]]
    for a, b in live:
        cell_ci[a][b] = mean_ci(cells[a][b]["wins"], n_boot=n_boot, seed=seed)["ci95"]
    by_target = {t: None for t in langs}
    mean = None
    if live and n_items > 0:
        W = _draw_weights(n_items, n_boot, seed)
        reps = {}
        for a, b in live:
            Wc = W[:, cells[a][b]["items"]]
            num = Wc @ np.asarray(cells[a][b]["wins"], dtype=np.float64)
            den = Wc.sum(axis=1)
            with np.errstate(all="ignore"):
                reps[(a, b)] = np.where(den > 0, num / np.maximum(den, 1.0), np.nan)
        for b, t in enumerate(langs):
            cols = [reps[(a, bb)] for (a, bb) in live if bb == b]
            if cols:
                by_target[t] = interval(_nanmean_rows(np.stack(cols, axis=1)))
        mean = interval(_nanmean_rows(np.stack([reps[c] for c in live], axis=1)))
    return {"lss_ci95": cell_ci, "lss_by_target_ci95": by_target, "lss_mean_ci95": mean}


# ------------------------------------------------------------------------------------------ generation
def generate_texts(session, prompts: Sequence[str], max_new_tokens: int = 32, sample: bool = False,
                   seed: int = 0, intervention=None) -> list[str]:
    """Continuations (new text only) of ``prompts`` under ``intervention`` if given
    (:meth:`langneurons.runtime.Session.generate`).

    Sampling (``sample=True``: temperature 1, full distribution) is seeded per batch, so a run with
    and without intervention draws the same random numbers.
    """
    with session.intervened(intervention):
        return session.generate(list(prompts), max_new_tokens, sample=sample, seed=seed)


def _shares(labels: Sequence[Optional[str]], codes: Sequence[str]) -> dict[str, float]:
    """Fraction of ``labels`` equal to each code (unclassified texts count in the total), as
    :meth:`langneurons.langid.LanguageIdentifier.shares`."""
    n = max(1, len(labels))
    return {code: sum(1 for x in labels if x == code) / n for code in codes}


def _indicators(labels: Sequence[Optional[str]], codes: Sequence[str]) -> np.ndarray:
    """``[len(codes), n]`` float64: 1 where run ``i`` is identified as ``codes[k]``."""
    return np.array([[x == c for x in labels] for c in codes], dtype=np.float64).reshape(len(codes), len(labels))


def generation_intervals(baseline_labels: Sequence[Optional[str]], labels: dict[str, Sequence[Optional[str]]],
                         languages: Sequence[str], seed: int = 0, n_boot: int = N_BOOT) -> dict:
    """Paired 95% bootstrap intervals of the generation shares (module docstring).

    ``baseline_labels[i]``: the identified language of unsteered run ``i``; ``labels[t][i]``: that of
    the same run steered toward ``t``. One draw of run indices per replicate (seeded with ``seed``)
    serves the baseline and every target. Returns ``{"share_ci95", "baseline_share_ci95",
    "delta_ci95"}`` ({t: [lo, hi]}) and ``{"share_mean_ci95", "baseline_share_mean_ci95",
    "delta_mean_ci95"}`` ([lo, hi], means over targets); all None without runs.
    """
    langs = list(languages)
    n = len(baseline_labels)
    if any(len(labels[t]) != n for t in langs):
        raise ValueError("steered and unsteered generations must be the same runs (equal counts)")
    keys = ("share", "baseline_share", "delta")
    if n == 0:
        return {**{f"{k}_ci95": {t: None for t in langs} for k in keys},
                **{f"{k}_mean_ci95": None for k in keys}}
    W = _draw_weights(n, n_boot, seed)                                          # [B, n] multiplicities
    # counts / n, as the point value (exact: an all-t sample gives 1.0, not 0.999...)
    steered = (W @ np.stack([_indicators(labels[t], [t])[0] for t in langs]).T) / n   # [B, K]
    base = (W @ _indicators(baseline_labels, langs).T) / n                            # [B, K]
    out = {}
    for k, rep in zip(keys, (steered, base, steered - base)):
        out[f"{k}_ci95"] = dict(zip(langs, interval(rep)))
        out[f"{k}_mean_ci95"] = interval(rep.mean(axis=1))
    return out


def _side_by_side(runs: Sequence[str], base: dict, texts: Sequence[str], labels: Sequence[Optional[str]],
                  k: int = 3) -> list[dict]:
    """The first ``k`` runs with distinct prompts, unsteered and steered (same run index)."""
    out, seen = [], set()
    for i, p in enumerate(runs):
        if p in seen:
            continue
        seen.add(p)
        out.append({"prompt": p, "unsteered": base["_texts"][i], "steered": texts[i],
                    "unsteered_label": base["_labels"][i], "steered_label": labels[i]})
        if len(out) == k:
            break
    return out


def public_baseline(baseline: Optional[dict]) -> Optional[dict]:
    """The generation baseline without its internal per-run arrays (keys starting with ``_``)."""
    return None if baseline is None else {k: v for k, v in baseline.items() if not k.startswith("_")}


def generation_shares(session, languages: Sequence[str], make_intervention: Callable[[str], Optional[Intervention]],
                      prompts: Sequence[str] = DEFAULT_NEUTRAL_PROMPTS, samples: int = 8, max_new_tokens: int = 32,
                      seed: int = 0, identifier=None, baseline: Optional[dict] = None, n_boot: int = N_BOOT) -> dict:
    """Share of generations identified as the target language, steered vs baseline (module docstring).

    ``seed`` seeds the sampling and the bootstrap. ``baseline``: the ``"_baseline"`` of a previous
    call with the same prompts, samples and seed (the unsteered runs, reused and paired with).
    Returns ``share``, ``baseline_share``, ``delta`` ({t: value}), their ``*_ci95``, ``share_mean``,
    ``baseline_share_mean``, ``delta_mean`` and their ``*_ci95``, ``ratio``, ``separated``, ``n``,
    ``examples``, ``pairs`` and ``_baseline`` (``share``, ``share_ci95``, ``n``, ``examples`` and the
    internal ``_prompts``, ``_texts``, ``_labels``, ``_seed``).
    """
    from .langid import LanguageIdentifier
    langs = list(languages)
    idf = identifier or LanguageIdentifier(langs)
    codes = list(getattr(idf, "languages", langs))
    runs = [p for p in prompts for _ in range(samples)]
    n = len(runs)
    if baseline is None:
        texts = generate_texts(session, runs, max_new_tokens, sample=True, seed=seed)
        labels0 = list(idf.labels(texts))
        ci0 = generation_intervals(labels0, {c: labels0 for c in codes}, codes, seed=seed, n_boot=n_boot)
        baseline = {"share": _shares(labels0, codes), "share_ci95": ci0["baseline_share_ci95"], "n": n,
                    "examples": texts[: min(4, len(texts))],
                    "_prompts": runs, "_texts": list(texts), "_labels": labels0, "_seed": seed}
    elif baseline.get("_prompts") != runs or baseline.get("_seed") != seed or "_labels" not in baseline:
        raise ValueError("the generation baseline comes from other prompts, samples or seed; it cannot be paired")
    share, examples, labels, pairs = {}, {}, {}, {}
    for t in langs:
        iv = make_intervention(t)
        texts = generate_texts(session, runs, max_new_tokens, sample=True, seed=seed, intervention=iv)
        labels[t] = list(idf.labels(texts))
        share[t] = _shares(labels[t], codes)[t]
        examples[t] = texts[: min(4, len(texts))]
        pairs[t] = _side_by_side(runs, baseline, texts, labels[t])
    base_share = {t: baseline["share"][t] for t in langs}
    delta = {t: share[t] - base_share[t] for t in langs}
    ci = generation_intervals(baseline["_labels"], labels, langs, seed=seed, n_boot=n_boot)
    share_mean = sum(share.values()) / len(share)
    base_mean = sum(base_share.values()) / len(base_share)
    apart = overlap(ci["share_mean_ci95"], ci["baseline_share_mean_ci95"])
    return {"share": share, "share_ci95": ci["share_ci95"],
            "baseline_share": base_share, "baseline_share_ci95": ci["baseline_share_ci95"],
            "delta": delta, "delta_ci95": ci["delta_ci95"],
            "share_mean": share_mean, "share_mean_ci95": ci["share_mean_ci95"],
            "baseline_share_mean": base_mean, "baseline_share_mean_ci95": ci["baseline_share_mean_ci95"],
            "delta_mean": sum(delta.values()) / len(delta), "delta_mean_ci95": ci["delta_mean_ci95"],
            "ratio": share_mean / base_mean if base_mean else None,
            "separated": bool(apart is False and share_mean > base_mean),
            "n": n, "examples": examples, "pairs": pairs, "_baseline": baseline}


# ------------------------------------------------------------------------------------------ sweep
def best_per_target(results: dict[str, dict], languages: Sequence[str], key: str = "lss_by_target") -> dict:
    """``{t: {"operator", "value"}}``: the operator with the highest ``results[op][key][t]``
    (first listed on ties; operators without a value are skipped). When the results carry
    ``key + "_ci95"``, the entry also has ``value_ci95``."""
    best = {}
    for t in languages:
        top = None
        for op, res in results.items():
            v = (res.get(key) or {}).get(t)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            if top is None or v > top[1]:
                top = (op, v)
        best[t] = {"operator": top[0], "value": top[1]} if top else None
        if top and isinstance(results[top[0]].get(key + "_ci95"), dict):
            best[t]["value_ci95"] = results[top[0]][key + "_ci95"].get(t)
    return best


def format_ci(ci: Optional[Sequence[float]], digits: int = 2) -> str:
    """``"[0.25, 0.37]"`` (empty for a missing interval)."""
    if ci is None or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in ci):
        return ""
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _with_ci(value: Optional[float], ci: Optional[Sequence[float]], digits: int) -> str:
    if value is None:
        return "n/a"
    text = format_ci(ci, 2)
    return f"{value:.{digits}f}" + (f" {text}" if text else "")


# ------------------------------------------------------------------------------------------ the evaluation run
def build_interventions(ns, stats, languages: Sequence[str], operators: Sequence[str], site: str = "act",
                        positions: str = "all", batch_scope: str = "batch", strict: bool = True
                        ) -> tuple[dict[str, dict[str, Intervention]], dict[str, str]]:
    """``{operator: {target: Intervention}}`` and ``{operator: reason}`` for operators skipped
    (only when ``strict`` is False, as in a sweep; otherwise the UserError propagates).

    Language arithmetic (``arith:...``) gives, per target ``t``, an
    :class:`~langneurons.intervene.ArithmeticIntervention` whose sources are the other
    ``languages`` (used as is for neutral-prompt generation; LSS narrows it to the prompt's language).
    """
    ivs, skipped = {}, {}
    for op in operators:
        try:
            if is_arith(op):
                ivs[op] = {t: ArithmeticIntervention(ns, t, [c for c in languages if c != t], op, stats=stats,
                                                     site=site, positions=positions) for t in languages}
                continue
            ivs[op] = {t: Intervention(neurons=ns, languages=[t], operator=op, stats=stats, site=site,
                                       positions=positions, batch_scope=batch_scope) for t in languages}
        except UserError as e:
            if strict:
                raise
            skipped[op] = str(e)
    return ivs, skipped


def evaluate_steering(session, interventions: dict[str, dict[str, Intervention]], languages: Sequence[str],
                      items: Optional[Sequence[ClozeItem]] = None, generation: bool = False,
                      neutral_prompts: Sequence[str] = DEFAULT_NEUTRAL_PROMPTS, samples: int = 8,
                      max_new_tokens: int = 32, seed: int = 0, progress: bool = False, identifier=None) -> dict:
    """LSS (when ``items``) and generation shares (when ``generation``) of every operator, and the
    best operator per target. Baseline scores are computed once and shared by every operator;
    ``seed`` seeds the sampling and every bootstrap interval (module docstring, Uncertainty).
    ``generation_baseline`` is written without its per-run arrays (texts, labels)."""
    import sys
    import time
    langs = list(languages)
    results: dict[str, dict] = {}
    ll0, gen0 = None, None
    for op, per_target in interventions.items():
        t0 = time.perf_counter()
        res: dict = {}
        if items:
            r = lss(session, items, langs, per_target.get, baseline=ll0, seed=seed)
            ll0 = r.pop("_ll0")
            r.pop("_wins")
            res.update(r)
        if generation:
            g = generation_shares(session, langs, per_target.get, neutral_prompts, samples, max_new_tokens,
                                  seed, identifier=identifier, baseline=gen0)
            gen0 = g.pop("_baseline")
            res["generation"] = g
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results[op] = res
        if progress and session.is_main:
            print(f"langneurons: steer {op}: {summary_line(res)} ({res['seconds']} s)", file=sys.stderr)
    out = {"operators": results}
    if items:
        out["best"] = best_per_target(results, langs, "lss_by_target")
    if generation:
        shares = {op: {"share_by_target": r["generation"]["share"],
                       "share_by_target_ci95": r["generation"]["share_ci95"]} for op, r in results.items()}
        out["best_generation"] = best_per_target(shares, langs, "share_by_target")
        out["generation_baseline"] = public_baseline(gen0)
    return out


def summary_line(res: dict) -> str:
    """One operator's headline numbers with their 95% intervals, e.g. ``LSS mean 0.771 [0.70, 0.84],
    target share 0.31 [0.25, 0.37] vs unsteered 0.10 [0.08, 0.12]``."""
    parts = []
    if "lss_mean" in res:
        parts.append("LSS mean " + _with_ci(res["lss_mean"], res.get("lss_mean_ci95"), 3))
    g = res.get("generation")
    if g:
        parts.append(f"target share {_with_ci(g['share_mean'], g.get('share_mean_ci95'), 2)} vs unsteered "
                     f"{_with_ci(g.get('baseline_share_mean'), g.get('baseline_share_mean_ci95'), 2)}")
    return ", ".join(parts)


def steer_record(evaluation: dict, languages: Sequence[str], settings: dict, skipped: dict) -> dict:
    return {"format": STEER_FORMAT, "languages": list(languages), **evaluation, "skipped": skipped,
            "settings": settings}


def plot_steer(record: dict, out_dir: Path) -> list[Path]:
    """``steer.png``: source x target LSS, each target column under its best operator (or the only
    one); ``steer_operators.png``: operators x targets (mean LSS, or target share without cloze data)."""
    from .plots import plot_heatmap
    langs = record["languages"]
    ops = record["operators"]
    paths = []
    nan = float("nan")
    if "best" in record:
        K = len(langs)
        mat = [[nan] * K for _ in range(K)]
        for b, t in enumerate(langs):
            best = record["best"].get(t)
            if not best:
                continue
            M = ops[best["operator"]]["lss"]
            for a in range(K):
                if M[a][b] is not None:
                    mat[a][b] = M[a][b]
        labels = [f"{t}\n{record['best'][t]['operator']}" if record["best"].get(t) and len(ops) > 1 else t
                  for t in langs]
        paths.append(plot_heatmap(mat, langs, labels, out_dir / "steer.png", fmt=".2f",
                                  title="Language Steering Shift LSS(source -> target); rows: source, "
                                        "columns: target" + (" (best operator per target)" if len(ops) > 1 else
                                                             f" ({next(iter(ops))})")))
        key = "lss_by_target"
    else:
        key = None
    rows, names = [], []
    for op, r in ops.items():
        if key:
            vals = r.get(key) or {}
        else:
            vals = r["generation"]["share"]
        rows.append([nan if vals.get(t) is None else vals[t] for t in langs])
        names.append(op)
    if not key and record.get("generation_baseline"):
        rows.insert(0, [record["generation_baseline"]["share"].get(t, nan) for t in langs])
        names.insert(0, "baseline")
    title = ("mean LSS over sources, per operator and target" if key else
             "share of generations identified as the target language")
    target = out_dir / ("steer_operators.png" if key else "steer.png")
    if not key or len(ops) > 1:
        paths.append(plot_heatmap(rows, names, langs, target, fmt=".2f", title=title))
    return paths
