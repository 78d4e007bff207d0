"""Shared pieces of the report page: text escaping and formatting, tables, embedded figures, the
per-file rendering context. Every section module builds its HTML from these."""

from __future__ import annotations

import base64
import contextvars
import html
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

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

#: Absolute (and as-given) spellings of the run directory, stripped from every text shown.
_RUN_PREFIXES: contextvars.ContextVar[tuple] = contextvars.ContextVar("run_prefixes", default=())


# ---------------------------------------------------------------------------------------------- helpers
def _relative(s: str) -> str:
    for rx in _RUN_PREFIXES.get():
        s = rx.sub(lambda m: "" if m.group(0).endswith("/") else ".", s)
    return s


def _e(x: Any) -> str:
    return html.escape(_relative(str(x)), quote=True)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v, digits=3) -> str:
    """``digits``: decimals of floats, or a format spec such as ``".3g"``."""
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
        return format(v, digits) if isinstance(digits, str) else f"{v:.{digits}f}"
    return str(v)


def _is_matrix(m) -> bool:
    return (isinstance(m, list) and len(m) > 0 and all(isinstance(r, list) for r in m)
            and all(v is None or _is_num(v) for r in m for v in r))


def _labels(labels, n: int) -> list[str]:
    if isinstance(labels, list) and len(labels) == n:
        return [str(x) for x in labels]
    return [str(i) for i in range(n)]


def _pct(v) -> Optional[float]:
    return 100.0 * v if _is_num(v) else None


def table(rows: Sequence[Sequence[Any]], header: Sequence[Any], row_labels: Optional[Sequence[Any]] = None,
          corner: str = "", digits=3) -> str:
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


def matrix_table(m, row_labels, col_labels, corner: str = "", digits=3) -> str:
    ncol = max(len(r) for r in m)
    return table(m, _labels(col_labels, ncol), _labels(row_labels, len(m)), corner, digits)


def img_png(path_or_bytes, caption: str = "") -> str:
    """``<figure>`` with the PNG embedded as a base64 data URI."""
    data = path_or_bytes if isinstance(path_or_bytes, (bytes, bytearray)) else Path(path_or_bytes).read_bytes()
    b64 = base64.b64encode(bytes(data)).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{b64}">{cap}</figure>'


def _plot_to_html(draw, caption: str) -> str:
    """Run ``draw(path)`` (a plotting function) into a temporary PNG and embed it; a note if it fails."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "plot.png"
            draw(p)
            return img_png(p.read_bytes(), caption)
    except Exception as e:  # noqa: BLE001 - plotting is decoration; the tables carry the numbers
        return f'<p class="meta">(no plot: {_e(e)})</p>'


def _plain(v, limit: int = 300) -> str:
    """A readable one-line rendering of a parameter value: ``k = v; ...`` for mappings, comma-joined
    lists, numbers as :func:`_fmt` gives them (never raw JSON)."""
    if isinstance(v, dict):
        text = "; ".join(f"{k} = {_plain(x, limit)}" for k, x in v.items())
    elif isinstance(v, (list, tuple)):
        text = ", ".join(_plain(x, limit) for x in v)
    elif isinstance(v, float):
        text = _fmt(v, ".4g")
    else:
        text = _fmt(v)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ci(v, ci, digits=3) -> str:
    """``value [lo, hi]`` (the 95% interval beside the number), or the value alone without one."""
    if not _is_num(v):
        return ""
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_is_num(x) for x in ci):
        return f"{_fmt(float(v), digits)} [{_fmt(float(ci[0]), digits)}, {_fmt(float(ci[1]), digits)}]"
    return _fmt(float(v), digits)


def _kv(items: Iterable[tuple[str, Any]]) -> str:
    rows = [(k, v if not isinstance(v, (dict, list)) else _plain(v))
            for k, v in items if v is not None]
    if not rows:
        return ""
    return table([[v] for _, v in rows], ["value"], [k for k, _ in rows], "")


def _dict(v) -> dict:
    return v if isinstance(v, dict) else {}


def _mean(values) -> Optional[float]:
    vals = [float(v) for v in values if _is_num(v)]
    return sum(vals) / len(vals) if vals else None


# ---------------------------------------------------------------------------------------------- context
@dataclass
class Item:
    """One artifact of the run: its path, its path relative to the run directory, its document."""

    path: Path
    rel: str
    doc: dict


@dataclass
class Context:
    run_dir: Path
    pngs: list
    used: set = field(default_factory=set)

    def figures(self, item: Item, match: Callable[[Path], bool]) -> list[str]:
        """The PNGs beside ``item`` accepted by ``match``, embedded (and not shown again under Figures)."""
        own = [p for p in self.pngs if p.parent == item.path.parent and match(p)]
        self.used.update(own)
        return [img_png(p, p.relative_to(self.run_dir).as_posix()) for p in own]


def _each(items: list, ctx: Context, fn) -> str:
    """Render every item with ``fn(item, ctx)``; a failure is reported in place of that item only."""
    out = []
    for it in items:
        try:
            out.append(fn(it, ctx))
        except Exception as e:  # noqa: BLE001 - one bad file must not lose the rest of the report
            out.append(f"<h3>{_e(it.rel)}</h3>"
                       f'<p class="err">could not render {_e(it.rel)}: {_e(e.__class__.__name__)}: {_e(e)}</p>')
    return "\n".join(out)


def _h(item: Item, what: str = "") -> str:
    """The heading of one file's part of a section: ``what`` followed by its path, or the path alone."""
    if not what:
        return f"<h3>{_e(item.rel)}</h3>"
    return f"<h3>{_e(what)} <span class='meta'>({_e(item.rel)})</span></h3>"


def _heatmap_html(m, rows, cols, title: str, fmt: str = ".2f") -> str:
    from ..plots import plot_heatmap
    nan = float("nan")
    mm = [[nan if v is None else float(v) for v in r] for r in m]
    return _plot_to_html(lambda p: plot_heatmap(mm, _labels(rows, len(mm)), _labels(cols, len(mm[0])), p,
                                                title=title, fmt=fmt), title)
