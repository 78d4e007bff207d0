"""Report sections of fine-tuning: experiments, evaluations, runs, per-run scores, masked-LoRA adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..helpers import Context, _dict, _e, _each, _h, _is_num, _mean, table


def _mean_sd(cell) -> Optional[str]:
    if not isinstance(cell, dict) or not _is_num(cell.get("mean")):
        return None
    sd = cell.get("sd")
    return f"{100 * cell['mean']:.1f} ± {100 * sd:.1f}" if _is_num(sd) else f"{100 * cell['mean']:.1f}"


def _diff_p(v) -> Optional[str]:
    if not isinstance(v, dict) or not _is_num(v.get("diff")):
        return None
    p = v.get("p")
    return f"{100 * v['diff']:+.1f}" + (f" (p={p:.3f})" if _is_num(p) else "")


def section_finetune_experiment(items: list, ctx: Context) -> str:
    def one(it, ctx):
        d = it.doc
        langs, conds, tab = d["languages"], d["conditions"], d["table"]
        out = [_h(it, f"{d.get('task')}: trained on {d.get('source')}, zero-shot elsewhere")]
        out.append(f'<p class="meta">model <code>{_e(d.get("model"))}</code>, neurons <code>{_e(d.get("neurons"))}'
                   f'</code>, MLP LoRA on {_e(d.get("mlp_modules"))}, seeds {_e(d.get("seeds"))}</p>')
        out.append("<h4>score (%), mean ± sd over seeds</h4>")
        out.append(table([[_mean_sd(_dict(tab.get(c)).get(l)) for l in langs] for c in conds], langs, conds,
                         "condition"))
        rows = [c for c in conds if c != "attn"]
        if rows:
            out.append("<h4>difference against attn (percentage points, paired bootstrap p)</h4>")
            out.append(table([[_diff_p(_dict(_dict(tab.get(c)).get(l)).get("vs_attn")) for l in langs]
                              for c in rows], langs, rows, "condition"))
        lvr = _dict(d.get("ln_vs_random"))
        if lvr:
            cols = langs + ["pooled-non-source"]
            out.append("<h4>language-neuron LoRA minus matched random-neuron LoRA (pp)</h4>")
            out.append(table([[_diff_p(_dict(per).get(l)) for l in cols] for per in lvr.values()], cols, list(lvr),
                             "mask languages"))
        verdict = _dict(d.get("verdict"))
        if verdict:
            out.append("<ul>" + "".join(
                f"<li>{_e(k)}: language neurons {'beat' if _dict(v).get('beats_random') else 'do not beat'} "
                "matched random neurons</li>" for k, v in verdict.items()) + "</ul>")
        out += ctx.figures(it, lambda p: p.name == "plot.png")
        return "\n".join(out)
    return _each(items, ctx, one)


def _metric_cols(metrics: dict) -> list[str]:
    cols: list[str] = []
    for m in metrics.values():
        for k, v in _dict(m).items():
            if _is_num(v) and k not in cols:
                cols.append(k)
    return cols


def section_finetune_eval(items: list, ctx: Context) -> str:
    def one(it, ctx):
        d = it.doc
        metrics = d["metrics"]
        cols = _metric_cols(metrics)
        out = [_h(it)]
        out.append(f'<p class="meta">run <code>{_e(d.get("run"))}</code>'
                   + (f', intervention <code>{_e(d["intervention"])}</code>' if d.get("intervention") else "")
                   + "</p>")
        out.append(table([[_dict(metrics[l]).get(k) for k in cols] for l in metrics], cols, list(metrics),
                         "language"))
        return "\n".join(out)
    return _each(items, ctx, one)


def section_finetune_runs(items: list, ctx: Context) -> str:
    rows, names = [], []
    for it in items:
        d = it.doc
        cfg = _dict(d.get("config"))
        names.append(str(Path(it.rel).parent.as_posix()))
        rows.append([d.get("task"), cfg.get("model"), cfg.get("neuron_langs") or "", d.get("steps"),
                     d.get("train_examples"), d.get("loss_first"), d.get("loss_last"), d.get("seconds"),
                     d.get("trainable_parameters"), d.get("masked")])
    return table(rows, ["task", "model", "mask languages", "steps", "examples", "loss first", "loss last",
                        "seconds", "trainable", "masked"], names, "run directory")


def section_finetune_run_scores(items: list, ctx: Context) -> str:
    langs: list[str] = []
    for it in items:
        for l in _dict(it.doc.get("metrics")) or it.doc["scores"]:
            if l not in langs:
                langs.append(l)
    rows, names = [], []
    for it in sorted(items, key=lambda i: (str(i.doc["run"].get("name")), str(i.doc["run"].get("seed")))):
        run, metrics = it.doc["run"], _dict(it.doc.get("metrics"))
        cells = []
        for l in langs:
            m = _dict(metrics.get(l))
            v = m.get("accuracy", m.get("f1"))
            if v is None and isinstance(it.doc["scores"].get(l), list):
                v = _mean(it.doc["scores"][l])
            cells.append(v if l in metrics or l in it.doc["scores"] else None)
        names.append(str(Path(it.rel).parent.as_posix()))
        rows.append([run.get("condition"), run.get("target"), run.get("seed"), *cells, it.doc.get("loss_last")])
    return ("<p class='meta'>accuracy (F1 for QA) per evaluated language</p>"
            + table(rows, ["condition", "target", "seed", *langs, "loss last"], names, "run", digits=3))


def section_masks(items: list, ctx: Context) -> str:
    rows, names = [], []
    for it in items:
        d = it.doc
        kept = sum(len(_dict(t).get("keep") or []) for t in d["targets"].values())
        names.append(it.rel)
        rows.append([", ".join(map(str, d.get("languages") or [])), ", ".join(map(str, d.get("mlp_modules") or [])),
                     len(d["targets"]), kept])
    return table(rows, ["languages", "MLP modules", "masked matrices", "units kept"], names, "file")
