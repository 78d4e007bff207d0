"""Report sections of the bridge probes: probes, selection, rankings, spectra, BLI and MRC."""

from __future__ import annotations

from ..helpers import (Context, _dict, _e, _each, _h, _heatmap_html, _is_matrix, _is_num, _pct, _plot_to_html,
                       img_png, matrix_table, table)


def section_probes(items: list, ctx: Context) -> str:
    rows, names = [], []
    for it in items:
        d = it.doc
        names.append(it.rel)
        rows.append([f"{d['src']}->{d['trg']}", d.get("filter"), d.get("site"), d.get("n_candidates"),
                     d.get("n_correct"), _pct(d.get("translation_accuracy")), d.get("n_probes", len(d["probes"]))])
    return table(rows, ["pair", "filter", "site", "candidates", "correct", "translation accuracy (%)", "probes"],
                 names, "file", digits=1)


def section_probe_summary(items: list, ctx: Context) -> str:
    def one(it, ctx):
        pairs = it.doc["pairs"]
        rows = [[_dict(v).get("n_candidates"), _dict(v).get("n_correct"), _pct(_dict(v).get("translation_accuracy")),
                 _dict(v).get("n_probes")] for v in pairs.values()]
        return (_h(it) + f'<p class="meta">model <code>{_e(it.doc.get("model"))}</code>, filter '
                f'{_e(it.doc.get("filter"))}, split {_e(it.doc.get("split"))}</p>'
                + table(rows, ["candidates", "correct", "translation accuracy (%)", "probes"], list(pairs), "pair",
                        digits=1))
    return _each(items, ctx, one)


def section_selection(items: list, ctx: Context) -> str:
    def one(it, ctx):
        pairs = it.doc["pairs"]
        cands: list[str] = []
        for v in pairs.values():
            cands += [c for c in _dict(_dict(v).get("scores")) if c not in cands]
        rows = [[_dict(v).get("selected")] + [_dict(_dict(v).get("scores")).get(c) for c in cands]
                for v in pairs.values()]
        layers = it.doc.get("layers")
        span = f", layers {layers[0]}-{layers[-1]}" if isinstance(layers, list) and layers else ""
        return (_h(it) + f'<p class="meta">HSIC {_e(it.doc.get("hsic"))}{_e(span)}; scores per candidate bridge</p>'
                + table(rows, ["selected"] + cands, list(pairs), "pair", digits=".4g"))
    return _each(items, ctx, one)


def section_ranking(items: list, ctx: Context) -> str:
    def one(it, ctx):
        d = it.doc
        ranking = [r for r in d["ranking"] if isinstance(r, dict)]
        out = [_h(it, f"bridge candidates for {d['src']} -> {d['trg']}: selected {d.get('selected')}")]
        out.append(table([[r.get("rank"), r.get("score"), len(r.get("layers_used") or [])] for r in ranking],
                         ["rank", "score", "layers used"], [r.get("bridge") for r in ranking], "bridge",
                         digits=".4g"))
        series = {}
        for r in ranking:
            per = [p for p in (r.get("per_layer") or []) if isinstance(p, dict) and _is_num(p.get("layer"))]
            if per:
                series[str(r.get("bridge"))] = ([p["layer"] for p in per], [p.get("score") for p in per])
        figs = ctx.figures(it, lambda p: p.stem == it.path.stem)
        out += figs
        if not figs and ranking:
            from ...bridge.select import plot_ranking
            doc = {**d, "ranking": [{**r, "score": float("nan") if r.get("score") is None else r["score"]}
                                    for r in ranking]}
            out.append(_plot_to_html(lambda p: plot_ranking(doc, p), f"bridge scores {d['src']}->{d['trg']}"))
        if any(v is not None for _, vals in series.values() for v in vals):
            from ...plots import plot_layer_lines
            out.append(_plot_to_html(lambda p: plot_layer_lines(series, p, ylabel="layer score (HSIC)",
                                                                title=f"per-layer bridge scores "
                                                                      f"{d['src']}->{d['trg']}"),
                                     f"per-layer scores: {it.rel}"))
        return "\n".join(out)
    return _each(items, ctx, one)


def section_spectrum(items: list, ctx: Context) -> str:
    specs = [("overlap", 0, "d", "top-prob neuron overlap |T_k ∩ T_k'|"),
             ("cosine", 3, ".2f", "cosine of activation probabilities on T_k ∩ T_k'"),
             ("jaccard", 3, ".2f", "Jaccard of top-prob neuron sets"),
             ("hsic", ".3g", ".2e", "HSIC layer score")]

    def one(it, ctx):
        d = it.doc
        langs = d["languages"]
        out = [_h(it)]
        figs = {p.stem: p for p in ctx.pngs if p.parent == it.path.parent and p.name.startswith("spectrum_")}
        for key, digits, fmt, title in specs:
            m = d.get(key)
            if not _is_matrix(m):
                continue
            out.append(f"<h4>{_e(title)}</h4>")
            out.append(matrix_table(m, langs, langs, "", digits))
            p = figs.get(f"spectrum_{key}")
            if p is not None:
                ctx.used.add(p)
                out.append(img_png(p, p.relative_to(ctx.run_dir).as_posix()))
            else:
                out.append(_heatmap_html(m, langs, langs, title, fmt))
        return "\n".join(out)
    return _each(items, ctx, one)


def section_conditions(items: list, ctx: Context) -> str:
    """BLI (``bli-S-T.json``) and MRC (``mrc-L.json``): accuracy per condition (no bridge, each bridge)."""
    def one(it, ctx):
        d = it.doc
        what = f"BLI {d['src']} -> {d['trg']}" if "trg" in d else f"MRC {d['src']}"
        n = d.get("n_words", d.get("n_items"))
        sel = d.get("selected")
        conds = d["conditions"]
        rows = [[_dict(c).get("bridge") or "(none)", _pct(_dict(c).get("accuracy")), _dict(c).get("n_correct"),
                 _dict(c).get("n"), "yes" if sel is not None and k == sel else ""] for k, c in conds.items()]
        return (_h(it, f"{what} ({n} {'words' if 'trg' in d else 'items'})")
                + table(rows, ["bridge", "accuracy (%)", "correct", "n", "selected"], list(conds), "condition",
                        digits=1))
    return _each(items, ctx, one)


def section_bli_summary(items: list, ctx: Context) -> str:
    def one(it, ctx):
        pairs = it.doc["pairs"]
        conds: list[str] = []
        for v in pairs.values():
            conds += [c for c in _dict(_dict(v).get("accuracy")) if c not in conds]
        rows = [[_dict(v).get("n_words"), _dict(v).get("selected")]
                + [_pct(_dict(_dict(v).get("accuracy")).get(c)) for c in conds] for v in pairs.values()]
        return (_h(it) + "<p class='meta'>accuracy (%) per condition</p>"
                + table(rows, ["words", "selected"] + conds, list(pairs), "pair", digits=1))
    return _each(items, ctx, one)
