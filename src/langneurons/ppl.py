"""The deactivation perplexity matrix (METHODS.md 4.1, [T24], [M25]).

Rows are interventions (by default: ``zero`` on the neurons of one language), plus the baseline row
(no intervention) and matched random-control rows (:func:`langneurons.neuronset.random_control`,
one set per seed, the same number of neurons per language and layer drawn outside every language
set). Columns are evaluated languages. Every cell is computed on the **same** held-out windows:
each column's text is tokenised and packed once (:mod:`langneurons.corpus`: documents joined with
EOS, windows of ``T`` tokens starting with BOS, a seeded subset of ``max_tokens // T`` windows).

For a window ``x_0 .. x_{T-1}`` the predicted tokens are ``x_1 .. x_{T-1}`` (labels at pad positions,
when a mask is given, are dropped: a label counts iff it and its context token are real). With
``NLL = -sum log p(x_t | x_<t)`` summed over every predicted token of every window of the column and
``N`` the number of predicted tokens::

    mean_nll[r, c] = NLL[r, c] / N[c]          ppl[r, c] = exp(mean_nll[r, c])
    delta_ppl[r, c] = ppl[r, c] - ppl[baseline, c]   delta_nll[r, c] = mean_nll[r, c] - mean_nll[baseline, c]

``delta_nll`` is ``log(ppl / ppl_baseline)``: scale-free, so it is what the diagonal-dominance
summary and the heatmap use.

What is reused instead of ``K^2`` independent full runs:

- tokenisation and packing: once per column, shared by every row;
- the baseline: once per column (the [M25] scripts recomputed it for every row);
- stacked rows: one forward pass holds sequences of several rows (``intervene_rows``: each
  sequence carries its own row's neuron table), so a column costs ``ceil(R * n_windows / B)``
  passes of ``B`` sequences whatever the number of rows ``R``, with no per-row set-up;
- per-neuron values (statistic operators) are computed once per row, not per batch.

The layers below the first intervened layer are recomputed for every row (skipping them would
need architecture-specific code); on a GPU the stacked passes make this cheap.

Intervals (:mod:`langneurons.uncertainty`): every headline number ``x`` of ``ppl.json`` is published
with ``x_ci95 = [lo, hi]``, the 95% percentile bootstrap interval over ``B = 2000`` replicates. The
units resampled are the column's held-out windows: all windows of a column have the same length and
no padding, so the column's ``mean_nll`` is the mean over its windows of the per-window mean NLL,
and a replicate recomputes it on ``n`` windows drawn with replacement. The draw is **paired**: one
index draw per replicate and column serves every row (baseline, language rows, random rows), so
``delta_nll`` / ``delta_ppl`` / the own-vs-random ``difference`` intervals reflect that every row is
scored on the same windows. Column ``c`` (0-based position in ``columns``) draws its windows with
``resample_indices(n_c, seed=seed + c)`` (``seed``: the command's ``--seed``); each replicate resamples
every column with its own draw, so the dominance counts are recomputed per replicate on a whole
replicate matrix. The ``random:<code>`` rows (means over the random-control seeds) also resample the
seeds when there are at least two: per replicate, ``S`` seed indices drawn with replacement from
``numpy.random.default_rng([seed, 1])`` (one draw per replicate, shared by every random row and
column, since one seed is one control set for every language). Integer counts (dominance) publish
the percentile interval widened outward to integers (``floor(lo)``, ``ceil(hi)``).

Deactivation-value sweep (which replacement value truly deactivates a neuron? [M25] open question
2: writing ``zero`` is not "off" for neurons whose typical activation is far from 0, and a low
percentile such as ``set:p10`` hurts too). ``operator`` may be a comma-separated list,
``zero,set:p1,set:p5,set:p10,set:p25,set:p50``: every operator's rows are stacked into the **same**
matrix pass (rows ``OP|code`` and ``OP|random[seed]:code``; the baseline once), so the sweep costs one
pass over the windows with ``1 + n_ops * (L + S * L)`` rows instead of ``n_ops`` runs. Each operator's
record is built from its own rows exactly as a one-operator run builds it (the same windows, the
same seeded window draws, so a sweep's per-operator matrices equal separate runs'). ``ppl.json``
keeps the **first** operator's record at the top level (what a one-operator run writes; ``work``
counts the whole pass) and adds ``sweep``: for each operator, on the ``m`` languages that are both
rows and columns::

    own[op]         = mean_k delta_nll[k, k]                  (the deactivated language's own damage)
    other[op]       = mean_{k != j} delta_nll[k, j]            (damage to the other languages)
    selectivity[op] = own[op] - other[op]

and the row-dominance count, each with its 95% interval from the paired window bootstrap above
(one draw per replicate and column, shared by every operator, so the intervals of different
operators are paired too). A replacement value that truly deactivates language neurons should
give a large own damage with a small other damage (high selectivity); one that merely breaks the
model raises both. A one-operator run writes no ``sweep`` and is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .corpus import LanguageSource, Packing, cut_windows, load_stream, select_windows
from .errors import UserError
from .intervene import Intervention, Operator
from .uncertainty import LEVEL, N_BOOT, interval, overlap, resample_indices

from .artifacts import PPL_FORMAT, PPL_PARTIAL_FORMAT  # noqa: E402 - the tags are defined in the artifact registry


# ------------------------------------------------------------------------------------------ data
def heldout_windows(source: LanguageSource, tokenizer, window: int, max_tokens: Optional[int], seed: int = 0,
                    cache_dir: Optional[Path] = None) -> np.ndarray:
    """The column's evaluation windows ``[n, T]`` (uint32): packed once, a seeded subset if capped."""
    packing = Packing(window).resolve(tokenizer)
    stream, _ = load_stream(source, tokenizer, packing, cache_dir,
                            stream_cap=(max_tokens * 4 if max_tokens else None))
    windows = cut_windows(stream, packing, tokenizer.bos_token_id, source.code)
    return windows[select_windows(len(windows), window, max_tokens, seed)]


# ------------------------------------------------------------------------------------------ operators
SWEEP_SEP = "|"      # row names of a sweep: ``OP|code``, ``OP|random[seed]:code``


def parse_operators(text: str) -> list[Operator]:
    """The operators of ``--operator OP[,OP...]``, in the order given; UserError (one line) on an
    empty entry, an unknown operator or the same operator twice (``zero`` and ``set:0``, ``set:p10``
    and ``set:p10*1`` are the same operator)."""
    from .intervene import parse_operator
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) > 1 and not all(parts):
        raise UserError(f"--operator {text!r} has an empty entry; give comma-separated operators, "
                        "e.g. zero,set:p10,set:p50")
    ops: list[Operator] = []
    seen: dict[tuple, str] = {}
    for part in parts:
        op = parse_operator(part)
        q = op.quantile
        key = (op.mode, op.source, q if q is not None else op.stat, float(op.value), float(op.factor))
        if key in seen:
            same = "" if seen[key] == op.spec else f" (the same as {seen[key]!r})"
            raise UserError(f"duplicate operator {op.spec!r} in --operator{same}; give each operator once")
        seen[key] = op.spec
        ops.append(op)
    return ops


# ------------------------------------------------------------------------------------------ scoring
@dataclass
class MatrixResult:
    rows: list[str]
    columns: list[str]
    nll_sum: torch.Tensor            # float64 [R, C]
    tokens: list[int]                # predicted tokens per column
    windows: list[int]
    passes: int
    sequences: int
    seconds: float
    window_nll: list[torch.Tensor] = field(default_factory=list)   # per column: float64 [R, n_windows]

    @property
    def mean_nll(self) -> torch.Tensor:
        return self.nll_sum / torch.tensor(self.tokens, dtype=torch.float64).clamp_min(1)

    def window_mean_nll(self, c: int) -> torch.Tensor:
        """Per-window mean NLL ``[R, n]`` of column ``c`` (windows have equal length and no padding, so
        its mean over windows is ``mean_nll[:, c]``)."""
        per_window = self.tokens[c] // max(self.windows[c], 1)
        return self.window_nll[c] / max(per_window, 1)

    @property
    def ppl(self) -> torch.Tensor:
        return self.mean_nll.exp()


def perplexity_matrix(session, rows: list[tuple[str, Optional[Intervention]]], columns: dict[str, np.ndarray],
                      progress: bool = False, done: Optional[dict[str, dict]] = None,
                      on_column: Optional[Callable[[str, dict], None]] = None) -> MatrixResult:
    """NLL of every row (intervention or ``None``) on every column's windows, stacked in passes of
    ``session.batch_size`` sequences (see the module docstring) through the runtime's token-NLL pass.

    Data parallel under torchrun: rank ``r`` runs passes ``r, r + W, ...`` of each column and every
    rank adds the gathered per-pass sums in pass order, so the matrix equals a one-process run.
    The per-window NLL sums (``window_nll``) come from the same gathered results, so they are the
    same on every rank.
    Resuming: ``done`` maps a column to its finished result (``{"nll": [R floats], "tokens": int,
    "windows": int, "window_nll": [R][n floats]}``), which is used instead of recomputing it (an entry
    without ``window_nll``, from an older checkpoint, is recomputed); ``on_column(code, result)`` is
    called as each column finishes, so that a caller can checkpoint it."""
    batch_size = session.batch_size
    R = len(rows)
    nll = torch.zeros(R, len(columns), dtype=torch.float64)
    tokens, nwin = [], []
    window_nll: list[torch.Tensor] = []
    passes = seqs = 0
    t0 = time.perf_counter()
    bar = None
    done = {c: v for c, v in (done or {}).items() if isinstance(v, dict) and "window_nll" in v}
    if progress and session.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(R * len(w) for c, w in columns.items() if c not in done), unit="seq", desc="ppl",
                   dynamic_ncols=True, mininterval=1.0)
    with session.intervened_rows([iv for _, iv in rows]) as ctl:
        for c, (code, windows) in enumerate(columns.items()):
            if code in done:
                nll[:, c] = torch.tensor(done[code]["nll"], dtype=torch.float64)
                tokens.append(int(done[code]["tokens"]))
                nwin.append(int(done[code]["windows"]))
                window_nll.append(torch.tensor(done[code]["window_nll"], dtype=torch.float64).reshape(R, nwin[-1]))
                continue
            W = torch.from_numpy(np.asarray(windows, dtype=np.int64))
            n = W.shape[0]
            pair_row = torch.arange(R).repeat_interleave(n)
            pair_win = torch.arange(n).repeat(R)

            def run(k: int, idx: list[int]) -> dict:
                ctl.assign(pair_row[idx])
                seq_nll, seq_n = session.token_nll(W[pair_win[idx]])
                return {k: (seq_nll.cpu(), int(seq_n[0]))}    # windows have equal length and no padding

            batches = [list(range(s, min(s + batch_size, R * n))) for s in range(0, R * n, batch_size)]
            per_pass = session.map_batches(batches, run, progress=bar.update if bar is not None else None)
            wn = torch.zeros(R, n, dtype=torch.float64)
            for k in range(len(batches)):                   # pass order: the same sums on every rank
                nll[:, c].index_add_(0, pair_row[batches[k]], per_pass[k][0])
                wn[pair_row[batches[k]], pair_win[batches[k]]] = per_pass[k][0].to(torch.float64)
            count = per_pass[0][1] if batches else 0
            passes += len(batches)
            seqs += R * n
            tokens.append(count * n)
            nwin.append(n)
            window_nll.append(wn)
            if on_column is not None:
                on_column(code, {"nll": nll[:, c].tolist(), "tokens": count * n, "windows": n,
                                 "window_nll": wn.tolist()})
    if bar is not None:
        bar.close()
    return MatrixResult(rows=[name for name, _ in rows], columns=list(columns), nll_sum=nll, tokens=tokens,
                        windows=nwin, passes=passes, sequences=seqs, seconds=time.perf_counter() - t0,
                        window_nll=window_nll)


# ------------------------------------------------------------------------------------------ summaries
def diagonal_dominance(delta: torch.Tensor, row_langs: list[str], col_langs: list[str]) -> dict:
    """For languages that are both a row and a column: is ``delta[k, k]`` the largest of its row
    (deactivating k hurts k most) and of its column (k is hurt most by its own neurons)?"""
    common = [k for k in row_langs if k in col_langs]
    out = {"row": {}, "column": {}}
    for k in common:
        r, c = row_langs.index(k), col_langs.index(k)
        row = delta[r, [col_langs.index(j) for j in common]]
        col = delta[[row_langs.index(j) for j in common], c]
        d = float(delta[r, c])
        out["row"][k] = bool(all(d > float(v) for j, v in zip(common, row) if j != k))
        out["column"][k] = bool(all(d > float(v) for j, v in zip(common, col) if j != k))
    out["row_count"] = sum(out["row"].values())
    out["column_count"] = sum(out["column"].values())
    out["languages"] = len(common)
    return out


def _round(t: torch.Tensor, nd: int = 6) -> list:
    return [[(round(float(v), nd) if math.isfinite(float(v)) else None) for v in row] for row in t.tolist()]


# ------------------------------------------------------------------------------------------ intervals
def dominance_counts(delta: np.ndarray, row_langs: list[str], col_langs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The row and column counts of :func:`diagonal_dominance` for a stack of matrices ``[B, L, K]``:
    two int arrays ``[B]`` (vectorised; the same strict comparisons)."""
    delta = np.asarray(delta, dtype=np.float64)
    common = [k for k in row_langs if k in col_langs]
    m = len(common)
    if m == 0:
        return np.zeros(delta.shape[0], dtype=np.int64), np.zeros(delta.shape[0], dtype=np.int64)
    sub = delta[:, [row_langs.index(k) for k in common]][:, :, [col_langs.index(k) for k in common]]
    diag = np.diagonal(sub, axis1=1, axis2=2)                         # [B, m]
    same = np.eye(m, dtype=bool)
    row_ok = ((diag[:, :, None] > sub) | same).all(axis=2)            # d[k, k] > d[k, j], j != k
    col_ok = ((diag[:, None, :] > sub) | same).all(axis=1)            # d[k, k] > d[j, k], j != k
    return row_ok.sum(1), col_ok.sum(1)


def replicate_nll(res: MatrixResult, seed: int = 0, n_boot: int = N_BOOT) -> np.ndarray:
    """``[B, R, C]``: every result row's mean NLL on each column's bootstrap resamples of its windows.

    Paired: column ``c`` draws ``resample_indices(n_c, n_boot, seed + c)`` once and every row uses it.
    A column without windows gives NaN."""
    R, C = len(res.rows), len(res.columns)
    out = np.full((n_boot, R, C), np.nan)
    for c in range(C):
        wm = res.window_mean_nll(c).numpy()                           # [R, n]
        n = wm.shape[1]
        if n == 0:
            continue
        idx = resample_indices(n, n_boot, seed + c)
        counts = np.bincount((idx + n * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * n)
        out[:, :, c] = counts.reshape(n_boot, n).astype(np.float64) @ wm.T / n
    return out


def _ci(reps: np.ndarray, nd: int = 6):
    """Nested ``[..., [lo, hi]]`` percentile intervals along axis 0, rounded (None where not finite)."""
    r = np.asarray(reps, dtype=np.float64)
    if np.isnan(r).any():
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)          # all-NaN cells (no windows)
            iv = interval(r)
    else:   # the same numbers as interval() (nanpercentile without NaNs), without its per-cell loop
        a = (1.0 - LEVEL) / 2.0
        iv = np.stack([np.percentile(r, 100 * a, axis=0), np.percentile(r, 100 * (1 - a), axis=0)], axis=-1).tolist()

    def rnd(x):
        if isinstance(x, list):
            if len(x) == 2 and not isinstance(x[0], list):
                return [round(float(v), nd) if math.isfinite(float(v)) else None for v in x] \
                    if all(math.isfinite(float(v)) for v in x) else None
            return [rnd(v) for v in x]
        return x
    return rnd(iv)


def _count_ci(reps: np.ndarray) -> list[int]:
    """Interval of an integer count: the percentile interval widened outward to integers."""
    lo, hi = interval(np.asarray(reps, dtype=np.float64))
    return [int(math.floor(lo + 1e-9)), int(math.ceil(hi - 1e-9))]


# ------------------------------------------------------------------------------------------ the command
@dataclass
class PPLConfig:
    model: str
    neurons: Path
    languages: list[LanguageSource]
    out: Path
    stats: Optional[Path] = None
    operator: str = "zero"              # one operator, or a comma-separated list: a sweep (module docstring)
    site: str = "act"
    rows: Optional[list[str]] = None
    random_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    window: int = 512
    max_tokens: Optional[int] = None
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    arch: Optional[str] = None
    device_map: Optional[str] = None
    trust_remote_code: bool = False
    seed: int = 0
    cache_dir: Optional[Path] = None
    progress: bool = True
    command_key: Optional[str] = None   # recorded in ppl.json (langneurons.outputs: reruns of the same command)


def run_ppl(cfg: PPLConfig, model=None, tokenizer=None) -> dict:
    """Load everything, compute the matrix, write ``OUT/ppl.json`` and ``OUT/ppl.png`` (a sweep, several
    comma-separated operators: also ``OUT/ppl_sweep.png``); return the record."""
    from .collect import check_run_options
    from .runtime import ModelOptions, model_fingerprint, open_session
    from .neuronset import NeuronSet, random_control
    from .atomic import atomic_write_text
    from .resume import Partial
    from .stats import ActivationStats

    check_run_options(cfg.window, cfg.batch_size, cfg.max_tokens, cfg.dtype)
    if any(s < 0 for s in cfg.random_seeds):
        raise UserError("--random-seeds must be non-negative integers")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    ops = parse_operators(cfg.operator)
    specs = [o.spec for o in ops]
    sweep = len(ops) > 1
    ns = NeuronSet.load(cfg.neurons)
    stats = ActivationStats.load(cfg.stats) if cfg.stats is not None else None
    row_langs = list(cfg.rows) if cfg.rows is not None else ns.languages
    for code in row_langs:
        if code not in ns.neurons:
            raise UserError(f"unknown language {code!r} in --rows: the neuron set {cfg.neurons} has "
                            f"{', '.join(ns.languages)}")
    for op in ops:
        if op.needs_stats and stats is None:
            raise UserError(f"operator {op.spec!r} needs activation statistics; pass --stats DIR")

    session = open_session(ModelOptions(cfg.model, cfg.arch, cfg.dtype, cfg.device, cfg.device_map,
                                        cfg.trust_remote_code), arch_from=(cfg.neurons, cfg.stats),
                           batch_size=cfg.batch_size, model=model, tokenizer=tokenizer)
    model, tokenizer, adapter = session.model, session.tokenizer, session.adapter
    ns.validate_for(adapter.num_layers, adapter.width)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and cfg.window > max_pos:
        raise UserError(f"--window {cfg.window} exceeds the model's {max_pos} positions; lower --window")

    def make(neurons, code, spec):
        # values of statistic operators come from the language's own statistics (random rows too)
        return Intervention(neurons=neurons, languages=[code], operator=spec, stats=stats, site=cfg.site)

    # one operator: baseline, language rows, random rows (seed-major); a sweep: the baseline once, then
    # the same rows of every operator, named OP|code and OP|random[seed]:code (module docstring)
    controls = {seed: random_control(ns, seed) for seed in cfg.random_seeds}
    rows: list[tuple[str, Optional[Intervention]]] = [("baseline", None)]
    for spec in specs:
        pre = f"{spec}{SWEEP_SEP}" if sweep else ""
        rows += [(f"{pre}{code}", make(ns, code, spec)) for code in row_langs]
        rows += [(f"{pre}random[{seed}]:{code}", make(controls[seed], code, spec))
                 for seed in cfg.random_seeds for code in row_langs]
    columns = {src.code: heldout_windows(src, tokenizer, cfg.window, cfg.max_tokens, cfg.seed, cfg.cache_dir)
               for src in cfg.languages}

    # Resume: every finished column is checkpointed in OUT/.partial/ppl.json under a key of everything
    # that determines it (model, rows, their interventions, the column's windows); a rerun of the same
    # command recomputes only the missing columns.
    # partial_version 2: parts carry the per-window NLL sums (an older checkpoint is not reused).
    key_doc = {"partial_version": 2, "model": model_fingerprint(model), "rows": [name for name, _ in rows],
               "neurons": hashlib.sha256(Path(cfg.neurons).read_bytes()).hexdigest(),
               "operator": specs if sweep else specs[0],
               "site": cfg.site, "stats": stats.fingerprint if stats is not None else None,
               "columns": {c: hashlib.sha256(np.ascontiguousarray(w, dtype=np.int64).tobytes()).hexdigest()
                           for c, w in columns.items()}}
    partial = Partial(out, "ppl", key_doc, PPL_PARTIAL_FORMAT, "columns", write=session.is_main)
    done = {c: v for c, v in partial.parts.items() if c in columns}
    if done and cfg.progress and session.is_main:
        print(f"ppl: resuming: {len(done)} of {len(columns)} columns already computed ({', '.join(done)})",
              file=sys.stderr)
    res = perplexity_matrix(session, rows, columns, progress=cfg.progress, done=done, on_column=partial.add)
    if sweep:
        record = build_sweep_record(res, specs, row_langs, cfg.random_seeds, ns, cfg, adapter)
    else:
        record = build_record(res, row_langs, cfg.random_seeds, ns, cfg, specs[0], adapter)
    record["work"]["resumed_columns"] = list(done)  # taken from the checkpoint of an interrupted run
    if cfg.command_key:
        from .outputs import KEY_FIELD
        record[KEY_FIELD] = cfg.command_key
    if not session.is_main:
        return record
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "ppl.json", json.dumps(record, indent=1, ensure_ascii=False))
    if sweep:
        plot_sweep_heatmap(record, row_langs, out / "ppl.png")
        plot_sweep(record, out / "ppl_sweep.png")
    else:
        plot_ppl(record, row_langs, bool(cfg.random_seeds), specs[0], out / "ppl.png")
    partial.clear()
    return record


def plot_ppl(record: dict, row_langs: list[str], with_random: bool, op: str, path: Path) -> None:
    """``ppl.png``: the change in NLL of every language row (and its random control) on every column."""
    from .plots import plot_heatmap
    main_rows = ["baseline"] + row_langs + ([f"random:{c}" for c in row_langs] if with_random else [])
    labels = [r for r in main_rows if r != "baseline"]
    dn = record["delta_nll"]
    mat = [dn[record["rows"].index(r)] for r in labels]
    plot_heatmap([[float("nan") if v is None else v for v in row] for row in mat], labels, record["columns"],
                 path, fmt=".2f", cmap="magma",
                 title=f"{op} on language neurons: ΔNLL = log(PPL / baseline PPL); rows: neurons, "
                       "columns: evaluated language")


def plot_sweep_heatmap(record: dict, row_langs: list[str], path: Path) -> None:
    """``ppl.png`` of a sweep: the change in NLL of every operator's language rows (``OP|code``)."""
    from .plots import plot_heatmap
    labels, mat = [], []
    for spec in record["sweep"]["operators"]:
        rec = record["sweep"]["per_operator"][spec]
        for code in row_langs:
            labels.append(f"{spec}{SWEEP_SEP}{code}")
            mat.append(rec["delta_nll"][rec["rows"].index(code)])
    plot_heatmap([[float("nan") if v is None else v for v in row] for row in mat], labels, record["columns"],
                 path, fmt=".2f", cmap="magma",
                 title="deactivation-value sweep: ΔNLL = log(PPL / baseline PPL); rows: operator|neurons, "
                       "columns: evaluated language")


def plot_sweep(record: dict, path: Path) -> None:
    """``ppl_sweep.png``: own- and other-language damage (mean ΔNLL, 95% interval bars) per operator,
    operators on the x axis in the order given."""
    from .plots import plot_intervals
    sw = record["sweep"]
    specs = sw["operators"]
    nan = float("nan")

    def series(name):
        vals = [sw[name][o]["value"] for o in specs]
        cis = [sw[name][o]["ci95"] or [nan, nan] for o in specs]
        return ([nan if v is None else v for v in vals], [nan if c[0] is None else c[0] for c in cis],
                [nan if c[1] is None else c[1] for c in cis])
    own, other = series("own"), series("other")
    plot_intervals([own[0], other[0]], specs, path, lows=[own[1], other[1]], highs=[own[2], other[2]],
                   series=["own language (diagonal)", "other languages (off-diagonal)"],
                   ylabel="mean ΔNLL (log PPL ratio)",
                   title=f"deactivation-value sweep on {len(sw['languages'])} languages: which value "
                         "deactivates? (95% bootstrap intervals)")



def build_record(res: MatrixResult, row_langs: list[str], seeds: list[int], ns, cfg: PPLConfig, op: str,
                 adapter) -> dict:
    """The ``ppl.json`` document: main matrix (baseline, language rows, seed-averaged random rows)
    plus every per-seed random row."""
    names = res.rows
    mean_nll = res.mean_nll
    ppl = res.ppl
    base = names.index("baseline")
    main = ["baseline"] + row_langs
    M_nll = [mean_nll[names.index(r)] for r in main]
    M_ppl = [ppl[names.index(r)] for r in main]
    if seeds:
        for code in row_langs:
            idx = [names.index(f"random[{s}]:{code}") for s in seeds]
            main.append(f"random:{code}")
            M_nll.append(mean_nll[idx].mean(0))
            M_ppl.append(ppl[idx].mean(0))
    M_nll = torch.stack(M_nll)
    M_ppl = torch.stack(M_ppl)
    d_nll = M_nll - mean_nll[base]
    d_ppl = M_ppl - ppl[base]
    lang_rows = torch.stack([d_nll[main.index(c)] for c in row_langs]) if row_langs else d_nll[:0]
    dom = diagonal_dominance(lang_rows, row_langs, res.columns)

    # bootstrap replicates of the main matrix (module docstring): windows paired across rows, seeds resampled
    rep = replicate_nll(res, cfg.seed, N_BOOT)                        # [B, R, C]
    B = rep.shape[0]
    r_nll = [rep[:, names.index(r)] for r in ["baseline"] + row_langs]
    r_ppl = [np.exp(x) for x in r_nll]
    if seeds:
        S = len(seeds)
        if S >= 2:
            sidx = np.random.default_rng([cfg.seed, 1]).integers(0, S, size=(B, S))
        else:
            sidx = np.zeros((B, 1), dtype=np.int64)
        for code in row_langs:
            per = rep[:, [names.index(f"random[{s}]:{code}") for s in seeds]]      # [B, S, C]
            chosen = np.take_along_axis(per, sidx[:, :, None], axis=1)
            r_nll.append(chosen.mean(1))
            r_ppl.append(np.exp(chosen).mean(1))
    r_nll = np.stack(r_nll, axis=1)                                   # [B, M, C]
    r_ppl = np.stack(r_ppl, axis=1)
    r_dnll = r_nll - r_nll[:, :1]
    r_dppl = r_ppl - r_ppl[:, :1]
    d_nll_ci = _ci(r_dnll)
    L = len(row_langs)
    rc_reps, cc_reps = dominance_counts(r_dnll[:, 1:1 + L], row_langs, res.columns)
    m = dom["languages"]
    dom["row_count_ci95"] = _count_ci(rc_reps)
    dom["column_count_ci95"] = _count_ci(cc_reps)
    dom["row_share"] = round(dom["row_count"] / m, 6) if m else None
    dom["row_share_ci95"] = [round(v / m, 6) for v in dom["row_count_ci95"]] if m else None
    dom["column_share"] = round(dom["column_count"] / m, 6) if m else None
    dom["column_share_ci95"] = [round(v / m, 6) for v in dom["column_count_ci95"]] if m else None

    vs_random = {}
    if seeds:
        for code in row_langs:
            if code in res.columns:
                c = res.columns.index(code)
                i, j = main.index(code), main.index(f"random:{code}")
                real = float(d_nll[i, c])
                rand = float(d_nll[j, c])
                real_r, rand_r = round(real, 6), round(rand, 6)
                real_ci, rand_ci = d_nll_ci[i][c], d_nll_ci[j][c]
                sep = overlap(real_ci, rand_ci)
                vs_random[code] = {"delta_nll": real_r, "random_delta_nll": rand_r,
                                   "ratio": round(real / rand, 3) if rand > 0 else None,
                                   "delta_nll_ci95": real_ci, "random_delta_nll_ci95": rand_ci,
                                   "difference": round(real_r - rand_r, 6),
                                   "difference_ci95": _ci(r_dnll[:, i, c] - r_dnll[:, j, c]),
                                   "separated": bool(sep is False and real_r > rand_r),
                                   "seeds": len(seeds)}
    headline = {
        "row_dominance": {"count": dom["row_count"], "of": m, "ci95": dom["row_count_ci95"]},
        "column_dominance": {"count": dom["column_count"], "of": m, "ci95": dom["column_count_ci95"]},
        "own_above_random": ({"count": sum(v["delta_nll"] > v["random_delta_nll"] for v in vs_random.values()),
                              "separated": sum(v["separated"] for v in vs_random.values()),
                              "of": len(vs_random)} if seeds else None),
        "intervals": f"95% percentile bootstrap over held-out windows (paired across rows), random seeds "
                     f"resampled; B={B}",
    }
    per_seed = {str(s): {"rows": row_langs, "ppl": _round(torch.stack([ppl[names.index(f"random[{s}]:{c}")]
                                                                       for c in row_langs])) if row_langs else []}
                for s in seeds}
    return {
        "format": PPL_FORMAT,
        "rows": main,
        "columns": res.columns,
        "languages": {"rows": row_langs, "columns": res.columns},
        "ppl": _round(M_ppl),
        "mean_nll": _round(M_nll),
        "delta_ppl": _round(d_ppl),
        "delta_nll": _round(d_nll),
        "ppl_ci95": _ci(r_ppl),
        "mean_nll_ci95": _ci(r_nll),
        "delta_ppl_ci95": _ci(r_dppl),
        "delta_nll_ci95": d_nll_ci,
        "headline": headline,
        "diagonal_dominance": dom,
        "vs_random": vs_random,
        "random_control": {"seeds": seeds, "per_seed": per_seed,
                           "sizes": {c: ns.total(c) for c in row_langs}},
        "tokens": dict(zip(res.columns, res.tokens)),
        "windows": dict(zip(res.columns, res.windows)),
        "settings": {"model": cfg.model, "model_type": adapter.model_type, "neurons": str(cfg.neurons),
                     "neuron_method": ns.method.get("name"), "neuron_counts": {c: ns.total(c) for c in row_langs},
                     "stats": str(cfg.stats) if cfg.stats else None, "operator": op, "site": cfg.site,
                     "positions": "all", "window": cfg.window, "max_tokens": cfg.max_tokens,
                     "batch_size": cfg.batch_size, "seed": cfg.seed,
                     "sources": {s.code: s.spec for s in cfg.languages}},
        "work": _work(res),
    }


def _work(res: MatrixResult) -> dict:
    """``ppl.json``'s ``work``: what the matrix pass cost, and what ``K^2`` separate runs would have."""
    return {"forward_passes": res.passes, "sequences": res.sequences, "seconds": round(res.seconds, 3),
            "naive_sequences": 2 * (len(res.rows) - 1) * sum(res.windows), "columns": len(res.columns),
            "reused": "windows tokenised once per column; baseline once per column; rows stacked "
                      "in shared forward passes (intervene_rows)"}


# ------------------------------------------------------------------------------------------ the sweep
# keys of a per-operator record that every operator shares (kept once, at the top level of ppl.json)
_SHARED_KEYS = ("format", "columns", "languages", "tokens", "windows", "settings", "work")


def operator_rows(res: MatrixResult, spec: str) -> MatrixResult:
    """The baseline and operator ``spec``'s rows of a sweep's matrix, named as in a one-operator run
    (``OP|code`` -> ``code``); the cost fields are the whole pass's."""
    pre = f"{spec}{SWEEP_SEP}"
    idx = [0] + [i for i, r in enumerate(res.rows) if r.startswith(pre)]
    if res.rows[0] != "baseline" or len(idx) == 1:
        raise ValueError(f"no rows of operator {spec!r} in the matrix")
    names = ["baseline"] + [res.rows[i][len(pre):] for i in idx[1:]]
    return MatrixResult(rows=names, columns=res.columns, nll_sum=res.nll_sum[idx], tokens=res.tokens,
                        windows=res.windows, passes=res.passes, sequences=res.sequences, seconds=res.seconds,
                        window_nll=[w[idx] for w in res.window_nll])


def sweep_summary(res: MatrixResult, specs: list[str], row_langs: list[str], records: dict, seed: int = 0,
                  n_boot: int = N_BOOT) -> dict:
    """``ppl.json``'s ``sweep`` (module docstring): own / other damage, selectivity and row dominance
    per operator with 95% intervals, from the replicates of :func:`replicate_nll` (the paired window
    bootstrap of :func:`build_record`: the same seeded draws, shared by every operator's rows).
    ``records``: each operator's :func:`build_record` document (its dominance count and interval are
    taken from there, its matrices go to ``per_operator``)."""
    common = [k for k in row_langs if k in res.columns]
    m = len(common)
    rep = replicate_nll(res, seed, n_boot)                             # [B, R, C]: every row of the sweep
    ci = [res.columns.index(k) for k in common]
    off = ~np.eye(m, dtype=bool)
    mean_nll = res.mean_nll.numpy()
    base = res.rows.index("baseline")

    def stats(d: np.ndarray):
        """own, other of ``[..., m, m]`` delta matrices (None where undefined)."""
        own = np.diagonal(d, axis1=-2, axis2=-1).mean(-1) if m else None
        other = d[..., off].mean(-1) if m >= 2 else None
        return own, other

    def entry(point, reps) -> dict:
        if point is None:
            return {"value": None, "ci95": None}
        return {"value": round(float(point), 6), "ci95": _ci(reps)}

    out = {"operators": list(specs), "languages": common, "own": {}, "other": {}, "selectivity": {},
           "row_dominance": {}, "per_operator": {}}
    for spec in specs:
        ri = [res.rows.index(f"{spec}{SWEEP_SEP}{k}") for k in common]
        point = mean_nll[ri][:, ci] - mean_nll[base, ci]                # [m, m] delta NLL
        reps = rep[:, ri][:, :, ci] - rep[:, base, ci][:, None, :]      # [B, m, m], paired
        own, other = stats(point)
        own_r, other_r = stats(reps)
        out["own"][spec] = entry(own, own_r)
        out["other"][spec] = entry(other, other_r)
        out["selectivity"][spec] = entry(None if own is None or other is None else own - other,
                                         None if own is None or other is None else own_r - other_r)
        out["row_dominance"][spec] = dict(records[spec]["headline"]["row_dominance"])
        out["per_operator"][spec] = {k: v for k, v in records[spec].items() if k not in _SHARED_KEYS}
    out["definition"] = (f"delta NLL on the {m} languages that are both rows and columns: own = mean of the "
                         "diagonal, other = mean of the off-diagonal cells, selectivity = own - other; "
                         "row_dominance as in diagonal_dominance")
    out["intervals"] = (f"95% percentile bootstrap over held-out windows (paired across rows and operators); "
                        f"B={rep.shape[0]}")
    return out


def build_sweep_record(res: MatrixResult, specs: list[str], row_langs: list[str], seeds: list[int], ns,
                       cfg: PPLConfig, adapter) -> dict:
    """``ppl.json`` of a sweep: the first operator's :func:`build_record` document at the top level (its
    ``work``: the whole pass) plus ``sweep`` (:func:`sweep_summary`)."""
    records = {spec: build_record(operator_rows(res, spec), row_langs, seeds, ns, cfg, spec, adapter)
               for spec in specs}
    record = dict(records[specs[0]])
    record["work"] = _work(res)
    record["sweep"] = sweep_summary(res, specs, row_langs, records, cfg.seed)
    return record


def print_summary(record: dict, file=None) -> None:
    """A plain-text table of PPL per row and column."""
    file = file if file is not None else sys.stdout
    sweep = record.get("sweep")
    if sweep:
        print(f"operator {sweep['operators'][0]} (the first of the sweep; every operator's matrices: "
              "sweep.per_operator in ppl.json)", file=file)
    cols = record["columns"]
    w = max(8, max(len(r) for r in record["rows"]) + 1)
    print("PPL".ljust(w) + "".join(c.rjust(10) for c in cols), file=file)
    for r, row in zip(record["rows"], record["ppl"]):
        print(r.ljust(w) + "".join(("-" if v is None else f"{v:.2f}").rjust(10) for v in row), file=file)
    dom = record["diagonal_dominance"]

    def ci(v) -> str:
        if not v:
            return ""
        fmt = (lambda x: f"{x}") if all(isinstance(x, int) for x in v) else (lambda x: f"{x:.3f}")
        return f" [{fmt(v[0])}, {fmt(v[1])}]"
    print(f"diagonal dominance (delta NLL, 95% CI): rows {dom['row_count']}/{dom['languages']}"
          f"{ci(dom.get('row_count_ci95'))}, columns {dom['column_count']}/{dom['languages']}"
          f"{ci(dom.get('column_count_ci95'))}", file=file)
    vs = record.get("vs_random") or {}
    if vs:
        print("own vs random delta NLL (own column, 95% CI):", file=file)
        for code, v in vs.items():
            mark = "separated" if v.get("separated") else "overlapping"
            print(f"  {code.ljust(w - 2)}own {v['delta_nll']:.3f}{ci(v.get('delta_nll_ci95'))}   "
                  f"random {v['random_delta_nll']:.3f}{ci(v.get('random_delta_nll_ci95'))}   {mark}", file=file)
        own = (record.get("headline") or {}).get("own_above_random")
        if own:
            print(f"own damage above random: {own['count']}/{own['of']} "
                  f"(intervals separated for {own['separated']})", file=file)
    if sweep:
        print_sweep(sweep, file=file)


def print_sweep(sweep: dict, file=None) -> None:
    """The sweep table: operator, own [ci], other [ci], selectivity [ci], row dominance [ci]."""
    file = file if file is not None else sys.stdout

    def cell(e) -> str:
        if e is None or e.get("value") is None:
            return "-"
        c = e.get("ci95")
        return f"{e['value']:.3f}" + (f" [{c[0]:.3f}, {c[1]:.3f}]" if c else "")
    w = max(10, max(len(o) for o in sweep["operators"]) + 2)
    print(f"deactivation-value sweep (delta NLL on {len(sweep['languages'])} languages, 95% CI; "
          "selectivity = own - other):", file=file)
    print("operator".ljust(w) + "own".ljust(26) + "other".ljust(26) + "selectivity".ljust(26) + "row dominance",
          file=file)
    for o in sweep["operators"]:
        d = sweep["row_dominance"][o]
        dom = f"{d['count']}/{d['of']}" + (f" [{d['ci95'][0]}, {d['ci95'][1]}]" if d.get("ci95") else "")
        print(o.ljust(w) + cell(sweep["own"][o]).ljust(26) + cell(sweep["other"][o]).ljust(26)
              + cell(sweep["selectivity"][o]).ljust(26) + dom, file=file)
