"""LAPE on hand-made probability tables with known answers, and against a loop re-implementation."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from langneurons.errors import UserError
from langneurons.identify import lape
from langneurons.identify.lape import entropy, lape_masks
from langneurons.stats import STATS_FORMAT, ActivationStats, LanguageStats


def table(rows, L=1):
    """Rows of per-language probabilities, one row per neuron, laid out as [L, I, K]."""
    t = torch.tensor(rows, dtype=torch.float64)
    return t.reshape(L, -1, t.shape[-1])


def selected(masks):
    return {k: masks[k].reshape(-1).nonzero().flatten().tolist() for k in range(masks.shape[0])}


# --------------------------------------------------------------------------------------------- by hand

def test_entropy_by_hand():
    p = torch.tensor([[0.9, 0.0], [0.5, 0.5], [0.0, 0.0], [0.2, 0.6]], dtype=torch.float64)
    H = entropy(p)
    q = 0.25
    assert H.tolist() == pytest.approx([0.0, math.log(2), 0.0, -(q * math.log(q) + (1 - q) * math.log(1 - q))])


def test_hand_table_with_tie_and_dead_neuron():
    # neuron: p(lang0), p(lang1)
    p = table([[0.9, 0.0],   # H = 0
               [0.5, 0.5],   # H = ln 2
               [0.0, 0.0],   # dead: below tau_f everywhere
               [0.0, 0.8]])  # H = 0 (ties with neuron 0)
    # pooled sorted: 0 0 0 0 .5 .5 .8 .9; rank round(0.5*8) = 4 -> tau_f = 0
    masks, info = lape_masks(p, top_rate=0.5, filter_rate=0.5, activation_bar_ratio=0.5)
    assert info["tau_f"] == 0.0 and info["rank_f"] == 4 and info["tau_b"] == 0.0
    assert info["requested"] == 2 and info["selected"] == 2 and info["filtered_inf"] == 1
    assert selected(masks) == {0: [0], 1: [3]}
    # one neuron only: the H = 0 tie goes to the smaller flat index (neuron 0)
    masks, info = lape_masks(p, top_rate=0.25, filter_rate=0.5, activation_bar_ratio=0.5)
    assert info["requested"] == 1
    assert selected(masks) == {0: [0], 1: []}
    # three neurons: both H = 0 neurons, then the ln 2 neuron, which belongs to both languages
    masks, info = lape_masks(p, top_rate=0.75, filter_rate=0.5, activation_bar_ratio=0.5)
    assert selected(masks) == {0: [0, 1], 1: [1, 3]}
    assert info["max_selected_entropy"] == pytest.approx(math.log(2))


def test_never_selects_infinite_entropy_when_too_few_survive():
    p = table([[0.3, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    masks, info = lape_masks(p, top_rate=0.75, filter_rate=0.5, activation_bar_ratio=0.5)
    assert info["requested"] == 3 and info["selected"] == 1 and info["shortfall"] == 2
    assert info["survivors"] == 1 and "note" in info
    assert selected(masks) == {0: [0], 1: []}
    # nothing survives at all: nothing is selected (never every neuron)
    masks, info = lape_masks(torch.zeros(2, 3, 2, dtype=torch.float64), 0.5, 0.5, 0.5)
    assert info["selected"] == 0 and not masks.any()


def test_kthvalue_rank_semantics():
    vals = torch.tensor([0.7, 0.1, 1.0, 0.4, 0.3, 0.9, 0.2, 0.6, 0.5, 0.8], dtype=torch.float64)
    p = vals.reshape(1, 5, 2)
    # N = 10. round(2.5) = 2 (half to even) -> 0.2; round(3.5) = 4 -> 0.4; round(9.0) = 9 -> 0.9
    for rate, rank, value in ((0.25, 2, 0.2), (0.35, 4, 0.4), (0.9, 9, 0.9), (0.04, 1, 0.1)):
        _, info = lape_masks(p, top_rate=0.2, filter_rate=rate, activation_bar_ratio=rate)
        assert (info["rank_f"], info["tau_f"]) == (rank, pytest.approx(value))
        assert (info["rank_b"], info["tau_b"]) == (rank, pytest.approx(value))


def test_filter_uses_every_language_and_bar_gives_membership():
    # K = 3; tau_f = tau_b = rank round(0.5*12) = 6 -> sorted 0 0 0 0 .1 .2 ... -> 0.2
    p = table([[0.9, 0.1, 0.0],    # survives (0.9 > .2); H small; belongs to lang 0 only
               [0.2, 0.2, 0.2],    # dead: <= tau_f everywhere (although H is maximal anyway)
               [0.6, 0.6, 0.0],    # belongs to languages 0 and 1
               [0.0, 0.0, 0.3]])   # H = 0, belongs to lang 2
    masks, info = lape_masks(p, top_rate=0.75, filter_rate=0.5, activation_bar_ratio=0.5)
    assert info["tau_f"] == pytest.approx(0.2) and info["filtered_inf"] == 1
    assert selected(masks) == {0: [0, 2], 1: [2], 2: [3]}


def test_language_with_no_neurons_and_unassigned():
    # every neuron has H = 0 (active in one language only): ties broken by index
    p = table([[0.9, 0.0, 0.0], [0.0, 0.8, 0.0], [0.6, 0.0, 0.0], [0.0, 0.0, 0.05]])
    masks, info = lape_masks(p, top_rate=0.5, filter_rate=0.5, activation_bar_ratio=0.5)
    assert info["filtered_inf"] == 0 and info["selected"] == 2
    assert selected(masks) == {0: [0], 1: [1], 2: []}
    # a bar above a selected neuron's every probability leaves it unassigned (counted):
    # sorted p: 0 x8, .05, .6, .8, .9; rank round(0.9 * 12) = 11 -> tau_b = 0.8
    masks, info = lape_masks(p, top_rate=0.75, filter_rate=0.5, activation_bar_ratio=0.9)
    assert info["tau_b"] == pytest.approx(0.8) and info["selected"] == 3
    assert selected(masks) == {0: [0], 1: [], 2: []} and info["unassigned"] == 2


def test_k2_and_validation():
    p = torch.rand(2, 10, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    masks, info = lape_masks(p)
    assert masks.shape == (2, 2, 10) and info["requested"] == 0  # round(0.01 * 20) = 0
    for bad in (dict(top_rate=0.0), dict(filter_rate=1.0), dict(activation_bar_ratio=-0.1), dict(top_rate=float("nan"))):
        with pytest.raises(UserError):
            lape_masks(p, **bad)
    with pytest.raises(UserError, match="at least 2 languages"):
        lape_masks(p[..., :1])


# --------------------------------------------------------------------------------------------- reference

def lape_reference(p: np.ndarray, top_rate, filter_rate, bar):
    """Straightforward loops, written from the definition (no shared code)."""
    L, I, K = p.shape
    pooled = sorted(p.reshape(-1).tolist())
    n = len(pooled)
    tau_f = pooled[min(max(int(round(filter_rate * n)), 1), n) - 1]
    tau_b = pooled[min(max(int(round(bar * n)), 1), n) - 1]
    cands = []
    for l in range(L):
        for j in range(I):
            v = [float(p[l, j, k]) for k in range(K)]
            if all(x <= tau_f for x in v):
                continue
            s = sum(v)
            h = 0.0
            for x in v:
                q = x / s
                if q > 0:
                    h -= q * math.log(q)
            cands.append((h, l * I + j))
    cands.sort()
    out = np.zeros((K, L, I), dtype=bool)
    for h, flat in cands[: int(round(top_rate * L * I))]:
        l, j = divmod(flat, I)
        for k in range(K):
            if p[l, j, k] > tau_b:
                out[k, l, j] = True
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_loop_reference_on_random_tables(seed):
    rng = np.random.default_rng(seed)
    L, I, K = 3, 40, int(rng.integers(2, 6))
    p = rng.random((L, I, K)) ** 3
    p[rng.random((L, I, K)) < 0.3] = 0.0                     # exact zeros
    # exact entropy ties: copy some neurons' probability rows to others
    src, dst = rng.integers(0, L * I, 15), rng.integers(0, L * I, 15)
    flat = p.reshape(L * I, K)
    flat[dst] = flat[src]
    for top_rate, filt, bar in ((0.1, 0.9, 0.9), (0.3, 0.5, 0.8), (0.6, 0.95, 0.7)):
        expected = lape_reference(p, top_rate, filt, bar)
        got, info = lape_masks(torch.from_numpy(p), top_rate, filt, bar)
        assert np.array_equal(got.numpy(), expected), (seed, top_rate, filt, bar)
        again, info2 = lape_masks(torch.from_numpy(p.copy()), top_rate, filt, bar)
        assert torch.equal(got, again) and info == info2


# --------------------------------------------------------------------------------------------- run()

def make_stats(tables: dict[str, torch.Tensor], n: int = 1000, site: str = "act") -> ActivationStats:
    """In-memory statistics whose prob() equals the given [L, I] tables (counts = p * n)."""
    L, I = next(iter(tables.values())).shape
    per = {}
    for code, p in tables.items():
        ls = LanguageStats(L, I, sketch_bins=0)
        ls.n_tokens += n
        ls.count_pos += (p * n).round().long()
        per[code] = ls
    meta = {"format": STATS_FORMAT, "model": {"name_or_path": "hand", "model_type": "llama", "num_layers": L,
                                              "width": I, "site": site},
            "unit": "window", "window": 8, "languages": {c: {"n_tokens": n} for c in tables}}
    return ActivationStats(meta, None, per)


def test_run_records_params_and_every_language():
    p = table([[0.9, 0.0, 0.0], [0.0, 0.8, 0.0], [0.6, 0.0, 0.0], [0.0, 0.0, 0.05]])
    stats = make_stats({c: p[..., k] for k, c in enumerate(["en", "fr", "zh"])})
    args = argparse.Namespace(top_rate=0.5, filter_rate=0.5, activation_bar_ratio=0.5)
    ns = lape.run(stats, ["en", "fr", "zh"], args)
    assert ns.languages == ["en", "fr", "zh"]
    assert ns.neurons["en"].tolist() == [[0, 0]] and ns.neurons["fr"].tolist() == [[0, 1]]
    assert ns.neurons["zh"].tolist() == []
    prm = ns.method["params"]
    assert prm["top_rate"] == 0.5 and prm["filter_rate"] == 0.5 and prm["activation_bar_ratio"] == 0.5
    assert prm["tau_f"] == 0.0 and prm["selected"] == 2 and prm["filtered_inf"] == 0
    assert prm["per_language"] == {"en": 1, "fr": 1, "zh": 0}
    assert ns.method["stats_fingerprint"] == stats.fingerprint and ns.model["site"] == "act"
    # the language set matters: LAPE over en, fr only
    ns2 = lape.run(stats, ["en", "fr"], args)
    assert ns2.languages == ["en", "fr"]
    with pytest.raises(UserError, match="at least 2"):
        lape.run(stats, ["en"], args)
