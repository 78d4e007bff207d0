"""PNG plots: neuron sets per layer, values per layer, language-by-language matrices, bar charts,
point estimates with interval bars.

matplotlib is an optional dependency (``pip install langneurons[plot]``); it is imported inside
the functions, and figures are drawn on the Agg canvas directly (no pyplot global state, no
display needed). Files are written atomically: a temporary file in the target directory, then
``os.replace``. Layer axes carry integer ticks only (layers are whole numbers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .atomic import atomic_write
from .errors import UserError

__all__ = ["plot_layer_distribution", "plot_layer_lines", "plot_heatmap", "plot_bars", "plot_intervals"]


def _new_figure(figsize):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plotting needs matplotlib; install it with: pip install 'langneurons[plot]'") from None
    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _integer_layer_axis(ax) -> None:
    """Ticks at whole layers only (never 0.5, 1.5, ...)."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save_png(fig, path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"), create_dirs=False)


def plot_layer_distribution(ns, path, title: str | None = None) -> Path:
    """Line plot of neurons per layer, one line per language of ``ns`` (a NeuronSet). Returns ``path``."""
    counts = ns.counts()
    layers = list(range(ns.num_layers))
    fig = _new_figure((max(6.0, 0.18 * ns.num_layers + 3), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    markers = "osD^v<>ph*x+"
    for k, lang in enumerate(ns.languages):
        ax.plot(layers, counts[lang].tolist(), marker=markers[k % len(markers)], markersize=3,
                linewidth=1.2, label=f"{lang} ({ns.total(lang)})")
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons")
    ax.set_xlim(-0.5, ns.num_layers - 0.5)
    _integer_layer_axis(ax)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    if title is None:
        title = (f"{ns.method['name']} neurons per layer ({ns.model.get('name_or_path') or 'model'}, "
                 f"{ns.num_layers}x{ns.width}, site {ns.site}, unique {ns.unique_total()})")
    ax.set_title(title, fontsize=9)
    if ns.languages:
        ax.legend(fontsize=7, ncol=2 if len(ns.languages) > 6 else 1, loc="best")
    return _save_png(fig, path)


def plot_layer_lines(series, path, ylabel: str = "", title: str = "") -> Path:
    """One line per name of ``series`` (``{name: ([layer ids], [values])}``; a ``None`` or NaN value
    breaks the line), layer on the x axis with integer ticks. Returns ``path``."""
    import math

    nan = float("nan")
    lines = {str(k): sorted((int(l), nan if v is None else float(v)) for l, v in zip(*xy))
             for k, xy in series.items()}
    layers = sorted({l for pts in lines.values() for l, v in pts if not math.isnan(v)})
    if not layers:
        raise UserError("plot_layer_lines: no value to plot")
    fig = _new_figure((max(6.0, 0.18 * len(layers) + 3), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    markers = "osD^v<>ph*x+"
    for k, (name, pts) in enumerate(lines.items()):
        if pts:
            ax.plot([l for l, _ in pts], [v for _, v in pts], marker=markers[k % len(markers)], markersize=3,
                    linewidth=1.2, label=name)
    ax.set_xlabel("layer")
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_xlim(layers[0] - 0.5, layers[-1] + 0.5)
    _integer_layer_axis(ax)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2 if len(lines) > 6 else 1, loc="best")
    return _save_png(fig, path)


def _to_rows(matrix) -> list[list[float]]:
    """Accept a torch tensor, numpy array or nested list; return a list of float rows."""
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().cpu()
    if hasattr(matrix, "tolist"):
        matrix = matrix.tolist()
    try:
        rows = [[float(v) for v in row] for row in matrix]
    except TypeError:
        raise UserError("plot_heatmap: the matrix must be 2-D (rows of numbers)") from None
    if rows and any(len(r) != len(rows[0]) for r in rows):
        raise UserError("plot_heatmap: the matrix rows have different lengths")
    return rows


def plot_heatmap(matrix, row_labels: Sequence[str], col_labels: Sequence[str], path,
                 title: str = "", fmt: str = ".2f", cmap: str = "viridis") -> Path:
    """Annotated heatmap of a 2-D matrix (Jaccard, overlap counts, perplexity, ...).

    ``fmt`` is a format spec applied to each cell (``".2f"``, ``".1%"``, ``"d"``; with ``"d"`` the
    values are rounded to int). NaN cells are left blank. Returns ``path``.
    """
    import math

    rows = _to_rows(matrix)
    n_rows, n_cols = len(rows), (len(rows[0]) if rows else 0)
    if n_rows == 0 or n_cols == 0:
        raise UserError("plot_heatmap: the matrix is empty; nothing to plot")
    if len(row_labels) != n_rows or len(col_labels) != n_cols:
        raise UserError(f"plot_heatmap: {n_rows}x{n_cols} matrix but {len(row_labels)} row and "
                        f"{len(col_labels)} column labels; give one label per row and column")

    def cell_text(v: float) -> str:
        if math.isnan(v):
            return ""
        return format(int(round(v)), fmt) if fmt.endswith("d") else format(v, fmt)

    fig = _new_figure((max(4.0, 0.6 * n_cols + 2.5), max(3.0, 0.5 * n_rows + 1.5)))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(rows, cmap=cmap, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n_cols))
    ax.set_xticklabels([str(c) for c in col_labels], rotation=45 if n_cols > 6 else 0, ha="right" if n_cols > 6 else "center")
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels([str(r) for r in row_labels])
    finite = [v for row in rows for v in row if not math.isnan(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    mid = (lo + hi) / 2
    font = 8 if max(n_rows, n_cols) <= 10 else 6
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            text = cell_text(v)
            if text:
                # viridis-like maps are dark at the low end: white text there, black at the high end
                ax.text(j, i, text, ha="center", va="center", fontsize=font, color="white" if v < mid else "black")
    if title:
        ax.set_title(title, fontsize=9)
    return _save_png(fig, path)


def plot_bars(values, labels: Sequence[str], path, *, series: Sequence[str] | None = None, errors=None,
              highlight: str | None = None, value_fmt: str | None = None, ylabel: str = "", title: str = "") -> Path:
    """Bar chart, one bar per label, or grouped bars with one group per label and one bar per series.

    ``values`` is ``[n]`` (one series) or ``[s][n]`` with ``series`` naming the ``s`` rows; ``errors``
    (same shape) are drawn as error bars. ``highlight`` colours the bar of that label differently
    (one series only). With ``value_fmt`` (``".3g"``) each bar is annotated; NaN values are drawn as
    empty bars, annotated ``n/a``. Returns ``path``.
    """
    import math

    grouped = series is not None
    rows = _to_rows(values if grouped else [values])
    errs = _to_rows(errors if grouped else [errors]) if errors is not None else None
    n = len(labels)
    if not n or any(len(r) != n for r in rows) or (errs is not None and [len(r) for r in errs] != [n] * len(rows)):
        raise UserError(f"plot_bars: need one value per label ({n} labels) in every series; check the shapes")
    if grouped and len(series) != len(rows):
        raise UserError(f"plot_bars: {len(rows)} series of values but {len(series)} series names")
    fig = _new_figure((max(4.0, (0.7 + 0.25 * (len(rows) - 1)) * n + 2.0), 3.8))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(rows)
    for k, row in enumerate(rows):
        xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(n)]
        heights = [0.0 if math.isnan(v) else v for v in row]
        kw = {"label": series[k]} if grouped else {}
        if not grouped:
            kw["color"] = ["tab:orange" if lab == highlight else "tab:blue" for lab in labels]
        if errs is not None:
            kw.update(yerr=[0.0 if math.isnan(e) else e for e in errs[k]], capsize=2)
        ax.bar(xs, heights, width, **kw)
        if value_fmt:
            for x, v, h in zip(xs, row, heights):
                ax.text(x, h, "n/a" if math.isnan(v) else format(v, value_fmt), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(n))
    ax.set_xticklabels([str(lab) for lab in labels], rotation=45 if n > 8 else 0, ha="right" if n > 8 else "center")
    ax.axhline(0.0, color="black", linewidth=0.6)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    if grouped:
        ax.legend(fontsize=7, ncol=min(4, len(rows)), loc="upper right")
    return _save_png(fig, path)


def plot_intervals(values, labels: Sequence[str], path, *, lows, highs, series: Sequence[str] | None = None,
                   ylabel: str = "", title: str = "") -> Path:
    """Point estimates with (asymmetric) interval bars: one x position per label, in the order given
    (categories, e.g. operators), one marker series per row of ``values``.

    ``values``, ``lows`` and ``highs`` are ``[n]`` (one series) or ``[s][n]`` with ``series`` naming the
    ``s`` rows; a NaN value is not drawn, a NaN interval end draws no bar. Series are offset slightly
    along x so that their bars do not hide each other. Returns ``path``.
    """
    import math

    grouped = series is not None
    rows = _to_rows(values if grouped else [values])
    lo = _to_rows(lows if grouped else [lows])
    hi = _to_rows(highs if grouped else [highs])
    n = len(labels)
    if not n or any(len(r) != n for r in rows + lo + hi) or not (len(rows) == len(lo) == len(hi)):
        raise UserError(f"plot_intervals: need one value, low and high per label ({n} labels) in every series")
    if grouped and len(series) != len(rows):
        raise UserError(f"plot_intervals: {len(rows)} series of values but {len(series)} series names")
    fig = _new_figure((max(4.5, 0.9 * n + 2.5), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    markers = "osD^v<>ph*x+"
    step = 0.12 if len(rows) > 1 else 0.0
    for k, (row, l, h) in enumerate(zip(rows, lo, hi)):
        xs = [i + (k - (len(rows) - 1) / 2) * step for i in range(n)]
        pts = [(x, v) for x, v in zip(xs, row) if not math.isnan(v)]
        line = ax.plot([x for x, _ in pts], [v for _, v in pts], linestyle="none", marker=markers[k % len(markers)],
                       markersize=5, label=series[k] if grouped else None)[0]
        for x, v, a, b in zip(xs, row, l, h):
            if not (math.isnan(v) or math.isnan(a) or math.isnan(b)):
                ax.errorbar([x], [v], yerr=[[max(v - a, 0.0)], [max(b - v, 0.0)]], color=line.get_color(),
                            capsize=3, linewidth=1.0)
    ax.set_xticks(range(n))
    ax.set_xticklabels([str(lab) for lab in labels], rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center")
    ax.set_xlim(-0.5, n - 0.5)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.grid(True, axis="y", alpha=0.3)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    if grouped:
        ax.legend(fontsize=7, loc="best")
    return _save_png(fig, path)
