"""GPU throughput of collect and of interventions on a model shaped like Llama-3.1-8B, in one run.

Model: random weights, built directly on the device (no download), exactly Llama-3.1-8B's shape:
hidden 4096, MLP width 14336, 32 layers, 32 heads (8 KV heads), vocabulary 128256, rope_theta 500000
with llama3 rope scaling (factor 8, low/high frequency factors 1/4, original context 8192),
rms_norm_eps 1e-5, untied embeddings; bfloat16. Token ids are seeded random integers.

Measured (every number printed comes from this run):

1. Bare forward of the decoder stack (``model.model(input_ids=..., use_cache=False)``: what collect
   runs; the LM head is never needed) on windows of 512 tokens at batch sizes 8, 16, 32, 64
   (stopping at the first out-of-memory), tokens/s and peak memory; the batch size with the
   highest tokens/s is used below.
2. At that batch size, interleaved repeats of: the bare forward again, collect with counts and
   moments only (``sketch_bins=0``), collect with the quantile sketch over every token (what a
   corpus smaller than the sketch's sample size gets) and with the default sampled sketch at the
   rate collect picks for 10^8 tokens per language (``stats.sketch_rate``), through the
   library's own code path (``Collector.run_batch`` with a ``LanguageStats`` on the device; sketch
   edges calibrated as ``collect`` does, outside the timed loop). Tokens/s and time ratios
   collect / bare (above 1: slower than the bare forward). Further variants are LanguageStats
   keyword arguments (``--variant NAME=JSON``, or :func:`collect_variants`).
3. Generation: greedy ``model.generate`` (batch 16, prompt 128 tokens, 128 new tokens, KV cache)
   plain, and inside ``intervene(model, Intervention(..., "zero"))`` on 0.5% random neurons of
   every layer; generated tokens/s and the time ratio intervened / plain.
4. Projected hours to collect 10^8 tokens of one language at the tokens/s of collect as it runs
   by default at that size (the sampled sketch), and of every other collect variant.

Each timing follows a warm-up of the same shape; GPU work is synchronised around
``time.perf_counter``. Repeats give best-of (least disturbed) and median times; ratios are taken
between timings of this one run (best over best; medians over medians beside them).

    PYTHONPATH=src python3 benchmarks/gpu.py [--json gpu.json]        # one H200: well under 8 minutes
    python benchmarks/gpu.py --tiny [--json tiny.json]                 # tiny Llama, CPU, float32, seconds

Imports nothing beyond torch, transformers, numpy and langneurons.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import numpy as np
import torch

from langneurons.arch import Adapter
from langneurons.collect import Batch, Collector, calibration_batches, calibration_rows
from langneurons.intervene import Intervention, intervene
from langneurons.neuronset import NeuronSet
from langneurons.stats import DEFAULT_SKETCH_BINS, LanguageStats, sketch_rate

ROPE_LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=131072,
                  tie_word_embeddings=False, rope_parameters=ROPE_LLAMA3)
TINY = dict(LLAMA31_8B, vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)

#: settings of a full run and of ``--tiny`` (each overridable on the command line)
FULL_SETTINGS = dict(window=512, batches="8,16,32,64", passes=2, repeats=3, gen_batch=16, prompt=128, new=128)
TINY_SETTINGS = dict(window=32, batches="2,4", passes=2, repeats=2, gen_batch=2, prompt=8, new=8)

OOM = torch.cuda.OutOfMemoryError
T0 = time.perf_counter()


def log(msg: str = "") -> None:
    print(msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype, seed: int):
    """A random-weight LlamaForCausalLM built directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**(TINY if tiny else LLAMA31_8B), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.eval()
    got = {p.dtype for p in model.parameters()}
    if got != {dtype}:
        raise RuntimeError(f"model built in {got}, expected {dtype}")
    return model


def timed(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def summary(times: list[float], tokens: int) -> dict:
    """Best-of and median seconds of the repeats, and tokens/s at each."""
    best, med = min(times), statistics.median(times)
    return {"times_s": times, "best_s": best, "median_s": med, "tokens": tokens,
            "tokens_per_s": tokens / best, "tokens_per_s_median": tokens / med}


def windows(n_batches: int, batch: int, window: int, vocab: int, seed: int) -> list[np.ndarray]:
    """Seeded random token windows, as collect holds them (numpy int64 ``[batch, window]`` per batch)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, (batch, window), dtype=np.int64) for _ in range(n_batches)]


def as_batch(items: np.ndarray) -> Batch:
    return Batch(torch.from_numpy(items), None)


# ----------------------------------------------------------------------------------------- 1. bare forward
def bare_fn(model, device: torch.device):
    """The decoder stack's forward, as collect runs it (ids moved to the device, no cache, no LM head)."""
    def run(items: np.ndarray):
        model.model(input_ids=torch.from_numpy(items).to(device), use_cache=False)
    return run


@torch.no_grad()
def bench_forward(model, device, args, vocab: int) -> dict:
    run = bare_fn(model, device)
    by_batch: dict[str, dict] = {}
    for bs in args.batch_sizes:
        data = windows(args.passes, bs, args.window, vocab, args.seed + bs)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        oom = False
        try:
            timed(lambda: run(data[0]), device)   # warm-up
            times = [timed(lambda: [run(w) for w in data], device) for _ in range(args.repeats)]
        except OOM:
            oom = True
        if oom:
            free(device)
            by_batch[str(bs)] = {"oom": True}
            log(f"  batch {bs:4d}: out of memory; stopping here")
            break
        r = summary(times, args.passes * bs * args.window)
        if device.type == "cuda":
            r["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        by_batch[str(bs)] = r
        mem = f"   peak {r['peak_mem_gib']:6.1f} GiB" if "peak_mem_gib" in r else ""
        log(f"  batch {bs:4d} x {args.window}: {r['tokens_per_s']:10.0f} tok/s best, "
            f"{r['tokens_per_s_median']:10.0f} median{mem}")
        del data
        free(device)
    ok = {int(k): v for k, v in by_batch.items() if not v.get("oom")}
    if not ok:
        raise SystemExit("the bare forward ran out of memory at every batch size; pass smaller --batches")
    best = max(ok, key=lambda b: ok[b]["tokens_per_s"])
    log(f"  best batch size: {best}")
    return {"window": args.window, "by_batch": by_batch, "best_batch": best,
            "tokens_per_s": ok[best]["tokens_per_s"]}


# ----------------------------------------------------------------------------------------- 2. collect
#: the collect variant the projection uses: what collect does by default for 10^8 tokens per language
DEFAULT_VARIANT = "sampled sketch"


def collect_variants(extra: list[str], n_neurons: int, tokens: float = 1e8) -> dict[str, dict]:
    """LanguageStats keyword arguments (besides num_layers, width, device) of each timed collect variant
    (more with ``--variant 'NAME={"sketch_bins": 128, "sketch_rate": 0.1}'`` on the command line)."""
    v = {"counts+moments": dict(sketch_bins=0),
         "sketch, every token": dict(sketch_bins=DEFAULT_SKETCH_BINS),
         DEFAULT_VARIANT: dict(sketch_bins=DEFAULT_SKETCH_BINS, sketch_rate=sketch_rate(int(tokens), n_neurons))}
    for spec in extra:
        name, sep, kw = spec.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"--variant {spec!r}: use NAME=JSON, e.g. 'uniform={{\"sketch_kind\": \"uniform\"}}'")
        v[name.strip()] = json.loads(kw)
    return v


def collector_fn(model, adapter: Adapter, device: torch.device, data: list[np.ndarray], stats_kwargs: dict,
                 seed: int):
    """``run(items)`` through collect's own path, as benchmarks/collect.py builds it: a Collector whose
    LanguageStats (``stats_kwargs``) lives on the device; sketch edges calibrated (untimed) as
    ``collect`` does, on windows spread over ``data``."""
    c = Collector(model, adapter, "act", device)
    c.stats = LanguageStats(adapter.num_layers, adapter.width, device=device, **stats_kwargs)
    if c.stats.sketch_bins:
        bs = len(data[0])
        c.calibrate(calibration_batches(data, bs, lambda i, items: as_batch(items)),
                    rows_per_batch=calibration_rows(data, bs), seed=seed)

    def run(items: np.ndarray):
        c.run_batch(as_batch(items))
    return run


@torch.no_grad()
def bench_collect(model, device, args, vocab: int, batch: int) -> dict:
    adapter = Adapter(model)
    data = windows(args.passes, batch, args.window, vocab, args.seed + 1000)
    fns = {"bare forward": bare_fn(model, device)}
    for name, kw in collect_variants(args.variant, adapter.num_layers * adapter.width, args.project_tokens).items():
        t = time.perf_counter()
        fns[name] = collector_fn(model, adapter, device, data, kw, args.seed)
        sync(device)
        log(f"  {name}: LanguageStats({kw}) ready in {time.perf_counter() - t:.1f} s (calibration, untimed)")
    for fn in fns.values():   # warm-up
        timed(lambda: fn(data[0]), device)
    times = {k: [] for k in fns}
    for _ in range(args.repeats):   # interleaved, so drift hits every variant alike
        for k, fn in fns.items():
            times[k].append(timed(lambda: [fn(w) for w in data], device))
    tokens = args.passes * batch * args.window
    res = {k: summary(v, tokens) for k, v in times.items()}
    base = res["bare forward"]
    for k, r in res.items():
        r["ratio"] = r["best_s"] / base["best_s"]
        r["ratio_median"] = r["median_s"] / base["median_s"]
        log(f"  {k:20s} {r['tokens_per_s']:10.0f} tok/s best ({r['tokens_per_s_median']:10.0f} median)   "
            f"time / bare: {r['ratio']:.3f} best, {r['ratio_median']:.3f} median")
    return {"batch": batch, "window": args.window, "tokens_per_pass": tokens, "variants": res}


def bench_collect_fitting(model, device, args, vocab: int, batch: int) -> dict:
    """bench_collect at ``batch``, halved on out-of-memory (the sketch needs more than the bare forward)."""
    while True:
        oom = False
        try:
            return bench_collect(model, device, args, vocab, batch)
        except OOM:
            oom = True
        if oom:
            free(device)
            if batch == 1:
                raise SystemExit("collect ran out of memory at batch size 1")
            log(f"  out of memory at batch {batch}; retrying at {batch // 2}")
            batch //= 2


# ----------------------------------------------------------------------------------------- 3. generation
def random_neurons(num_layers: int, width: int, rate: float, seed: int) -> NeuronSet:
    """``rate`` of the neurons of every layer (at least one), drawn at random."""
    g = torch.Generator().manual_seed(seed)
    n = max(1, round(rate * width))
    rows = [torch.stack([torch.full((n,), l), torch.randperm(width, generator=g)[:n]], 1) for l in range(num_layers)]
    return NeuronSet({"xx": torch.cat(rows)}, {"num_layers": num_layers, "width": width, "site": "act"},
                     {"name": f"random {rate:g} per layer"})


@torch.no_grad()
def bench_generation(model, device, args, vocab: int) -> dict:
    adapter = Adapter(model)
    ns = random_neurons(adapter.num_layers, adapter.width, args.neuron_rate, args.seed)
    iv = Intervention(ns, ["xx"], args.operator)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, vocab, (args.gen_batch, args.prompt), generator=g).to(device)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
              pad_token_id=0, use_cache=True)

    def plain():
        out = model.generate(ids, **kw)
        assert out.shape == (args.gen_batch, args.prompt + args.new), out.shape

    def intervened():
        with intervene(model, iv):
            out = model.generate(ids, **kw)
        assert out.shape == (args.gen_batch, args.prompt + args.new), out.shape

    fns = {"plain": plain, "intervened": intervened}
    for fn in fns.values():   # warm-up
        timed(fn, device)
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    tokens = args.gen_batch * args.new
    res = {k: summary(v, tokens) for k, v in times.items()}
    ratio = res["intervened"]["best_s"] / res["plain"]["best_s"]
    ratio_med = res["intervened"]["median_s"] / res["plain"]["median_s"]
    for k, r in res.items():
        log(f"  {k:11s} {r['tokens_per_s']:9.0f} generated tok/s best ({r['tokens_per_s_median']:9.0f} median), "
            f"{1e3 * r['best_s'] / args.new:7.2f} ms per step")
    log(f"  time intervened / plain: {ratio:.3f} best, {ratio_med:.3f} median "
        f"({ns.total('xx')} neurons, {iv.operator}, positions {iv.positions})")
    return {"batch": args.gen_batch, "prompt": args.prompt, "new_tokens": args.new, "operator": iv.operator,
            "neurons": ns.total("xx"), "neuron_rate_per_layer": args.neuron_rate, **res,
            "ratio": ratio, "ratio_median": ratio_med}


# ----------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny Llama (2 layers, hidden 64, width 128, vocab 1000), "
                    "float32, on the CPU unless --device says otherwise; seconds")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu (--tiny: cpu)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="default: bfloat16 (--tiny: float32)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results here as JSON")
    ap.add_argument("--window", type=int, default=None, help="tokens per window [512; tiny 32]")
    ap.add_argument("--batches", default=None, help="batch sizes of the bare forward, ascending [8,16,32,64; tiny 2,4]")
    ap.add_argument("--passes", type=int, default=None, help="batches per timed measurement [2]")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats of every measurement [3; tiny 2]")
    ap.add_argument("--gen-batch", type=int, default=None, help="generation batch [16; tiny 2]")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens [128; tiny 8]")
    ap.add_argument("--new", type=int, default=None, help="new tokens [128; tiny 8]")
    ap.add_argument("--neuron-rate", type=float, default=0.005, help="intervened share of each layer's neurons [0.005]")
    ap.add_argument("--operator", default="zero", help="intervention operator without statistics, e.g. zero, "
                    "set:1.5, scale:2 [zero]")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                    help="one more collect variant: LanguageStats keyword arguments as JSON (repeatable)")
    ap.add_argument("--project-tokens", type=float, default=1e8, help="tokens per language to project [1e8]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU runs)")
    args = ap.parse_args(argv)
    for k, v in (TINY_SETTINGS if args.tiny else FULL_SETTINGS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.batch_sizes = sorted({int(b) for b in str(args.batches).split(",") if b.strip()})
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.dtype is None:
        args.dtype = "float32" if args.tiny else "bfloat16"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    import transformers
    elapsed: dict[str, float] = {}
    t = time.perf_counter()
    model = build_model(args.tiny, device, dtype, args.seed)
    sync(device)
    cfg = model.config
    vocab = cfg.vocab_size
    elapsed["build"] = time.perf_counter() - t
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    config = {"model": "tiny Llama" if args.tiny else "Llama-3.1-8B shape, random weights",
              "num_layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "width": cfg.intermediate_size,
              "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "vocab": vocab,
              "parameters": sum(p.numel() for p in model.parameters()), "dtype": args.dtype,
              "attn_implementation": getattr(cfg, "_attn_implementation", None), "device": str(device),
              "device_name": name, "torch": torch.__version__, "transformers": transformers.__version__,
              "python": sys.version.split()[0], "repeats": args.repeats, "passes": args.passes, "seed": args.seed}
    log(f"model: {config['model']}: {config['num_layers']} layers, hidden {config['hidden']}, width {config['width']}, "
        f"{config['heads']}/{config['kv_heads']} heads, vocab {vocab}, {config['parameters'] / 1e9:.2f} B parameters, "
        f"{args.dtype}, attention {config['attn_implementation']}")
    log(f"device: {name}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"built in {elapsed['build']:.1f} s; {args.repeats} repeats of {args.passes} batches per measurement")
    res = {"config": config}

    def section(key: str, title: str, fn):
        log(f"\n[{key}] {title}")
        t = time.perf_counter()
        out = fn()
        elapsed[key] = time.perf_counter() - t
        log(f"  ({elapsed[key]:.1f} s; {time.perf_counter() - T0:.0f} s since start)")
        return out

    res["forward"] = section("forward", f"bare forward of the decoder stack, window {args.window}",
                             lambda: bench_forward(model, device, args, vocab))
    batch = res["forward"]["best_batch"]
    res["collect"] = section("collect", f"collect at batch {batch} x {args.window} (time ratios against the bare "
                             "forward of the same repeats)",
                             lambda: bench_collect_fitting(model, device, args, vocab, batch))
    free(device)
    res["generation"] = section("generation", f"greedy generation, batch {args.gen_batch}, prompt {args.prompt}, "
                                f"{args.new} new tokens, KV cache",
                                lambda: bench_generation(model, device, args, vocab))
    var = res["collect"]["variants"]
    hours = {k: {"tokens_per_s": r["tokens_per_s"], "hours": args.project_tokens / r["tokens_per_s"] / 3600,
                 "hours_median": args.project_tokens / r["tokens_per_s_median"] / 3600}
             for k, r in var.items() if k != "bare forward"}
    res["projection"] = {"tokens": args.project_tokens, "variant": DEFAULT_VARIANT,
                         "tokens_per_s": var[DEFAULT_VARIANT]["tokens_per_s"],
                         "hours": hours[DEFAULT_VARIANT]["hours"], "by_variant": hours}
    log(f"\n[projection] {args.project_tokens:.3g} tokens per language (batch {res['collect']['batch']} x "
        f"{args.window}, one device)")
    for k, h in hours.items():
        log(f"  {k:20s} {h['hours']:8.2f} h at {h['tokens_per_s']:.0f} tok/s ({h['hours_median']:.2f} h at the median)")
    elapsed["total"] = time.perf_counter() - T0
    res["elapsed_s"] = elapsed
    log(f"\ntotal {elapsed['total']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, allow_nan=False)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
