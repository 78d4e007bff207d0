"""One self-contained HTML page that shows what a run directory holds.

``render_report(run_dir)`` walks ``run_dir`` (sub-directories included, hidden ones and model
directories skipped) and renders, in this order, whatever it finds:

* ``stats.json`` (activation statistics): model, site, window, tokens per language;
* neuron sets (``*.json`` with format ``langneurons.neuronset.v1``): method, neurons per
  language, a languages x layers count table and a layer-distribution plot;
* ``ppl.json`` (perplexity matrix): its matrices (PPL, change in PPL, NLL...) as tables, with
  ``ppl.png`` or a heatmap drawn from the matrix;
* ``steer.json`` (steering): LSS matrices and per-target scores per operator, generation shares,
  with ``steer*.png``;
* task results (``langneurons.task.v1``, written by ``langneurons eval``): one table per metric;
* every other ``*.png``.

Everything is inline: CSS in a ``<style>`` element, images as ``data:image/png;base64`` URIs, no
scripts and no network references, so the file can be mailed or archived alone. Files that do
not parse are listed with the reason instead of stopping the report; readers are defensive about
keys, since each section's producer may add or rename fields.
"""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from .errors import UserError
from .atomic import atomic_write_text

__all__ = ["render_report", "build_html"]

#: JSON files that belong to model or tokenizer directories, never rendered.
_SKIP_NAMES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "adapter_config.json", "vocab.json", "added_tokens.json",
               "langneurons_train.json", "trainer_state.json", "preprocessor_config.json"}
_MAX_JSON_BYTES = 64 * 1024 * 1024

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;color:#222;
padding:0 1em;line-height:1.4}
h1{font-size:1.6em;border-bottom:2px solid #444}h2{font-size:1.3em;margin-top:2em;border-bottom:1px solid #bbb}
h3{font-size:1.05em;margin-top:1.4em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right}th{background:#f0f0f0}
td.l,th.l{text-align:left}
.meta{color:#555;font-size:.9em}.err{color:#a00}
img{max-width:100%;border:1px solid #ddd;margin:.4em 0}
figure{margin:.6em 0}figcaption{font-size:.8em;color:#555}
code{background:#f4f4f4;padding:0 .2em}
.scroll{overflow-x:auto}
"""


# ---------------------------------------------------------------------------------------------- helpers
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.{digits}f}"
    return str(v)


def _is_matrix(m) -> bool:
    return (isinstance(m, list) and len(m) > 0 and all(isinstance(r, list) for r in m)
            and all(v is None or _is_num(v) for r in m for v in r))


def _labels(labels, n: int) -> list[str]:
    if isinstance(labels, list) and len(labels) == n:
        return [str(x) for x in labels]
    return [str(i) for i in range(n)]


def table(rows: Sequence[Sequence[Any]], header: Sequence[Any], row_labels: Optional[Sequence[Any]] = None,
          corner: str = "", digits: int = 3) -> str:
    """An HTML table; numbers right-aligned and formatted, labels left-aligned."""
    out = ['<div class="scroll"><table>']
    head = ([f'<th class="l">{_e(corner)}</th>'] if row_labels is not None else []) + [f"<th>{_e(h)}</th>"
                                                                                       for h in header]
    out.append("<tr>" + "".join(head) + "</tr>")
    for i, row in enumerate(rows):
        cells = [f'<th class="l">{_e(row_labels[i])}</th>'] if row_labels is not None else []
        for v in row:
            cls = "" if (v is None or _is_num(v)) else ' class="l"'
            cells.append(f"<td{cls}>{_e(_fmt(v, digits))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table></div>")
    return "\n".join(out)


def matrix_table(m, row_labels, col_labels, corner: str = "", digits: int = 3) -> str:
    ncol = max(len(r) for r in m)
    return table(m, _labels(col_labels, ncol), _labels(row_labels, len(m)), corner, digits)


def img_png(path_or_bytes, caption: str = "") -> str:
    """``<figure>`` with the PNG embedded as a base64 data URI."""
    data = path_or_bytes if isinstance(path_or_bytes, (bytes, bytearray)) else Path(path_or_bytes).read_bytes()
    b64 = base64.b64encode(bytes(data)).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{b64}">{cap}</figure>'


def _plot_to_html(draw, caption: str) -> str:
    """Run ``draw(path)`` (a plotting function) into a temporary PNG and embed it; '' if it fails."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "plot.png"
            draw(p)
            return img_png(p.read_bytes(), caption)
    except Exception as e:  # noqa: BLE001 - plotting is decoration; the tables carry the numbers
        return f'<p class="meta">(no plot: {_e(e)})</p>'


def _kv(items: Iterable[tuple[str, Any]]) -> str:
    rows = [(k, v if not isinstance(v, (dict, list)) else json.dumps(v, ensure_ascii=False)[:300])
            for k, v in items if v is not None]
    if not rows:
        return ""
    return table([[v] for _, v in rows], ["value"], [k for k, _ in rows], "")


# ---------------------------------------------------------------------------------------------- sections
def section_stats(path: Path, d: dict, rel: str) -> str:
    model = d.get("model") if isinstance(d.get("model"), dict) else {}
    out = [f"<h3>{_e(rel)}</h3>"]
    out.append(_kv([("model", model.get("name_or_path")), ("model type", model.get("model_type")),
                    ("layers", model.get("num_layers")), ("width", model.get("width")),
                    ("site", model.get("site") or d.get("site")), ("unit", d.get("unit")),
                    ("window", d.get("window")), ("dtype", d.get("dtype")), ("format", d.get("format"))]))
    langs = d.get("languages")
    if isinstance(langs, dict) and langs:
        rows = []
        for code, info in langs.items():
            info = info if isinstance(info, dict) else {}
            rows.append([code, info.get("n_tokens"), info.get("n_windows", info.get("n_sentences")),
                         info.get("source")])
        out.append(table([r[1:] for r in rows], ["tokens", "windows", "source"], [r[0] for r in rows], "language"))
    return "\n".join(out)


def section_neurons(path: Path, d: dict, rel: str) -> str:
    from .neuronset import NeuronSet
    out = [f"<h3>{_e(rel)}</h3>"]
    try:
        ns = NeuronSet.load(path)
    except (UserError, Exception) as e:  # noqa: BLE001 - a broken file is reported, not fatal
        return out[0] + f'<p class="err">cannot read this neuron set: {_e(e)}</p>'
    params = ns.method.get("params") or {}
    out.append(f'<p class="meta">method <code>{_e(ns.method.get("name"))}</code>'
               + (f" ({_e(json.dumps(params, ensure_ascii=False)[:300])})" if params else "")
               + f"; model <code>{_e(ns.model.get('name_or_path'))}</code> {ns.num_layers} layers x {ns.width}, "
               f"site {_e(ns.site)}; {ns.unique_total()} distinct neurons</p>")
    counts = ns.counts()
    langs = ns.languages
    rows = [[ns.total(c)] + [int(x) for x in counts[c].tolist()] for c in langs]
    out.append(table(rows, ["total"] + [f"L{l}" for l in range(ns.num_layers)], langs, "language", digits=0))
    if langs and any(ns.total(c) for c in langs):
        from .plots import plot_layer_distribution
        out.append(_plot_to_html(lambda p: plot_layer_distribution(ns, p), f"neurons per layer: {rel}"))
    return "\n".join(out)


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


def section_ppl(path: Path, d: dict, rel: str, pngs: list[Path]) -> str:
    out = [f"<h3>{_e(rel)}</h3>"]
    settings = d.get("settings") if isinstance(d.get("settings"), dict) else {}
    if settings:
        out.append(f'<p class="meta">operator <code>{_e(settings.get("operator"))}</code>, neurons '
                   f'<code>{_e(settings.get("neurons"))}</code> ({_e(settings.get("neuron_method"))}), '
                   f'site {_e(settings.get("site"))}, window {_e(settings.get("window"))}</p>')
    rows, cols = _row_col_labels(d)
    shown = False
    titles = {"ppl": "perplexity exp(mean NLL)", "delta_ppl": "change in perplexity vs baseline",
              "delta": "change vs baseline", "mean_nll": "mean NLL", "delta_nll": "change in mean NLL"}
    for key in ("ppl", "delta_ppl", "delta", "delta_nll", "mean_nll"):
        m = d.get(key)
        if _is_matrix(m):
            out.append(f"<h4>{_e(titles[key])} (rows: deactivated neurons; columns: evaluated language)</h4>")
            out.append(matrix_table(m, rows, cols, "rows \\ columns"))
            shown = True
    dom = d.get("diagonal_dominance")
    if isinstance(dom, dict):
        out.append(_kv([(k, v) for k, v in dom.items() if not isinstance(v, (list, dict))]))
    own = [p for p in pngs if p.parent == path.parent and p.name.startswith("ppl")]
    for p in own:
        out.append(img_png(p, p.name))
    if not own and shown:
        m = d.get("delta_ppl") if _is_matrix(d.get("delta_ppl")) else d.get("delta") if _is_matrix(d.get("delta")) \
            else d.get("ppl")
        if _is_matrix(m):
            from .plots import plot_heatmap
            nan = float("nan")
            mm = [[nan if v is None else float(v) for v in r] for r in m]
            out.append(_plot_to_html(lambda p: plot_heatmap(mm, _labels(rows, len(mm)), _labels(cols, len(mm[0])),
                                                            p, title="perplexity matrix", fmt=".2f"),
                                     "perplexity matrix"))
    if not shown and not own:
        out.append('<p class="meta">no matrix found in this file</p>')
    return "\n".join(out), own


def section_steer(path: Path, d: dict, rel: str, pngs: list[Path]) -> str:
    out = [f"<h3>{_e(rel)}</h3>"]
    langs = d.get("languages") if isinstance(d.get("languages"), list) else None
    ops = d.get("operators") if isinstance(d.get("operators"), dict) else {}
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
        rows = [[(b or {}).get("operator"), (b or {}).get("value")] for b in best.values()]
        out.append("<h4>best operator per target</h4>")
        out.append(table(rows, ["operator", "value"], list(best), "target"))
    if not ops and not _is_matrix(d.get("lss")):
        # unknown layout: any 2-D matrix at the top level
        for k, v in d.items():
            if _is_matrix(v):
                out.append(f"<h4>{_e(k)}</h4>" + matrix_table(v, langs, langs))
    own = [p for p in pngs if p.parent == path.parent and p.name.startswith("steer")]
    for p in own:
        out.append(img_png(p, p.name))
    return "\n".join(out), own


def section_task(path: Path, d: dict, rel: str) -> str:
    from .tasks.runner import build_table
    langs = d.get("languages") or []
    rows = d.get("rows") or []
    model = d.get("model") if isinstance(d.get("model"), dict) else {}
    out = [f"<h3>{_e(d.get('task'))}: {_e(d.get('description', ''))} <span class='meta'>({_e(rel)})</span></h3>"]
    meta = (f"model <code>{_e(model.get('name_or_path'))}</code>, split {_e(d.get('split'))}, "
            f"{_e(d.get('shots', 0))}-shot, limit {_e(d.get('limit') or 'none')}")
    iv = d.get("intervention")
    if isinstance(iv, dict):
        meta += (f"; intervention <code>{_e(iv.get('operator'))}</code> at {_e(iv.get('site'))} "
                 f"({_e(iv.get('positions'))} positions), neurons <code>{_e(iv.get('neurons'))}</code>")
    out.append(f'<p class="meta">{meta}</p>')
    frac = set(d.get("fraction_metrics") or [])
    for metric in d.get("metrics") or []:
        labels, tab = build_table(rows, langs, metric)
        scale = 100.0 if metric in frac else 1.0
        vals = [[None if tab[lab].get(c) is None else tab[lab][c] * scale for c in langs] for lab in labels]
        n = {r["lang"]: r.get("n") for r in rows if isinstance(r, dict)}
        out.append(f"<h4>{_e(metric)}{' (%)' if metric in frac else ''}</h4>")
        out.append(table(vals, [f"{c} (n={n.get(c)})" for c in langs], labels, "setting", digits=2))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- the page
def _walk(run_dir: Path) -> tuple[list[Path], list[Path]]:
    jsons, pngs = [], []
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if any((run_dir.joinpath(*rel.parts[:i]) / "config.json").is_file()
               and (run_dir.joinpath(*rel.parts[:i]) / "tokenizer.json").exists() for i in range(1, len(rel.parts))):
            continue  # inside a model directory
        if p.is_file() and p.suffix == ".json" and p.name not in _SKIP_NAMES:
            jsons.append(p)
        elif p.is_file() and p.suffix == ".png":
            pngs.append(p)
    return jsons, pngs


def _kind(path: Path, d: Any) -> Optional[str]:
    if not isinstance(d, dict):
        return None
    fmt = str(d.get("format", ""))
    if fmt == "langneurons.neuronset.v1" or (isinstance(d.get("neurons"), dict) and "method" in d):
        return "neurons"
    if fmt.startswith("langneurons.task"):
        return "task"
    if fmt.startswith("langneurons.stats") or (path.name == "stats.json" and "languages" in d and "model" in d):
        return "stats"
    if "ppl" in fmt or path.name == "ppl.json":
        return "ppl"
    if "steer" in fmt or path.name == "steer.json":
        return "steer"
    return None


def _mean(values) -> Optional[float]:
    vals = [float(v) for v in values if _is_num(v)]
    return sum(vals) / len(vals) if vals else None


def summary_lines(groups: dict[str, list[tuple[Path, Any]]], run_dir: Path) -> list[str]:
    """Plain-language findings of a run: what the tables below show, in one sentence each."""
    out = []
    for p, d in groups["stats"]:
        langs = d.get("languages") or {}
        toks = [v.get("n_tokens") for v in langs.values() if isinstance(v, dict)]
        m = d.get("model") or {}
        out.append(f"{p.relative_to(run_dir)}: activation statistics of {len(langs)} languages "
                   f"({_fmt(sum(t for t in toks if _is_num(t)), 0)} tokens) at site {m.get('site', '?')} of "
                   f"{m.get('num_layers', '?')} x {m.get('width', '?')} neurons.")
    for p, d in groups["neurons"]:
        counts = {c: len(v) for c, v in (d.get("neurons") or {}).items()}
        if counts:
            lo, hi = min(counts.values()), max(counts.values())
            span = f"{lo}" if lo == hi else f"{lo}-{hi}"
            out.append(f"{p.relative_to(run_dir)}: {(d.get('method') or {}).get('name', '?')} selected {span} "
                       f"neurons per language for {len(counts)} languages.")
    for p, d in groups["ppl"]:
        dom = d.get("diagonal_dominance") or {}
        vs = d.get("vs_random") or {}
        own, rnd = _mean(v.get("delta_nll") for v in vs.values()), _mean(v.get("random_delta_nll") for v in vs.values())
        if not dom:
            continue
        text = (f"{p.relative_to(run_dir)}: deactivating a language's neurons raised that language's perplexity "
                f"more than any other language's for {dom.get('row_count', '?')} of {dom.get('languages', '?')} "
                "languages")
        if own is not None and rnd is not None:
            text += (f"; its own mean NLL rose by {own:.3f} nats/token on average, against {rnd:.3f} for random "
                     "sets of the same size per layer")
        out.append(text + ".")
    for p, d in groups["steer"]:
        ops = d.get("operators") or {}
        parts = []
        for op, r in ops.items():
            share = (r.get("generation") or {}).get("share_mean") if isinstance(r, dict) else None
            lss = r.get("lss_mean") if isinstance(r, dict) else None
            if _is_num(share):
                parts.append(f"{op} {share:.3f}" + (f" (LSS {lss:.2f})" if _is_num(lss) else ""))
            elif _is_num(lss):
                parts.append(f"{op} LSS {lss:.2f}")
        base = d.get("generation_baseline") or {}
        base_mean = _mean((base.get("share") or {}).values()) if isinstance(base, dict) else None
        if parts:
            out.append(f"{p.relative_to(run_dir)}: steering toward each target language, mean target share of "
                       "generations (and Language Steering Shift on cloze items, when measured): "
                       + ", ".join(parts) + (f"; unsteered {base_mean:.3f}" if base_mean is not None else "") + ".")
    return out


def build_html(run_dir: Path, title: Optional[str] = None) -> str:
    """The report page of ``run_dir`` as a string."""
    run_dir = Path(run_dir)
    jsons, pngs = _walk(run_dir)
    groups: dict[str, list[tuple[Path, Any]]] = {k: [] for k in ("stats", "neurons", "ppl", "steer", "task")}
    problems, others = [], []
    for p in jsons:
        rel = str(p.relative_to(run_dir))
        try:
            if p.stat().st_size > _MAX_JSON_BYTES:
                others.append(f"{rel} (not read: larger than {_MAX_JSON_BYTES >> 20} MiB)")
                continue
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            problems.append(f"{rel}: {e}")
            continue
        kind = _kind(p, d)
        if kind:
            groups[kind].append((p, d))
        else:
            others.append(rel)

    used: set[Path] = set()
    body = [f"<h1>{_e(title or 'langneurons report: ' + run_dir.name)}</h1>",
            f'<p class="meta">run directory <code>{_e(run_dir)}</code></p>']

    def guarded(fn, *a):
        try:
            r = fn(*a)
        except Exception as e:  # noqa: BLE001 - one bad file must not lose the rest of the report
            return f'<p class="err">could not render {_e(a[2])}: {_e(e.__class__.__name__)}: {_e(e)}</p>', []
        return r if isinstance(r, tuple) else (r, [])

    findings = summary_lines(groups, run_dir)
    if findings:
        body.append("<h2>What was found</h2>")
        body.append("<ul>" + "".join(f"<li>{_e(f)}</li>" for f in findings) + "</ul>")
    headings = {"stats": "Activation statistics", "neurons": "Neuron sets", "ppl": "Perplexity under deactivation",
                "steer": "Steering", "task": "Downstream tasks"}
    for kind in ("stats", "neurons", "ppl", "steer", "task"):
        if not groups[kind]:
            continue
        body.append(f"<h2>{headings[kind]}</h2>")
        for p, d in groups[kind]:
            rel = str(p.relative_to(run_dir))
            if kind == "stats":
                html_, own = guarded(section_stats, p, d, rel)
            elif kind == "neurons":
                html_, own = guarded(section_neurons, p, d, rel)
            elif kind == "ppl":
                html_, own = guarded(section_ppl, p, d, rel, pngs)
            elif kind == "steer":
                html_, own = guarded(section_steer, p, d, rel, pngs)
            else:
                html_, own = guarded(section_task, p, d, rel)
            body.append(html_)
            used.update(own)
    rest = [p for p in pngs if p not in used]
    if rest:
        body.append("<h2>Figures</h2>")
        body += [img_png(p, str(p.relative_to(run_dir))) for p in rest]
    if others or problems:
        body.append("<h2>Other files</h2>")
        if others:
            body.append("<ul>" + "".join(f"<li><code>{_e(o)}</code></li>" for o in others) + "</ul>")
        if problems:
            body.append("<ul>" + "".join(f'<li class="err">{_e(o)}</li>' for o in problems) + "</ul>")
    if len(body) == 2:
        body.append("<p>Nothing to show: the directory holds no statistics, neuron sets, results or figures.</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_e(title or 'langneurons report: ' + run_dir.name)}</title>\n<style>{_CSS}</style>\n</head>\n"
            "<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def render_report(run_dir, out=None, title: Optional[str] = None) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``run_dir/report.html``); return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; give the --out directory of a langneurons run")
    target = Path(out) if out is not None else run_dir / "report.html"
    atomic_write_text(target, build_html(run_dir, title))
    return target
