"""Bootstrap percentile intervals (langneurons.uncertainty): agreement with closed-form intervals
where those hold, degenerate samples, seeding, overlap and pairing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from langneurons.uncertainty import N_BOOT, bootstrap, interval, mean_ci, overlap, resample_indices

Z = 1.959963984540054


def test_mean_interval_matches_normal_interval():
    x = np.random.default_rng(1).normal(3.0, 2.0, 4000)
    got = mean_ci(x, seed=0)
    half = Z * x.std(ddof=1) / math.sqrt(len(x))
    assert got["value"] == pytest.approx(x.mean(), abs=1e-12)
    assert got["n"] == 4000
    lo, hi = got["ci95"]
    assert lo == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.1 * half)
    assert (hi - lo) == pytest.approx(2 * half, rel=0.1)


def test_proportion_interval_matches_wilson():
    x = (np.random.default_rng(2).random(2000) < 0.3).astype(float)
    n, p = len(x), x.mean()
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    lo, hi = mean_ci(x, seed=0)["ci95"]
    assert lo == pytest.approx(centre - half, abs=0.1 * half)
    assert hi == pytest.approx(centre + half, abs=0.1 * half)


def test_one_unit_gives_a_point_interval():
    got = mean_ci([2.5])
    assert got == {"value": 2.5, "ci95": [2.5, 2.5], "n": 1}
    with pytest.raises(ValueError):
        resample_indices(0)


def test_seeded_reruns_are_identical():
    x = np.random.default_rng(3).exponential(1.0, 300)
    a, b = mean_ci(x, seed=7), mean_ci(x, seed=7)
    assert a == b
    assert mean_ci(x, seed=8)["ci95"] != a["ci95"]           # another seed: another (close) interval
    assert resample_indices(10, seed=5).shape == (N_BOOT, 10)
    np.testing.assert_array_equal(resample_indices(10, seed=5), resample_indices(10, seed=5))


def test_overlap_truth_table():
    assert overlap([0, 1], [2, 3]) is False
    assert overlap([2, 3], [0, 1]) is False
    assert overlap([0, 2], [1, 3]) is True
    assert overlap([0, 1], [1, 2]) is True                   # a shared end point counts
    assert overlap([0, 3], [1, 2]) is True                   # nested
    assert overlap([1, 1], [1, 1]) is True
    assert overlap(None, [0, 1]) is None and overlap([0, 1], None) is None


def test_paired_difference_of_shifted_rows_has_zero_width():
    """Two rows that differ by a constant on every unit: resampling the units *together* gives the
    constant with no spread; resampling them independently would not."""
    a = np.random.default_rng(4).normal(0.0, 1.0, 200)
    x = np.stack([a, a + 0.5], axis=1)                      # [n units, 2 rows]
    got = bootstrap(x, statistic=lambda s: s[..., 1].mean(-1) - s[..., 0].mean(-1), seed=0)
    assert got["value"] == pytest.approx(0.5, abs=1e-12)
    assert got["ci95"][0] == pytest.approx(0.5, abs=1e-12) and got["ci95"][1] == pytest.approx(0.5, abs=1e-12)
    unpaired = a[resample_indices(200, seed=1)].mean(1) + 0.5 - a[resample_indices(200, seed=2)].mean(1)
    lo, hi = interval(unpaired)
    assert hi - lo > 0.2


def test_interval_of_a_stack_keeps_the_trailing_shape():
    reps = np.random.default_rng(5).normal(size=(N_BOOT, 3, 2))
    iv = np.array(interval(reps))
    assert iv.shape == (3, 2, 2)
    assert (iv[..., 0] < iv[..., 1]).all()
