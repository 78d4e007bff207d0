"""BridgeX-ICL end to end on the tiny 8-language model of the test suite (en fr es de zh ru ar hi).

Steps, all through the ``langneurons bridge`` command line, then read back and printed:

1. ``probe``: word-translation probes from MUSE dictionaries for de->zh, fr->ru, es->ar and
   de->hi (triangulated through the en-de, en-zh, en-fr, en-ru, en-es, en-ar and en-hi files;
   MUSE train split).  The tiny model translates (almost) no word correctly, so ``--filter all``
   keeps every word; the number it got right is printed anyway.
2. ``select``: overlap neurons, bridge neurons and the HSIC bridge ranking per pair, at the
   paper's top rate 0.01 and, because a 4x384 model has only 15 top-1% neurons per language, at
   0.05 as well.  Candidates en de fr it pt es; it and pt have no statistics and are dropped.
3. ``spectrum``: overlap / cosine / Jaccard / HSIC matrices between the 8 languages.
4. ``bli``: word translation on the MUSE test split without a bridge and through every
   candidate bridge (the selected one marked with ``*``).

Usage:
    .venv/bin/python experiments/bridge_tiny.py [--out DIR] [--limit 64] [--bli-limit 50] [--model DIR --stats DIR]

The model and statistics are those of ``experiments/shared8_ppl_steer.py`` (tiny-train 1500 steps
on FLORES-200 devtest + NTREX-128 text of the 8 languages), built in ``.cache/experiments/shared8``
on the first run (about 8 minutes); ``--model``/``--stats`` take others.

Time: about 20 s once the model exists.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAIRS = [("de", "zh"), ("fr", "ru"), ("es", "ar"), ("de", "hi")]


def model_and_stats(model: Path | None, stats: Path | None) -> tuple[Path, Path, Path]:
    """The given model/statistics, else those of experiments/shared8_ppl_steer.py (built or resumed in
    .cache/experiments/shared8, about 8 minutes the first time)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import shared8_ppl_steer as shared8
    gone = shared8.missing_data()
    if gone:
        raise SystemExit(f"needs {gone[0]} (the shared data beside the repository; set LANGNEURONS_SHARED_DATA)")
    if model is None or stats is None:
        cache = REPO / ".cache" / "experiments" / "shared8"
        shared8.run(cache)
        model, stats = model or cache / "model", stats or cache / "stats"
    return Path(model), Path(stats), shared8.SHARED


def cli(*argv: str) -> None:
    from langneurons.cli import main
    t0 = time.time()
    rc = main(list(argv))
    print(f"  [langneurons {' '.join(argv[:2])} -> exit {rc}, {time.time() - t0:.1f} s]")
    if rc != 0:
        raise SystemExit(rc)


def fmt(v, spec=".4g") -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def matrix(langs, rows, spec) -> str:
    w = max(9, *(len(format(v, spec)) + 1 for r in rows for v in r if v is not None))
    lines = ["      " + "".join(c.rjust(w) for c in langs)]
    for c, r in zip(langs, rows):
        lines.append(f"  {c:>3} " + "".join(fmt(v, spec).rjust(w) for v in r))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / ".cache" / "experiments" / "bridge_tiny")
    ap.add_argument("--limit", type=int, default=64, help="probe words per pair [64]")
    ap.add_argument("--bli-limit", type=int, default=50, help="BLI source words per pair [50]")
    ap.add_argument("--model", type=Path, default=None, help="tiny model directory [that of shared8_ppl_steer.py]")
    ap.add_argument("--stats", type=Path, default=None, help="its statistics [those of shared8_ppl_steer.py]")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(2)
    model, stats, data = model_and_stats(args.model, args.stats)
    muse = data / "muse"
    out = args.out
    print(f"model {model}\nstats {stats}\nMUSE  {muse}\nout   {out}\n")
    pair_args = [a for s, t in PAIRS for a in ("--pair", f"{s}-{t}")]
    common = ["--model", str(model), "--muse-dir", str(muse), "--device", "cpu", "--batch-size", "32"]

    # 1. probes ------------------------------------------------------------------------------------
    print("== 1. probes (MUSE train split, --filter all: the tiny model translates almost nothing)")
    cli("bridge", "probe", *common, *pair_args, "--split", "train", "--limit", str(args.limit),
        "--filter", "all", "--out", str(out / "probes"))
    for s, t in PAIRS:
        doc = json.loads((out / "probes" / f"probes-{s}-{t}.json").read_text(encoding="utf-8"))
        print(f"{s}->{t}: {doc['n_correct']}/{doc['n_candidates']} translated correctly "
              f"(translation accuracy {doc['translation_accuracy']:.3f}); probes kept {doc['n_probes']} "
              f"(filter {doc['filter']}), acts [L, I, N] = [{doc['num_layers']}, {doc['width']}, {doc['n_probes']}]")
        for p in doc["probes"][:3]:
            print(f"    {p['prompt']!r} -> {p['output']!r}  refs {p['references'][:3]}  correct={p['correct']}")

    # 2. selection ---------------------------------------------------------------------------------
    rankings = {}
    for rate in ("0.01", "0.05"):
        for hs in ("biased", "normalized"):
            tag = f"select_r{rate}_{hs}"
            print(f"\n== 2. bridge selection: top-prob rate {rate}, HSIC {hs}, window 10-21/32 scaled")
            cli("bridge", "select", "--stats", str(stats), "--probes", str(out / "probes"), *pair_args,
                "--top-rate", rate, "--hsic", hs, "--out", str(out / tag))
            for s, t in PAIRS:
                rk = json.loads((out / tag / f"ranking-{s}-{t}.json").read_text(encoding="utf-8"))
                rankings[(rate, hs, s, t)] = rk
                sizes = rk["neurons"]["sizes"]
                print(f"{s}->{t}: |T_{s}|={sizes[s]} |T_{t}|={sizes[t]}; overlap neurons per window layer "
                      f"{rk['overlap_per_layer']}; selected bridge: {rk['selected']}")
                for r in rk["ranking"]:
                    per = ", ".join(f"L{e['layer']}:{fmt(e['score'], '.3g')}({e['n_overlap']}x{e['n_bridge']})"
                                    for e in r["per_layer"])
                    print(f"    #{r['rank']} {r['bridge']}: score {fmt(r['score'])}  [{per}]")

    # 3. spectrum ----------------------------------------------------------------------------------
    print("\n== 3. linguistic spectrum (top-prob 0.01; HSIC over all probes, biased)")
    cli("bridge", "spectrum", "--stats", str(stats), "--probes", str(out / "probes"), "--out", str(out / "spectrum"))
    sp = json.loads((out / "spectrum" / "spectrum.json").read_text(encoding="utf-8"))
    langs = sp["languages"]
    print(f"overlap |T_k & T_k'|:\n{matrix(langs, sp['overlap'], 'd')}")
    print(f"cosine of activation probabilities on the overlap:\n{matrix(langs, sp['cosine'], '.3f')}")
    print(f"Jaccard:\n{matrix(langs, sp['jaccard'], '.3f')}")
    print(f"HSIC layer score (layers {sp['layers']}, {sp['n_probes']} probes):\n{matrix(langs, sp['hsic'], '.2e')}")

    # 4. BLI ---------------------------------------------------------------------------------------
    print("\n== 4. BLI on the MUSE test split, with and without each bridge (ranking: rate 0.05, biased)")
    cli("bridge", "bli", *common, *pair_args, "--split", "test", "--limit", str(args.bli_limit),
        "--ranking", str(out / "select_r0.05_biased"), "--out", str(out / "bli"))
    summ = json.loads((out / "bli" / "bli_summary.json").read_text(encoding="utf-8"))
    for key, v in summ["pairs"].items():
        accs = "  ".join(f"{k}{'*' if k == v['selected'] else ''}={a:.3f}" for k, a in v["accuracy"].items())
        print(f"{key} ({v['n_words']} unique source words): {accs}")
        doc = json.loads((out / "bli" / f"bli-{key}.json").read_text(encoding="utf-8"))
        for cond in list(doc["conditions"])[:2]:
            r = doc["conditions"][cond]["records"][0]
            print(f"    {cond}: {r['prompt']!r} -> {r['output']!r} (refs {r['references'][:3]})")
    print("\nMRC: no Belebele data is available locally; run_mrc is tested on a hand-written JSONL "
          "in tests/test_bridge.py.")
    print(f"\nall outputs under {out}")


if __name__ == "__main__":
    main()
