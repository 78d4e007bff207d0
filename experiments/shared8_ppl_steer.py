"""Deactivation perplexity matrix and steering on a tiny model trained on 8 languages of ../shared/data.

The claims checked ([T24] and [R25] on a model small enough for a CPU):

1. deactivating a language's LAPE neurons raises that language's perplexity more than any other
   language's (row dominance of the delta-NLL matrix), for at least 7 of the 8 languages, and far
   more than a matched random set of the same size per layer does;
2. writing the target language's neurons with ``set:p_max`` shifts cloze preferences (Language
   Steering Shift on MUSE-built items) and sampled generations (langid share) toward the target more
   than ``zero`` and ``set:batch-p10`` do.

It is ``langneurons demo`` on other text: ``tiny-train`` (``--steps``, default 1500) on FLORES-200
devtest + NTREX-128 text of en fr es de zh ru ar hi, ``collect`` (windows of 64 tokens, 16 384
tokens per language), ``identify lape --top-rate`` (default 0.05 of the 4 x 384 neurons),
``ppl`` on the held-out 5 % of each language's lines with random-control rows, ``collect --unit
sentence`` and ``steer --muse --generation`` with the three operators, then ``report``. Every step
is the CLI command of that name; OUT keeps every artifact and a rerun skips finished steps.

With 600 training steps (the test fixture) the tiny model shares most neurons among the four
Latin-script languages and row dominance is 6/8; with 1500 steps the languages separate.

Time: about 10 minutes on 2 cores (training 6-7 of them).

Run:  python experiments/shared8_ppl_steer.py [--out .cache/experiments/shared8] [--steps 1500] [--top-rate 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from langneurons.testing import SHARED8_TEXT

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LANGNEURONS_SHARED_DATA", REPO.parent / "shared" / "data"))

TEXT = SHARED8_TEXT   # FLORES-200 devtest + NTREX-128 text of en fr es de zh ru ar hi


def missing_data() -> list[Path]:
    need = [SHARED / f for fs in TEXT.values() for f in fs] + [SHARED / "muse"]
    return [p for p in need if not p.exists()]


def run(out: Path, steps: int = 1500, top_rate: float = 0.05, quiet: bool = True) -> dict:
    """Run (or resume) the pipeline in ``out``; return the summary that ``main`` prints."""
    from langneurons.demo import run_demo
    languages = {c: ",".join(str(SHARED / f) for f in fs) for c, fs in TEXT.items()}
    run_demo(out, steps=steps, quiet=quiet, languages=languages, top_rate=top_rate, muse=SHARED / "muse")
    return summarise(out)


def summarise(out: Path) -> dict:
    ppl = json.loads((out / "ppl" / "ppl.json").read_text(encoding="utf-8"))
    steer = json.loads((out / "steer" / "steer.json").read_text(encoding="utf-8"))
    langs = ppl["columns"]
    rows = {r: ppl["delta_nll"][i] for i, r in enumerate(ppl["rows"])}
    ops = steer["operators"]
    return {
        "languages": langs,
        "sizes": {c: len(v) for c, v in json.loads((out / "neurons" / "lape.json").read_text())["neurons"].items()},
        "baseline_ppl": dict(zip(langs, ppl["ppl"][0])),
        "delta_nll": {c: rows[c] for c in langs},
        "dominance": ppl["diagonal_dominance"],
        "vs_random": ppl["vs_random"],
        "lss_mean": {op: r.get("lss_mean") for op, r in ops.items()},
        "lss_by_target": {op: r.get("lss_by_target") for op, r in ops.items()},
        "generation_share": {op: r["generation"]["share_mean"] for op, r in ops.items() if "generation" in r},
    }


def print_summary(s: dict, file=sys.stdout) -> None:
    langs = s["languages"]
    p = lambda *a: print(*a, file=file)  # noqa: E731
    p("LAPE neurons per language:", s["sizes"])
    p("baseline PPL:", {c: round(v, 1) for c, v in s["baseline_ppl"].items()})
    p("delta NLL (rows: deactivated language, columns: evaluated language)")
    p("      " + " ".join(f"{c:>7}" for c in langs))
    for c in langs:
        p(f"  {c:>4}" + " ".join(f"{v:7.3f}" for v in s["delta_nll"][c]))
    d = s["dominance"]
    p(f"row dominance {d['row_count']}/{d['languages']}, column dominance {d['column_count']}/{d['languages']}")
    p("own-language delta NLL vs matched random set:",
      {c: (v["delta_nll"], v["random_delta_nll"]) for c, v in s["vs_random"].items()})
    p("mean LSS:", {op: None if v is None else round(v, 3) for op, v in s["lss_mean"].items()})
    p("mean generation share of the target:", {op: round(v, 3) for op, v in s["generation_share"].items()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / ".cache" / "experiments" / "shared8",
                    help="output directory, reused by crosslingual_sib200.py [.cache/experiments/shared8]")
    ap.add_argument("--steps", type=int, default=1500, help="tiny-train steps [1500]")
    ap.add_argument("--top-rate", type=float, default=0.05, help="LAPE top rate [0.05]")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    gone = missing_data()
    if gone:
        print(f"shared8_ppl_steer: needs {gone[0]} (the shared data beside the repository; "
              "set LANGNEURONS_SHARED_DATA)", file=sys.stderr)
        return 2
    s = run(args.out, args.steps, args.top_rate, args.quiet)
    print_summary(s)
    (args.out / "summary.json").write_text(json.dumps(s, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
