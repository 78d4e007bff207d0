"""Report sections of the core pipeline: statistics, neuron sets, interventions, perplexity, steering,
downstream tasks, tiny models, and the generic fallback."""

from __future__ import annotations

import json
from typing import Any

from ..helpers import (Context, _dict, _e, _each, _fmt, _h, _heatmap_html, _is_matrix, _is_num, _kv,
                       _plot_to_html, matrix_table, table)


def section_generic(items: list, ctx: Context) -> str:
    """Any kind: its scalar top-level fields."""
    def one(it, ctx):
        return _h(it) + _kv([(k, v) for k, v in it.doc.items() if not isinstance(v, (dict, list))])
    return _each(items, ctx, one)


def section_stats(items: list, ctx: Context) -> str:
    def one(it, ctx):
        d = it.doc
        model = _dict(d.get("model"))
        out = [_h(it)]
        out.append(_kv([("model", model.get("name_or_path")), ("model type", model.get("model_type")),
                        ("layers", model.get("num_layers")), ("width", model.get("width")),
                        ("site", model.get("site") or d.get("site")), ("unit", d.get("unit")),
                        ("window", d.get("window")), ("dtype", d.get("dtype")), ("format", d.get("format"))]))
        langs = d.get("languages")
        if isinstance(langs, dict) and langs:
            rows = []
            for code, info in langs.items():
                info = _dict(info)
                rows.append([code, info.get("n_tokens"), info.get("n_windows", info.get("n_sentences")),
                             info.get("source")])
            out.append(table([r[1:] for r in rows], ["tokens", "windows", "source"], [r[0] for r in rows],
                             "language"))
        return "\n".join(out)
    return _each(items, ctx, one)


def section_neurons(items: list, ctx: Context) -> str:
    def one(it, ctx):
        from ...neuronset import NeuronSet
        out = [_h(it)]
        try:
            ns = NeuronSet.load(it.path)
        except Exception as e:  # noqa: BLE001 - a broken file is reported, not fatal
            return out[0] + f'<p class="err">cannot read this neuron set: {_e(e)}</p>'
        params = ns.method.get("params") or {}
        out.append(f'<p class="meta">method <code>{_e(ns.method.get("name"))}</code>'
                   + (f" ({_e(json.dumps(params, ensure_ascii=False)[:300])})" if params else "")
                   + f"; model <code>{_e(ns.model.get('name_or_path'))}</code> {ns.num_layers} layers x "
                   f"{ns.width}, site {_e(ns.site)}; {ns.unique_total()} distinct neurons</p>")
        counts = ns.counts()
        langs = ns.languages
        rows = [[ns.total(c)] + [int(x) for x in counts[c].tolist()] for c in langs]
        out.append(table(rows, ["total"] + [f"L{l}" for l in range(ns.num_layers)], langs, "language", digits=0))
        if langs and any(ns.total(c) for c in langs):
            from ...plots import plot_layer_distribution
            out.append(_plot_to_html(lambda p: plot_layer_distribution(ns, p), f"neurons per layer: {it.rel}"))
        return "\n".join(out)
    return _each(items, ctx, one)


def section_intervention(items: list, ctx: Context) -> str:
    def one(it, ctx):
        d = it.doc
        n = _dict(d.get("neurons"))
        return _h(it) + _kv([("operator", d.get("operator")), ("languages", ", ".join(map(str, d["languages"]))),
                             ("site", d.get("site")), ("positions", d.get("positions")),
                             ("neurons", n.get("path")), ("method", n.get("method")), ("counts", n.get("counts")),
                             ("statistics", _dict(d.get("stats")).get("directory"))])
    return _each(items, ctx, one)


def _row_col_labels(d: dict) -> tuple[Any, Any]:
    rows, cols = d.get("rows"), d.get("columns")
    langs = d.get("languages")
    if isinstance(langs, dict):
        rows = rows if isinstance(rows, list) else langs.get("rows")
        cols = cols if isinstance(cols, list) else langs.get("columns")
    elif isinstance(langs, list):
        rows = rows if isinstance(rows, list) else langs
        cols = cols if isinstance(cols, list) else langs
    return rows, cols


def section_ppl(items: list, ctx: Context) -> str:
    titles = {"ppl": "perplexity exp(mean NLL)", "delta_ppl": "change in perplexity vs baseline",
              "delta": "change vs baseline", "mean_nll": "mean NLL", "delta_nll": "change in mean NLL"}

    def one(it, ctx):
        d = it.doc
        out = [_h(it)]
        settings = _dict(d.get("settings"))
        if settings:
            out.append(f'<p class="meta">operator <code>{_e(settings.get("operator"))}</code>, neurons '
                       f'<code>{_e(settings.get("neurons"))}</code> ({_e(settings.get("neuron_method"))}), '
                       f'site {_e(settings.get("site"))}, window {_e(settings.get("window"))}</p>')
        rows, cols = _row_col_labels(d)
        shown = False
        for key in ("ppl", "delta_ppl", "delta", "delta_nll", "mean_nll"):
            m = d.get(key)
            if _is_matrix(m):
                out.append(f"<h4>{_e(titles[key])} (rows: deactivated neurons; columns: evaluated language)</h4>")
                out.append(matrix_table(m, rows, cols, "rows \\ columns"))
                shown = True
        dom = d.get("diagonal_dominance")
        if isinstance(dom, dict):
            out.append(_kv([(k, v) for k, v in dom.items() if not isinstance(v, (list, dict))]))
        figs = ctx.figures(it, lambda p: p.name.startswith("ppl"))
        out += figs
        if not figs and shown:
            m = next(d[k] for k in ("delta_ppl", "delta", "ppl") if _is_matrix(d.get(k)))
            out.append(_heatmap_html(m, rows, cols, "perplexity matrix"))
        if not shown and not figs:
            out.append('<p class="meta">no matrix found in this file</p>')
        return "\n".join(out)
    return _each(items, ctx, one)


def section_steer(items: list, ctx: Context) -> str:
    def one(it, ctx):
        d = it.doc
        out = [_h(it)]
        langs = d.get("languages") if isinstance(d.get("languages"), list) else None
        ops = _dict(d.get("operators"))
        if _is_matrix(d.get("lss")):  # a flat record with one matrix
            out.append(matrix_table(d["lss"], langs, langs, "source \\ target"))
        by_target_rows, by_target_names, gen_rows, gen_names = [], [], [], []
        for op, r in ops.items():
            if not isinstance(r, dict):
                continue
            if _is_matrix(r.get("lss")):
                mean = r.get("lss_mean")
                out.append(f"<h4>LSS, operator <code>{_e(op)}</code>"
                           + (f" (mean {_e(_fmt(mean))})" if _is_num(mean) else "") + "</h4>")
                out.append(matrix_table(r["lss"], langs, langs, "source \\ target"))
            bt = r.get("lss_by_target")
            if isinstance(bt, dict) and langs:
                by_target_rows.append([bt.get(t) for t in langs])
                by_target_names.append(op)
            g = r.get("generation")
            if isinstance(g, dict) and isinstance(g.get("share"), dict) and langs:
                gen_rows.append([g["share"].get(t) for t in langs])
                gen_names.append(op)
        if by_target_rows:
            out.append("<h4>mean LSS per target language</h4>")
            out.append(table(by_target_rows, langs, by_target_names, "operator"))
        if gen_rows:
            base = d.get("generation_baseline")
            if isinstance(base, dict) and isinstance(base.get("share"), dict):
                gen_rows.insert(0, [base["share"].get(t) for t in langs])
                gen_names.insert(0, "baseline")
            out.append("<h4>share of generations in the target language</h4>")
            out.append(table(gen_rows, langs, gen_names, "operator"))
        best = d.get("best")
        if isinstance(best, dict) and best:
            rows = [[_dict(b).get("operator"), _dict(b).get("value")] for b in best.values()]
            out.append("<h4>best operator per target</h4>")
            out.append(table(rows, ["operator", "value"], list(best), "target"))
        if not ops and not _is_matrix(d.get("lss")):
            for k, v in d.items():   # unknown layout: any 2-D matrix at the top level
                if _is_matrix(v):
                    out.append(f"<h4>{_e(k)}</h4>" + matrix_table(v, langs, langs))
        out += ctx.figures(it, lambda p: p.name.startswith("steer"))
        return "\n".join(out)
    return _each(items, ctx, one)


def section_task(items: list, ctx: Context) -> str:
    def one(it, ctx):
        from ...tasks.runner import build_table
        d = it.doc
        langs = d.get("languages") or []
        rows = d.get("rows") or []
        model = _dict(d.get("model"))
        out = [_h(it, f"{d.get('task')}: {d.get('description', '')}")]
        meta = (f"model <code>{_e(model.get('name_or_path'))}</code>, split {_e(d.get('split'))}, "
                f"{_e(d.get('shots', 0))}-shot, limit {_e(d.get('limit') or 'none')}")
        iv = d.get("intervention")
        if isinstance(iv, dict):
            meta += (f"; intervention <code>{_e(iv.get('operator'))}</code> at {_e(iv.get('site'))} "
                     f"({_e(iv.get('positions'))} positions), neurons <code>{_e(iv.get('neurons'))}</code>")
        out.append(f'<p class="meta">{meta}</p>')
        frac = set(d.get("fraction_metrics") or [])
        n = {r["lang"]: r.get("n") for r in rows if isinstance(r, dict) and "lang" in r}
        for metric in d.get("metrics") or []:
            labels, tab = build_table(rows, langs, metric)
            scale = 100.0 if metric in frac else 1.0
            vals = [[None if tab[lab].get(c) is None else tab[lab][c] * scale for c in langs] for lab in labels]
            out.append(f"<h4>{_e(metric)}{' (%)' if metric in frac else ''}</h4>")
            out.append(table(vals, [f"{c} (n={n.get(c)})" for c in langs], labels, "setting", digits=2))
        return "\n".join(out)
    return _each(items, ctx, one)


def section_tiny(items: list, ctx: Context) -> str:
    def one(it, ctx):
        d = it.doc
        cfg = d["config"]
        return _h(it) + _kv([("languages", ", ".join(d["languages"])), ("steps", cfg.get("steps")),
                             ("layers", cfg.get("num_layers", cfg.get("layers"))), ("seed", cfg.get("seed")),
                             ("train seconds", d.get("train_seconds")), ("loss first", d.get("loss_first")),
                             ("loss last 50", d.get("loss_last_50"))])
    return _each(items, ctx, one)
