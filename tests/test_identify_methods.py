"""act-prob-percentile, top-prob (+ overlap similarity), language-activated and AP on known inputs."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from langneurons.errors import UserError
from langneurons.identify import METHODS, act_prob, ap, language_activated, top_count_mask
from langneurons.identify.act_prob import act_prob_scores, select_by_score, thresholds
from langneurons.identify.ap import ap_masks, average_precision
from langneurons.identify.language_activated import activated_mask
from langneurons.identify.top_prob import overlap_similarity, top_prob_masks
from langneurons.stats import STATS_FORMAT, ActivationStats, LanguageStats


def normal_cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def memory_stats(per: dict, site="act", unit="window") -> ActivationStats:
    ls = next(iter(per.values()))
    meta = {"format": STATS_FORMAT,
            "model": {"name_or_path": "synthetic", "model_type": "llama", "num_layers": ls.num_layers,
                      "width": ls.width, "site": site},
            "unit": unit, "window": 16, "languages": {c: {"n_tokens": int(s.n_tokens)} for c, s in per.items()}}
    return ActivationStats(meta, None, per)


def test_registry_and_interface():
    assert list(METHODS) == ["lape", "act-prob-percentile", "top-prob", "language-activated", "ap", "random"]
    for name, m in METHODS.items():
        assert m.NAME == name and m.HELP and callable(m.add_arguments) and callable(m.run)


def test_top_count_mask_ties_and_eligibility():
    s = torch.tensor([[0.5, 0.9, 0.5], [0.9, 0.1, 0.5]])
    assert top_count_mask(s, 2).nonzero().tolist() == [[0, 1], [1, 0]]
    # the 0.5 tie goes to the smallest flat index
    assert top_count_mask(s, 3).nonzero().tolist() == [[0, 0], [0, 1], [1, 0]]
    assert int(top_count_mask(s, 10, eligible=s > 0.4).sum()) == 5


# ------------------------------------------------------------------------------ act-prob-percentile

@pytest.fixture(scope="module")
def gaussian_stats():
    """Two languages, 3 neurons of one layer: a ~ N(mu, 1) with known means.

    neuron 0: A ~ N(1, 1), B ~ N(0, 1); neuron 1: A ~ N(0, 1), B ~ N(1, 1); neuron 2: both N(0, 1).
    """
    g = torch.Generator().manual_seed(0)
    n = 40000
    means = {"A": torch.tensor([1.0, 0.0, 0.0]), "B": torch.tensor([0.0, 1.0, 0.0])}
    per = {}
    for code, mu in means.items():
        ls = LanguageStats(1, 3, sketch_bins=64)
        for _ in range(4):
            ls.add_layer(0, torch.randn(n // 4, 3, generator=g) + mu)
            ls.add_tokens(n // 4)
        per[code] = ls
    return per


def test_act_prob_own_scores_are_one_minus_percentile(gaussian_stats):
    scores = act_prob_scores(gaussian_stats, 0.9, "own")
    assert scores.shape == (2, 1, 3)
    assert torch.allclose(scores, torch.full_like(scores, 0.1), atol=0.005)


def test_act_prob_pooled_and_reference(gaussian_stats):
    z90 = 1.2815515655446004
    # reference B: t = B's P90 = mu_B + z90; score_A = P(N(mu_A, 1) > t)
    t = thresholds(gaussian_stats, 0.9, "reference", gaussian_stats["B"])
    assert t["A"][0].tolist() == pytest.approx([z90, 1 + z90, z90], abs=0.03)
    scores = act_prob_scores(gaussian_stats, 0.9, "reference", gaussian_stats["B"])
    expect_a = [1 - normal_cdf(z90 - 1), 1 - normal_cdf(1 + z90), 0.1]
    assert scores[0, 0].tolist() == pytest.approx(expect_a, abs=0.01)
    assert scores[1, 0].tolist() == pytest.approx([0.1, 0.1, 0.1], abs=0.005)
    # pooled: t solves (F_A(t) + F_B(t)) / 2 = 0.9 for neurons 0 and 1 (mixture of N(0,1) and N(1,1))
    lo, hi = 0.0, 4.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (normal_cdf(mid) + normal_cdf(mid - 1)) / 2 < 0.9 else (lo, mid)
    t_mix = lo
    scores = act_prob_scores(gaussian_stats, 0.9, "pooled")
    assert scores[0, 0, 0].item() == pytest.approx(1 - normal_cdf(t_mix - 1), abs=0.01)
    assert scores[1, 0, 0].item() == pytest.approx(1 - normal_cdf(t_mix), abs=0.01)
    masks = select_by_score(scores, 1)
    assert masks[0, 0].tolist() == [True, False, False]   # A: its shifted neuron 0
    assert masks[1, 0].tolist() == [False, True, False]   # B: its shifted neuron 1


def test_act_prob_run_records_and_validates(gaussian_stats):
    stats = memory_stats(gaussian_stats)
    args = argparse.Namespace(percentile=90.0, rate=0.34, threshold="pooled")   # round(0.34 * 3) = 1
    ns = act_prob.run(stats, ["A", "B"], args)
    assert ns.neurons["A"].tolist() == [[0, 0]] and ns.neurons["B"].tolist() == [[0, 1]]
    prm = ns.method["params"]
    assert prm["count"] == 1 and prm["threshold"] == "pooled" and prm["site"] == "act"
    assert ns.method["stats_fingerprint"] == stats.fingerprint
    ns = act_prob.run(stats, ["A", "B"], argparse.Namespace(percentile=90.0, rate=0.34, threshold="B"))
    assert ns.method["params"]["threshold"] == "B" and ns.method["params"]["threshold_source"] == "reference"
    assert ns.neurons["A"].tolist() == [[0, 0]]
    ns = act_prob.run(stats, ["A", "B"], argparse.Namespace(percentile=90.0, rate=0.34, threshold="own"))
    assert "note" in ns.method["params"]
    for bad in (dict(percentile=100.0), dict(percentile=0.0), dict(rate=0.0), dict(rate=1.5), dict(threshold="xx")):
        kw = dict(percentile=90.0, rate=0.34, threshold="pooled") | bad
        with pytest.raises(UserError):
            act_prob.run(stats, ["A", "B"], argparse.Namespace(**kw))


# ------------------------------------------------------------------------------ top-prob

def test_top_prob_masks_by_hand():
    # N = 10, top_rate 0.2 -> rank round(0.8 * 10) = 8
    pa = torch.tensor([[0.1, 0.9, 0.3, 0.4, 0.2], [0.8, 0.0, 0.5, 0.7, 0.6]])   # 8th smallest = 0.7
    pb = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.1], [0.0, 0.2, 0.5, 0.9, 0.3]])   # 8th = 0.5: five ties kept
    m = top_prob_masks({"a": pa, "b": pb}, top_rate=0.2)
    assert m["a"].nonzero().tolist() == [[0, 1], [1, 0], [1, 3]]
    assert m["b"].nonzero().tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert m["a"].dtype == torch.bool and list(m) == ["a", "b"]
    with pytest.raises(UserError):
        top_prob_masks({"a": pa}, top_rate=1.0)
    with pytest.raises(UserError):
        top_prob_masks({"a": pa, "b": pb[:1]})


def test_overlap_similarity_by_hand():
    pa = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 0.6]])
    pb = torch.tensor([[0.4, 0.3, 0.5], [0.1, 0.7, 0.2]])
    pc = torch.tensor([[0.2, 0.2, 0.2], [0.2, 0.2, 0.2]])
    ma = torch.tensor([[False, True, True], [True, False, False]])
    mb = torch.tensor([[False, True, False], [True, True, False]])
    mc = torch.tensor([[True, False, False], [False, True, True]])
    langs, O, S = overlap_similarity({"a": pa, "b": pb, "c": pc}, {"a": ma, "b": mb, "c": mc})
    assert langs == ["a", "b", "c"]
    assert O.dtype == torch.int64 and S.dtype == torch.float64
    assert O.tolist() == [[3, 2, 0], [2, 3, 1], [0, 1, 3]]
    # a ∩ b = {(0, 1), (1, 0)}: gather p_a = (0.9, 0.8), p_b = (0.3, 0.1)
    cos_ab = (0.9 * 0.3 + 0.8 * 0.1) / (math.hypot(0.9, 0.8) * math.hypot(0.3, 0.1))
    assert S[0, 1].item() == pytest.approx(cos_ab) and S[1, 0].item() == pytest.approx(cos_ab)
    assert S[0, 2].item() == 0.0                         # empty intersection
    assert S[1, 2].item() == pytest.approx(1.0)          # one common neuron: vectors of length 1
    assert S.diagonal().tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_overlap_similarity_matches_loops_on_random():
    g = torch.Generator().manual_seed(3)
    probs = {c: torch.rand(3, 20, generator=g) for c in "abcd"}
    masks = top_prob_masks(probs, top_rate=0.3)
    langs, O, S = overlap_similarity(probs, masks)
    for i, a in enumerate(langs):
        for j, b in enumerate(langs):
            rows = (masks[a] & masks[b]).nonzero().tolist()
            assert O[i, j] == len(rows)
            x = np.array([probs[a][l, k].item() for l, k in rows])
            y = np.array([probs[b][l, k].item() for l, k in rows])
            ref = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))) if rows else 0.0
            assert S[i, j].item() == pytest.approx(ref, abs=1e-12)


# ------------------------------------------------------------------------------ sentence means

def sentence_stats(means: dict[str, torch.Tensor]) -> ActivationStats:
    per = {}
    for code, m in means.items():
        S, L, I = m.shape
        ls = LanguageStats(L, I, sketch_bins=0, sentences=S)
        ls.sentence_mean[:] = m
        ls.add_sentences(S)
        ls.add_tokens(10 * S)
        per[code] = ls
    return memory_stats(per, unit="sentence")


def test_language_activated_by_hand():
    m = torch.tensor([[[0.5, -0.1, 0.2, 0.0]], [[0.3, 0.4, 0.1, 0.2]], [[0.1, 0.2, 0.0, 0.3]]])  # [3, 1, 4]
    assert activated_mask(m)[0].tolist() == [True, False, False, False]
    assert activated_mask(m[1:])[0].tolist() == [True, True, False, True]
    stats = sentence_stats({"x": m, "y": -m})
    ns = language_activated.run(stats, ["x", "y"], argparse.Namespace(sentences=None))
    assert ns.neurons["x"].tolist() == [[0, 0]] and ns.neurons["y"].tolist() == []
    assert ns.method["params"]["sentences_used"] == {"x": 3, "y": 3}
    ns = language_activated.run(stats, ["x"], argparse.Namespace(sentences=1))
    assert ns.neurons["x"].tolist() == [[0, 0], [0, 2]]
    with pytest.raises(UserError, match="only 3"):
        language_activated.run(stats, ["x"], argparse.Namespace(sentences=5))
    window = memory_stats({"x": LanguageStats(1, 4, sketch_bins=0)})
    with pytest.raises(UserError, match="--unit sentence"):
        language_activated.run(window, ["x"], argparse.Namespace(sentences=None))


def test_average_precision_by_hand():
    scores = torch.tensor([[0.9, 1.0], [0.8, 1.0], [0.7, 0.0], [0.1, 0.0]])  # 4 sentences, 2 neurons
    labels = torch.tensor([0, 0, 1, 1])
    aps = average_precision(scores, labels, 2)
    assert aps[0, 0].item() == pytest.approx(1.0)
    assert aps[1, 0].item() == pytest.approx((1 / 3 + 2 / 4) / 2)
    # neuron 1: all ties within groups; the top group {0, 1} holds both positives of class 0
    assert aps[0, 1].item() == pytest.approx(1.0)
    assert aps[1, 1].item() == pytest.approx(0.5)     # both positives at group end 4: precision 2/4
    tie = average_precision(torch.tensor([[1.0], [1.0], [0.0], [0.0]]), torch.tensor([0, 1, 0, 1]), 2)
    assert tie[:, 0].tolist() == pytest.approx([0.5, 0.5])


def ap_loop(x, y, k):
    """Threshold-wise AP: sum over distinct scores (descending) of (R_n - R_{n-1}) P_n."""
    npos = sum(1 for v in y if v == k)
    total, prev_recall = 0.0, 0.0
    for t in sorted(set(x), reverse=True):
        retrieved = [i for i in range(len(x)) if x[i] >= t]
        tp = sum(1 for i in retrieved if y[i] == k)
        recall = tp / npos
        total += (recall - prev_recall) * tp / len(retrieved)
        prev_recall = recall
    return total


def test_average_precision_matches_reference_with_ties():
    rng = np.random.default_rng(0)
    M, N, K = 30, 25, 3
    x = rng.integers(0, 6, (M, N)).astype(float)      # many ties
    y = rng.integers(0, K, M)
    got = average_precision(torch.from_numpy(x), torch.from_numpy(y), K)
    for k in range(K):
        for n in range(N):
            assert got[k, n].item() == pytest.approx(ap_loop(list(x[:, n]), list(y), k), abs=1e-12)
    sk = pytest.importorskip("sklearn.metrics")
    for n in range(3):
        assert got[1, n].item() == pytest.approx(sk.average_precision_score(y == 1, x[:, n]), abs=1e-12)


def test_ap_selection_threshold_topk_and_exclusivity():
    ap_t = torch.tensor([[[0.95, 0.92, 0.5, 0.99]], [[0.1, 0.93, 0.97, 0.2]]])   # [K=2, L=1, I=4]
    masks, info = ap_masks(ap_t, 0.9)
    assert masks[0, 0].tolist() == [True, False, False, True]     # neuron 1 is kept by both: dropped
    assert masks[1, 0].tolist() == [False, False, True, False]
    assert info["dropped_shared"] == 1 and info["kept_before_exclusivity"] == [3, 2]
    masks, _ = ap_masks(ap_t, 0.9, top_k=1)
    assert masks[0, 0].tolist() == [False, False, False, True] and masks[1, 0].tolist() == [False, False, True, False]


def test_ap_run_on_sentence_means():
    g = torch.Generator().manual_seed(0)
    S, L, I = 20, 2, 6
    base = {c: torch.randn(S, L, I, generator=g) * 0.1 for c in ("en", "fr", "zh")}
    base["en"][:, 0, 1] += 2.0    # perfectly separating neuron for en
    base["zh"][:, 1, 4] += 2.0    # and for zh
    stats = sentence_stats(base)
    args = argparse.Namespace(threshold=0.9, top_k=None, direction="high", sentences=None)
    ns = ap.run(stats, ["en", "fr", "zh"], args)
    assert ns.neurons["en"].tolist() == [[0, 1]] and ns.neurons["zh"].tolist() == [[1, 4]]
    assert ns.neurons["fr"].tolist() == []
    prm = ns.method["params"]
    assert prm["max_ap"]["en"] == pytest.approx(1.0) and prm["chance_ap"]["en"] == pytest.approx(1 / 3)
    low = ap.run(stats, ["en", "fr", "zh"], argparse.Namespace(threshold=0.0, top_k=2, direction="low", sentences=None))
    assert all(low.total(c) <= 2 for c in low.languages)
    with pytest.raises(UserError):
        ap.run(stats, ["en"], args)
    with pytest.raises(UserError):
        ap.run(stats, ["en", "fr"], argparse.Namespace(threshold=1.0, top_k=None, direction="high", sentences=None))
