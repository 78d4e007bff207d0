"""``langneurons steer``: generate under an intervention, or score steering (LSS, generation share)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "steer generation toward a language with its neurons; score steering (LSS, generation share, sweep)"

EPILOG = """\
Two modes.

1. Print generations (no --out): --target CODE, --operator OP, and --prompt TEXT (repeatable) or
   --prompts FILE (one prompt per line). --baseline also prints the unsteered continuation.

2. Score steering (--out DIR): with parallel cloze data (--cloze FILE.jsonl, --mlama DIR or
   --muse DIR) the Language Steering Shift LSS(s->t) = mean_i [D1 - D0 > 0] with
   D = ll(o_t | q_s) - ll(o_s | q_s) (D1 under t's neurons written by the operator); with
   --generation the share of sampled generations from neutral prompts that an offline language
   identifier (langid) assigns to the target. --sweep tries several operators and picks the best
   per target. Writes DIR/steer.json and DIR/steer.png (+ steer_operators.png for several operators).
   Every headline number x comes with x_ci95 = [lo, hi], a 95% bootstrap interval (2000 resamples
   seeded with --seed): cloze items are resampled for LSS; generation runs (prompt x sample) are
   resampled jointly with their unsteered twins, so the steered-minus-unsteered delta is paired.

Cloze JSONL (one item per line):
  {"id": "1", "lang": {"en": {"prompt": "Einstein was born in", "object": "Ulm"},
                       "zh": {"prompt": "爱因斯坦出生于", "object": "乌尔姆", "sep": ""}}}
mLAMA layout: ROOT/<lang>/templates.jsonl ({"relation", "template"} with [X] and [Y]) and
ROOT/<lang>/<relation>.jsonl ({"sub_label", "obj_label", "uuid"}).
MUSE: a directory with en-xx.txt dictionaries ("english_word other_word" per line).

Operators: zero, set:STAT[*A], set:CONST, scale:A, add:STAT[*A], set:batch-max, add:batch-max,
set:batch-p10 (STAT: mean, std, pXX, p_max, p_median; p_max/p_median need sentence statistics).
These write the target's neurons.

Language arithmetic (Gurgurov et al. 2025) deactivates a source language's neurons and activates
the target's in the same pass (neurons of both: the target value), strength A >= 0 (default 1):
  arith:add[*A]  source a <- a - A*mean_s (needs --stats), target a <- a + A*mean_t
  arith:mul[*A]  source a <- max(0, 1-A)*a,                target a <- (1+A)*a
The source is the prompt's language where known: LSS cell (s, t) uses s. Neutral prompts
(--generation) and print mode use every other language (of --languages, else of the neuron set)
unless print mode names --source CODE[,CODE]. They mix with the other operators in a list.

examples:
  langneurons steer --model M --neurons lape.json --stats stats-sent --target zh --operator set:p_max \\
      --prompt "The weather today" --max-new-tokens 30
  langneurons steer --model M --neurons lape.json --stats stats-sent --muse data/muse --languages en,fr,zh \\
      --sweep --generation --out runs/steer
  langneurons steer --model M --neurons lape.json --stats stats --target fr --source en \\
      --operator arith:add --prompt "The weather today"
  langneurons steer --model M --neurons lape.json --stats stats --cloze facts.jsonl --languages en,fr,zh \\
      --operator set:p_max,arith:add,arith:mul*0.5 --out runs/arith
"""


def register(sub) -> None:
    p = sub.add_parser("steer", help=HELP, description=HELP, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    from .options import add_languages, add_model_options, add_operator, add_overwrite, add_seed
    add_model_options(p, batch_size=16)
    p.add_argument("--neurons", required=True, type=Path, help="neuron-set JSON file")
    p.add_argument("--stats", type=Path, default=None, help="statistics directory (statistic operators)")
    add_operator(p, "set:p_max", "operator (or arith:add[*A], arith:mul[*A]: language arithmetic), or a "
                 "comma-separated list in scoring mode [set:p_max]")
    p.add_argument("--site", default="act", help="site written: pre | act (default) | product")
    p.add_argument("--positions", default="all", help="all (default) | prompt | generated | last")
    p.add_argument("--batch-scope", default="batch", choices=("batch", "sequence"),
                   help="pooling of batch-* operators: the whole batch ([R25], default) or each sequence")
    g = p.add_argument_group("print mode")
    g.add_argument("--target", action="append", default=None, help="language to steer toward (repeatable)")
    # SUPPRESS: absent unless given, so the command key of runs without it is unchanged
    g.add_argument("--source", default=argparse.SUPPRESS, metavar="CODE[,CODE]",
                   help="language(s) of the prompts, deactivated by arith:* operators [every other language]")
    g.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    g.add_argument("--prompts", type=Path, default=None, help="file with one prompt per line")
    g.add_argument("--baseline", action="store_true", help="also print the unsteered continuation")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    s = p.add_argument_group("scoring mode")
    s.add_argument("--out", type=Path, default=None, help="output directory (turns scoring mode on)")
    add_overwrite(s)
    add_languages(s, "languages (sources and targets) [all of the neuron set]")
    s.add_argument("--cloze", type=Path, default=None, help="parallel cloze JSONL file")
    s.add_argument("--mlama", type=Path, default=None, help="mLAMA-layout directory")
    s.add_argument("--mlama-mode", default="prefix", choices=("prefix", "remove"),
                   help="prompt = template cut before [Y] (default) or with ' [Y]' removed")
    s.add_argument("--muse", type=Path, default=None, help="directory of MUSE en-xx.txt dictionaries")
    s.add_argument("--items", type=int, default=100, help="cloze items (MUSE builder / mLAMA cap) [100]")
    s.add_argument("--sweep", action="store_true", help="also try the default operator sweep; best per target")
    s.add_argument("--generation", action="store_true", help="generation-based score (needs langid)")
    s.add_argument("--neutral-prompts", type=Path, default=None, help="file of neutral prompts, one per line")
    s.add_argument("--samples", type=int, default=8, help="sampled generations per neutral prompt [8]")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate [32]")
    add_seed(p, 0, "seed of sampling and of the MUSE builder")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=run)


def _lines(path: Path) -> list[str]:
    from ..errors import UserError
    if not path.is_file():
        raise UserError(f"{path} does not exist; give a text file with one prompt per line")
    return [ln.rstrip("\n") for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def run(args) -> int:
    from ..errors import UserError
    from ..neuronset import NeuronSet
    from ..runtime import ModelOptions
    from ..stats import ActivationStats

    key = check_outputs(args) if args.out is not None else None
    if args.max_new_tokens < 1 or args.batch_size < 1 or args.samples < 1 or args.items < 1:
        raise UserError("--max-new-tokens, --batch-size, --samples and --items must be at least 1")
    ModelOptions.from_args(args).check()
    ns = NeuronSet.load(args.neurons)
    stats = ActivationStats.load(args.stats) if args.stats is not None else None
    operators = [o.strip() for o in args.operator.split(",") if o.strip()]
    if args.out is None:
        return _print_mode(args, ns, stats, operators)

    from .. import steer as S
    if getattr(args, "source", None) is not None:
        raise UserError("--source is for print mode; in scoring mode language arithmetic takes the source from the "
                        "cloze prompt's language (LSS) or uses every other language (--generation)")
    sources = [x for x in (args.cloze, args.mlama, args.muse) if x is not None]
    if len(sources) > 1:
        raise UserError("give at most one of --cloze, --mlama and --muse")
    if not sources and not args.generation:
        raise UserError("scoring mode needs cloze data (--cloze, --mlama or --muse) and/or --generation")
    if args.languages:
        langs = [c.strip() for c in args.languages.split(",") if c.strip()]
    else:
        langs = ns.languages
    unknown = [c for c in langs if c not in ns.neurons]
    if unknown:
        raise UserError(f"unknown language(s) {', '.join(unknown)}: the neuron set {args.neurons} has "
                        f"{', '.join(ns.languages)}")
    if len(langs) < 2:
        raise UserError("steering scores need at least two languages (--languages a,b,...)")
    items = None
    data = {}
    if args.cloze is not None:
        items = S.load_cloze_jsonl(args.cloze, langs)
        data = {"kind": "cloze", "path": str(args.cloze)}
    elif args.mlama is not None:
        items = S.load_mlama(args.mlama, langs, mode=args.mlama_mode, max_items=args.items)
        data = {"kind": "mlama", "path": str(args.mlama), "mode": args.mlama_mode}
    elif args.muse is not None:
        items = S.build_muse_cloze(args.muse, langs, n_items=args.items, seed=args.seed)
        data = {"kind": "muse", "path": str(args.muse), "context_words": 3, "seed": args.seed}
    if items is not None:
        data["items"] = len(items)
        have = {c for it in items for c in it.prompts}
        missing = [c for c in langs if c not in have]
        if missing:
            raise UserError(f"the cloze data has no item in {', '.join(missing)}; drop them from --languages")
    if args.generation:
        from ..langid import LanguageIdentifier
        LanguageIdentifier(langs)  # fails early on a missing package or an unknown language
    ops = list(dict.fromkeys(operators + (list(S.DEFAULT_SWEEP) if args.sweep else [])))
    ivs, skipped = S.build_interventions(ns, stats, langs, ops, site=args.site, positions=args.positions,
                                         batch_scope=args.batch_scope, strict=not args.sweep)
    if not ivs:
        raise UserError(f"no operator is usable with these statistics ({'; '.join(skipped.values())})")
    prompts = _lines(args.neutral_prompts) if args.neutral_prompts else list(S.DEFAULT_NEUTRAL_PROMPTS)

    session = _session(args, ns)
    ev = S.evaluate_steering(session, ivs, langs, items=items, generation=args.generation,
                             neutral_prompts=prompts, samples=args.samples, max_new_tokens=args.max_new_tokens,
                             seed=args.seed, progress=not args.quiet)
    settings = {"model": args.model, "neurons": str(args.neurons), "stats": str(args.stats) if args.stats else None,
                "site": args.site, "positions": args.positions, "batch_scope": args.batch_scope,
                "operators": list(ivs), "data": data, "samples": args.samples,
                "max_new_tokens": args.max_new_tokens, "seed": args.seed, "batch_size": args.batch_size,
                "neutral_prompts": prompts if args.generation else None}
    record = S.steer_record(ev, langs, settings, skipped)
    if not session.is_main:
        return 0
    from ..atomic import atomic_write_text
    from ..outputs import KEY_FIELD, ensure_dir
    record[KEY_FIELD] = key
    ensure_dir(args.out)
    atomic_write_text(args.out / "steer.json", json.dumps(record, indent=1, ensure_ascii=False))
    S.plot_steer(record, args.out)
    _print_summary(record)
    print(str(args.out / "steer.json"))
    return 0


def check_outputs(args) -> str:
    """Scoring mode: refuse a bad --out before any model or data is read; return the command's key."""
    from ..outputs import check_dir, command_key
    key = command_key(args)
    check_dir(args.out, inputs=[("model directory", args.model), ("neuron-set file", args.neurons),
                                ("statistics directory", args.stats), ("cloze file", args.cloze),
                                ("mLAMA directory", args.mlama), ("MUSE directory", args.muse),
                                ("prompt file", args.neutral_prompts), ("prompt file", args.prompts)],
              writes=["steer.json", "steer.png", "steer_operators.png"], key=key, overwrite=args.overwrite,
              what="the steering scores")
    return key


def _ci_cell(ci) -> str:
    """``0.25-0.37`` (``-`` when missing): a compact interval for the summary table."""
    if not ci or any(v is None for v in ci):
        return "-"
    return f"{ci[0]:.2f}-{ci[1]:.2f}"


def _print_summary(record: dict) -> None:
    """Per operator: per-target LSS (or target share without cloze data) and the mean, each with its
    95% bootstrap interval on the row below; then the generation shares against the unsteered runs
    and the best operator per target, with intervals."""
    from ..steer import format_ci
    langs = record["languages"]
    w = 11
    print("operator".ljust(18) + "".join(t.rjust(w) for t in langs) + "mean".rjust(w))
    gen_lines = []
    for op, r in record["operators"].items():
        g = r.get("generation")
        if "lss_by_target" in r:
            vals, cis = r["lss_by_target"], r.get("lss_by_target_ci95") or {}
            mean, mean_ci = r["lss_mean"], r.get("lss_mean_ci95")
            tag = "LSS"
        else:
            vals, cis = g["share"], g.get("share_ci95") or {}
            mean, mean_ci = g["share_mean"], g.get("share_mean_ci95")
            tag = "share"
        cells = "".join(("-" if vals.get(t) is None else f"{vals[t]:.2f}").rjust(w) for t in langs)
        print(f"{op} ({tag})"[:18].ljust(18) + cells + ("-" if mean is None else f"{mean:.3f}").rjust(w))
        print("  95% CI".ljust(18) + "".join(_ci_cell(cis.get(t)).rjust(w) for t in langs)
              + _ci_cell(mean_ci).rjust(w))
        if g:
            ratio = g.get("ratio")
            extra = ([f"ratio {ratio:.2f}"] if ratio is not None else []) + (["separated"] if g.get("separated") else [])
            gen_lines.append(
                f"  {op}: {g['share_mean']:.2f} {format_ci(g.get('share_mean_ci95'))} vs unsteered "
                f"{g['baseline_share_mean']:.2f} {format_ci(g.get('baseline_share_mean_ci95'))}, paired delta "
                f"{g['delta_mean']:+.2f} {format_ci(g.get('delta_mean_ci95'))}"
                + (f" ({', '.join(extra)})" if extra else "") + f", n={g.get('n')} per target")
    if gen_lines:
        print("generation, mean target share (95% CI):")
        print("\n".join(gen_lines))
    for key, name in (("best", "best per target"), ("best_generation", "best per target (generation share)")):
        best = record.get(key)
        if best:
            print(f"{name}: " + ", ".join(f"{t}={b['operator']} {b['value']:.2f} {format_ci(b.get('value_ci95'))}".rstrip()
                                          for t, b in best.items() if b))


def _session(args, ns):
    """The model of ``args`` in a runtime session (``--arch`` read back from the neuron set or
    statistics when not given), checked against the neuron set."""
    from ..runtime import ModelOptions, open_session
    session = open_session(ModelOptions.from_args(args), arch_from=(args.neurons, args.stats),
                           batch_size=args.batch_size)
    ns.validate_for(session.adapter.num_layers, session.adapter.width)
    return session


def _print_mode(args, ns, stats, operators) -> int:
    from ..errors import UserError
    from ..intervene import ArithmeticIntervention, Intervention, is_arith
    from ..steer import generate_texts
    if not args.target:
        raise UserError("print mode needs --target CODE (or give --out DIR to score steering)")
    if len(operators) != 1:
        raise UserError("print mode takes one --operator")
    prompts = list(args.prompt or []) + (_lines(args.prompts) if args.prompts else [])
    if not prompts:
        raise UserError("give --prompt TEXT (repeatable) or --prompts FILE")
    targets = [c.strip() for t in args.target for c in t.split(",") if c.strip()]
    op = operators[0]
    given = getattr(args, "source", None)
    sources = [c.strip() for c in given.split(",") if c.strip()] if given is not None else None
    if is_arith(op):
        pool = ([c.strip() for c in args.languages.split(",") if c.strip()] if args.languages else ns.languages)
        ivs = {t: ArithmeticIntervention(ns, t, sources if sources is not None else [c for c in pool if c != t], op,
                                         stats=stats, site=args.site, positions=args.positions) for t in targets}
    else:
        if sources is not None:
            raise UserError(f"--source names the prompts' language for language arithmetic (arith:add, arith:mul); "
                            f"operator {op!r} writes the target's neurons only: drop --source")
        ivs = {t: Intervention(neurons=ns, languages=[t], operator=op, stats=stats, site=args.site,
                               positions=args.positions, batch_scope=args.batch_scope) for t in targets}
    session = _session(args, ns)
    kw = dict(max_new_tokens=args.max_new_tokens, sample=args.sample, seed=args.seed)
    base = generate_texts(session, prompts, **kw) if args.baseline else None
    for t, iv in ivs.items():
        outs = generate_texts(session, prompts, intervention=iv, **kw)
        if not session.is_main:
            continue
        print(f"=== target {t}: {iv.describe()} ===")
        for i, (p, o) in enumerate(zip(prompts, outs)):
            print(f"[{i + 1}] {p}")
            if base is not None:
                print(f"  baseline: {base[i]}")
            print(f"  steered:  {o}")
    sys.stdout.flush()
    return 0
