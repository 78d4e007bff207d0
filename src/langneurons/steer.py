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

Generation score
----------------
From neutral prompts (default: BOS alone and a few punctuation/number starts), sample
``samples`` continuations per prompt (seeded; the same seeds with and without intervention) and
identify their language (:mod:`langneurons.langid`, restricted to the compared languages):
``share[t]`` = fraction of outputs identified as ``t`` under ``t``'s intervention, against the
baseline fraction.

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

import torch

from .errors import UserError
from .jsonl import iter_jsonl, read_jsonl
from .intervene import Intervention

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


def lss(session, items: Sequence[ClozeItem], languages: Sequence[str],
        make_intervention: Callable[[str], Optional[Intervention]], baseline: Optional[dict] = None) -> dict:
    """Language Steering Shift of every (source, target) pair (module docstring).

    ``make_intervention(t)`` gives the intervention that steers toward ``t``. ``baseline``: a dict
    from a previous call (key ``"_ll0"``) to reuse the unsteered log-likelihoods. The unsteered pass of
    target ``t`` scores exactly the pairs of the steered pass in the same batches, so an intervention
    that changes nothing gives ``D1 == D0`` bit for bit (a tie, which fails) whatever the batching.
    Returns ``{"lss": [K][K] (None on the diagonal), "lss_by_target", "lss_mean", "mean_shift",
    "items": [K][K] item counts, "_ll0": cache}``.
    """
    langs = list(languages)
    K = len(langs)
    ll0 = dict(baseline or {})

    M = [[None] * K for _ in range(K)]
    shift = [[None] * K for _ in range(K)]
    counts = [[0] * K for _ in range(K)]
    for b, t in enumerate(langs):
        iv = make_intervention(t)
        srcs = [s for s in langs if s != t]
        # pairs needed under the intervention: (q_s, o_t) and (q_s, o_s) on items having s and t
        jobs = []
        for s in srcs:
            keep = [i for i, it in enumerate(items) if s in it.prompts and t in it.objects and s in it.objects]
            jobs.append((s, keep))
        pairs = []
        for s, keep in jobs:
            pairs += [(items[i].prompts[s], items[i].sep(s) + items[i].objects[t]) for i in keep]
            pairs += [(items[i].prompts[s], items[i].sep(s) + items[i].objects[s]) for i in keep]
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
            wins, d = 0, 0.0
            for j in range(n):
                d1 = to_t[j] - to_s[j]
                d0 = b0t[j] - b0s[j]
                wins += (d1 - d0) > 0
                d += d1 - d0
            a = langs.index(s)
            counts[a][b] = n
            if n:
                M[a][b] = wins / n
                shift[a][b] = d / n
    by_target = {}
    for b, t in enumerate(langs):
        vals = [M[a][b] for a in range(K) if a != b and M[a][b] is not None]
        by_target[t] = sum(vals) / len(vals) if vals else None
    off = [M[a][b] for a in range(K) for b in range(K) if a != b and M[a][b] is not None]
    return {"lss": M, "lss_by_target": by_target, "lss_mean": sum(off) / len(off) if off else None,
            "mean_shift": shift, "items": counts, "_ll0": ll0}


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


def generation_shares(session, languages: Sequence[str], make_intervention: Callable[[str], Optional[Intervention]],
                      prompts: Sequence[str] = DEFAULT_NEUTRAL_PROMPTS, samples: int = 8, max_new_tokens: int = 32,
                      seed: int = 0, identifier=None, baseline: Optional[dict] = None) -> dict:
    """Share of generations identified as the target language, steered vs baseline (module docstring)."""
    from .langid import LanguageIdentifier
    langs = list(languages)
    idf = identifier or LanguageIdentifier(langs)
    runs = [p for p in prompts for _ in range(samples)]
    if baseline is None:
        texts = generate_texts(session, runs, max_new_tokens, sample=True, seed=seed)
        baseline = {"share": idf.shares(texts), "examples": texts[: min(4, len(texts))]}
    share, examples = {}, {}
    for t in langs:
        iv = make_intervention(t)
        texts = generate_texts(session, runs, max_new_tokens, sample=True, seed=seed, intervention=iv)
        share[t] = idf.shares(texts)[t]
        examples[t] = texts[: min(4, len(texts))]
    delta = {t: share[t] - baseline["share"][t] for t in langs}
    return {"share": share, "baseline_share": {t: baseline["share"][t] for t in langs}, "delta": delta,
            "share_mean": sum(share.values()) / len(share), "delta_mean": sum(delta.values()) / len(delta),
            "examples": examples, "_baseline": baseline}


# ------------------------------------------------------------------------------------------ sweep
def best_per_target(results: dict[str, dict], languages: Sequence[str], key: str = "lss_by_target") -> dict:
    """``{t: {"operator", "value"}}``: the operator with the highest ``results[op][key][t]``
    (first listed on ties; operators without a value are skipped)."""
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
    return best


# ------------------------------------------------------------------------------------------ the evaluation run
def build_interventions(ns, stats, languages: Sequence[str], operators: Sequence[str], site: str = "act",
                        positions: str = "all", batch_scope: str = "batch", strict: bool = True
                        ) -> tuple[dict[str, dict[str, Intervention]], dict[str, str]]:
    """``{operator: {target: Intervention}}`` and ``{operator: reason}`` for operators skipped
    (only when ``strict`` is False, as in a sweep; otherwise the UserError propagates)."""
    ivs, skipped = {}, {}
    for op in operators:
        try:
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
    best operator per target. Baseline scores are computed once and shared by every operator."""
    import sys
    import time
    langs = list(languages)
    results: dict[str, dict] = {}
    ll0, gen0 = None, None
    for op, per_target in interventions.items():
        t0 = time.perf_counter()
        res: dict = {}
        if items:
            r = lss(session, items, langs, per_target.get, baseline=ll0)
            ll0 = r.pop("_ll0")
            res.update(r)
        if generation:
            g = generation_shares(session, langs, per_target.get, neutral_prompts, samples, max_new_tokens,
                                  seed, identifier=identifier, baseline=gen0)
            gen0 = g.pop("_baseline")
            res["generation"] = g
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results[op] = res
        if progress and session.is_main:
            parts = []
            if items:
                parts.append(f"LSS mean {res['lss_mean']:.3f}" if res.get("lss_mean") is not None else "LSS n/a")
            if generation:
                parts.append(f"target share {res['generation']['share_mean']:.3f}")
            print(f"langneurons: steer {op}: {', '.join(parts)} ({res['seconds']} s)", file=sys.stderr)
    out = {"operators": results}
    if items:
        out["best"] = best_per_target(results, langs, "lss_by_target")
    if generation:
        shares = {op: {"share_by_target": r["generation"]["share"]} for op, r in results.items()}
        out["best_generation"] = best_per_target(shares, langs, "share_by_target")
        out["generation_baseline"] = gen0
    return out


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
