"""Mergeable statistics and the quantile sketch."""

import json

import pytest
import torch

from langneurons.errors import UserError
from langneurons.stats import ActivationStats, LanguageStats, pooled_quantile


def _acts(n, I=40, seed=0, kind="silu", shift=0.0):
    """Activations of ``n`` tokens: SiLU, GELU, ReLU (a point mass at 0), a heavy tail (Student t,
    2 dof) or the Gaussian pre-activations; neuron ``j`` has scale 0.3..4 and offset ``shift`` x -1..1."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, I, generator=g) * torch.linspace(0.3, 4, I)
    if shift:
        z = z + shift * torch.linspace(-1, 1, I)
    if kind == "silu":
        return torch.nn.functional.silu(z)
    if kind == "gelu":
        return torch.nn.functional.gelu(z)
    if kind == "relu":
        return torch.relu(z)
    if kind == "heavy":
        chi2 = torch.randn(n, 2, I, generator=g).pow(2).sum(1)
        return z / (chi2 / 2).sqrt()
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


# ---------------------------------------------------------------------------- the sampled sketch
def _synthetic(kind, n, I, seed):
    return _acts(n, I, seed, kind, shift=1.0)


def _sketch_stream(kind, n_tokens, I, chunk, rate, seed=7):
    """Feed ``n_tokens`` synthetic activations in batches of ``chunk``, sampled as collect samples."""
    from langneurons.stats import calibration_edges, sample_positions
    ls = LanguageStats(1, I, sketch_bins=128, sketch_rate=rate)
    ls.set_edges(0, calibration_edges(_synthetic(kind, 4096, I, seed=999), 128))
    for b in range(n_tokens // chunk):
        x = _synthetic(kind, chunk, I, seed=seed * 100_000 + b)
        pick = sample_positions(chunk, rate, seed, b)
        ls.add_layer(0, x, sketch_rows=pick)
        ls.add_tokens(chunk, chunk if pick is None else len(pick))
    return ls


def _stream_rank_error(kind, n_tokens, I, chunk, q, p, seed=7):
    """Percentile-point error of the quantiles ``q [I]`` against the exact data, regenerated in chunks."""
    lo = torch.zeros(I, dtype=torch.float64)
    hi = torch.zeros(I, dtype=torch.float64)
    for b in range(n_tokens // chunk):
        x = _synthetic(kind, chunk, I, seed=seed * 100_000 + b)
        lo += (x < q).sum(0)
        hi += (x <= q).sum(0)
    lo, hi = lo / n_tokens, hi / n_tokens
    return ((lo - p).clamp_min(0) + (p - hi).clamp_min(0)) * 100


@pytest.mark.parametrize("kind", ["silu", "gelu", "relu", "heavy"])
@pytest.mark.parametrize("n_tokens", [40_000, 3_000_000])
def test_sampled_sketch_within_its_guarantee(kind, n_tokens):
    """At the default settings collect would use, P10/P50/P90 of every neuron are within 0.5 pp of the
    exact quantiles: small corpora are sketched in full, large ones sampled at rate m / n."""
    from langneurons.stats import SKETCH_ERROR_PP, sketch_error_bound, sketch_rate
    I, chunk = 24, 20_000
    rate = sketch_rate(n_tokens, I)
    assert (rate == 1.0) == (n_tokens == 40_000)
    ls = _sketch_stream(kind, n_tokens, I, chunk, rate)
    sampled = int(ls.n_tokens if ls.sketch_tokens is None else ls.sketch_tokens)
    assert int(ls.n_tokens) == n_tokens
    bound = sketch_error_bound(I, sampled, n_tokens)
    assert bound <= SKETCH_ERROR_PP + 1e-9
    if rate < 1:   # a binomial count: within 5 standard deviations
        assert abs(sampled - rate * n_tokens) <= 5 * (rate * (1 - rate) * n_tokens) ** 0.5
    for p in (0.1, 0.5, 0.9):
        err = _stream_rank_error(kind, n_tokens, I, chunk, ls.quantile(p)[0].float(), p)
        assert float(err.max()) <= 0.5, (kind, n_tokens, p, float(err.max()))


def test_sample_positions_are_seeded_by_seed_and_batch():
    from langneurons.stats import sample_positions
    a = sample_positions(1000, 0.1, seed=3, index=5)
    assert 60 <= len(a) <= 140 and torch.equal(a, a.sort().values) and len(set(a.tolist())) == len(a)
    assert torch.equal(a, sample_positions(1000, 0.1, seed=3, index=5))
    assert not torch.equal(a, sample_positions(1000, 0.1, seed=3, index=6))
    assert not torch.equal(a, sample_positions(1000, 0.1, seed=4, index=5))
    assert sample_positions(1000, 1.0, seed=3, index=5) is None
    # every position equally likely, whatever the batch size (no rounding per batch)
    hits = torch.zeros(7)
    for i in range(4000):
        hits[sample_positions(7, 0.3, seed=0, index=i)] += 1
    assert torch.allclose(hits / 4000, torch.full((7,), 0.3), atol=0.03)


def test_sampled_shards_merge_and_resume_exactly(tmp_path):
    """Ranks taking batches i, i + W, ... and a resume from a checkpoint give one process's sketch."""
    from langneurons.stats import calibration_edges, sample_positions
    I, rate, seed = 16, 0.3, 11
    edges = calibration_edges(_synthetic("silu", 4096, I, 1), 64)
    data = [_synthetic("silu", 500, I, seed=b) for b in range(6)]

    def run(batches, ls=None):
        ls = ls or LanguageStats(2, I, sketch_bins=64, sketch_rate=rate)
        for layer in range(2):
            ls.set_edges(layer, edges)
        for b in batches:
            pick = sample_positions(500, rate, seed, b)
            for layer in range(2):
                ls.add_layer(layer, data[b] * (layer + 1), sketch_rows=pick)
            ls.add_tokens(500, len(pick))
        return ls

    one = run(range(6))
    two = run([0, 2, 4]).merge(run([1, 3, 5]))
    first = run(range(3))
    first.save(tmp_path / "ckpt.safetensors")
    resumed = run(range(3, 6), LanguageStats.load(tmp_path / "ckpt.safetensors"))
    assert resumed.sketch_rate == rate
    for other in (two, resumed):
        for k in ("n_tokens", "count_pos", "count_neg", "hist", "sketch_tokens", "sketch_zeros"):
            assert torch.equal(getattr(one, k), getattr(other, k)), k
        assert torch.allclose(one.sum, other.sum, rtol=0, atol=1e-9)
        assert torch.equal(one.quantile(0.5), other.quantile(0.5)) or torch.allclose(
            one.quantile(0.5), other.quantile(0.5), rtol=0, atol=1e-12)
    assert int(one.sketch_tokens) == sum(len(sample_positions(500, rate, seed, b)) for b in range(6))
    with pytest.raises(UserError, match="rates"):
        one.merge(LanguageStats(2, I, sketch_bins=64, sketch_rate=0.5))


def test_sampled_sketch_reads_exact_zeros_from_the_counts():
    """A sampled sketch rescales its non-zero mass to the exact one, so the mass at 0 is exact."""
    from langneurons.stats import sample_positions
    x = _synthetic("relu", 20_000, 8, 3)
    ls = LanguageStats(1, 8, sketch_bins=64, sketch_rate=0.2)
    pick = sample_positions(20_000, 0.2, 0, 0)
    ls.add_layer(0, x, sketch_rows=pick)
    ls.add_tokens(20_000, len(pick))
    exact_zero = (x == 0).double().mean(0)
    at_zero = ls.cdf(torch.zeros(1, 8))[0] - ls.cdf(torch.full((1, 8), -1e-9))[0]
    assert torch.allclose(at_zero, exact_zero, atol=1e-9)
    assert int((ls.sketch_zeros[0] == int(ls.sketch_tokens)).sum()) >= 1   # a neuron sampled only at 0
    assert torch.allclose(ls.frac_above(torch.zeros(1, 8))[0], (x > 0).double().mean(0), atol=1e-9)


def test_opened_statistics_read_lazily_and_layer_by_layer_equal_loaded(tmp_path, monkeypatch):
    """ActivationStats opens each language lazily; the layer-at-a-time read-off used for large
    statistics gives what the one-block read-off gives."""
    import langneurons.stats as st
    from langneurons.stats import calibration_edges, sample_positions
    L, I = 3, 24
    for sampled in (False, True):
        rate = 0.4 if sampled else 1.0
        ls = LanguageStats(L, I, sketch_bins=32, sentences=4, sketch_rate=rate)
        for b in range(4):
            pick = sample_positions(500, rate, 0, b)
            for layer in range(L):
                x = _synthetic("silu", 500, I, seed=10 * b + layer)
                if b == 0:
                    ls.set_edges(layer, calibration_edges(x, 32))
                ls.add_layer(layer, x, sketch_rows=pick)
                ls.add_sentence_means(layer, x[:1], b)
            ls.add_tokens(500, None if pick is None else len(pick))
            ls.add_sentences(1)
        d = tmp_path / f"s{int(sampled)}"
        d.mkdir()
        ls.save(d / "en.safetensors")
        (d / "stats.json").write_text(json.dumps({
            "format": "langneurons.stats.v1", "languages": {"en": {"n_tokens": 2000}},
            "model": {"name_or_path": "x", "model_type": "llama", "num_layers": L, "width": I, "site": "act"}}))
        opened = ActivationStats.load(d).get("en")
        assert "hist" not in opened.__dict__ and "sentence_mean" not in opened.__dict__
        assert torch.equal(opened.part("hist", slice(1, 2)), ls.hist[1:2].to(torch.int32))
        t = torch.full((L, I), 0.3)
        for q in (0.1, 0.5, 0.9):
            assert torch.equal(opened.quantile(q), ls.quantile(q))
        assert torch.equal(opened.cdf(t), ls.cdf(t))
        assert "hist" not in opened.__dict__          # the read-off read slices, not the whole sketch
        pm, pmed = opened.sentence_patch_values()
        assert torch.equal(pm, ls.sentence_patch_values()[0]) and torch.equal(pmed, ls.sentence_patch_values()[1])
        assert opened.max_sentences == 4 and "sentence_mean" not in opened.__dict__
        monkeypatch.setattr(st, "TABLE_CACHE_ELEMENTS", 1)   # large-model path: one layer at a time
        per_layer = ActivationStats.load(d).get("en")
        for q in (0.1, 0.5, 0.9):
            assert torch.allclose(per_layer.quantile(q), ls.quantile(q), rtol=0, atol=1e-12)
        assert torch.allclose(per_layer.cdf(t), ls.cdf(t), rtol=0, atol=1e-12)
        assert torch.allclose(st.pooled_quantile([per_layer, ls], 0.5), st.pooled_quantile([ls, ls], 0.5),
                              rtol=0, atol=1e-9)
        monkeypatch.undo()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_accumulation_reads_activations_in_their_own_dtype(dtype):
    """The GPU path (run here on the CPU) reads bf16/fp16 without a float32 copy: the same counts and
    extremes as the float32 path on the same values, moments to float32 accumulation."""
    x = _synthetic("gelu", 3000, 16, 5).to(dtype)
    x[::7, 3] = 0
    a, b = LanguageStats(1, 16, sketch_bins=0), LanguageStats(1, 16, sketch_bins=0)
    a._add_chunk_direct(0, x)
    b.add_layer(0, x.float())
    for k in ("count_pos", "count_neg", "vmin", "vmax"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    exact = x.double()
    assert torch.allclose(a.sum[0], exact.sum(0), rtol=1e-4, atol=1e-3)
    assert torch.allclose(a.sumsq[0], (exact ** 2).sum(0), rtol=1e-4)


def test_opened_statistics_are_read_only_and_bad_sampled_states_are_refused(tmp_path):
    ls = LanguageStats(1, 8, sketch_bins=16, sketch_rate=0.5)
    ls.add_layer(0, _synthetic("silu", 100, 8, 0), sketch_rows=torch.arange(0, 100, 2))
    ls.add_tokens(100, 50)
    ls.save(tmp_path / "en.safetensors")
    opened = LanguageStats.open(tmp_path / "en.safetensors")
    with pytest.raises(UserError, match="read-only"):
        opened.add_layer(0, torch.zeros(3, 8))
    with pytest.raises(UserError, match="read-only"):
        opened.merge(ls)
    with pytest.raises(UserError, match="sampled sketch"):
        LanguageStats.from_state_dict(ls.state_dict())          # the rate is not in the state
