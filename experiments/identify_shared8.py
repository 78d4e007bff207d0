"""Compare neuron-selection methods on the tiny 8-language model of the test suite.

Prints, for LAPE at several top rates: the per-layer distribution per language, the Jaccard
matrix between languages (with the mean over same-script and cross-script pairs), and the
per-language Jaccard between LAPE and act-prob-percentile with the ``own`` and ``pooled``
thresholds (act-prob taken at the same number of neurons per language as LAPE selects on
average, so that the sizes are comparable), plus top-prob.

Usage:
    .venv/bin/python experiments/identify_shared8.py [--stats DIR] [--top-rates 0.01,0.05]

Without ``--stats`` the newest complete ``.cache/tests/shared8-stats-*`` directory is used; if there
is none, the statistics are built with the test suite's own helpers (needs ../shared/data; slow).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"en": "Latin", "fr": "Latin", "es": "Latin", "de": "Latin", "zh": "Han", "ru": "Cyrillic",
           "ar": "Arabic", "hi": "Devanagari", "el": "Greek", "ja": "Japanese"}


def find_stats() -> Path:
    found = sorted((REPO / ".cache" / "tests").glob("shared8-stats-*"), key=lambda p: p.stat().st_mtime)
    found = [p for p in found if (p / ".complete").is_file()]
    if found:
        return found[-1]
    sys.path.insert(0, str(REPO / "tests"))
    import conftest  # the fixtures' builders

    if not conftest.SHARED_DATA.is_dir():
        raise SystemExit(f"no cached statistics and no shared data at {conftest.SHARED_DATA}; pass --stats DIR")
    langs = {c: [conftest.SHARED_DATA / f for f in fs] for c, fs in conftest.SHARED_TEXT.items()}
    model = conftest._train(langs, "shared8", steps=600)
    return conftest._collect(model, {c: [fs[0]] for c, fs in langs.items()}, "shared8-stats")


def table(header, rows) -> str:
    cells = [[str(x) for x in header]] + [[str(x) for x in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(v.rjust(w[i]) for i, v in enumerate(r)) for r in cells)


def matrix_text(langs, m, fmt="{:.2f}") -> str:
    return table([""] + langs, [[a] + [fmt.format(v) for v in m[i].tolist()] for i, a in enumerate(langs)])


def script_means(langs, jac) -> tuple[float, float]:
    same, cross = [], []
    for i in range(len(langs)):
        for j in range(i + 1, len(langs)):
            (same if SCRIPTS.get(langs[i]) == SCRIPTS.get(langs[j]) else cross).append(float(jac[i, j]))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return mean(same), mean(cross)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stats", type=Path, default=None)
    ap.add_argument("--top-rates", default="0.01,0.05")
    ap.add_argument("--percentile", type=float, default=90.0)
    args = ap.parse_args(argv)

    from langneurons.identify import lape, prob_table
    from langneurons.identify.act_prob import act_prob_scores, select_by_score
    from langneurons.identify.top_prob import top_prob_masks
    from langneurons.neuronset import NeuronSet, jaccard_between, jaccard_matrix
    from langneurons.stats import ActivationStats

    stats_dir = args.stats or find_stats()
    stats = ActivationStats.load(stats_dir)
    langs = stats.languages
    L, I = stats.num_layers, stats.width
    print(f"statistics: {stats_dir}")
    print(f"model {stats.meta['model']['name_or_path']} ({L} layers x {I} neurons), site {stats.site}, "
          f"unit {stats.meta.get('unit')}, window {stats.meta.get('window')}")
    print("tokens: " + ", ".join(f"{c}={stats.meta['languages'][c]['n_tokens']}" for c in langs))

    t0 = time.time()
    per = {c: stats.get(c) for c in langs}
    q = args.percentile / 100
    scores = {"own": act_prob_scores(per, q, "own"), "pooled": act_prob_scores(per, q, "pooled")}
    print(f"act-prob scores (P{args.percentile:g}, own and pooled thresholds) in {time.time() - t0:.1f} s")
    own = scores["own"]
    print(f"own-threshold scores: mean {own.mean():.4f}, std {own.std():.4f}, min {own.min():.4f}, "
          f"max {own.max():.4f} (about {1 - q:.2f} by construction)")
    p = prob_table(stats, langs)

    for rate in [float(x) for x in args.top_rates.split(",")]:
        ns = lape.run(stats, langs, argparse.Namespace(top_rate=rate, filter_rate=0.95, activation_bar_ratio=0.95))
        prm = ns.method["params"]
        print(f"\n=== LAPE top_rate {rate} (round({rate} * {L * I}) = {prm['requested']} neurons; selected "
              f"{prm['selected']}, tau_f = tau_b = {prm['tau_f']:.4f}, {prm['filtered_inf']} neurons filtered, "
              f"{prm['unassigned']} unassigned)")
        counts = ns.counts()
        rows = [[c] + counts[c].tolist() + [ns.total(c)] for c in langs]
        print("per-layer distribution:")
        print(table(["lang"] + [f"L{l}" for l in range(L)] + ["total"], rows))
        _, jac = jaccard_matrix(ns)
        print("Jaccard between languages:")
        print(matrix_text(langs, jac))
        same, cross = script_means(langs, jac)
        print(f"mean Jaccard, same-script pairs (Latin en/fr/es/de): {same:.3f}; cross-script pairs: {cross:.3f}")

        # act-prob at the mean LAPE size per language (at least 1)
        k = max(1, round(sum(ns.total(c) for c in langs) / len(langs)))
        model, method = stats.model_info, {"name": "act-prob-percentile", "languages": langs}
        rows = []
        other = {}
        for src in ("own", "pooled"):
            m = select_by_score(scores[src], k)
            other[src] = NeuronSet.from_masks({c: m[i] for i, c in enumerate(langs)}, model, method)
        tp = NeuronSet.from_masks(top_prob_masks({c: p[..., i] for i, c in enumerate(langs)}, rate), model,
                                  {"name": "top-prob", "languages": langs})
        j_own = jaccard_between(ns, other["own"])[1]
        j_pool = jaccard_between(ns, other["pooled"])[1]
        j_op = jaccard_between(other["own"], other["pooled"])[1]
        j_tp = jaccard_between(ns, tp)[1]
        for i, c in enumerate(langs):
            rows.append([c, ns.total(c), f"{j_own[i]:.3f}", f"{j_pool[i]:.3f}", f"{j_op[i]:.3f}", tp.total(c),
                         f"{j_tp[i]:.3f}"])
        rows.append(["mean", "", f"{j_own.mean():.3f}", f"{j_pool.mean():.3f}", f"{j_op.mean():.3f}", "",
                     f"{j_tp.mean():.3f}"])
        print(f"per-language Jaccard (act-prob P{args.percentile:g} with {k} neurons per language; "
              f"top-prob at top_rate {rate}):")
        print(table(["lang", "|LAPE|", "LAPE~own", "LAPE~pooled", "own~pooled", "|top-prob|", "LAPE~top-prob"],
                    rows))
        _, jac_pool = jaccard_matrix(other["pooled"])
        same_p, cross_p = script_means(langs, jac_pool)
        print(f"act-prob pooled, mean Jaccard same-script {same_p:.3f}, cross-script {cross_p:.3f}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    sys.exit(main())
