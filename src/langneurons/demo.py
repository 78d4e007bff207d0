"""The offline demo: the whole pipeline on the embedded corpus, ending in ``OUT/report.html``.

Steps (each one is the same command a user would run, called in-process):

1. ``tiny-train`` a small Llama on the embedded corpus (10 languages, 7 scripts; the last 5% of
   every language's lines are held out);
2. ``collect`` activation statistics (site ``act``) on the training text;
3. ``identify`` language neurons with LAPE, Act-Prob-percentile (pooled and own thresholds) and
   top-prob, plus a matched random control of the LAPE set;
4. ``neurons plot`` and ``compare``: layer distributions and overlaps;
5. ``ppl``: the deactivation perplexity matrix on the held-out lines, with random-control rows;
6. ``collect --unit sentence`` (per-sentence means, for ``set:p_max``) and ``steer --generation``:
   the share of sampled generations an offline language identifier assigns to each target language
   under ``zero``, ``set:batch-p10`` and ``set:p_max``;
7. ``report``: one self-contained HTML page.

Every artifact stays in OUT, so the run can be inspected or continued from the command line.
A step whose output already exists is skipped, so an interrupted demo resumes.
"""

from __future__ import annotations

import sys
import time
from importlib import resources
from pathlib import Path
from typing import Optional

from .errors import UserError

#: LAPE rate (top-prob: the same budget divided among the languages). The tiny model has
#: 4 x 384 = 1536 neurons for 10 languages: the 1% of [T24] would be 15 neurons in all.
#: Measured on the 400-step demo model (ppl with 3 random seeds, steer with 32 generations per
#: target): at 0.05 (about 8 neurons per language) deactivation
#: raised the own language's NLL most for 4/10 languages and set:p_max moved the target share from
#: 0.09 to 0.12; at 0.15, 8/10 and 0.17; at 0.25 (about 38 per language, 2.5% of the MLP each),
#: 10/10 (9 separated from random) and 0.19 [0.15, 0.24]; 0.35 adds little. Real models: use
#: ``identify lape``'s default.
DEMO_TOP_RATE = 0.25
#: matched random-control sets of the deactivation matrix (the own-vs-random comparison resamples them)
RANDOM_SEEDS = "0,1,2"
#: [R25]'s ordering to see: p_max steers more than zero and batch-p10
STEER_OPERATORS = ("zero", "set:batch-p10", "set:p_max")


def corpus_dir() -> Path:
    return Path(str(resources.files("langneurons") / "data" / "demo_corpus"))


def demo_languages() -> list[str]:
    return sorted(p.stem for p in corpus_dir().glob("*.txt"))


def _step(name: str, argv: list[str], done: Path, log) -> None:
    from .cli import main
    if done.exists():
        log(f"[demo] {name}: already done ({done.name})")
        return
    t = time.time()
    log(f"[demo] {name}: langneurons {' '.join(argv[:2])} ...")
    rc = main(argv)
    if rc != 0:
        raise UserError(f"demo step {name!r} failed (exit {rc}); see the message above")
    log(f"[demo] {name}: {time.time() - t:.0f} s")


def run_demo(out: Path, steps: int = 400, max_tokens: int = 16384, quiet: bool = False,
             languages: Optional[dict[str, str]] = None, top_rate: float = DEMO_TOP_RATE,
             muse: Optional[Path] = None, samples: int = 4) -> Path:
    """Run the pipeline into ``out`` and return the report's path.

    ``languages`` (``{code: source}``, sources as in ``--lang CODE=SOURCE``) replaces the embedded
    corpus; ``muse`` (a directory of MUSE ``en-xx.txt`` dictionaries) adds the Language Steering
    Shift on cloze items built from them to the steering step.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
    q = ["--quiet"] if quiet else []
    if languages is None:
        languages = {c: str(corpus_dir() / f"{c}.txt") for c in demo_languages()}
    langs = list(languages)
    lang_args = [a for c, src in languages.items() for a in ("--lang", f"{c}={src}")]
    model = out / "model"
    stats = out / "stats"
    neurons = out / "neurons"
    _step("train", ["tiny-train", *lang_args, "--out", str(model), "--steps", str(steps), *q],
          model / "langneurons_train.json", log)
    _step("collect", ["collect", "--model", str(model), *lang_args, "--out", str(stats), "--window", "64",
                      "--max-tokens", str(max_tokens), "--batch-size", "16", "--device", "cpu",
                      "--cache-dir", str(out / "cache"), *q], stats / "stats.json", log)
    neurons.mkdir(exist_ok=True)
    common = ["--stats", str(stats)]
    _step("identify lape", ["identify", "lape", *common, "--top-rate", str(top_rate),
                            "--out", str(neurons / "lape.json")], neurons / "lape.json", log)
    _step("identify act-prob (pooled)", ["identify", "act-prob-percentile", *common, "--threshold", "pooled",
                                         "--rate", "0.005", "--out", str(neurons / "act_prob_pooled.json")],
          neurons / "act_prob_pooled.json", log)
    _step("identify act-prob (own)", ["identify", "act-prob-percentile", *common, "--threshold", "own",
                                      "--rate", "0.005", "--out", str(neurons / "act_prob_own.json")],
          neurons / "act_prob_own.json", log)
    # top-prob's rate is per language: the LAPE budget shared among the languages, so both sets are
    # about the same size
    _step("identify top-prob", ["identify", "top-prob", *common, "--top-rate", f"{top_rate / len(langs):.6g}",
                                "--out", str(neurons / "top_prob.json")], neurons / "top_prob.json", log)
    _step("identify random", ["identify", "random", "--of", str(neurons / "lape.json"),
                              "--seed", "0", "--out", str(neurons / "random_lape.json")],
          neurons / "random_lape.json", log)
    _step("plots", ["neurons", "plot", str(neurons / "lape.json"), "--out", str(out / "plots")],
          out / "plots", log)
    held = model / "heldout"
    held_args = [a for c in langs for a in ("--lang", f"{c}={held / (c + '.txt')}")]
    _step("ppl", ["ppl", "--model", str(model), "--neurons", str(neurons / "lape.json"), "--stats", str(stats),
                  *held_args, "--out", str(out / "ppl"), "--window", "64", "--random-seeds", RANDOM_SEEDS, *q],
          out / "ppl" / "ppl.json", log)
    # set:p_max needs per-sentence means: a sentence-unit pass over the same text
    sent_stats = out / "stats-sentence"
    _step("collect sentences", ["collect", "--model", str(model), *lang_args, "--out", str(sent_stats),
                                "--unit", "sentence", "--window", "64", "--sentences", "200", "--batch-size", "32",
                                "--device", "cpu", "--cache-dir", str(out / "cache"), *q],
          sent_stats / "stats.json", log)
    _step("steer", ["steer", "--model", str(model), "--neurons", str(neurons / "lape.json"),
                    "--stats", str(sent_stats), "--languages", ",".join(langs), "--generation",
                    "--operator", ",".join(STEER_OPERATORS), "--samples", str(samples), "--max-new-tokens", "16",
                    *(["--muse", str(muse), "--items", "20"] if muse else []),
                    "--device", "cpu", "--out", str(out / "steer"), *q], out / "steer" / "steer.json", log)
    _step("report", ["report", str(out)], out / "report.html", log)
    from .report import run_results
    for line in run_results(out):
        log(f"[demo] {line}")
    log(f"[demo] done in {time.time() - t0:.0f} s: {out / 'report.html'}")
    return out / "report.html"

