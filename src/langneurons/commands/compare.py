"""``langneurons compare``: one scoreboard of every way of localising a language (neuron sets, random
controls, DiffMean directions, language arithmetic, attention-head sets), measured by one code path."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = ("scoreboard: steer, deactivate and budget every localisation method (neurons, random, diffmean, arith, "
        "heads)")


def _epilog() -> str:
    from ..compare import METRICS
    metrics = "\n".join(f"  {k}\n      {v}" for k, v in METRICS.items())
    return f"""\
Methods (--methods, comma-separated; default: every method the inputs allow). Each gives, per target
t, a steering intervention, a deactivation intervention and a budget:
  NAME:OP        t's neurons of the set --neurons NAME=FILE written by operator OP (default operator:
                 set:p_max with --sentence-stats, set:max with --stats, else scale:4; --operator to
                 change); deactivation: zero on t's neurons; budget: |N(t)| neurons
  random:NAME    the same on a matched random control of NAME (same neurons per layer, drawn outside
                 every language set; one per --random-seeds seed, metrics averaged over seeds)
  diffmean       h_L <- h_L + alpha * rbar_L * v_L(t) / |v_L(t)| (--directions DIR from 'directions
                 collect'); deactivation: directional ablation h_L <- h_L - (h_L . u) u, u = v_L(t)/|v_L(t)|;
                 budget: 1 direction, H numbers. L = --direction-layer, default
                 argmax_l mean_t |v_l(t)| / rbar_l on the artifact; alpha = --alpha [0.5], in units of
                 the layer's mean residual norm rbar_L
  arith:add[*A], arith:mul[*A]
                 language arithmetic on the first neuron set (NAME:arith:... for another): the other
                 targets' neurons down, t's up; skipped with the reason when this langneurons has no
                 language arithmetic; deactivation and budget as NAME:OP (budget: neurons written)
  heads:NAME     t's attention heads of the head set --heads NAME=FILE ('heads identify') scaled:
                 z_h <- A z_h, so c_h <- A c_h (A = --head-scale [2]): amplifying the target's heads is
                 the head analogue of activating its neurons (a head has no "on" value to set);
                 deactivation: zero on t's heads (z_h <- 0, removes c_h); budget: |Heads(t)| heads
                 (units) and |Heads(t)| x head_dim x H parameters (the columns of W_O, the attention
                 output projection, the heads' outputs pass through)
  random-heads:NAME
                 the same on a matched random control of the head set (per language and layer as many
                 heads as NAME has, drawn among the heads of no language of NAME; one per
                 --random-seeds seed); it also gives heads:NAME its deact_own_vs_random (null, with
                 the reason in details, when a layer has too few free heads for a control)

Metrics (per method x target; summary: mean over targets). Every number x comes with x_ci95, a 95%
percentile bootstrap interval (2000 resamples seeded with --seed) over generation runs (paired with
the unsteered runs), held-out windows (paired with the baseline) or cloze items (LSS):
{metrics}
NLL_u is the mean next-token NLL per predicted token of language u's held-out windows (--held-out,
packed as 'ppl' packs them); ΔNLL = NLL(intervention) - NLL(baseline) = log(PPL ratio).

Writes OUT/compare.json ("format": "langneurons.compare.v1": methods, targets, metrics, rows of
{{method, target, METRIC, METRIC_ci95}}, summary, baseline, details, skipped, generations,
settings) and OUT/compare.png (target share vs collateral ΔNLL under steering; own vs other ΔNLL
under deactivation), and prints the table.

example:
  langneurons compare --model runs/model --languages en,zh,fr \\
      --held-out en=heldout/en.txt --held-out zh=heldout/zh.txt --held-out fr=heldout/fr.txt \\
      --neurons lape=runs/neurons/lape.json --neurons top-prob=runs/neurons/top_prob.json \\
      --stats runs/stats --sentence-stats runs/stats-sentence --directions runs/directions \\
      --heads lape-heads=runs/heads-lape.json --muse data/muse --out runs/compare
"""


def register(sub) -> None:
    p = sub.add_parser("compare", help=HELP, description=HELP, epilog=_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    from .options import add_languages, add_model_options, add_operator, add_out, add_seed
    from ..compare import DEFAULT_ALPHA, DEFAULT_HEAD_SCALE
    add_model_options(p, batch_size=16)
    add_languages(p, "target languages (at least two)", required=True)
    p.add_argument("--held-out", action="append", required=True, metavar="CODE=FILE", dest="held_out",
                   help="held-out text of a language (repeat; every target needs one, others add columns)")
    p.add_argument("--neurons", action="append", default=None, metavar="NAME=FILE",
                   help="a neuron set to compare, named (repeat: lape=neurons/lape.json, top-prob=...)")
    p.add_argument("--heads", action="append", default=None, metavar="NAME=FILE",
                   help="a head set to compare ('langneurons heads identify'), named (repeat: "
                        "lape-heads=heads/lape.json); adds heads:NAME (and random-heads:NAME for the first)")
    p.add_argument("--head-scale", default=str(DEFAULT_HEAD_SCALE), dest="head_scale", metavar="A",
                   help=f"heads:NAME steering multiplies t's head outputs by A [{DEFAULT_HEAD_SCALE:g}]")
    p.add_argument("--stats", type=Path, default=None, help="window statistics (statistic operators, arith:add)")
    p.add_argument("--sentence-stats", type=Path, default=None, dest="sentence_stats",
                   help="per-sentence statistics ('collect --unit sentence'; set:p_max, set:p_median)")
    p.add_argument("--directions", type=Path, default=None, help="output of 'langneurons directions collect'")
    p.add_argument("--direction-layer", type=int, default=None, dest="direction_layer",
                   help="layer of the DiffMean method [argmax_l mean_t |v_l(t)| / rbar_l]")
    p.add_argument("--alpha", default=str(DEFAULT_ALPHA),
                   help=f"DiffMean steering strength, x the layer's mean residual norm [{DEFAULT_ALPHA:g}]")
    p.add_argument("--methods", default=None, help="comma-separated methods [every method the inputs allow]")
    add_operator(p, None, "steering operator(s) of the NAME:OP methods, comma-separated "
                          "[set:p_max with --sentence-stats, set:max with --stats, else scale:4]")
    p.add_argument("--site", default="act", help="site the neuron methods write: pre | act (default) | product")
    p.add_argument("--random-seeds", default="0,1,2", dest="random_seeds",
                   help="seeds of the random:NAME and random-heads:NAME controls and of the own-vs-random "
                        "comparison, or none [0,1,2]")
    g = p.add_argument_group("steering data")
    g.add_argument("--cloze", type=Path, default=None, help="parallel cloze JSONL (adds the lss metric)")
    g.add_argument("--muse", type=Path, default=None, help="directory of MUSE en-xx.txt dictionaries (cloze items)")
    g.add_argument("--items", type=int, default=100, help="MUSE cloze items [100]")
    g.add_argument("--neutral-prompts", type=Path, default=None, dest="neutral_prompts",
                   help="file of neutral prompts, one per line [BOS and a few punctuation starts]")
    g.add_argument("--samples", type=int, default=8, help="sampled generations per neutral prompt [8]")
    g.add_argument("--max-new-tokens", type=int, default=32, dest="max_new_tokens", help="tokens generated [32]")
    w = p.add_argument_group("held-out windows")
    w.add_argument("--window", type=int, default=512, help="tokens per window [512]")
    w.add_argument("--max-tokens", type=int, default=None, dest="max_tokens",
                   help="tokens per held-out language (seeded subset of windows)")
    w.add_argument("--cache-dir", type=Path, default=None, help="token cache [$LANGNEURONS_CACHE or ~/.cache/langneurons]")
    w.add_argument("--no-cache", action="store_true", help="do not cache token streams")
    add_out(p, "output directory (compare.json, compare.png)")
    add_seed(p, 0, "seed of sampling, window selection and the bootstrap")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=run)


def _seeds(text: str) -> list[int]:
    from ..errors import UserError
    if text is None or text.strip().lower() in ("", "none"):
        return []
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--random-seeds {text!r} must be comma-separated integers, e.g. 0,1,2 (or none)") from None


def _prompts(path: Path) -> list[str]:
    from ..errors import UserError
    if not path.is_file():
        raise UserError(f"{path} does not exist; give a text file with one neutral prompt per line")
    return [ln.rstrip("\n") for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def check_outputs(args) -> str:
    """Refuse a bad --out before any model or data is read; return the command's key."""
    from ..outputs import check_dir, command_key, lang_inputs
    key = command_key(args)
    neurons = [(f"--neurons {s.split('=', 1)[0]}", s.split("=", 1)[1]) for s in (args.neurons or []) if "=" in s]
    neurons += [(f"--heads {s.split('=', 1)[0]}", s.split("=", 1)[1]) for s in (args.heads or []) if "=" in s]
    check_dir(args.out, inputs=[("model directory", args.model), ("statistics directory", args.stats),
                                ("statistics directory", args.sentence_stats), ("directions directory", args.directions),
                                ("cloze file", args.cloze), ("MUSE directory", args.muse),
                                ("prompt file", args.neutral_prompts), *neurons,
                                *lang_inputs(args.held_out, "held-out text", "--held-out")],
              writes=["compare.json", "compare.png"], key=key, overwrite=args.overwrite, what="the scoreboard")
    return key


def run(args) -> int:
    from ..compare import CompareConfig, parse_alpha, parse_head_scale, parse_named_files, print_table, run_compare
    from ..corpus import default_cache_dir, parse_lang_arg
    from ..errors import UserError
    from .options import split_languages
    alpha = parse_alpha(args.alpha)
    head_scale = parse_head_scale(args.head_scale)
    key = check_outputs(args)
    held = []
    for spec in args.held_out:
        try:
            held.append(parse_lang_arg(spec))
        except UserError as e:
            raise UserError(str(e).replace("--lang", "--held-out")) from None
    if len({s.code for s in held}) != len(held):
        raise UserError("a language is given twice in --held-out; give each CODE once")
    methods = split_languages(args.methods)
    ops = split_languages(args.operator)
    cfg = CompareConfig(
        model=args.model, targets=split_languages(args.languages) or [], held_out=held, out=args.out,
        neurons=parse_named_files(args.neurons or []), heads=parse_named_files(args.heads or [], "--heads"),
        head_scale=head_scale, stats=args.stats, sentence_stats=args.sentence_stats,
        directions=args.directions, direction_layer=args.direction_layer, alpha=alpha, methods=methods,
        operators=ops or None, site=args.site, random_seeds=_seeds(args.random_seeds), cloze=args.cloze,
        muse=args.muse, items=args.items, samples=args.samples, max_new_tokens=args.max_new_tokens,
        neutral_prompts=_prompts(args.neutral_prompts) if args.neutral_prompts else None, window=args.window,
        max_tokens=args.max_tokens, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        arch=args.arch, device_map=args.device_map, trust_remote_code=args.trust_remote_code, seed=args.seed,
        cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()), progress=not args.quiet,
        command_key=key)
    if methods is not None and not methods:
        raise UserError("--methods names no method; give e.g. --methods lape:set:max,random:lape,diffmean,heads:H")
    record = run_compare(cfg)
    from ..runtime import dist_info
    if dist_info()[0] != 0:
        return 0
    print_table(record)
    print(str(Path(args.out) / "compare.json"))
    return 0
