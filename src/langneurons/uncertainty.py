"""Uncertainty of headline numbers: nonparametric bootstrap percentile intervals.

One convention everywhere (``ppl.json``, ``steer.json``, the report): a number ``x`` computed from
``n`` independent units (held-out windows, generations, cloze items, random seeds) is published with
``x_ci95 = [lo, hi]``, the 2.5 and 97.5 percentiles of ``x`` recomputed on ``B`` resamples of the
units drawn with replacement (Efron's percentile bootstrap; ``B = 2000``, seeded, so a rerun
gives the same interval). Paired quantities (the same windows under two interventions, the same
prompts with and without steering) are resampled *together*: one index draw per replicate serves
every row of a matrix, so a difference's interval reflects the pairing.

For the mean of ``n`` values with standard deviation ``s`` and ``n`` large, the interval approaches
the normal one ``mean +- 1.96 s / sqrt(n)`` (the tests check this); for a proportion it approaches
the Wald/Wilson interval. With ``n = 1`` every resample equals the sample and the interval is a
point: one unit carries no information about its own spread.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


def resample_indices(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """``[n_boot, n]`` indices drawn with replacement (seeded)."""
    if n < 1:
        raise ValueError("cannot resample an empty sample")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def interval(replicates, level: float = LEVEL) -> list[float]:
    """Percentile interval ``[lo, hi]`` of bootstrap replicates along axis 0 (any trailing shape:
    the result then has shape ``[..., 2]`` as nested lists). NaN replicates are ignored."""
    r = np.asarray(replicates, dtype=np.float64)
    a = (1.0 - level) / 2.0
    with np.errstate(all="ignore"):
        lo = np.nanpercentile(r, 100 * a, axis=0)
        hi = np.nanpercentile(r, 100 * (1 - a), axis=0)
    return np.stack([lo, hi], axis=-1).tolist()


def bootstrap(values, statistic: Callable[[np.ndarray], np.ndarray] = None, n_boot: int = N_BOOT,
              seed: int = 0, level: float = LEVEL) -> dict:
    """Point value and percentile interval of ``statistic`` over the first axis of ``values``.

    ``values``: ``[n, ...]``; ``statistic(x)`` maps a ``[n, ...]`` sample (or a ``[B, n, ...]`` stack of
    resamples) to its value(s); the default is the mean over the unit axis (``axis=-1 - (ndim-1)``
    i.e. axis 0 of one sample, axis 1 of a stack). Returns ``{"value", "ci95", "n"}``."""
    x = np.asarray(values, dtype=np.float64)
    n = x.shape[0]
    if statistic is None:
        def statistic(s):
            return s.mean(axis=-x.ndim)
    point = statistic(x)
    reps = statistic(x[resample_indices(n, n_boot, seed)])
    return {"value": _plain(point), "ci95": interval(reps, level), "n": int(n)}


def mean_ci(values, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> dict:
    """``{"value": mean, "ci95": [lo, hi], "n"}`` of a 1-D sample (a proportion when it is 0/1)."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    return bootstrap(x, n_boot=n_boot, seed=seed, level=level)


def overlap(a: Optional[list], b: Optional[list]) -> Optional[bool]:
    """Whether two ``[lo, hi]`` intervals share a point (None when either is missing)."""
    if a is None or b is None:
        return None
    return not (a[1] < b[0] or b[1] < a[0])


def _plain(v):
    v = np.asarray(v)
    return float(v) if v.ndim == 0 else v.tolist()
