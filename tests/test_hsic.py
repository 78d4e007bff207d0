"""Tests for langneurons.bridge.hsic: HSIC estimators, bandwidth and layer score."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from langneurons.bridge import hsic
from langneurons.bridge.hsic import (
    VARIANTS,
    gaussian_kernels,
    hsic_matrix,
    hsic_pair_loop,
    layer_score,
    median_bandwidth,
    zscore_rows,
)


def _randn(seed: int, *shape: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _centering(n: int) -> torch.Tensor:
    """Explicit H = I - 1 1^T / N."""
    return torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)


def _dependent_pair(seed: int = 0, n1: int = 5, n2: int = 4, n_probes: int = 11):
    """Small X, Y where some Y rows depend on X rows, so values are not all ~0."""
    x = _randn(seed, n1, n_probes)
    y = _randn(seed + 1, n2, n_probes)
    y[:2] += x[:2] + 0.5 * x[:2] ** 2
    return x, y


# ------------------------------------------------------------- agreement with loops


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sigma", [None, 0.8, 2.5])
def test_matches_pair_loop(variant, sigma):
    x, y = _dependent_pair()
    got = hsic_matrix(x, y, variant, sigma)
    ref = hsic_pair_loop(x, y, variant, sigma)
    assert got.shape == (5, 4) and got.dtype == torch.float64
    diff, scale = float((got - ref).abs().max()), float(ref.abs().max())
    assert diff <= 1e-9
    # the median bandwidth makes biased/unbiased values small (~1e-4), so also
    # require agreement relative to the largest value
    assert scale > 1e-5 and diff <= 1e-9 * scale


@pytest.mark.parametrize("variant", VARIANTS)
def test_blocking_and_chunking_do_not_change_values(variant, monkeypatch):
    x, y = _dependent_pair(seed=3, n1=7, n2=5, n_probes=13)
    ref = hsic_pair_loop(x, y, variant, 1.3)
    # tiny bands (1..3 kernel rows) and neuron chunks of 1..3 exercise every blocking path
    for band in (1, 20, 60):
        monkeypatch.setattr(hsic, "_BAND_ELEMENTS", band)
        for chunk in (1, 3, 100):
            got = hsic_matrix(x, y, variant, 1.3, chunk=chunk)
            assert float((got - ref).abs().max()) <= 1e-9, (band, chunk)


def test_paper_variant_is_literal_trace_k_h_l():
    x, y = _dependent_pair(seed=5)
    n = x.shape[1]
    zx, zy = zscore_rows(x), zscore_rows(y)
    sigma = median_bandwidth(zx, zy)
    k, l, h = gaussian_kernels(zx, sigma), gaussian_kernels(zy, sigma), _centering(n)
    expected = torch.tensor(
        [[float(torch.trace(k[i] @ h @ l[j])) for j in range(len(l))] for i in range(len(k))],
        dtype=torch.float64,
    )
    got = hsic_matrix(x, y, "paper")
    assert float((got - expected).abs().max()) <= 1e-9
    # Same with an explicit, more local bandwidth (larger values).
    k, l = gaussian_kernels(zx, 0.7), gaussian_kernels(zy, 0.7)
    expected = torch.stack([torch.stack([torch.trace(ki @ h @ lj) for lj in l]) for ki in k])
    got = hsic_matrix(x, y, "paper", sigma=0.7)
    assert float((got - expected).abs().max()) <= 1e-9
    assert float(expected.abs().max()) > 1.0


def test_biased_variant_is_literal_trace_khlh():
    x, y = _dependent_pair(seed=6)
    n = x.shape[1]
    zx, zy = zscore_rows(x), zscore_rows(y)
    h = _centering(n)
    for sigma in (None, 0.9):
        s = median_bandwidth(zx, zy) if sigma is None else sigma
        k, l = gaussian_kernels(zx, s), gaussian_kernels(zy, s)
        expected = torch.stack(
            [torch.stack([torch.trace(ki @ h @ lj @ h) for lj in l]) for ki in k]
        ) / (n - 1) ** 2
        got = hsic_matrix(x, y, "biased", sigma)
        assert float((got - expected).abs().max()) <= 1e-9


def test_unbiased_variant_is_literal_song_formula():
    x, y = _dependent_pair(seed=8)
    n = x.shape[1]
    zx, zy = zscore_rows(x), zscore_rows(y)
    one = torch.ones(n, 1, dtype=torch.float64)
    k, l = gaussian_kernels(zx, 1.1), gaussian_kernels(zy, 1.1)
    k = k - torch.diag_embed(torch.diagonal(k, dim1=1, dim2=2))  # zero diagonals
    l = l - torch.diag_embed(torch.diagonal(l, dim1=1, dim2=2))
    expected = torch.empty(len(k), len(l), dtype=torch.float64)
    for i, ki in enumerate(k):
        for j, lj in enumerate(l):
            value = (
                torch.trace(ki @ lj)
                + float(one.T @ ki @ one) * float(one.T @ lj @ one) / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * float(one.T @ ki @ lj @ one)
            )
            expected[i, j] = value / (n * (n - 3))
    got = hsic_matrix(x, y, "unbiased", sigma=1.1)
    assert float((got - expected).abs().max()) <= 1e-9


# ---------------------------------------------------------------- statistical sense


def test_independent_rows_give_small_biased_hsic():
    n, n_probes = 12, 64
    x = _randn(10, n, n_probes)
    y_indep = _randn(11, n, n_probes)
    y_dep = x + 0.5 * _randn(12, n, n_probes)
    for sigma in (None, 1.0):
        indep = hsic_matrix(x, y_indep, "biased", sigma).diagonal()
        dep = hsic_matrix(x, y_dep, "biased", sigma).diagonal()
        assert float(indep.min()) >= -1e-15  # biased HSIC with PSD kernels is >= 0
        # independent pairs: well under a tenth of the dependent ones
        assert float(indep.mean()) < 0.1 * float(dep.mean())


def test_unbiased_hsic_averages_to_zero_for_independent_rows():
    # 400 independent (x_i, y_i) pairs: the diagonal of the matrix holds 400 i.i.d.
    # estimates (explicit sigma, so no shared data-driven bandwidth links them).
    m, n_probes = 400, 24
    x, y = _randn(20, m, n_probes), _randn(21, m, n_probes)
    est = hsic_matrix(x, y, "unbiased", sigma=1.0).diagonal()
    std_err = float(est.std()) / math.sqrt(m)
    assert abs(float(est.mean())) <= 4.0 * std_err
    # the biased estimator on the same data is clearly positive (its O(1/N) bias) ...
    biased = hsic_matrix(x, y, "biased", sigma=1.0).diagonal()
    assert float(biased.mean()) > 10.0 * float(biased.std()) / math.sqrt(m)
    # ... and a dependent pair sits many standard errors above zero
    dep = hsic_matrix(x, x + 0.5 * _randn(22, m, n_probes), "unbiased", sigma=1.0).diagonal()
    assert float(dep.mean()) > 20.0 * std_err


def test_normalized_self_is_one_and_values_in_unit_interval():
    x = _randn(30, 6, 40)
    self_sim = hsic_matrix(x, x, "normalized")
    assert torch.allclose(self_sim.diagonal(), torch.ones(6, dtype=torch.float64), atol=1e-12)
    assert float(self_sim.min()) >= 0.0 and float(self_sim.max()) <= 1.0
    # independent rows: strictly inside, far from 1
    y = _randn(31, 5, 40)
    cross = hsic_matrix(x, y, "normalized")
    assert float(cross.min()) >= 0.0 and float(cross.max()) < 0.5
    # an affine transform of a row is the same row after z-scoring: value 1
    aff = hsic_matrix(x[:1], 3.0 * x[:1] - 7.0, "normalized")
    assert abs(float(aff[0, 0]) - 1.0) <= 1e-12


@pytest.mark.parametrize("variant", VARIANTS)
def test_invariance_to_row_and_probe_order(variant):
    x, y = _dependent_pair(seed=40, n1=6, n2=5, n_probes=12)
    base = hsic_matrix(x, y, variant)
    p, q = torch.randperm(6, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 0, 4, 2, 1])
    # permuting neurons permutes the matrix the same way (median sigma is order-free)
    permuted = hsic_matrix(x[p], y[q], variant)
    assert torch.allclose(permuted, base[p][:, q], rtol=1e-12, atol=1e-15)
    # a joint permutation of the probe columns leaves every value unchanged
    c = torch.randperm(12, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(hsic_matrix(x[:, c], y[:, c], variant), base, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------- layer score


def test_layer_score_hand_example():
    m = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    # row maxima 2, 3, 0.5 -> mean 11/6; column maxima 3, 2 -> mean 5/2
    assert layer_score(m) == pytest.approx(0.5 * (11 / 6 + 5 / 2), abs=1e-15)
    assert layer_score(m.numpy()) == pytest.approx(13 / 6, abs=1e-15)
    assert layer_score(torch.tensor([[-0.25]])) == -0.25


def test_layer_score_rejects_empty_matrix():
    with pytest.raises(ValueError, match="non-empty"):
        layer_score(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="non-empty"):
        layer_score(hsic_matrix(torch.zeros(2, 8), torch.zeros(0, 8)))


def test_empty_side_gives_empty_matrix():
    assert hsic_matrix(torch.zeros(0, 8), _randn(1, 3, 8)).shape == (0, 3)
    assert hsic_matrix(_randn(1, 2, 8), torch.zeros(0, 8), "unbiased").shape == (2, 0)


# -------------------------------------------------------- bandwidth, z-scores, kernels


def test_median_bandwidth_hand_examples():
    # pooled rows (0,0), (3,4), (0,1): distances 5, 1, sqrt(18) -> median sqrt(18)
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    y = torch.tensor([[0.0, 1.0]])
    assert median_bandwidth(x, y) == pytest.approx(math.sqrt(18.0), abs=1e-14)
    # even number of pairs: rows 0, 1, 3, 7 -> distances 1,3,7,2,6,4 -> (3 + 4) / 2
    assert median_bandwidth(np.array([[0.0], [1.0]]), np.array([[3.0], [7.0]])) == 3.5
    # X-X, Y-Y and X-Y pairs all count: the same rows split differently give the same
    assert median_bandwidth(np.array([[0.0], [1.0], [3.0]]), np.array([[7.0]])) == 3.5


def test_median_bandwidth_degenerate_cases():
    # 3 of 3 rows coincide: all distances 0 -> fallback 1.0
    same = torch.ones(3, 4)
    assert median_bandwidth(same[:2], same[2:]) == 1.0
    # median 0 (4 identical rows + 1 other): median of the non-zero distances instead
    x = torch.zeros(4, 2)
    y = torch.tensor([[3.0, 4.0]])
    assert median_bandwidth(x, y) == 5.0
    with pytest.raises(ValueError, match="two rows"):
        median_bandwidth(torch.zeros(1, 3), torch.zeros(0, 3))


def test_zscore_rows_and_constant_rows():
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    z = zscore_rows(x)
    assert torch.isfinite(z).all()
    assert torch.allclose(z[0].mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-15)
    assert torch.allclose(z[0].square().mean(), torch.tensor(1.0, dtype=torch.float64))
    expected0 = (x[0].double() - 3.0) / math.sqrt(3.5)  # population std of 1,2,3,6
    assert torch.allclose(z[0], expected0, atol=1e-15)
    assert torch.equal(z[1:], torch.zeros(2, 4, dtype=torch.float64))
    # constant up to float rounding (0.1 summed differently) also counts as constant
    near = torch.tensor([[0.1, 0.3 - 0.2, 0.1, 0.7 - 0.6]], dtype=torch.float64)
    assert float(near.std()) > 0.0
    assert torch.equal(zscore_rows(near), torch.zeros(1, 4, dtype=torch.float64))


@pytest.mark.parametrize("variant", VARIANTS)
def test_constant_rows_give_no_nan(variant):
    x = _randn(50, 4, 10)
    x[1] = 2.5  # a dead neuron
    y = _randn(51, 3, 10)
    y[0] = 0.0
    m = hsic_matrix(x, y, variant)
    assert torch.isfinite(m).all()
    assert math.isfinite(layer_score(m))
    assert torch.allclose(m, hsic_pair_loop(x, y, variant), atol=1e-9, rtol=0)
    # a constant row carries no dependence (also for "paper": tr(J H L) = 1^T H L 1 = 0)
    assert float(m[1].abs().max()) <= 1e-15 and float(m[:, 0].abs().max()) <= 1e-15
    # all rows constant: still finite (bandwidth falls back to 1.0)
    assert torch.isfinite(hsic_matrix(torch.ones(2, 10), torch.zeros(2, 10), variant)).all()


def test_gaussian_kernels_values():
    k = gaussian_kernels(torch.tensor([[0.0, 1.0, 3.0]]), sigma=1.0)
    assert k.shape == (1, 3, 3) and k.dtype == torch.float64
    assert float(k[0, 0, 1]) == pytest.approx(math.exp(-0.5), abs=1e-15)
    assert float(k[0, 0, 2]) == pytest.approx(math.exp(-4.5), abs=1e-15)
    assert float(k[0, 2, 1]) == pytest.approx(math.exp(-2.0), abs=1e-15)
    assert torch.equal(k[0].diagonal(), torch.ones(3, dtype=torch.float64))
    assert torch.equal(k[0], k[0].T)


# ---------------------------------------------------------------- inputs and errors


def test_numpy_input_matches_torch_input():
    x, y = _dependent_pair(seed=60)
    from_np = hsic_matrix(x.numpy().astype(np.float32), y.numpy().astype(np.float32), "normalized")
    from_t = hsic_matrix(x.float(), y.float(), "normalized")
    assert from_np.dtype == torch.float64
    assert torch.allclose(from_np, from_t, atol=1e-12)


def test_input_validation():
    x, y = _randn(1, 3, 8), _randn(2, 2, 8)
    with pytest.raises(ValueError, match="unknown HSIC variant"):
        hsic_matrix(x, y, "cka")
    with pytest.raises(ValueError, match="at least 4 probes"):
        hsic_matrix(x[:, :3], y[:, :3], "unbiased")
    with pytest.raises(ValueError, match="same number of probes"):
        hsic_matrix(x, y[:, :7])
    with pytest.raises(ValueError, match="sigma"):
        hsic_matrix(x, y, sigma=0.0)
    with pytest.raises(ValueError, match="2-D"):
        hsic_matrix(x[0], y)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        hsic_matrix(bad, y)
    with pytest.raises(ValueError, match="chunk"):
        hsic_matrix(x, y, chunk=0)
