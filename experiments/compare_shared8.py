"""The localisation scoreboard (``langneurons compare``) on the shared 8-language tiny model.

Every way of localising a language, measured by one code path on the model, statistics and neuron
sets of ``shared8_ppl_steer.py`` (its ``run()`` trains or reuses them in OUT): the LAPE and
top-prob neuron sets under ``set:p_max`` (per-sentence statistics), a matched random control of
the LAPE set, DiffMean residual directions (``directions collect`` on the same training text, same
windows), a LAPE head set (``heads collect`` on the same text and windows, then ``heads identify
--method lape --top-rate 0.25``: 4 of the model's 4 x 4 = 16 attention heads, a few per language;
``heads:lape-heads`` scales t's heads by 2, ``random-heads:lape-heads`` is its matched random
control) and language arithmetic (``arith:add``, ``arith:mul``; listed as skipped when this
langneurons has none), each steering toward and deactivating all 8 languages. Metrics (target
share of generations, LSS on MUSE cloze items, fluency of the steered generations under the
unsteered model, collateral and deactivation ΔNLL on the held-out text, budget) come with 95%
bootstrap intervals; see ``langneurons compare --help``.

OUT keeps every artifact: ``compare/compare.json``, ``compare/compare.png``, ``directions/``,
``heads/`` (head statistics), ``heads-lape.json`` (the head set), and
those of ``shared8_ppl_steer.py``; a rerun skips finished steps (``compare`` itself is rerun).

Time: about 10 minutes on 2 cores for the shared8 pipeline (training), then a few minutes more.

Run:  python experiments/compare_shared8.py [--out .cache/experiments/shared8] [--steps 1500]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared8_ppl_steer import REPO, SHARED, TEXT, missing_data  # noqa: E402
from shared8_ppl_steer import run as run_shared8  # noqa: E402


def run(out: Path, steps: int = 1500, top_rate: float = 0.05, quiet: bool = True, samples: int = 4,
        items: int = 20, max_new_tokens: int = 16, head_top_rate: float = 0.25) -> dict:
    """The shared8 pipeline (reused when done), DiffMean directions and head statistics on its
    training text, a LAPE head set, then ``compare`` with every method and all 8 targets; returns
    the compare record."""
    from langneurons.cli import main
    from langneurons.errors import UserError
    out = Path(out)
    run_shared8(out, steps, top_rate, quiet)
    langs = list(TEXT)
    model, neurons = out / "model", out / "neurons"
    q = ["--quiet"] if quiet else []
    lang_args = [a for c, fs in TEXT.items() for a in ("--lang", f"{c}={','.join(str(SHARED / f) for f in fs)}")]
    dirs = out / "directions"
    if not (dirs / "directions.json").is_file() or \
            set(json.loads((dirs / "directions.json").read_text())["languages"]) != set(langs):
        # the windows of the statistics: 64 tokens, 16 384 tokens per language (langneurons.demo)
        if main(["directions", "collect", "--model", str(model), *lang_args, "--out", str(dirs), "--window", "64",
                 "--max-tokens", "16384", "--batch-size", "16", "--device", "cpu", "--cache-dir", str(out / "cache"),
                 *q]) != 0:
            raise UserError("directions collect failed; see the message above")
    heads = out / "heads"
    if not (heads / "heads.json").is_file() or \
            set(json.loads((heads / "heads.json").read_text())["languages"]) != set(langs):
        # the same text and windows as the directions (and the statistics)
        if main(["heads", "collect", "--model", str(model), *lang_args, "--out", str(heads), "--window", "64",
                 "--max-tokens", "16384", "--batch-size", "16", "--device", "cpu", "--cache-dir", str(out / "cache"),
                 *q]) != 0:
            raise UserError("heads collect failed; see the message above")
    headset = out / "heads-lape.json"
    if main(["heads", "identify", "--stats", str(heads), "--method", "lape", "--top-rate", str(head_top_rate),
             "--out", str(headset), "--overwrite"]) != 0:
        raise UserError("heads identify failed; see the message above")
    held = [a for c in langs for a in ("--held-out", f"{c}={model / 'heldout' / (c + '.txt')}")]
    argv = ["compare", "--model", str(model), "--device", "cpu", "--languages", ",".join(langs), *held,
            "--neurons", f"lape={neurons / 'lape.json'}", "--neurons", f"top-prob={neurons / 'top_prob.json'}",
            "--stats", str(out / "stats"), "--sentence-stats", str(out / "stats-sentence"),
            "--directions", str(dirs), "--heads", f"lape-heads={headset}", "--muse", str(SHARED / "muse"),
            "--items", str(items),
            "--samples", str(samples), "--max-new-tokens", str(max_new_tokens), "--window", "64",
            "--random-seeds", "0,1,2", "--out", str(out / "compare"), "--overwrite", *q]
    if main(argv) != 0:
        raise UserError("compare failed; see the message above")
    return json.loads((out / "compare" / "compare.json").read_text(encoding="utf-8"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / ".cache" / "experiments" / "shared8",
                    help="output directory, shared with shared8_ppl_steer.py [.cache/experiments/shared8]")
    ap.add_argument("--steps", type=int, default=1500, help="tiny-train steps [1500]")
    ap.add_argument("--top-rate", type=float, default=0.05, help="LAPE top rate [0.05]")
    ap.add_argument("--samples", type=int, default=4, help="sampled generations per neutral prompt [4]")
    ap.add_argument("--items", type=int, default=20, help="MUSE cloze items [20]")
    ap.add_argument("--head-top-rate", type=float, default=0.25, dest="head_top_rate",
                    help="LAPE top rate of the head set: the fraction of all heads kept [0.25]")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    gone = missing_data()
    if gone:
        print(f"compare_shared8: needs {gone[0]} (the shared data beside the repository; "
              "set LANGNEURONS_SHARED_DATA)", file=sys.stderr)
        return 2
    record = run(args.out, args.steps, args.top_rate, args.quiet, args.samples, args.items,
                 head_top_rate=args.head_top_rate)                                          # prints the table
    print(f"{len(record['methods'])} methods x {len(record['targets'])} targets; skipped: "
          f"{', '.join(record['skipped']) or 'none'}; {args.out / 'compare' / 'compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
