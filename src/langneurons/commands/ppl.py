"""``langneurons ppl``: the deactivation perplexity matrix."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "perplexity matrix: deactivate each language's neurons, evaluate every language (+ baseline, random controls)"

EPILOG = """\
Rows: the baseline, one row per language of the neuron set (its neurons written by --operator,
zero by default) and, per --random-seeds seed, a matched random control of every language (same
count per layer, drawn outside every language set). Columns: the --lang languages, evaluated on
the same held-out windows for every row (tokenised once, seeded subset with --max-tokens).
PPL = exp(mean NLL over predicted tokens).

OUT gets ppl.json (ppl, mean_nll, delta_ppl, delta_nll, diagonal dominance, per-seed controls,
settings) and ppl.png (delta NLL heatmap). Every finished column is checkpointed in OUT/.partial:
after an interruption, rerun the same command and only the missing columns are computed.

Deactivation-value sweep: which replacement value truly deactivates a neuron? (Mondal et al. 2025,
open question 2: writing 0 is not "off" for neurons whose typical activation is far from 0, and a
low percentile such as P10 hurts too.) Give --operator a comma-separated list, e.g.
--operator zero,set:p1,set:p5,set:p10,set:p25,set:p50 (statistic operators need --stats). Every
operator's rows are stacked into the same pass over the windows (rows OP|code; the baseline once;
random controls per operator), so the sweep costs one pass with more rows, not one run per
operator. ppl.json keeps the first operator's record at the top level (as a one-operator run) and
adds "sweep": per operator, on the languages that are both rows and columns, own-language damage
(mean diagonal delta NLL), other-language damage (mean off-diagonal delta NLL), selectivity
(own - other) and the row-dominance count, each with a 95% paired window-bootstrap interval, plus
every operator's matrices (sweep.per_operator). A value that deactivates the language should give
high own damage and low other damage; one that merely breaks the model raises both.
ppl_sweep.png plots own and other damage per operator; ppl.png then stacks every operator's rows.

example:
  langneurons ppl --model runs/model --neurons runs/lape.json --lang en=heldout/en.txt \\
      --lang zh=heldout/zh.txt --out runs/ppl --window 512 --max-tokens 100000 --random-seeds 0,1,2
  langneurons ppl --model runs/model --neurons runs/lape.json --stats runs/stats \\
      --lang en=heldout/en.txt --lang zh=heldout/zh.txt --out runs/ppl-sweep --random-seeds 0 \\
      --operator zero,set:p1,set:p5,set:p10,set:p25,set:p50
"""


def _seeds(text: str) -> list[int]:
    from ..errors import UserError
    if text.strip().lower() in ("", "none"):
        return []
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--random-seeds {text!r} must be comma-separated integers, e.g. 0,1,2 (or none)") from None


def register(sub) -> None:
    p = sub.add_parser("ppl", help=HELP, description=HELP, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    from .options import add_model_options, add_operator, add_out, add_seed
    add_model_options(p, batch_size=8)
    p.add_argument("--neurons", required=True, type=Path, help="neuron-set JSON file")
    p.add_argument("--stats", type=Path, default=None,
                   help="statistics directory (needed by statistic operators such as set:mean)")
    p.add_argument("--lang", action="append", required=True, metavar="CODE=SOURCE",
                   help="an evaluated language and its held-out text (repeat per language)")
    add_out(p, "output directory")
    add_operator(p, "zero", "operator written into the row's neurons [zero]; a comma-separated list "
                            "(zero,set:p10,set:p50) runs a deactivation-value sweep in one pass (see below)")
    p.add_argument("--site", default="act", help="site written: pre | act (default) | product")
    p.add_argument("--rows", default=None, help="comma-separated languages of the neuron set to use as rows [all]")
    p.add_argument("--random-seeds", default="0,1,2", help="seeds of matched random-control rows, or none [0,1,2]")
    p.add_argument("--window", type=int, default=512, help="tokens per evaluation window [512]")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per language (seeded subset of windows)")
    add_seed(p, 0, "window selection seed")
    p.add_argument("--cache-dir", type=Path, default=None, help="token cache [$LANGNEURONS_CACHE or ~/.cache/langneurons]")
    p.add_argument("--no-cache", action="store_true", help="do not cache token streams")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _is_sweep(text) -> bool:
    """Whether --operator names several operators (a sweep also writes ppl_sweep.png)."""
    return isinstance(text, str) and len([o for o in text.split(",") if o.strip()]) > 1


def check_outputs(args) -> str:
    """Refuse a bad --out before any model or corpus is read; return the command's key."""
    from ..outputs import check_dir, command_key, lang_inputs
    key = command_key(args)
    check_dir(args.out, inputs=[("model directory", args.model), ("neuron-set file", args.neurons),
                                ("statistics directory", args.stats), *lang_inputs(args.lang)],
              writes=["ppl.json", "ppl.png"] + (["ppl_sweep.png"] if _is_sweep(args.operator) else []), key=key,
              overwrite=args.overwrite, what="the perplexity matrix")
    return key


def run(args) -> int:
    from ..corpus import default_cache_dir, parse_lang_args
    from ..ppl import PPLConfig, print_summary, run_ppl
    key = check_outputs(args)
    rows = [c.strip() for c in args.rows.split(",") if c.strip()] if args.rows else None
    cfg = PPLConfig(model=args.model, neurons=args.neurons, languages=parse_lang_args(args.lang), out=args.out,
                    stats=args.stats, operator=args.operator, site=args.site, rows=rows,
                    random_seeds=_seeds(args.random_seeds), window=args.window, max_tokens=args.max_tokens,
                    batch_size=args.batch_size, device=args.device, dtype=args.dtype, arch=args.arch,
                    device_map=args.device_map, trust_remote_code=args.trust_remote_code, seed=args.seed,
                    cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
                    progress=not args.quiet, command_key=key)
    record = run_ppl(cfg)
    from ..runtime import dist_info
    if dist_info()[0] != 0:
        return 0
    print_summary(record)
    print(str(args.out / "ppl.json"))
    return 0
