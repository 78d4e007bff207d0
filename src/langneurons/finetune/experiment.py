"""The cross-lingual experiment of [M25]: train on a source language, evaluate zero-shot elsewhere.

Conditions (every one trains attention LoRA plus a task head on the source-language data with the
same hyper-parameters and seed; they differ only in the MLP LoRA):

==================  ==================================================================================
``attn``            attention LoRA only (the baseline)
``ln-source``       + MLP LoRA masked to the source language's neurons (evaluated on every language)
``ln-target``       + MLP LoRA masked to the target language's neurons (one model per target language)
``ln-both``         + MLP LoRA masked to source ∪ target neurons (one model per target language)
``rand-source``     + MLP LoRA masked to a matched random set of the source language
``rand-target``     + ... matched random set of the target language
``rand-both``       + ... the union of both matched random sets
``attn+OP``         the ``attn`` model evaluated with a test-time intervention ``OP`` (e.g. ``set:mean``)
                    on the target language's neurons, values from the target language's statistics
==================  ==================================================================================

Random sets are :func:`langneurons.neuronset.random_control` of the neuron set with the run's seed
(same count per language and layer, drawn outside every language set). For a target condition the
source-language column repeats the source condition (target = source).

Statistics per language and condition, over seeds ``s`` and test examples ``i`` (score ``c[s, i]``:
1/0 correctness, or F1 for QA):

- ``mean`` and ``sd`` (ddof 1) over seeds of the per-seed score ``mean_i c[s, i]``;
- paired bootstrap of a difference between conditions X and Y, paired over examples and seeds:
  ``d_i = mean_s (c_X[s, i] - c_Y[s, i])``, ``D = mean_i d_i``; ``B`` resamples of the examples with
  replacement give ``D_b``; the 95 % interval is the 2.5 / 97.5 percentiles of ``D_b``, and the
  two-sided p-value ``(1 + #{|D_b - D| >= |D|}) / (B + 1)`` (the resampled differences centred on
  ``D`` stand in for the null distribution).

Outputs in OUT: ``results.json`` (everything, including per-example scores), ``table.md`` and
``plot.png``. Every run lives in ``OUT/runs/<condition>[-<target>]/seed<S>`` and is skipped when
already finished, so rerunning the experiment resumes it.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import UserError
from ..neuronset import NeuronSet, random_control
from ..atomic import atomic_write_text
from .train import FinetuneConfig, TaskModel, evaluate_sets, train

CONDITIONS = ("attn", "ln-source", "ln-target", "ln-both", "rand-source", "rand-target", "rand-both")
from ..artifacts import FINETUNE_EXPERIMENT_FORMAT as RESULTS_FORMAT, FINETUNE_RUN_SCORES_FORMAT  # noqa: E402


@dataclass
class ExperimentConfig:
    model: str
    train: str
    eval: dict                               # {lang: path}; neuron-set language codes
    neurons: str
    out: Path
    task: str = "sib200"
    source: str = "en"
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    conditions: list = field(default_factory=lambda: list(CONDITIONS))
    interventions: list = field(default_factory=list)     # operator specs, e.g. ["set:mean"]
    stats: Optional[str] = None
    mlp_modules: str = "gate"
    bootstrap: int = 2000
    eval_max_examples: Optional[int] = None
    eval_batch_size: int = 64
    eval_max_length: Optional[int] = None                 # tokens per evaluation example [training's]
    progress: bool = True
    train_options: dict = field(default_factory=dict)     # FinetuneConfig fields (lr, max_steps, ...)

    def validate(self) -> NeuronSet:
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad:
            raise UserError(f"unknown condition(s) {','.join(bad)}; use a subset of {','.join(CONDITIONS)}")
        if "attn" not in self.conditions:
            raise UserError("the conditions must include attn (the baseline every comparison is paired with)")
        if self.source not in self.eval:
            raise UserError(f"no evaluation data for the source language {self.source!r}; add --eval {self.source}=PATH")
        if not self.seeds:
            raise UserError("give at least one seed (--seeds 0,1,2)")
        ns = NeuronSet.load(self.neurons)
        missing = [c for c in self.eval if c not in ns.languages]
        if missing:
            raise UserError(f"the neuron set {self.neurons} has no language {','.join(missing)} (it has "
                            f"{','.join(ns.languages)}); name evaluation sets by the neuron set's language codes")
        if self.interventions and self.stats is None:
            raise UserError("--operator needs --stats DIR (activation statistics of the same model and site)")
        return ns


def _targets(cfg: ExperimentConfig) -> list[str]:
    return [c for c in cfg.eval if c != cfg.source]


def plan_runs(cfg: ExperimentConfig) -> list[dict]:
    """Every training run: ``{"name", "condition", "target", "seed", "langs" (mask languages),
    "random" (bool), "eval" (languages to evaluate)}``."""
    runs = []
    all_langs = list(cfg.eval)
    for s in cfg.seeds:
        for cond in cfg.conditions:
            if cond == "attn":
                runs.append(dict(name="attn", condition=cond, target=None, seed=s, langs=[], random=False,
                                 eval=all_langs))
            elif cond.endswith("-source"):
                runs.append(dict(name=cond, condition=cond, target=None, seed=s, langs=[cfg.source],
                                 random=cond.startswith("rand"), eval=all_langs))
            else:
                for t in _targets(cfg):
                    langs = [t] if cond.endswith("-target") else [cfg.source, t]
                    runs.append(dict(name=f"{cond}-{t}", condition=cond, target=t, seed=s, langs=langs,
                                     random=cond.startswith("rand"), eval=[t]))
    return runs


def _run_dir(cfg: ExperimentConfig, run: dict) -> Path:
    return Path(cfg.out) / "runs" / run["name"] / f"seed{run['seed']}"


def _neuron_file(cfg: ExperimentConfig, ns: NeuronSet, run: dict) -> Optional[Path]:
    if not run["langs"]:
        return None
    if not run["random"]:
        return Path(cfg.neurons)
    path = Path(cfg.out) / "random" / f"random-seed{run['seed']}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        random_control(ns, run["seed"]).save(path)
    return path


def _intervention_context(cfg, ns, stats, tm: TaskModel, op: str, lang: str):
    from ..intervene import Intervention
    iv = Intervention(neurons=ns, languages=[lang], operator=op, stats=stats, site=ns.site)
    return tm.intervention(iv)


def _load_eval(path: Path) -> Optional[dict]:
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return None


_WORKER: dict = {}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(max(1, threads))
    _WORKER.clear()


def _load_base_for(cfg: ExperimentConfig):
    from ..runtime import load_model, resolve_device, resolve_dtype
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except Exception:
        pass
    dev = resolve_device(cfg.train_options.get("device", "auto"))
    return load_model(cfg.model, dev, resolve_dtype(cfg.train_options.get("dtype", "auto"), dev))


def execute_run(cfg: ExperimentConfig, run: dict, base=None, ns: Optional[NeuronSet] = None, stats=None) -> dict:
    """Train one run (or load it when finished), evaluate it, write and return its ``eval_scores.json``.

    In a worker process the base model, neuron set and statistics are loaded once and kept.
    """
    rdir = _run_dir(cfg, run)
    ev_path = rdir / "eval_scores.json"
    ev = _load_eval(ev_path)
    if ev is not None:
        return ev
    if base is None:
        if "base" not in _WORKER:
            _WORKER["base"] = _load_base_for(cfg)
        base = _WORKER["base"]
    if ns is None:
        ns = _WORKER.setdefault("ns", NeuronSet.load(cfg.neurons))
    ops = list(cfg.interventions)
    if ops and stats is None:
        from ..stats import ActivationStats
        stats = _WORKER.setdefault("stats", ActivationStats.load(cfg.stats))
    base_model, tok = base
    eval_sets = {c: str(p) for c, p in cfg.eval.items()}
    nf = _neuron_file(cfg, ns, run)
    opts = dict(cfg.train_options)
    opts.update(model=cfg.model, task=cfg.task, train=cfg.train, out=rdir, seed=run["seed"], progress=False,
                neurons=str(nf) if nf else None, neuron_langs=",".join(run["langs"]) if run["langs"] else None,
                mlp_modules=cfg.mlp_modules)
    fcfg = FinetuneConfig.build(**opts)
    model = copy.deepcopy(base_model)
    c0 = time.process_time()
    tm = train(fcfg, model=model, tokenizer=tok)
    sets = [(c, eval_sets[c]) for c in run["eval"]]
    res = evaluate_sets(tm, sets, batch_size=cfg.eval_batch_size, max_examples=cfg.eval_max_examples,
                        max_length=cfg.eval_max_length)
    ev = {"format": FINETUNE_RUN_SCORES_FORMAT, "run": run, "scores": {c: r["correct"] for c, r in res.items()},
          "metrics": {c: {k: v for k, v in r.items() if k not in ("correct", "predictions")} for c, r in res.items()},
          "train_seconds": tm.record.get("seconds"), "loss_last": tm.record.get("loss_last")}
    if run["condition"] == "attn" and ops:
        ev["interventions"] = {}
        targets = _targets(cfg)
        for op in ops:
            r2 = evaluate_sets(tm, [(c, eval_sets[c]) for c in targets], batch_size=cfg.eval_batch_size,
                               max_examples=cfg.eval_max_examples, max_length=cfg.eval_max_length,
                               context_for=lambda lang, op=op: _intervention_context(cfg, ns, stats, tm, op, lang))
            ev["interventions"][op] = {c: r["correct"] for c, r in r2.items()}
    ev["cpu_seconds"] = round(time.process_time() - c0, 2)
    atomic_write_text(ev_path, json.dumps(ev))
    return ev


def run_experiment(cfg: ExperimentConfig, base=None, workers: int = 1, threads_per_worker: int = 1) -> dict:
    """Train and evaluate every run (resuming finished ones), then aggregate; returns the results.

    ``workers > 1`` runs that many training processes side by side (spawned, ``threads_per_worker``
    torch threads each): on a CPU, small models train faster as several one-thread processes than
    as one process with several threads. Results do not depend on ``workers``.
    """
    ns = cfg.validate()
    stats = None
    if cfg.interventions:
        from ..stats import ActivationStats
        stats = ActivationStats.load(cfg.stats)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(cfg)
    for run in runs:                      # random sets are written once, before any worker needs them
        if run["random"]:
            _neuron_file(cfg, ns, run)
    t_start = time.time()
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(runs), desc="experiment", unit="run", dynamic_ncols=True)
    evs: dict[int, dict] = {}
    pending = []
    for k, run in enumerate(runs):
        ev = _load_eval(_run_dir(cfg, run) / "eval_scores.json")
        if ev is not None:
            evs[k] = ev
            if bar is not None:
                bar.update(1)
        else:
            pending.append(k)
    if workers > 1 and len(pending) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(threads_per_worker,)) as ex:
            futures = {ex.submit(execute_run, cfg, runs[k]): k for k in pending}
            for f in as_completed(futures):
                evs[futures[f]] = f.result()
                if bar is not None:
                    bar.update(1)
    else:
        if pending and base is None:
            base = _load_base_for(cfg)
        for k in pending:
            evs[k] = execute_run(cfg, runs[k], base=base, ns=ns, stats=stats)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(run=f"{runs[k]['name']}/s{runs[k]['seed']}")
    if bar is not None:
        bar.close()
    scores: dict = {}        # scores[condition][lang][seed] = per-example scores
    for k in range(len(runs)):
        _collect_scores(scores, cfg, evs[k])
    results = aggregate(cfg, scores)
    results["seconds"] = round(time.time() - t_start, 1)
    results["train_seconds_total"] = round(sum(float(e.get("train_seconds") or 0) for e in evs.values()), 1)
    results["cpu_seconds_total"] = round(sum(float(e.get("cpu_seconds") or 0) for e in evs.values()), 1)
    write_outputs(cfg, results)
    return results


def _collect_scores(scores: dict, cfg: ExperimentConfig, ev: dict) -> None:
    run = ev["run"]
    s = run["seed"]
    cond = run["condition"]
    for lang, sc in ev["scores"].items():
        scores.setdefault(cond, {}).setdefault(lang, {})[s] = sc
        if cond.endswith("-source") and lang == cfg.source:
            # a target/both condition with target = source is the source condition
            for other in (cond.replace("-source", "-target"), cond.replace("-source", "-both")):
                if other in cfg.conditions:
                    scores.setdefault(other, {}).setdefault(lang, {})[s] = sc
    for op, per in ev.get("interventions", {}).items():
        for lang, sc in per.items():
            scores.setdefault(f"attn+{op}", {}).setdefault(lang, {})[s] = sc


# ------------------------------------------------------------------------------------ statistics
def paired_bootstrap(x: np.ndarray, y: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Paired bootstrap of ``mean(x) - mean(y)``; ``x``, ``y``: ``[S, N]`` (seeds x examples).

    ``d_i = mean_s (x[s, i] - y[s, i])``; resample examples ``i`` with replacement (vectorised:
    ``idx`` is ``[B, N]``). Returns the difference, its 95 % percentile interval and the two-sided
    p-value ``(1 + #{|D_b - D| >= |D|}) / (B + 1)``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"paired_bootstrap needs two [S, N] arrays of one shape, got {x.shape} and {y.shape}")
    d = (x - y).mean(axis=0)                        # [N]
    D = float(d.mean())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.shape[0], size=(n_boot, d.shape[0]))
    boot = d[idx].mean(axis=1)                      # [B]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    p = (1 + int(np.sum(np.abs(boot - D) >= abs(D) - 1e-12))) / (n_boot + 1) if D != 0 else 1.0
    return {"diff": D, "ci95": [float(lo), float(hi)], "p": float(p), "n": int(d.shape[0]), "seeds": int(x.shape[0])}


def _matrix(per_seed: dict, seeds: list) -> Optional[np.ndarray]:
    if not all(s in per_seed for s in seeds):
        return None
    rows = [per_seed[s] for s in seeds]
    if len({len(r) for r in rows}) != 1:
        return None
    return np.asarray(rows, dtype=np.float64)


def aggregate(cfg: ExperimentConfig, scores: dict) -> dict:
    seeds = list(cfg.seeds)
    langs = list(cfg.eval)
    rows = [c for c in cfg.conditions] + [f"attn+{op}" for op in cfg.interventions]
    table = {}
    for cond in rows:
        table[cond] = {}
        for lang in langs:
            m = _matrix(scores.get(cond, {}).get(lang, {}), seeds)
            if m is None:
                continue
            per_seed = m.mean(axis=1)
            cell = {"mean": float(per_seed.mean()), "sd": float(per_seed.std(ddof=1)) if len(seeds) > 1 else 0.0,
                    "per_seed": per_seed.tolist(), "n": int(m.shape[1])}
            if cond != "attn":
                base = _matrix(scores.get("attn", {}).get(lang, {}), seeds)
                if base is not None:
                    cell["vs_attn"] = paired_bootstrap(m, base, cfg.bootstrap, seed=0)
            table[cond][lang] = cell
    # language neurons against matched random neurons
    ln_vs_rand = {}
    for kind in ("source", "target", "both"):
        a, b = f"ln-{kind}", f"rand-{kind}"
        if a not in cfg.conditions or b not in cfg.conditions:
            continue
        ln_vs_rand[kind] = {}
        xs, ys = [], []
        for lang in langs:
            x = _matrix(scores.get(a, {}).get(lang, {}), seeds)
            y = _matrix(scores.get(b, {}).get(lang, {}), seeds)
            if x is None or y is None:
                continue
            ln_vs_rand[kind][lang] = paired_bootstrap(x, y, cfg.bootstrap, seed=0)
            if lang != cfg.source:
                xs.append(x)
                ys.append(y)
        if xs:
            ln_vs_rand[kind]["pooled-non-source"] = paired_bootstrap(np.concatenate(xs, 1), np.concatenate(ys, 1),
                                                                     cfg.bootstrap, seed=0)
    verdict = _verdict(ln_vs_rand, cfg.source)
    return {"format": RESULTS_FORMAT, "task": cfg.task, "source": cfg.source, "languages": langs, "seeds": seeds,
            "conditions": rows, "model": cfg.model, "neurons": str(cfg.neurons), "mlp_modules": cfg.mlp_modules,
            "train_options": {k: v for k, v in cfg.train_options.items()}, "bootstrap": cfg.bootstrap,
            "table": table, "ln_vs_random": ln_vs_rand, "verdict": verdict,
            "scores": {c: {l: {str(s): v for s, v in d.items()} for l, d in per.items()} for c, per in scores.items()}}


def _verdict(ln_vs_rand: dict, source: str) -> dict:
    out = {}
    for kind, per in ln_vs_rand.items():
        langs = [l for l in per if l not in ("pooled-non-source",) and (kind == "source" or l != source)]
        better = [l for l in langs if per[l]["diff"] > 0 and per[l]["p"] < 0.05]
        worse = [l for l in langs if per[l]["diff"] < 0 and per[l]["p"] < 0.05]
        pooled = per.get("pooled-non-source")
        out[kind] = {"languages": len(langs), "significantly_better": better, "significantly_worse": worse,
                     "pooled_non_source": pooled,
                     "beats_random": bool(pooled and pooled["diff"] > 0 and pooled["p"] < 0.05)}
    return out


# ------------------------------------------------------------------------------------ outputs
def _fmt_pct(v: float) -> str:
    return f"{100 * v:.1f}"


def markdown_table(results: dict) -> str:
    langs = results["languages"]
    lines = [f"# Zero-shot cross-lingual transfer ({results['task']}, trained on {results['source']})", "",
             f"Seeds: {', '.join(map(str, results['seeds']))}. Cells: mean ± sd over seeds (score in %); "
             "Δ: paired bootstrap difference against `attn` (95 % CI, p), paired over examples and seeds.", "",
             "| condition | " + " | ".join(langs) + " |", "|---|" + "---|" * len(langs)]
    for cond in results["conditions"]:
        cells = []
        for lang in langs:
            c = results["table"].get(cond, {}).get(lang)
            cells.append("" if c is None else f"{_fmt_pct(c['mean'])} ± {_fmt_pct(c['sd'])}")
        lines.append(f"| {cond} | " + " | ".join(cells) + " |")
    lines += ["", "Difference against `attn` (percentage points; * p < 0.05):", "",
              "| condition | " + " | ".join(langs) + " |", "|---|" + "---|" * len(langs)]
    for cond in results["conditions"]:
        if cond == "attn":
            continue
        cells = []
        for lang in langs:
            v = results["table"].get(cond, {}).get(lang, {}).get("vs_attn")
            cells.append("" if v is None else f"{100 * v['diff']:+.1f}{'*' if v['p'] < 0.05 else ''} "
                                              f"[{100 * v['ci95'][0]:+.1f}, {100 * v['ci95'][1]:+.1f}]")
        lines.append(f"| {cond} | " + " | ".join(cells) + " |")
    if results["ln_vs_random"]:
        cols = langs + ["pooled-non-source"]
        lines += ["", "Language-neuron LoRA minus matched random-neuron LoRA (percentage points, p):", "",
                  "| mask languages | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for kind, per in results["ln_vs_random"].items():
            cells = []
            for lang in cols:
                v = per.get(lang)
                cells.append("" if v is None else f"{100 * v['diff']:+.1f} (p={v['p']:.3f})")
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        lines.append("")
        for kind, v in results["verdict"].items():
            pooled = v["pooled_non_source"]
            pooled_txt = "" if pooled is None else (f"pooled over non-source languages {100 * pooled['diff']:+.1f} pp "
                                                    f"(95 % CI {100 * pooled['ci95'][0]:+.1f} to "
                                                    f"{100 * pooled['ci95'][1]:+.1f}, p={pooled['p']:.3f}); ")
            lines.append(f"- {kind}: language neurons {'beat' if v['beats_random'] else 'do not beat'} matched random "
                         f"neurons: {pooled_txt}significantly better in {len(v['significantly_better'])} and worse in "
                         f"{len(v['significantly_worse'])} of {v['languages']} languages.")
    return "\n".join(lines) + "\n"


def plot_results(results: dict, path: Path) -> None:
    from ..plots import plot_bars
    langs, conds, table = results["languages"], results["conditions"], results["table"]
    cell = lambda c, lang, key, default: 100 * table.get(c, {}).get(lang, {}).get(key, default)  # noqa: E731
    plot_bars([[cell(c, lang, "mean", np.nan) for lang in langs] for c in conds], langs, path, series=conds,
              errors=[[cell(c, lang, "sd", 0.0) for lang in langs] for c in conds], ylabel="score (%)",
              title=f"{results['task']}: trained on {results['source']}, zero-shot elsewhere "
                    f"({len(results['seeds'])} seeds, mean ± sd)")


def write_outputs(cfg: ExperimentConfig, results: dict) -> None:
    out = Path(cfg.out)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out / "table.md", markdown_table(results))
    plot_results(results, out / "plot.png")
