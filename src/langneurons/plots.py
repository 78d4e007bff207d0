"""PNG plots of neuron sets and language-by-language matrices.

matplotlib is an optional dependency (``pip install langneurons[plot]``); it is imported inside
the functions, and figures are drawn on the Agg canvas directly (no pyplot global state, no
display needed). Files are written atomically: a temporary file in the target directory, then
``os.replace``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .atomic import atomic_write
from .errors import UserError

__all__ = ["plot_layer_distribution", "plot_heatmap"]


def _new_figure(figsize):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plotting needs matplotlib; install it with: pip install 'langneurons[plot]'") from None
    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


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
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    if title is None:
        title = (f"{ns.method['name']} neurons per layer ({ns.model.get('name_or_path') or 'model'}, "
                 f"{ns.num_layers}x{ns.width}, site {ns.site}, unique {ns.unique_total()})")
    ax.set_title(title, fontsize=9)
    if ns.languages:
        ax.legend(fontsize=7, ncol=2 if len(ns.languages) > 6 else 1, loc="best")
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
