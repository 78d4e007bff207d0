"""Evaluate a task over languages, without and with neuron interventions, and write the results.

Settings (``--setting``, a comma-separated list):

* ``none``: the model as it is (the baseline);
* ``self``: for task language ``x``, intervene on the neurons of ``x`` (the amplified or
  deactivated language is the task language);
* ``cross``: for task language ``x``, one run per other language ``y`` of the neuron set,
  intervening on the neurons of ``y``; the table also shows their mean.

Every setting scores the same documents (the first ``--limit`` of each language, after the
few-shot demonstrations are set aside), so differences between rows are the intervention's.

Output: ``OUT/TASK.json`` (format ``langneurons.task.v1``: one row per language and setting with
all metrics, plus the settings used) and ``OUT/TASK.md`` (one Markdown table per metric, rows =
settings, columns = languages). Both are written atomically, after every run has finished.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..atomic import atomic_write_text
from ..resume import Partial
from . import get_task
from ..runtime import Session

from ..artifacts import TASK_FORMAT as FORMAT, TASK_PARTIAL_FORMAT  # noqa: E402 - tags live in the registry
SETTINGS = ("none", "self", "cross")


@dataclass
class EvalConfig:
    task: str
    model: str
    out: Path
    langs: Optional[list[str]] = None
    data: Optional[str] = None
    split: Optional[str] = None
    limit: Optional[int] = None
    shots: int = 0
    batch_size: int = 8
    max_new_tokens: Optional[int] = None
    options: dict = field(default_factory=dict)
    neurons: Optional[Path] = None
    stats: Optional[Path] = None
    operator: Optional[str] = None
    settings: Optional[list[str]] = None
    site: str = "act"
    positions: str = "all"
    device: str = "auto"
    dtype: str = "auto"
    device_map: Optional[str] = None
    trust_remote_code: bool = False
    arch: Optional[str] = None
    progress: bool = True
    command_key: Optional[str] = None   # recorded in TASK.json (langneurons.outputs: reruns of the same command)


def parse_settings(text: Optional[str], have_neurons: bool) -> list[str]:
    """``"none,self"`` -> ``["none", "self"]``; default ``none`` (plus ``self`` with neurons)."""
    if not text:
        return ["none", "self"] if have_neurons else ["none"]
    out = []
    for s in text.split(","):
        s = s.strip()
        if s not in SETTINGS:
            raise UserError(f"unknown --setting {s!r}; use none, self, cross or a comma-separated list of them")
        if s not in out:
            out.append(s)
    return out


def _check(cfg: EvalConfig, task) -> None:
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError(f"--limit must be at least 1, got {cfg.limit}")
    if cfg.shots < 0:
        raise UserError(f"--shots must be 0 or more, got {cfg.shots}")
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    settings = cfg.settings or ["none"]
    wants_iv = any(s in ("self", "cross") for s in settings)
    if wants_iv and (cfg.neurons is None or not cfg.operator):
        raise UserError("--setting self/cross needs --neurons FILE and --operator OP (e.g. zero, set:p_max)")
    if not wants_iv and (cfg.neurons is not None or cfg.operator):
        raise UserError("--neurons/--operator given but --setting is none; add --setting self or cross")


def _split_selectable(data: Optional[str]) -> bool:
    """Whether ``--data`` lets the split vary (a directory or an ``hf:`` source without a split)."""
    if data is None:
        return True
    if data.startswith("hf:"):
        from .common import parse_hf_spec
        return parse_hf_spec(data)[2] is None
    return "{lang}" not in data and Path(data).is_dir()


def load_task_docs(task, cfg: EvalConfig, lang: str, options: dict) -> tuple[list, list, str]:
    """``(documents to score, few-shot demonstrations, where the demonstrations came from)``."""
    split = task.check_split(cfg.split)
    docs = task.load(cfg.data, lang, split, **options)
    demos, source = [], ""
    if cfg.shots:
        pool_split = task.fewshot_split(split) if _split_selectable(cfg.data) else None
        pool = None
        if pool_split is not None:
            if cfg.data is not None and not cfg.data.startswith("hf:"):
                # a directory: use the other split when its file is there (a bad file is an error)
                if task.local_file(Path(cfg.data), lang, pool_split).is_file():
                    pool = task.load(cfg.data, lang, pool_split, **options)
            else:
                try:  # a dataset may lack the split
                    pool = task.load(cfg.data, lang, pool_split, **options)
                except UserError:
                    pool = None
            if pool is not None:
                source = f"first {cfg.shots} of split {pool_split}"
        if pool is None or len(pool) < cfg.shots:
            if len(docs) <= cfg.shots:
                raise UserError(f"{task.name} {lang}: {len(docs)} documents cannot give {cfg.shots} shots and "
                                "leave any to score; lower --shots")
            demos, docs = docs[:cfg.shots], docs[cfg.shots:]
            source = f"first {cfg.shots} of the evaluated split (not scored)"
        else:
            demos = pool[:cfg.shots]
    if cfg.limit:
        docs = docs[:cfg.limit]
    return docs, demos, source


def _intervention(ns, stats, lang: str, cfg: EvalConfig):
    try:
        from ..intervene import Intervention
    except ImportError as e:
        raise UserError(f"interventions need langneurons.intervene, which cannot be imported ({e})") from None
    if lang not in ns.languages:
        raise UserError(f"neuron set {cfg.neurons} has no language {lang!r} (it has {', '.join(ns.languages)}); "
                        "identify neurons for it or drop it from --languages")
    return Intervention(neurons=ns, languages=[lang], operator=cfg.operator, stats=stats, site=cfg.site,
                        positions=cfg.positions)


def _split_metrics(result: dict) -> tuple[dict, dict]:
    metrics = {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    extra = {k: v for k, v in result.items() if k not in metrics}
    return metrics, extra


def evaluate_rows(task, scorer: Session, cfg: EvalConfig, langs: list[str], data: dict, options: dict,
                  ns=None, stats=None, log=None, done: Optional[dict] = None, on_row=None) -> list[dict]:
    """One row per (language, setting[, neuron language]) with the metrics of that run.

    Resuming: ``done`` maps ``"lang|setting|neurons_lang"`` to a finished row, used instead of
    evaluating it again; ``on_row(key, row)`` is called as each row finishes (to checkpoint it)."""
    settings = cfg.settings or ["none"]
    rows = []
    for lang in langs:
        docs, demos, _ = data[lang]
        runs: list[tuple[str, Optional[str]]] = []
        for s in settings:
            if s == "none":
                runs.append(("none", None))
            elif s == "self":
                runs.append(("self", lang))
            else:
                runs += [("cross", other) for other in ns.languages if other != lang]
        for setting, nlang in runs:
            key = f"{lang}|{setting}|{nlang}"
            if done and key in done:
                rows.append(done[key])
                continue
            iv = _intervention(ns, stats, nlang, cfg) if nlang is not None else None
            record = iv.to_dict() if iv is not None else None
            t0 = time.time()
            with scorer.intervened(iv):
                result = task.evaluate(scorer, docs, lang, demos, max_new_tokens=cfg.max_new_tokens, **options)
            metrics, extra = _split_metrics(result)
            row = {"lang": lang, "setting": setting, "neurons_lang": nlang, "n": len(docs), "metrics": metrics,
                   "seconds": round(time.time() - t0, 3)}
            row.update(extra)
            if record is not None:
                row["intervention"] = record
            rows.append(row)
            if on_row is not None:
                on_row(key, row)
            if log:
                head = task.metrics[0]
                log(f"{task.name} {lang} {setting}{'' if nlang is None else ':' + nlang}: "
                    f"{head} {metrics.get(head, float('nan')):.4f} (n={len(docs)})")
    return rows


def row_label(row: dict) -> str:
    if row["setting"] == "cross":
        return f"cross:{row['neurons_lang']}"
    return row["setting"]


def build_table(rows: list[dict], langs: list[str], metric: str) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Row labels and ``{label: {lang: value}}``; ``cross (mean)`` averages the cross rows per language."""
    labels: list[str] = []
    table: dict[str, dict[str, float]] = {}
    for r in rows:
        lab = row_label(r)
        if lab not in table:
            labels.append(lab)
            table[lab] = {}
        table[lab][r["lang"]] = r["metrics"].get(metric, float("nan"))
    cross = [lab for lab in labels if lab.startswith("cross:")]
    if cross:
        mean = {}
        for lang in langs:
            vals = [table[lab][lang] for lab in cross if lang in table[lab]]
            if vals:
                mean[lang] = sum(vals) / len(vals)
        labels.append("cross (mean)")
        table["cross (mean)"] = mean
    return labels, table


def _fmt(v: Optional[float], scale: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v * scale:.2f}"


def markdown(result: dict) -> str:
    """One Markdown table per metric: rows = settings, columns = languages."""
    langs = result["languages"]
    out = [f"## {result['task']}: {result.get('description', '')}", "",
           f"model `{result['model']['name_or_path']}`, split {result['split']}, "
           f"{result['shots']}-shot, limit {result['limit'] or 'none'}"]
    iv = result.get("intervention")
    if iv:
        out.append(f"intervention: operator `{iv['operator']}` at site `{iv['site']}`, positions {iv['positions']}, "
                   f"neurons `{iv['neurons']}`")
    out.append("")
    for metric in result["metrics"]:
        frac = metric in result.get("fraction_metrics", [])
        labels, table = build_table(result["rows"], langs, metric)
        out.append(f"### {metric}{' (%)' if frac else ''}")
        out.append("")
        out.append("| setting | " + " | ".join(langs) + " |")
        out.append("|---|" + "---:|" * len(langs))
        for lab in labels:
            out.append(f"| {lab} | " + " | ".join(_fmt(table[lab].get(lang), 100.0 if frac else 1.0)
                                                 for lang in langs) + " |")
        out.append("")
    return "\n".join(out)


def run_eval(cfg: EvalConfig, model=None, tokenizer=None) -> dict:
    """Run ``cfg`` and write ``OUT/TASK.json`` and ``OUT/TASK.md``; returns the result dict.

    All documents are loaded and checked before the model is, so a bad file fails in a second
    with one line and nothing written.
    """
    task = get_task(cfg.task)
    cfg.settings = cfg.settings or parse_settings(None, cfg.neurons is not None)
    _check(cfg, task)
    options = task.resolve_options(cfg.options or {})
    langs = list(cfg.langs or task.languages)
    if not langs:
        raise UserError(f"{task.name} has no default languages; give --languages a,b,...")
    if len(set(langs)) != len(langs):
        raise UserError(f"--languages lists a language twice: {','.join(langs)}")
    data = {lang: load_task_docs(task, cfg, lang, options) for lang in langs}
    for lang in langs:  # build one prompt now: a language without prompt words fails before the model loads
        docs = data[lang][0]
        if docs and hasattr(task, "requests"):
            task.requests(docs[0], lang, **options)
        elif docs:
            task.prompt(docs[0], lang, **options)

    ns = stats = None
    if cfg.neurons is not None:
        from ..neuronset import NeuronSet
        ns = NeuronSet.load(cfg.neurons)
        if cfg.stats is not None:
            from ..stats import ActivationStats
            stats = ActivationStats.load(cfg.stats)
        if "self" in cfg.settings:
            missing = [lang for lang in langs if lang not in ns.languages]
            if missing:
                raise UserError(f"neuron set {cfg.neurons} has no language {', '.join(missing)} for --setting self "
                                f"(it has {', '.join(ns.languages)}); drop them from --languages or use --setting cross")

    from ..runtime import ModelOptions, open_session
    scorer = open_session(ModelOptions(cfg.model, cfg.arch, cfg.dtype, cfg.device, cfg.device_map,
                                       cfg.trust_remote_code), arch_from=(cfg.neurons, cfg.stats),
                          batch_size=cfg.batch_size, model=model, tokenizer=tokenizer)
    model = scorer.model
    if ns is not None:
        ns.validate_for(scorer.adapter.num_layers, scorer.adapter.width)
    log = (lambda m: print(m, file=sys.stderr)) if cfg.progress and scorer.is_main else None
    t0 = time.time()
    # Resume: finished rows are checkpointed in OUT/.partial/TASK.json under a key of the model, the
    # documents, the options and the intervention; rerunning the same command skips them.
    from ..runtime import model_fingerprint
    key_doc = {"task": task.name, "model": model_fingerprint(model), "options": options, "shots": cfg.shots,
               "max_new_tokens": cfg.max_new_tokens, "operator": cfg.operator, "site": cfg.site,
               "positions": cfg.positions, "settings": list(cfg.settings or []),
               "neurons": None if cfg.neurons is None else hashlib.sha256(Path(cfg.neurons).read_bytes()).hexdigest(),
               "stats": None if stats is None else stats.fingerprint,
               "docs": {lang: hashlib.sha256(json.dumps(data[lang][:2], sort_keys=True, default=str).encode())
                        .hexdigest() for lang in langs}}
    partial = Partial(Path(cfg.out), task.name, key_doc, TASK_PARTIAL_FORMAT, "rows", write=scorer.is_main)
    if partial.parts and log:
        log(f"{task.name}: resuming: {len(partial.parts)} finished rows reused from {partial.path}")
    rows = evaluate_rows(task, scorer, cfg, langs, data, options, ns, stats, log, done=dict(partial.parts),
                         on_row=partial.add)

    result = result_record(task, cfg, model, data, langs, options, ns, rows, round(time.time() - t0, 3))
    if cfg.command_key:
        from ..outputs import KEY_FIELD
        result[KEY_FIELD] = cfg.command_key
    if not scorer.is_main:
        return result
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{task.name}.json", json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(out / f"{task.name}.md", markdown(result) + "\n")
    partial.clear()
    return result


def result_record(task, cfg: EvalConfig, model, data: dict, langs: list[str], options: dict, ns, rows: list[dict],
                  seconds: float) -> dict:
    """The ``TASK.json`` document: settings, one row per run, and the headline table."""
    result = {
        "format": FORMAT,
        "task": task.name,
        "description": task.description,
        "model": {"name_or_path": str(cfg.model), "model_type": getattr(model.config, "model_type", None),
                  "dtype": str(next(model.parameters()).dtype).replace("torch.", "")},
        "data": cfg.data or task.hf,
        "split": task.check_split(cfg.split),
        "limit": cfg.limit,
        "shots": cfg.shots,
        "fewshot_source": {lang: data[lang][2] for lang in langs} if cfg.shots else None,
        "options": options,
        "task_info": {lang: task.options_info(lang, **options) for lang in langs},
        "metrics": list(task.metrics),
        "fraction_metrics": [m for m in task.metrics if m in task.fraction_metrics],
        "languages": langs,
        "settings": list(cfg.settings),
        "intervention": None if ns is None else {
            "neurons": str(cfg.neurons), "stats": None if cfg.stats is None else str(cfg.stats),
            "operator": cfg.operator, "site": cfg.site, "positions": cfg.positions,
            "neuron_languages": ns.languages, "method": ns.method.get("name")},
        "padding": {"scoring": "right", "generation": "left"},
        "batch_size": cfg.batch_size,
        "rows": rows,
        "seconds": seconds,
    }
    labels, table = build_table(rows, langs, task.metrics[0])
    result["table"] = {"metric": task.metrics[0], "rows": labels, "columns": langs,
                       "values": [[table[lab].get(lang) for lang in langs] for lab in labels]}
    return result
