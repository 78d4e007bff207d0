"""Benchmark: cost of interventions in generation, and of the perplexity matrix.

Setting: a random-weight Llama (8 layers, hidden 512, MLP width 1408, 8 heads, vocabulary 32000),
float32, torch limited to 2 threads, seeded.

1. Generation: batch of 8 prompts of 32 tokens (left-padded, two rows shorter), 64 new tokens,
   greedy, KV cache. Plain ``model.generate`` against the same call inside
   ``intervene(model, Intervention(..., "set:mean"))`` on a 1% neuron set (113 neurons spread
   over the layers). Runs alternate (plain, intervened, plain, ...) after a warm-up; the script
   prints best-of and median times and the ratio intervened / plain (target <= 1.05 on the best
   times, the less noisy estimate on a shared machine).
2. Perplexity matrix of K = 4 languages (random windows: 8 windows of 64 tokens per language,
   a 1% ``zero`` set per language): ``perplexity_matrix`` (baseline once per column, rows stacked in
   shared passes of 8 sequences) against the naive loop that, for every (row, column) cell, runs
   the column's windows once under the row's intervention and once more for its baseline, as the
   [M25] scripts did (2 K^2 column passes). Both give the same NLL (checked).

Run:  python benchmarks/intervene.py [--threads 2] [--repeats 5]   (exit status 1 if the matrices disagree)

On an oversubscribed machine (load far above the core count) two-thread timings are dominated by
scheduling waits at every parallel region; ``--threads 1`` then gives the steadier comparison.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch

from langneurons.intervene import Intervention, intervene
from langneurons.neuronset import NeuronSet
from langneurons.ppl import perplexity_matrix
from langneurons.runtime import Session
from langneurons.stats import STATS_FORMAT, ActivationStats, LanguageStats

SEED = 0
LAYERS, HIDDEN, WIDTH, VOCAB = 8, 512, 1408, 32000
BATCH, PROMPT, NEW = 8, 32, 64
RATE = 0.01
REPEATS = 5
K, WINDOWS, T = 4, 8, 64
TARGET = 1.05


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(SEED)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=WIDTH, num_hidden_layers=LAYERS,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def random_set(langs, seed) -> NeuronSet:
    g = torch.Generator().manual_seed(seed)
    n = round(RATE * LAYERS * WIDTH)
    neurons = {}
    for code in langs:
        flat = torch.randperm(LAYERS * WIDTH, generator=g)[:n]
        neurons[code] = torch.stack([flat // WIDTH, flat % WIDTH], 1)
    return NeuronSet(neurons, {"num_layers": LAYERS, "width": WIDTH, "site": "act"}, {"name": "random"})


def fake_stats(langs) -> ActivationStats:
    g = torch.Generator().manual_seed(SEED)
    per = {}
    for code in langs:
        ls = LanguageStats(LAYERS, WIDTH, sketch_bins=0)
        ls.sum = torch.randn(LAYERS, WIDTH, generator=g, dtype=torch.float64) * 100
        ls.n_tokens = torch.tensor(1000)
        per[code] = ls
    meta = {"format": STATS_FORMAT, "languages": {c: {} for c in langs},
            "model": {"name_or_path": "random", "model_type": "llama", "num_layers": LAYERS, "width": WIDTH,
                      "site": "act"}}
    return ActivationStats(meta, None, per)


def bench_generation(model) -> float:
    ns = random_set(["xx"], SEED)
    iv = Intervention(ns, ["xx"], "set:mean", stats=fake_stats(["xx"]))
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(3, VOCAB, (BATCH, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :11] = 0
    ids[mask == 0] = 0
    kw = dict(attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
              use_cache=True)

    def plain():
        return model.generate(ids, **kw)

    def steered():
        with intervene(model, iv):
            return model.generate(ids, **kw)

    with torch.no_grad():
        plain(), steered()  # warm-up
        times = {"plain": [], "intervened": []}
        for _ in range(REPEATS):
            for name, fn in (("plain", plain), ("intervened", steered)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    bp, bi = min(times["plain"]), min(times["intervened"])
    mp, mi = statistics.median(times["plain"]), statistics.median(times["intervened"])
    print(f"generation: batch {BATCH}, prompt {PROMPT}, {NEW} new tokens, {ns.total('xx')} neurons (1%), set:mean")
    print(f"  plain        best {bp:7.3f} s   median {mp:7.3f} s")
    print(f"  intervened   best {bi:7.3f} s   median {mi:7.3f} s")
    ratio = bi / bp
    print(f"  ratio intervened/plain: best {ratio:.3f}, median {mi / mp:.3f}  (target <= {TARGET}: "
          f"{'met' if ratio <= TARGET else 'NOT met'})")
    hook_us = hook_cost(model, iv)
    step = bp / NEW
    print(f"  hook cost per decode step (model pre-hook + {LAYERS} layer writers, timed in isolation): "
          f"{hook_us:.0f} us = {100 * hook_us * 1e-6 / step:.2f}% of a plain step ({1e3 * step:.1f} ms); "
          f"load-independent estimate of the ratio: {1 + hook_us * 1e-6 / step:.4f}")
    return ratio


def hook_cost(model, iv, n: int = 5000) -> float:
    """Microseconds of hook work per decode step: the model-level pre/post hooks once, the writer
    (through the registered forward hook) once per layer, on the decode-step tensors [8, 1, I]."""
    from langneurons.arch import Adapter
    from langneurons.hooks import write
    from langneurons.intervene import Controller
    adapter = Adapter(model)
    ctl = Controller(model, adapter, [iv])
    plan = iv.plan(adapter)
    act = adapter.layers[sorted(plan)[0]].act
    ids = torch.zeros(BATCH, 1, dtype=torch.long)
    am = torch.ones(BATCH, PROMPT + NEW // 2, dtype=torch.long)
    x = torch.randn(BATCH, 1, WIDTH)
    with write(adapter, "act", ctl.make_writer(0, iv, plan), [sorted(plan)[0]]):
        def step():
            ctl._pre_hook(model, (), {"input_ids": ids, "attention_mask": am})
            for _ in range(LAYERS):
                act(x)
            ctl._post_hook(model, (), {}, None)
        for _ in range(50):
            step()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        with_hooks = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n):
        for _ in range(LAYERS):
            act(x)
    bare = (time.perf_counter() - t0) / n
    return (with_hooks - bare) * 1e6


def bench_ppl(model) -> bool:
    langs = [f"l{k}" for k in range(K)]
    ns = random_set(langs, SEED + 1)
    rng = np.random.default_rng(SEED)
    columns = {c: rng.integers(3, VOCAB, (WINDOWS, T)) for c in langs}
    rows = [("baseline", None)] + [(c, Intervention(ns, [c], "zero")) for c in langs]
    with torch.no_grad():
        t0 = time.perf_counter()
        session = Session(model, None, batch_size=BATCH)
        res = perplexity_matrix(session, rows, columns)
        ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        naive = torch.zeros(K + 1, K, dtype=torch.float64)
        passes = 0
        for r, (_, iv) in enumerate(rows[1:], 1):
            for c, W in enumerate(columns.values()):
                ids = torch.from_numpy(W)
                for s in range(0, WINDOWS, BATCH):
                    with intervene(model, iv):
                        naive[r, c] += session.token_nll(ids[s:s + BATCH])[0].sum()
                    base = session.token_nll(ids[s:s + BATCH])[0].sum()   # baseline recomputed per cell
                    naive[0, c] = base if r == 1 else naive[0, c]
                    passes += 2
        naive_t = time.perf_counter() - t0
    ok = torch.allclose(naive, res.nll_sum, rtol=1e-4, atol=1e-3)
    print(f"perplexity matrix: K = {K} languages, {WINDOWS} windows x {T} tokens each, rows = baseline + {K}, zero")
    print(f"  stacked (langneurons.ppl)  {ours:7.2f} s   {res.passes} forward passes of <= {BATCH} sequences "
          f"({res.sequences} sequences)")
    print(f"  naive per-cell loop        {naive_t:7.2f} s   {passes} forward passes "
          f"(2 K^2 = {2 * K * K} column passes)")
    print(f"  speed-up {naive_t / ours:.2f}x; matrices agree: {ok} "
          f"(max |diff| {float((naive - res.nll_sum).abs().max()):.2e} nats summed)")
    return ok


def main() -> int:
    import argparse
    global REPEATS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=REPEATS)
    args = ap.parse_args()
    REPEATS = args.repeats
    torch.set_num_threads(args.threads)
    model = build_model()
    print(f"model: random Llama {LAYERS} layers, hidden {HIDDEN}, MLP width {WIDTH}, vocab {VOCAB}, float32, "
          f"{torch.get_num_threads()} threads")
    import os
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    bench_generation(model)
    ok = bench_ppl(model)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
