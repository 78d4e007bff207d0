"""Report sections of the core pipeline: statistics, neuron sets, interventions, perplexity, steering,
downstream tasks, tiny models, and the generic fallback."""

from __future__ import annotations

from typing import Any

from ..helpers import (Context, _ci, _dict, _e, _each, _fmt, _h, _heatmap_html, _is_matrix, _is_num, _kv,
                       _plain, _plot_to_html, matrix_table, table)


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
                   + (f" ({_e(_plain(params))})" if params else "")
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


def rows_ok(ci, rows) -> bool:
    """Whether an interval matrix ``[row][col] -> [lo, hi]`` has one row per label."""
    return isinstance(rows, list) and len(ci) == len(rows) and all(isinstance(r, list) for r in ci)


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
            out.append(_kv([(k, v) for k, v in dom.items() if not isinstance(v, (list, dict))]
                           + [(k, _plain(v)) for k, v in dom.items() if k.endswith("_ci95")]))
        vs = _dict(d.get("vs_random"))
        if vs:
            vs_rows = [[_ci(_dict(v).get("delta_nll"), _dict(v).get("delta_nll_ci95")),
                        _ci(_dict(v).get("random_delta_nll"), _dict(v).get("random_delta_nll_ci95")),
                        _ci(_dict(v).get("difference"), _dict(v).get("difference_ci95")),
                        _dict(v).get("separated")] for v in vs.values()]
            seeds = next((_dict(v).get("seeds") for v in vs.values()), None)
            out.append("<h4>own-language damage against random neuron sets of the same size per layer "
                       "(ΔNLL, nats/token; 95% intervals over held-out windows"
                       + (f", {seeds} random seeds" if seeds else "") + ")</h4>")
            out.append(table(vs_rows, ["own neurons", "random neurons", "difference", "separated"], list(vs),
                             "language"))
        sw = _dict(d.get("sweep"))
        if sw.get("operators"):
            ops = [o for o in sw["operators"] if isinstance(o, str)]

            def cell(key, op):
                v = _dict(_dict(sw.get(key)).get(op))
                return _ci(v.get("value"), v.get("ci95"))
            dom_rows = [_dict(_dict(sw.get("row_dominance")).get(op)) for op in ops]
            out.append("<h4>deactivation-value sweep: own- vs other-language damage per operator (mean ΔNLL, "
                       "nats/token; 95% intervals paired over windows)</h4>")
            out.append(table([[cell("own", op), cell("other", op), cell("selectivity", op),
                               f"{r.get('count')}/{r.get('of')}" if r else None] for op, r in zip(ops, dom_rows)],
                             ["own language", "other languages", "selectivity (own - other)", "row dominance"],
                             ops, "operator"))
        ci = d.get("delta_nll_ci95")
        if isinstance(ci, list) and rows_ok(ci, rows):
            cells = [[_ci(v, c) for v, c in zip(vr, cr)] for vr, cr in zip(d["delta_nll"], ci)]
            out.append("<h4>change in mean NLL with 95% intervals (paired bootstrap over held-out windows)</h4>")
            out.append(table(cells, cols, rows, "rows \\ columns"))
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
        by_target_rows, by_target_names, gen_rows, gen_names, pairs = [], [], [], [], {}
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
                bci = _dict(r.get("lss_by_target_ci95"))
                by_target_rows.append([_ci(bt.get(t), bci.get(t), 2) if bci else bt.get(t) for t in langs]
                                      + [_ci(r.get("lss_mean"), r.get("lss_mean_ci95"), 2)])
                by_target_names.append(op)
            g = r.get("generation")
            if isinstance(g, dict) and isinstance(g.get("share"), dict) and langs:
                cis = _dict(g.get("share_ci95"))
                gen_rows.append([_ci(g["share"].get(t), cis.get(t), 2) if cis else g["share"].get(t) for t in langs]
                                + [_ci(g.get("share_mean"), g.get("share_mean_ci95"), 2)])
                gen_names.append(op)
                for t, ps in _dict(g.get("pairs")).items():
                    pairs.setdefault(t, {})[op] = [_dict(pr) for pr in (ps or [])]
        if by_target_rows:
            out.append("<h4>mean LSS per target language (95% intervals over cloze items)</h4>")
            out.append(table(by_target_rows, langs + ["mean"], by_target_names, "operator"))
        if gen_rows:
            base = d.get("generation_baseline")
            if isinstance(base, dict) and isinstance(base.get("share"), dict):
                bci = _dict(base.get("share_ci95"))
                g0 = next((_dict(_dict(r).get("generation")) for r in ops.values()), {})
                gen_rows.insert(0, [_ci(base["share"].get(t), bci.get(t), 2) if bci else base["share"].get(t)
                                    for t in langs]
                                + [_ci(g0.get("baseline_share_mean"), g0.get("baseline_share_mean_ci95"), 2)])
                gen_names.insert(0, "unsteered")
            out.append("<h4>share of generations identified as the target language (95% intervals over "
                       "generations, paired with the unsteered runs)</h4>")
            out.append(table(gen_rows, langs + ["mean"], gen_names, "operator"))
        if pairs:
            # per target, the operator that steered generations most (best_generation), its first two
            # pairs with a non-empty continuation on either side
            best_gen = _dict(d.get("best_generation"))
            rows, labels = [], []
            for t, by_op in pairs.items():
                op = _dict(best_gen.get(t)).get("operator") or next(iter(by_op))
                shown = [pr for pr in by_op.get(op, []) if (pr.get("unsteered") or "").strip()
                         or (pr.get("steered") or "").strip()][:2]
                for pr in shown:
                    labels.append(t)
                    rows.append([op, repr(pr.get("prompt", "")), pr.get("unsteered") or "(empty)",
                                 pr.get("unsteered_label"), pr.get("steered") or "(empty)", pr.get("steered_label")])
            if rows:
                out.append("<h4>steered vs unsteered generations (same prompt and sampling seed; per target, the "
                           "operator with the highest target share)</h4>")
                out.append(table(rows, ["operator", "prompt", "unsteered", "identified", "steered", "identified"],
                                 labels, "target"))
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
    """A tiny-train model: its recipe as a table, and whether it learnt its languages (held-out
    perplexity and the language-ID share of continuations, with intervals, and a few continuations)."""
    def one(it, ctx):
        d = it.doc
        cfg = _dict(d.get("config"))
        out = [_h(it, "tiny-train model")]
        out.append(_kv([("languages", ", ".join(d["languages"])), ("steps", cfg.get("steps")),
                        ("train seconds", d.get("train_seconds")), ("loss first", d.get("loss_first")),
                        ("loss last 50", d.get("loss_last_50"))]))
        recipe = [(k, cfg.get(k)) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                             "num_heads", "num_kv_heads", "context", "batch_per_language", "lr",
                                             "warmup", "weight_decay", "holdout", "seed") if k in cfg]
        if recipe:
            out.append("<h4>recipe</h4>" + table([[v] for _, v in recipe], ["value"], [k for k, _ in recipe],
                                                 "setting", digits=".4g"))
        h = _dict(d.get("heldout"))
        ppl, share = _dict(h.get("ppl")), _dict(h.get("lid_share"))
        langs = list(dict.fromkeys([*ppl, *share]))
        if langs:
            rows = [[_ci(ppl.get(c), _dict(h.get("ppl_ci95")).get(c), 1), _dict(h.get("windows")).get(c),
                     _ci(share.get(c), _dict(h.get("lid_share_ci95")).get(c), 2),
                     _dict(h.get("generations")).get(c)] for c in langs]
            out.append(f"<h4>held-out evaluation (windows of {_e(h.get('window'))} tokens; 95% bootstrap "
                       "intervals)</h4>")
            out.append(table(rows, ["perplexity", "windows", "language-ID share of continuations", "continuations"],
                             langs, "language"))
            if _is_num(h.get("lid_share_mean")):
                mean = _ci(h["lid_share_mean"], h.get("lid_share_mean_ci95"), 2)
                out.append(f'<p class="meta">mean language-ID share {_e(mean)}'
                           " (continuations of held-out line prefixes sampled at temperature 1, identified "
                           "among the trained languages)</p>")
            elif h.get("lid_skipped"):
                out.append(f'<p class="meta">language-ID share not measured: {_e(h["lid_skipped"])}</p>')
            ex = _dict(h.get("examples"))
            ex_rows = [[c, _dict(e).get("prompt"), _dict(e).get("continuation")]
                       for c in langs for e in (ex.get(c) or [])[:1]]
            if ex_rows:
                out.append("<h4>continuations of held-out prefixes (unsteered)</h4>")
                out.append(table([r[1:] for r in ex_rows], ["prefix", "continuation"], [r[0] for r in ex_rows],
                                 "language"))
        return "\n".join(out)
    return _each(items, ctx, one)
