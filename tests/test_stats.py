"""Mergeable statistics and the quantile sketch."""

import json

import pytest
import torch

from langneurons.errors import UserError
from langneurons.stats import ActivationStats, LanguageStats, pooled_quantile


def _acts(n, I=40, seed=0, kind="silu"):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, I, generator=g) * torch.linspace(0.3, 4, I)
    if kind == "silu":
        return torch.nn.functional.silu(z)
    if kind == "gelu":
        return torch.nn.functional.gelu(z)
    if kind == "relu":
        return torch.relu(z)
    return z


def _feed(ls, batches, layer=0):
    for x in batches:
        ls.add_layer(layer, x)
        ls.add_tokens(x.shape[0])


def _rank_error(X, q, p):
    """Distance in percentile points from p to the percentile-rank interval of q in the exact data."""
    lo = (X < q).double().mean(0)
    hi = (X <= q).double().mean(0)
    return ((lo - p).clamp_min(0) + (p - hi).clamp_min(0)) * 100


def test_counts_and_moments_are_exact():
    batches = [_acts(300, seed=s) for s in range(4)]
    X = torch.cat(batches)
    ls = LanguageStats(1, 40, sketch_bins=32)
    _feed(ls, batches)
    assert int(ls.n_tokens) == 1200
    assert ls.count_pos.dtype == torch.int64
    assert torch.equal(ls.count_pos[0], (X > 0).sum(0))
    assert torch.equal(ls.count_neg[0], (X < 0).sum(0))
    assert torch.allclose(ls.sum[0], X.double().sum(0), rtol=1e-6)
    assert torch.allclose(ls.sumsq[0], (X.double() ** 2).sum(0), rtol=1e-6)
    assert torch.equal(ls.vmin[0], X.min(0).values) and torch.equal(ls.vmax[0], X.max(0).values)
    assert torch.allclose(ls.std()[0], X.double().std(0, unbiased=False), rtol=1e-5)
    assert torch.allclose(ls.prob()[0], (X > 0).double().mean(0))


def test_underflow_to_zero_is_not_activated():
    x = torch.tensor([[1e-30, 0.0, -0.0, 1e-46]], dtype=torch.float32)  # 1e-46 underflows to 0 in float32
    ls = LanguageStats(1, 4, sketch_bins=0)
    ls.add_layer(0, x)
    assert ls.count_pos[0].tolist() == [1, 0, 0, 0]


def test_merging_two_shards_equals_one_pass():
    batches = [_acts(256, seed=s) for s in range(6)]
    one = LanguageStats(1, 40, sketch_bins=32, sentences=0)
    _feed(one, batches)
    a = LanguageStats(1, 40, sketch_bins=32)
    b = LanguageStats(1, 40, sketch_bins=32)
    _feed(a, batches[:3])
    b.set_edges(0, a.edges[0])  # one run calibrates every shard identically
    _feed(b, batches[3:])
    a.merge(b)
    for k in ("n_tokens", "count_pos", "count_neg", "hist", "vmin", "vmax", "edges"):
        assert torch.equal(getattr(a, k), getattr(one, k)), k
    assert torch.allclose(a.sum, one.sum, rtol=1e-12) and torch.allclose(a.sumsq, one.sumsq, rtol=1e-12)


def test_merging_sketches_with_other_edges_is_refused():
    a = LanguageStats(1, 40, sketch_bins=16)
    b = LanguageStats(1, 40, sketch_bins=16)
    _feed(a, [_acts(100, seed=1)])
    _feed(b, [_acts(100, seed=2)])
    with pytest.raises(UserError, match="edges"):
        a.merge(b)


@pytest.mark.parametrize("kind", ["silu", "gelu", "gauss"])
def test_sketch_quantiles_within_half_a_percentile_point(kind):
    batches = [_acts(2048, I=60, seed=s, kind=kind) for s in range(8)]
    X = torch.cat(batches)
    ls = LanguageStats(1, 60, sketch_bins=128)
    _feed(ls, batches)
    for p in (0.1, 0.5, 0.9):
        err = _rank_error(X, ls.quantile(p)[0].float(), p)
        assert float(err.max()) <= 0.5, (kind, p, float(err.max()))


def test_point_mass_at_zero_relu():
    batches = [_acts(1024, seed=s, kind="relu") for s in range(4)]
    X = torch.cat(batches)
    ls = LanguageStats(1, 40, sketch_bins=32)
    _feed(ls, batches)
    assert torch.equal(ls.quantile(0.3)[0], torch.zeros(40, dtype=torch.float64))  # half the mass is exactly 0
    err = _rank_error(X, ls.quantile(0.9)[0].float(), 0.9)
    assert float(err.max()) <= 0.5
    assert torch.allclose(ls.cdf(torch.zeros(1, 40))[0], (X <= 0).double().mean(0), atol=1e-12)


def test_frac_above_any_threshold():
    batches = [_acts(2048, seed=s) for s in range(4)]
    X = torch.cat(batches)
    ls = LanguageStats(1, 40, sketch_bins=128)
    _feed(ls, batches)
    for q in (0.2, 0.5, 0.9):
        t = torch.quantile(X, q, dim=0)
        exact = (X > t).double().mean(0)
        assert float((ls.frac_above(t[None])[0] - exact).abs().max()) < 0.005


def test_pooled_quantile_of_languages_with_different_sketches():
    xa = [_acts(2048, seed=s) for s in range(3)]
    xb = [_acts(2048, seed=10 + s) * 2 + 0.5 for s in range(2)]
    a = LanguageStats(1, 40, sketch_bins=128)
    b = LanguageStats(1, 40, sketch_bins=128)
    _feed(a, xa)
    _feed(b, xb)
    X = torch.cat(xa + xb)
    q = pooled_quantile([a, b], 0.9)[0].float()
    assert float(_rank_error(X, q, 0.9).max()) <= 0.5


def test_uniform_sketch_kind_round_trips(tmp_path):
    ls = LanguageStats(2, 40, sketch_bins=32, sketch_kind="uniform")
    for l in range(2):
        ls.add_layer(l, _acts(500, seed=l, kind="gauss"))
    ls.add_tokens(500)
    ls.save(tmp_path / "x.safetensors")
    back = LanguageStats.load(tmp_path / "x.safetensors")
    assert back.sketch_kind == "uniform"
    assert torch.equal(back.hist, ls.hist) and torch.equal(back.quantile(0.5), ls.quantile(0.5))
    x = _acts(500, seed=5, kind="gauss")
    assert torch.equal(back.bin_index(0, x), ls.bin_index(0, x))


def test_sentence_patch_values():
    ls = LanguageStats(1, 3, sketch_bins=0, sentences=4)
    means = torch.tensor([[1.0, -1.0, 0.0], [3.0, 2.0, 0.0], [2.0, 5.0, 0.0], [0.0, 0.0, 1.0]])
    ls.add_sentence_means(0, means, 0)
    ls.add_sentences(4)
    p_max, p_median = ls.sentence_patch_values()
    assert p_max[0].tolist() == [3.0, 5.0, 1.0]
    assert p_median[0].tolist() == [1.5, 1.0, 0.0]  # numpy median: mean of the two middle values


def test_save_load_and_corruption(tmp_path):
    ls = LanguageStats(2, 40, sketch_bins=16)
    for l in range(2):
        ls.add_layer(l, _acts(300, seed=l))
    ls.add_tokens(300)
    ls.save(tmp_path / "en.safetensors")
    back = LanguageStats.load(tmp_path / "en.safetensors")
    for k in LanguageStats.TENSORS:
        v = getattr(ls, k)
        if v is not None:
            assert torch.equal(getattr(back, k), v), k
    raw = (tmp_path / "en.safetensors").read_bytes()
    (tmp_path / "bad.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="corrupt"):
        LanguageStats.load(tmp_path / "bad.safetensors")


def test_activation_stats_directory_errors(tmp_path):
    with pytest.raises(UserError, match="no stats.json"):
        ActivationStats.load(tmp_path)
    (tmp_path / "stats.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        ActivationStats.load(tmp_path)
    (tmp_path / "stats.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(UserError, match="not a langneurons"):
        ActivationStats.load(tmp_path)
