"""Peak memory and time of identify, ppl value loading and report on statistics of real model widths.

Statistics files of the exact shape of Llama-3.1-8B (32 layers x 14336) and Llama-3.1-70B
(80 x 28672) are synthesised for 20 languages (random values of the right dtypes and structure:
counts of 10^8 tokens, a 128-bin sampled sketch with sorted edges, 16 per-sentence means per
language so that the sentence methods run too; a real 70B collection is not possible on a CPU), each
language its own file as collect writes it. Then, one subprocess each, with its own peak RSS
(``VmHWM``, benchmarks/peak_rss.py) and wall time:

- ``langneurons identify METHOD`` for every method (``random`` draws a set matched to LAPE's);
- ppl value loading: the per-neuron values of ``set:mean`` and ``set:p10`` for every language and
  neuron of the LAPE set (``langneurons.intervene.statistic``, what ``ppl``/``steer`` run first);
- ``langneurons report`` on a run directory holding the statistics and the neuron sets.

    python benchmarks/identify_memory.py [--shapes 8b,70b] [--languages 20] [--workdir /tmp]

The 70B files take about 2.6 GB each on disk (52 GB for 20 languages), written one shape at a time
and deleted afterwards (``--keep`` keeps them). Target: every step under 4 GiB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peak_rss  # noqa: E402

SHAPES = {"8b": ("Llama-3.1-8B", 32, 14336), "70b": ("Llama-3.1-70B", 80, 28672)}
BINS, SENTENCES, TOKENS = 128, 16, 10**8
LANGS = ("en fr es de it pt nl pl ru uk cs zh ja ko ar he hi bn tr vi sw th el fa".split())


def synthesise(directory: Path, name: str, L: int, I: int, languages: list[str], seed: int = 0) -> None:
    """A statistics directory as ``collect --unit sentence`` would write it, with random contents."""
    from langneurons.stats import STATS_FORMAT, sketch_sample_size
    directory.mkdir(parents=True)
    m = sketch_sample_size(L * I)
    rate = m / TOKENS
    steps = torch.linspace(0, 1, BINS + 1)
    meta_langs = {}
    for k, code in enumerate(languages):
        g = torch.Generator().manual_seed(seed * 1000 + k)
        p = torch.rand(L, I, generator=g) * 0.6 + 0.05 * (torch.rand(L, I, generator=g) < 0.01)
        count_pos = (p * TOKENS).to(torch.int64)
        count_neg = ((1 - p) * TOKENS * 0.999).to(torch.int64)
        scale = torch.rand(L, I, generator=g) + 0.5
        lo = -0.3 * scale
        edges = (lo.unsqueeze(-1) + (scale * 3).unsqueeze(-1) * steps).float()      # [L, I, B+1], sorted
        hist = torch.randint(m // (BINS + 2) // 2, 3 * m // (BINS + 2) // 2, (L, I, BINS + 2), generator=g,
                             dtype=torch.int32)
        means = torch.randn(SENTENCES, L, I, generator=g) * 0.1 + (p - 0.3)
        state = {
            "n_tokens": torch.tensor(TOKENS, dtype=torch.int64),
            "count_pos": count_pos, "count_neg": count_neg,
            "sum": (p.double() - 0.2) * TOKENS, "sumsq": (p.double() + 0.1) * TOKENS,
            "vmin": (lo - 0.1).float(), "vmax": (lo + 3 * scale + 1).float(),
            "edges": edges, "hist": hist,
            "sketch_tokens": hist[0, 0].sum().to(torch.int64), "sketch_zeros": torch.zeros(L, I, dtype=torch.int64),
            "n_sentences": torch.tensor(SENTENCES, dtype=torch.int64), "sentence_mean": means,
            "p_max": means.max(0).values, "p_median": means.median(0).values,
        }
        save_file(state, str(directory / f"{code}.safetensors"),
                  metadata={"format": STATS_FORMAT, "sketch_kind": "quantile", "sketch_rate": repr(rate)})
        del state, edges, hist, means
        meta_langs[code] = {"source": "synthetic", "corpus_fingerprint": f"synthetic-{code}", "n_tokens": TOKENS,
                            "n_sentences": SENTENCES, "n_sentence_means": SENTENCES,
                            "sketch": {"rate": rate, "sampled_tokens": m, "error_bound_pp": 0.3}}
        print(f"  wrote {code} ({k + 1}/{len(languages)})", file=sys.stderr, flush=True)
    meta = {"format": STATS_FORMAT, "library_version": "synthetic",
            "model": {"name_or_path": f"synthetic {name} shape", "model_type": "llama", "num_layers": L, "width": I,
                      "site": "act", "gated": True},
            "unit": "sentence", "window": 512, "dtype": "bfloat16",
            "sketch": {"bins": BINS, "kind": "quantile", "rate": "auto", "error_pp": 0.3, "sample_target": m},
            "languages": meta_langs}
    (directory / "stats.json").write_text(json.dumps(meta, indent=1))


def measure(args: list[str], label: str) -> dict:
    """Run ``python args...``: wall time and its own peak RSS (GiB; benchmarks/peak_rss.py)."""
    r = peak_rss.run(args)
    res = {"step": label, "seconds": round(r["seconds"], 1), "peak_gib": round(r["peak_rss_bytes"] / 2**30, 3),
           "rc": r["rc"]}
    if r["rc"] != 0:
        res["error"] = r.get("error", "")
    print(f"  {label:28s} {res['seconds']:8.1f} s {res['peak_gib']:8.2f} GiB"
          + ("" if r["rc"] == 0 else f"  FAILED: {res['error']}"), flush=True)
    return res


VALUES = """
import sys
from langneurons.stats import ActivationStats
from langneurons.neuronset import NeuronSet
from langneurons.intervene import statistic
stats = ActivationStats.load(sys.argv[1])
ns = NeuronSet.load(sys.argv[2])
for code in stats.languages:
    for name in ("mean", "p10"):
        v = statistic(stats, code, name)
        for c in ns.languages:
            rows = ns.neurons[c]
            if len(rows):
                v[rows[:, 0], rows[:, 1]].sum().item()
"""


STEPS = ("lape", "act-prob-percentile", "top-prob", "language-activated", "ap", "random", "values", "report")


def run_shape(key: str, n_langs: int, work: Path, keep: bool, steps=STEPS) -> list[dict]:
    name, L, I = SHAPES[key]
    root = work / f"identify-memory-{key}"
    if root.exists():
        shutil.rmtree(root)
    stats_dir = root / "stats"
    print(f"\n{name} shape: {L} layers x {I} neurons, {n_langs} languages", flush=True)
    t = time.perf_counter()
    synthesise(stats_dir, name, L, I, list(LANGS[:n_langs]))
    print(f"  synthesised in {time.perf_counter() - t:.0f} s "
          f"({sum(f.stat().st_size for f in stats_dir.iterdir()) / 2**30:.1f} GiB on disk)", flush=True)
    cli = ["-m", "langneurons"]
    res = []
    lape = ["lape"] if {"random", "values"} & set(steps) and "lape" not in steps else []
    for method in lape + [m for m in steps if m not in ("random", "values", "report")]:
        r = measure([*cli, "identify", method, "--stats", str(stats_dir), "--out", str(root / f"{method}.json")],
                    f"identify {method}")
        if method in steps:
            res.append(r)
    if "random" in steps:
        res.append(measure([*cli, "identify", "random", "--of", str(root / "lape.json"), "--out",
                            str(root / "random.json")], "identify random"))
    if "values" in steps:
        res.append(measure(["-c", VALUES, str(stats_dir), str(root / "lape.json")], "ppl values (mean, p10)"))
    if "report" in steps:
        res.append(measure([*cli, "report", str(root), "--out", str(root / "report.html")], "report"))
    for r in res:
        r["shape"] = key
    if not keep:
        shutil.rmtree(root)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8b,70b", help="comma-separated among 8b, 70b [8b,70b]")
    ap.add_argument("--languages", type=int, default=20, help=f"languages, at most {len(LANGS)} [20]")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated among {', '.join(STEPS)} [all]")
    ap.add_argument("--keep", action="store_true", help="keep the synthesised statistics")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in shapes if s not in SHAPES]
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if bad or not 2 <= args.languages <= len(LANGS) or not steps or set(steps) - set(STEPS):
        raise SystemExit(f"--shapes among {', '.join(SHAPES)}; --languages in 2..{len(LANGS)}; "
                         f"--steps among {', '.join(STEPS)}")
    results = []
    for s in shapes:
        results += run_shape(s, args.languages, args.workdir, args.keep, steps)
    worst = max(r["peak_gib"] for r in results)
    failed = [r for r in results if r["rc"] != 0]
    print(f"\nworst peak RSS {worst:.2f} GiB (target < 4 GiB); {len(failed)} step(s) failed", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
