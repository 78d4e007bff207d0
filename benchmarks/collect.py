"""Collection overhead, memory and sketch accuracy, measured side by side in one run.

Model: random-weight Llama, 8 layers, hidden 512, intermediate 1408, vocab 32000, float32, 2 threads;
batches of 8 windows x 256 tokens. Prints time ratios against a bare forward pass over the same
windows (``model(input_ids)``, the full causal LM, and ``model.model(input_ids)``, the decoder stack
that collect runs, without the LM head) for:

- collect with counts and moments only (``--sketch-bins 0``);
- collect with the quantile sketch over every token (``quantile`` edges, the default, and ``uniform``
  edges): what collect does for a corpus smaller than the sketch's sample size ``m``;
- collect with the default sampled sketch at the rate ``m / n`` collect picks for a language of
  ``n`` = 10^7 and 10^8 tokens (the sizes researchers collect; ``stats.sketch_rate``);
- a straightforward hook implementation (float64 casts and separate reductions per statistic);
- nnsight tracing, when nnsight is installed.

Then peak memory (RSS, separate processes) at N and 4N tokens, and the sketch's P10/P50/P90 error
in percentile points against exact quantiles of the same activations (the worst neuron), with edges
calibrated as ``collect`` does (64 windows spread over the selection):

- the sketch over every token, all neurons of every layer, for both edge kinds, over the 128 windows
  of ``--accuracy-batches`` 16 (the histogram read-off error alone);
- the default sampled sketch: the model's first two layers (the same weights), 256 seeded neurons
  per layer, over ``--sample-tokens`` (default 2^21) tokens, sampled at the rate collect picks there
  (``m`` for the full model's 11264 neurons, so the same sample size as a 10^8-token corpus; the
  finite-population correction ``sqrt(1 - m/n)`` of a corpus only twice ``m`` makes the sampling part
  smaller than at 10^8 tokens, so the printed Hoeffding bound is the figure to compare with).

The timing loop leaves the calibration out (it happens once per language: one extra forward pass
over 64 windows).

    python benchmarks/collect.py [--batches 6] [--repeats 5] [--accuracy-batches 16] [--sample-tokens N]

Time ratios are of the best of the interleaved repeats (interference on a shared machine only ever
adds time, so the minimum is the least noisy estimate, as ``timeit`` recommends); the ratio of the
medians is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from langneurons.arch import Adapter
from langneurons.collect import Batch, Collector, calibration_batches, calibration_rows
from langneurons.hooks import observe
from langneurons.stats import LanguageStats, sketch_error_bound, sketch_rate, sketch_sample_size


def build_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 32000, (8, 256), generator=g) for _ in range(n)]


def time_it(fn, data):
    t = time.perf_counter()
    with torch.no_grad():
        for ids in data:
            fn(ids)
    return time.perf_counter() - t


def naive_collector(model, adapter):
    """What one writes first: cast to float64 and reduce each statistic separately."""
    L, I = adapter.num_layers, adapter.width
    acc = {"count": torch.zeros(L, I, dtype=torch.int64), "sum": torch.zeros(L, I, dtype=torch.float64),
           "sumsq": torch.zeros(L, I, dtype=torch.float64)}

    def fn(layer, t):
        x = t.reshape(-1, I).double()
        acc["count"][layer] += (x > 0).sum(0)
        acc["sum"][layer] += x.sum(0)
        acc["sumsq"][layer] += (x ** 2).sum(0)

    def run(ids):
        with observe(adapter, "act", fn):
            model.model(input_ids=ids, use_cache=False)
    return run


def collector_fn(model, adapter, bins, kind="quantile", rate=1.0):
    c = Collector(model, adapter, "act", torch.device("cpu"))
    c.stats = LanguageStats(adapter.num_layers, adapter.width, sketch_bins=bins, sketch_kind=kind, sketch_rate=rate)
    return lambda ids: c.run_batch(Batch(ids, None))


def nnsight_fn(model, adapter):
    try:
        from nnsight import NNsight
    except ImportError:
        return None
    wrapped = NNsight(model)
    L, I = adapter.num_layers, adapter.width
    count = torch.zeros(L, I, dtype=torch.int64)

    def run(ids):
        with wrapped.trace(ids):
            saved = [wrapped.model.layers[l].mlp.act_fn.output.save() for l in range(L)]
        for l, s in enumerate(saved):
            v = s.value if hasattr(s, "value") else s
            count[l] += (v.reshape(-1, I) > 0).sum(0)
    return run


def child_peak_rss(n_batches: int) -> None:
    """Run collect on n batches in this process and print the peak RSS (KiB)."""
    torch.set_num_threads(2)
    model = build_model()
    adapter = Adapter(model)
    run = collector_fn(model, adapter, 128)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(n_batches):  # windows are generated on the fly, as collect streams them
            run(torch.randint(3, 32000, (8, 256), generator=g))
    print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def sketch_accuracy(model, adapter, data, kind: str = "quantile"):
    """Collect's sketch, its edges calibrated as ``collect`` does (seeded positions of 64 windows spread
    over all of ``data``), against exact quantiles of every activation it counted."""
    L, I = adapter.num_layers, adapter.width
    c = Collector(model, adapter, "act", torch.device("cpu"))
    ls = c.stats = LanguageStats(L, I, sketch_bins=128, sketch_kind=kind)
    windows = [ids.numpy() for ids in data]
    bs = len(windows[0])
    c.calibrate(calibration_batches(windows, bs, lambda i, items: Batch(torch.from_numpy(items), None)),
                rows_per_batch=calibration_rows(windows, bs), seed=0)
    acts = [[] for _ in range(L)]

    def fn(layer, t):
        acts[layer].append(t.reshape(-1, I).float().clone())
    with torch.no_grad():
        for ids in data:
            with observe(adapter, "act", fn):
                c.run_batch(Batch(ids, None))
    return worst_errors(ls, acts), len(data) * 8 * 256


def worst_errors(ls: LanguageStats, acts: list, cols=None) -> dict:
    """Worst neuron's distance (percentile points) from P10/P50/P90 to the percentile-rank interval of
    the sketch's quantile in the exact activations ``acts[layer]`` (columns ``cols`` of the sketch)."""
    worst = {}
    for p in (0.1, 0.5, 0.9):
        q = ls.quantile(p).float()
        if cols is not None:
            q = q[:, cols]
        errs = []
        for l, chunks in enumerate(acts):
            X = torch.cat(chunks)
            lo = (X < q[l]).double().mean(0)
            hi = (X <= q[l]).double().mean(0)
            errs.append(((lo - p).clamp_min(0) + (p - hi).clamp_min(0)).max() * 100)
        worst[p] = float(torch.stack(errs).max())
    return worst


def sampled_sketch_accuracy(model, n_tokens: int, neurons: int = 256, seed: int = 0):
    """The default sampled sketch on the first two layers of ``model`` over ``n_tokens`` tokens, at the
    rate collect picks for the full model's neurons, against exact quantiles of ``neurons`` seeded
    neurons per layer. Returns (worst error per level, rate, sampled positions, Hoeffding bound)."""
    import copy
    full = Adapter(model)
    n_full = full.num_layers * full.width
    small = copy.copy(model.model)                        # shares the weights
    small._modules = dict(small._modules)                 # but not the module table: model keeps its layers
    small.layers = torch.nn.ModuleList(list(model.model.layers)[:2])
    small.config = copy.copy(model.config)
    small.config.num_hidden_layers = 2
    adapter = Adapter(small)
    L, I = adapter.num_layers, adapter.width
    rate = sketch_rate(n_tokens, n_full)
    c = Collector(small, adapter, "act", torch.device("cpu"))
    ls = c.stats = LanguageStats(L, I, sketch_bins=128, sketch_rate=rate)
    c.sketch_seed = seed
    windows = [ids.numpy() for ids in batches(n_tokens // 2048, seed=3)]
    c.calibrate(calibration_batches(windows, 8, lambda i, items: Batch(torch.from_numpy(items), None)),
                rows_per_batch=calibration_rows(windows, 8), seed=seed)
    cols = torch.randperm(I, generator=torch.Generator().manual_seed(seed))[:neurons].sort().values
    acts = [[] for _ in range(L)]

    def keep(layer, t):
        acts[layer].append(t.reshape(-1, I)[:, cols].float().clone())
    t0 = time.perf_counter()
    with torch.no_grad():
        for i, w in enumerate(windows):
            with observe(adapter, "act", keep):
                c.run_batch(Batch(torch.from_numpy(w), None, index=i))
            if i % 128 == 127:
                print(f"  sampled-sketch accuracy: {(i + 1) * 2048} of {n_tokens} tokens, "
                      f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    worst = worst_errors(ls, acts, cols)
    n = int(ls.n_tokens)
    m = int(ls.sketch_tokens) if ls.sketch_tokens is not None else n
    return worst, rate, m, n, sketch_error_bound(n_full, m, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--accuracy-batches", type=int, default=16, help="batches of 8 x 256 for the sketch accuracy (0: skip it) [16]")
    ap.add_argument("--sample-tokens", type=int, default=1 << 21,
                    help="tokens for the sampled sketch's accuracy (0: skip it) [2097152]")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child_peak_rss(args.child)
        return
    torch.set_num_threads(2)
    model = build_model()
    adapter = Adapter(model)
    data = batches(args.batches)
    n_neurons = adapter.num_layers * adapter.width
    rates = {n: sketch_rate(n, n_neurons) for n in (10**7, 10**8)}
    variants = {
        "forward (full LM)": lambda ids: model(input_ids=ids, use_cache=False),
        "forward (decoder stack)": lambda ids: model.model(input_ids=ids, use_cache=False),
        "collect: counts+moments": collector_fn(model, adapter, 0),
        "collect: + quantile sketch": collector_fn(model, adapter, 128, "quantile"),
        "collect: + uniform sketch": collector_fn(model, adapter, 128, "uniform"),
        **{f"collect: sampled, 10^{len(str(n)) - 1} tok/lang": collector_fn(model, adapter, 128, "quantile", r)
           for n, r in rates.items()},
        "straightforward hooks": naive_collector(model, adapter),
    }
    nn = nnsight_fn(model, adapter)
    if nn is not None:
        variants["nnsight trace"] = nn
    with torch.no_grad():
        for fn in variants.values():  # warm-up
            fn(data[0])
    times = {k: [] for k in variants}
    for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
        for k, fn in variants.items():
            times[k].append(time_it(fn, data))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    tokens = args.batches * 8 * 256
    print(f"collect benchmark: Llama 8x512 (I=1408, vocab 32000), float32, 2 threads, batch 8x256, "
          f"{tokens} tokens per pass, {args.repeats} interleaved repeats; ratios of the best (least disturbed) "
          "times, medians in brackets")
    print(f"{'variant':30s} {'best s':>8s} {'tok/s':>9s} {'/ full LM':>10s} {'/ decoder':>10s} {'(medians)':>10s}")
    for k, v in best.items():
        print(f"{k:30s} {v:8.3f} {tokens / v:9.0f} {v / best['forward (full LM)']:10.3f} "
              f"{v / best['forward (decoder stack)']:10.3f} {med[k] / med['forward (decoder stack)']:10.3f}")
    if nn is None:
        print("nnsight: not installed (pip install nnsight to include it)")
    m = sketch_sample_size(n_neurons)
    print(f"sampled sketch: m = {m} positions per language for {n_neurons} neurons (0.3 pp at P1..P99, "
          "probability 0.99); rates " + ", ".join(f"{r:.4f} at {n:.0e} tokens" for n, r in rates.items())
          + "; counts and moments see every token")

    rss = {}
    for n in (4, 16):
        out = subprocess.run([sys.executable, __file__, "--child", str(n)], capture_output=True, text=True, check=True)
        rss[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"]
    print(f"peak RSS: {rss[4] / 1024:.0f} MiB at {4 * 2048} tokens, {rss[16] / 1024:.0f} MiB at {16 * 2048} tokens "
          f"(growth {100 * (rss[16] / rss[4] - 1):+.1f}% for 4x tokens; target <= 5%)")

    acc_data = batches(args.accuracy_batches, seed=2)
    for kind in ("quantile", "uniform") if acc_data else ():
        worst, n = sketch_accuracy(model, adapter, acc_data, kind)
        print(f"sketch (128 {kind} bins) vs exact quantiles over {n} tokens x {adapter.num_layers * adapter.width} "
              "neurons, worst neuron, percentile points: "
              + ", ".join(f"P{int(p * 100)} {e:.3f}" for p, e in worst.items()) + " (target <= 0.5)")
    if args.sample_tokens:
        worst, rate, m, n, bound = sampled_sketch_accuracy(model, args.sample_tokens)
        print(f"sampled sketch (128 quantile bins, default settings) vs exact quantiles over {n} tokens, layers 0-1, "
              f"256 neurons per layer: rate {rate:.3f}, {m} sampled positions, Hoeffding bound {bound:.3f} pp "
              "(+ read-off); worst neuron, percentile points: "
              + ", ".join(f"P{int(p * 100)} {e:.3f}" for p, e in worst.items()) + " (target <= 0.5)")


if __name__ == "__main__":
    main()
