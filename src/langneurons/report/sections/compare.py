"""Report section of ``langneurons compare``: the scoreboard of localisation methods (neuron sets,
random controls, DiffMean directions, language arithmetic, attention-head sets) with 95% intervals, and
its figure."""

from __future__ import annotations

from ..helpers import Context, _ci, _dict, _e, _each, _h, _is_num, _plain, _plot_to_html, table

#: (metric, column heading) of the tables, in order; a metric no row has is left out.
_COLUMNS = (("share", "target share"), ("share_delta", "Δ share vs unsteered"), ("lss", "LSS"),
            ("fluency_nll", "fluency NLL"), ("fluency_delta", "Δ fluency NLL"),
            ("steer_own_dnll", "steer ΔNLL own"), ("steer_other_dnll", "steer ΔNLL other"),
            ("deact_own_dnll", "deact ΔNLL own"), ("deact_other_dnll", "deact ΔNLL other"),
            ("deact_selectivity", "deact own − other"), ("deact_own_vs_random", "deact own − random"),
            ("budget_units", "units"), ("budget_params", "parameters"))


def _cells(d: dict, cols) -> list:
    out = []
    for k, _ in cols:
        v = d.get(k)
        if k.startswith("budget_"):
            out.append(v if _is_num(v) else None)
        else:
            out.append(_ci(v, d.get(k + "_ci95"), 3) if _is_num(v) else None)
    return out


def section_compare(items: list, ctx: Context) -> str:
    def one(it, ctx):
        d = it.doc
        methods = [m for m in d["methods"] if isinstance(m, str)]
        targets = [t for t in d["targets"] if isinstance(t, str)]
        rows = [r for r in d["rows"] if isinstance(r, dict)]
        summary = _dict(d.get("summary"))
        present = [(k, h) for k, h in _COLUMNS if any(k in r for r in rows) or any(k in _dict(s) for s in
                                                                                       summary.values())]
        st = _dict(d.get("settings"))
        out = [_h(it, f"{len(methods)} methods on {len(targets)} target languages")]
        meta = [f"targets {', '.join(targets)}"]
        if st.get("model"):
            meta.append(f"model <code>{_e(st['model'])}</code>")
        if st.get("direction_layer") is not None:
            meta.append(f"DiffMean at layer {_e(st['direction_layer'])}, alpha {_e(st.get('alpha'))} "
                        f"(× mean residual norm)")
        if _dict(st.get("heads")) and st.get("head_scale") is not None:
            meta.append(f"head sets {_e(', '.join(_dict(st['heads'])))}: t's heads scaled by "
                        f"{_e(st['head_scale'])} to steer, zeroed to deactivate")
        if st.get("generations_per_target"):
            meta.append(f"{_e(st['generations_per_target'])} generations per target")
        out.append(f'<p class="meta">{"; ".join(meta)}. Each value is followed by its 95% bootstrap interval '
                   "(generation runs, held-out windows paired with the baseline, cloze items).</p>")
        if summary:
            out.append("<h4>mean over targets</h4>")
            out.append(table([_cells(_dict(summary.get(m)), present) for m in methods], [h for _, h in present],
                             methods, "method"))
        figs = ctx.figures(it, lambda p: p.name == "compare.png")
        if figs:
            out += figs
        elif summary:
            from ...compare import plot_compare
            out.append(_plot_to_html(lambda p: plot_compare(d, p), f"methods compared: {it.rel}"))
        if rows:
            out.append("<h4>per target</h4>")
            out.append(table([[r.get("target")] + _cells(r, present) for r in rows],
                             ["target"] + [h for _, h in present], [r.get("method") for r in rows], "method"))
        base = _dict(d.get("baseline"))
        if base:
            shares = _dict(base.get("share"))
            sci = _dict(base.get("share_ci95"))
            bits = [f"{_e(t)} {_e(_ci(v, sci.get(t), 2))}" for t, v in shares.items() if _is_num(v)]
            if _is_num(base.get("fluency_nll")):
                bits.append(f"fluency NLL {_e(_ci(base['fluency_nll'], base.get('fluency_nll_ci95'), 3))}")
            if bits:
                out.append(f'<p class="meta">unsteered: target share {"; ".join(bits)}</p>')
        defs = _dict(d.get("metrics"))
        if defs:
            out.append(table([[v] for v in defs.values()], ["definition"], list(defs), "metric"))
        skipped = _dict(d.get("skipped"))
        if skipped:
            out.append("<p class=\"meta\">skipped: " + "; ".join(f"<code>{_e(k)}</code>: {_e(v)}"
                                                               for k, v in skipped.items()) + "</p>")
        det = _dict(d.get("details"))
        if det:
            out.append(table([[_plain({k: v for k, v in _dict(x).items() if k != "steer"})] for x in det.values()],
                             ["details"], list(det), "method"))
        return "\n".join(out)
    return _each(items, ctx, one)
