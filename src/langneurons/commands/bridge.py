"""``langneurons bridge``: BridgeX-ICL, bridge languages chosen from neuron overlap (probe, select, bli, mrc, spectrum)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

from ..artifacts import BLI_FORMAT, BLI_SUMMARY_FORMAT, MRC_FORMAT, PROBE_SUMMARY_FORMAT, SELECTION_FORMAT
from ..errors import UserError

HELP = "BridgeX-ICL: probe data, bridge-language selection by HSIC, chained BLI/MRC, linguistic spectrum"

EPILOG = """\
Pipeline (METHODS.md section 6):
  probe     word-translation prompts {Src}:"{word}"→{Trg}: from a MUSE dictionary; keeps the words
            the model translates correctly (--filter) and saves their mean activations [L, I, N]
  select    ranks candidate bridges per pair by the HSIC between the probe activations of the
            source-target overlap neurons and of each candidate's language neurons
  bli       word translation with and without each bridge: {S}:"{w}"→{B}:"{w_B}"→{T}:
  mrc       multiple-choice reading comprehension with the passage translated into each bridge
  spectrum  language-by-language overlap, cosine, Jaccard and HSIC matrices with heatmaps

example:
  langneurons bridge probe --model M --pair de-zh --muse-dir data/muse --out runs/bridge
  langneurons bridge select --stats runs/stats --probes runs/bridge --pair de-zh --out runs/bridge
  langneurons bridge bli --model M --pair de-zh --muse-dir data/muse --ranking runs/bridge --out runs/bridge
  langneurons bridge spectrum --stats runs/stats --probes runs/bridge --out runs/bridge
"""

PROBE_EPILOG = """\
Dictionaries: --muse-dir holds MUSE files en-xx.txt (full) and en-xx.0-5000.txt / en-xx.5000-6500.txt
(splits), directly or under full/ and splits_reconstructed/. A pair x-en is read reversed, a pair
x-y without English is triangulated through English (x and y words translating the same English
word). --dict FILE gives one 'source target' file instead (one --pair only).

--filter correct keeps only the words the model translates correctly (exact match of the quoted
answer with any reference, quotes/whitespace stripped, case-insensitive). Small models translate
almost nothing: --filter all keeps every word (translations still recorded), --filter none keeps
every word without generating. The filter used is recorded in every output.

Outputs in --out: probes-SRC-TRG.safetensors (acts [L, I, N], mean activation over the prompt
tokens, special tokens excluded unless --include-special) and probes-SRC-TRG.json (settings and
the probe list), probe_summary.json.
"""

SELECT_EPILOG = """\
Language neurons T_k: the top --top-rate of all L*I neurons by activation probability in --stats
(top-prob, [X25]), or the sets of --neurons FILE. X = overlap neurons (--overlap intersection:
T_s & T_t, or union), Y = bridge neurons (--bridge-exclude none: T_b, or pair: T_b minus T_s|T_t).
Per layer: layer_score(HSIC(X_l, Y_l)); the candidate's score is the mean over the non-empty
layers of the window (true layer ids); NaN (ranked last) when every layer is empty.

Outputs in --out: ranking-SRC-TRG.json and .png, language_neurons.json (T_k as a neuron set),
overlap_neurons.json (X per pair as a neuron set, keys SRC-TRG), selection.json (bridge per pair).
"""

MRC_EPILOG = """\
--data: JSONL, one item per line, either Belebele's fields (flores_passage, question,
mc_answer1..mc_answer4, correct_answer_num 1-4) or {"passage", "question", "options": [4 strings],
"answer": "A"-"D" or 1-4}. For each bridge B the passage is translated first with
{S}:"{passage}"→{B}: (greedy, up to --max-new-tokens, first line), then the question prompt
(passage, question, options A-D, 'Answer:') is scored by next-token argmax over A-D.
"""


# ---------------------------------------------------------------------------------------- argument groups
def _add_model(p) -> None:
    from .options import add_model_options
    add_model_options(p, batch_size=16, batch_help="prompts per forward pass / generate call")
    p.add_argument("--token-healing", action="store_true",
                   help="take back each prompt's last token and make the first generated token start with its "
                        "text (prompts end in '{T}:', which BPE vocabularies often merge with the quote that "
                        "follows; off by default, as the paper)")


def _add_names(p) -> None:
    p.add_argument("--name-style", default="endonym", choices=("endonym", "english"),
                   help="how prompts name languages: endonym (Deutsch, 中文; default, as BridgeX-ICL) or english")
    p.add_argument("--names", default=None, metavar="CODE=NAME,...",
                   help="override names, e.g. de=German,zh=Chinese")


def _add_dictionary(p, split_default: str, limit_default: Optional[int]) -> None:
    p.add_argument("--pair", action="append", required=True, metavar="SRC-TRG",
                   help="source and target language codes, e.g. de-zh (repeatable)")
    p.add_argument("--muse-dir", type=Path, default=None, help="directory of MUSE en-xx dictionaries")
    p.add_argument("--dict", type=Path, default=None, metavar="FILE",
                   help="a 'source target' dictionary file for a single --pair (instead of --muse-dir)")
    p.add_argument("--split", default=split_default, choices=("full", "train", "test"),
                   help=f"MUSE dictionary: full, train (0-5000) or test (5000-6500) [{split_default}]")
    p.add_argument("--limit", type=int, default=limit_default,
                   help=f"unique source words per pair [{limit_default if limit_default else 'all'}]")
    p.add_argument("--shuffle", action="store_true", help="take a seeded random sample of words (default: file order)")
    p.add_argument("--seed", type=int, default=0, help="seed of --shuffle [0]")
    p.add_argument("--skip-identical", action="store_true",
                   help="drop words whose translations include the word itself (numbers, names)")


def register(sub) -> None:
    from .options import add_overwrite
    p = sub.add_parser("bridge", help=HELP, description=HELP, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    cmds.required = True
    fmt = argparse.RawDescriptionHelpFormatter

    pr = cmds.add_parser("probe", help="build probe data: correctly translated dictionary words and their activations",
                         description="Build BridgeX-ICL probe data for each --pair.", epilog=PROBE_EPILOG,
                         formatter_class=fmt)
    _add_model(pr)
    _add_dictionary(pr, "train", 200)
    _add_names(pr)
    pr.add_argument("--out", required=True, type=Path, help="output directory")
    add_overwrite(pr)
    pr.add_argument("--filter", default="correct", choices=("correct", "all", "none"),
                    help="which words become probes: correct (default), all (record correctness), none (no generation)")
    pr.add_argument("--max-probes", type=int, default=None, help="keep at most this many probes per pair [all]")
    pr.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens per translation (stops at newline) [8]")
    pr.add_argument("--site", default="act", help="activation site recorded: pre | act (default) | product")
    pr.add_argument("--include-special", action="store_true", help="average special tokens (BOS) too")
    pr.add_argument("--stats", type=Path, default=None, metavar="DIR",
                    help="activation statistics of the same model (optional): its recorded --arch is used")
    pr.set_defaults(func=run_probe)

    se = cmds.add_parser("select", help="rank candidate bridge languages per pair by HSIC (JSON + bar chart)",
                         description="Rank candidate bridge languages for each --pair.", epilog=SELECT_EPILOG,
                         formatter_class=fmt)
    _add_neuron_source(se)
    se.add_argument("--probes", required=True, type=Path, metavar="DIR", help="directory written by 'bridge probe'")
    se.add_argument("--pair", action="append", required=True, metavar="SRC-TRG", help="pair to rank (repeatable)")
    se.add_argument("--candidates", default="en,de,fr,it,pt,es",
                    help="candidate bridges; those without language neurons are dropped [en,de,fr,it,pt,es]")
    _add_hsic(se)
    se.add_argument("--overlap", default="intersection", choices=("intersection", "union"),
                    help="X neurons: T_s & T_t (intersection, default) or T_s | T_t (union)")
    se.add_argument("--bridge-exclude", default="none", choices=("none", "pair"),
                    help="Y neurons: T_b (none, default) or T_b minus (T_s | T_t) (pair)")
    se.add_argument("--out", required=True, type=Path, help="output directory")
    add_overwrite(se)
    se.set_defaults(func=run_select)

    bl = cmds.add_parser("bli", help="word translation accuracy without and with each bridge (chained prompts)",
                         description="Bilingual lexicon induction through bridge languages: baseline "
                                     "{S}:\"{w}\"→{T}: and chained {S}:\"{w}\"→{B}:\"{w_B}\"→{T}:, exact match "
                                     "over unique source words.", formatter_class=fmt)
    _add_model(bl)
    _add_dictionary(bl, "test", 100)
    _add_names(bl)
    bl.add_argument("--bridges", default=None, metavar="a,b",
                    help="bridges to try [the candidates of --ranking, else en,de,fr,it,pt,es]")
    bl.add_argument("--ranking", type=Path, default=None, metavar="DIR",
                    help="output directory of 'bridge select': marks the selected bridge of each pair")
    bl.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens per translation [8]")
    bl.add_argument("--out", required=True, type=Path, help="output directory")
    add_overwrite(bl)
    bl.set_defaults(func=run_bli)

    mr = cmds.add_parser("mrc", help="multiple-choice reading comprehension with the passage translated into each bridge",
                         description="Belebele-style MRC through bridge languages.", epilog=MRC_EPILOG,
                         formatter_class=fmt)
    _add_model(mr)
    _add_names(mr)
    mr.add_argument("--data", required=True, type=Path, metavar="FILE.jsonl", help="MRC items (format below)")
    mr.add_argument("--lang", required=True, help="language code of the data")
    mr.add_argument("--bridges", default="en,de,fr,it,pt,es", metavar="a,b",
                    help="bridges to try (the data's own language is skipped) [en,de,fr,it,pt,es]")
    mr.add_argument("--limit", type=int, default=None, help="first N items [all]")
    mr.add_argument("--max-new-tokens", type=int, default=256, help="greedy tokens for a passage translation [256]")
    mr.add_argument("--out", required=True, type=Path, help="output directory")
    add_overwrite(mr)
    mr.set_defaults(func=run_mrc)

    sp = cmds.add_parser("spectrum", help="language-by-language neuron similarity matrices and heatmaps",
                         description="Linguistic spectrum: overlap counts, cosine of activation probabilities on "
                                     "the overlap, Jaccard and (with --probes) HSIC layer scores between the "
                                     "languages' top-prob neurons.", formatter_class=fmt)
    _add_neuron_source(sp, stats_required=True)
    sp.add_argument("--languages", default=None, metavar="a,b,c", help="languages [all in the statistics]")
    sp.add_argument("--probes", type=Path, default=None, metavar="DIR",
                    help="probe directory: adds the HSIC matrix over all its probes (concatenated)")
    _add_hsic(sp)
    sp.add_argument("--out", required=True, type=Path, help="output directory")
    add_overwrite(sp)
    sp.set_defaults(func=run_spectrum)


def _add_neuron_source(p, stats_required: bool = False) -> None:
    p.add_argument("--stats", type=Path, default=None, required=stats_required, metavar="DIR",
                   help="statistics written by 'langneurons collect' (activation probabilities)")
    p.add_argument("--neurons", type=Path, default=None, metavar="FILE.json",
                   help="language neuron sets to use instead of top-prob sets from --stats")
    p.add_argument("--top-rate", type=float, default=0.01, help="top-prob fraction of all L*I neurons [0.01]")


def _add_hsic(p) -> None:
    p.add_argument("--hsic", default="biased", choices=("biased", "unbiased", "normalized", "paper"),
                   help="HSIC estimator: biased tr(KHLH)/(N-1)^2 (default), unbiased, normalized (CKA-like), "
                        "paper tr(K H L) as published")
    p.add_argument("--sigma", type=float, default=None, help="Gaussian bandwidth [median pairwise row distance]")
    p.add_argument("--layers", default=None, metavar="A-B,...",
                   help="explicit layer ids [window 10-21 of 32 scaled to the model depth]")
    p.add_argument("--window", default="10-21/32", metavar="A-B/REF",
                   help="layer window scaled by depth: round(A/REF*L)..round(B/REF*L) [10-21/32]")


# ---------------------------------------------------------------------------------------- helpers
def _check_out(args, inputs, writes, keyed, shared=(), what="the results") -> str:
    """Refuse a bad --out before any model or data is read; return the command's key (recorded in
    the JSON results, so the same command may run again over its own results)."""
    from ..outputs import check_dir, command_key
    key = command_key(args)
    check_dir(args.out, inputs=inputs, shared=shared, writes=writes, key=key, keyed=keyed,
              overwrite=args.overwrite, what=what)
    return key


def _dictionary_inputs(args) -> list:
    return [("model directory", args.model), ("MUSE directory", args.muse_dir), ("dictionary", args.dict)]


def _pairs(items) -> list[tuple[str, str]]:
    out = []
    for item in items:
        parts = item.split("-")
        if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
            raise UserError(f"bad --pair {item!r}; write SRC-TRG with two different codes, e.g. --pair de-zh")
        out.append((parts[0], parts[1]))
    return out


def _codes(text: Optional[str]) -> list[str]:
    return [c.strip() for c in (text or "").split(",") if c.strip()]


def _names(args, codes) -> dict[str, str]:
    from ..bridge.names import language_name, parse_name_overrides
    over = parse_name_overrides(args.names)
    return {c: language_name(c, args.name_style, over) for c in dict.fromkeys(codes)}


def _load(args, arch_from=()):
    """The runtime session of ``--model`` (``--arch`` read back from ``arch_from`` when not given)."""
    from ..runtime import ModelOptions, open_session
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    return open_session(ModelOptions.from_args(args), arch_from=arch_from, batch_size=args.batch_size)


def _dictionaries(args, pairs) -> dict:
    from ..bridge.probe import load_dictionary, select_words
    if args.dict is not None and len(pairs) != 1:
        raise UserError("--dict gives one dictionary; use it with exactly one --pair (or use --muse-dir)")
    if args.dict is None and args.muse_dir is None:
        raise UserError("no dictionary given; pass --muse-dir DIR (MUSE en-xx files) or --dict FILE")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    out = {}
    for s, t in pairs:
        entries = load_dictionary(s, t, muse_dir=args.muse_dir, split=args.split, path=args.dict)
        out[(s, t)] = select_words(entries, args.limit, args.shuffle, args.seed, args.skip_identical)
        if not out[(s, t)]:
            raise UserError(f"no {s}-{t} word pairs left in the dictionary; check --split, --skip-identical")
    return out


def _layers(args, num_layers: int) -> list[int]:
    from ..bridge.select import parse_layers, window_layers
    if args.layers:
        return parse_layers(args.layers, num_layers)
    try:
        span, ref = args.window.split("/")
        a, b = span.split("-")
        return window_layers(num_layers, int(a), int(b), int(ref))
    except ValueError:
        raise UserError(f"bad --window {args.window!r}; write A-B/REF, e.g. 10-21/32") from None


def _language_neurons(args, languages: Optional[list[str]] = None):
    """``(masks, probs or None, info)``: T_k per language from --neurons or top-prob on --stats."""
    probs, info = None, {}
    stats = None
    if args.stats is not None:
        from ..stats import ActivationStats
        stats = ActivationStats.load(args.stats)
        langs = stats.check_languages(languages) if languages else stats.languages
        probs = {c: stats.get(c).prob().double().cpu() for c in langs}
        info["stats"] = str(args.stats)
        info["model"] = stats.model_info
    if args.neurons is not None:
        from ..neuronset import NeuronSet
        ns = NeuronSet.load(args.neurons)
        if stats is not None:
            ns.validate_for(stats.num_layers, stats.width, stats.site)
        langs = [c for c in (languages or ns.languages) if c in ns.languages]
        masks = {c: ns.mask(c) for c in langs}
        if probs is not None:
            probs = {c: probs[c] for c in langs if c in probs}
        info.update(neurons=str(args.neurons), definition=f"neuron sets of {args.neurons}", model=ns.model)
    elif probs is not None:
        from ..identify.top_prob import top_prob_masks
        masks = top_prob_masks(probs, args.top_rate)
        info.update(definition=f"top-prob: top {args.top_rate} of all L*I neurons by activation probability",
                    top_rate=args.top_rate)
    else:
        raise UserError("no language neurons; pass --stats DIR (top-prob sets) or --neurons FILE")
    info["sizes"] = {c: int(m.sum()) for c, m in masks.items()}
    return masks, probs, info


def _model_block(info: dict, L: int, I: int) -> dict:
    m = dict(info.get("model") or {})
    m.setdefault("num_layers", L)
    m.setdefault("width", I)
    return m


def _write_json(path: Path, doc) -> None:
    from ..bridge.select import _json_safe
    from ..atomic import atomic_write_text
    atomic_write_text(path, json.dumps(_json_safe(doc), ensure_ascii=False, indent=1))


# ---------------------------------------------------------------------------------------- probe
def run_probe(args) -> int:
    from ..arch import check_site
    from ..bridge.icl import HFGenerator
    from ..bridge.probe import build_probes
    from ..outputs import KEY_FIELD
    pairs = _pairs(args.pair)
    names_out = [f"probes-{s}-{t}.{x}" for s, t in pairs for x in ("json", "safetensors")] + ["probe_summary.json"]
    key = _check_out(args, [*_dictionary_inputs(args), ("statistics directory", args.stats)], names_out,
                     [n for n in names_out if n.endswith(".json")], what="the probes")
    check_site(args.site)
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if args.max_probes is not None and args.max_probes < 1:
        raise UserError("--max-probes must be at least 1")
    names = _names(args, [c for p in pairs for c in p])
    dicts = _dictionaries(args, pairs)
    session = _load(args, arch_from=(args.stats,))
    gen = HFGenerator(session, args.max_new_tokens, token_healing=args.token_healing)
    summary = {"format": PROBE_SUMMARY_FORMAT,
               "model": args.model, "filter": args.filter, "split": args.split, "limit": args.limit,
               "token_healing": args.token_healing, "pairs": {}, KEY_FIELD: key}
    for (s, t), entries in dicts.items():
        ps = build_probes(session, entries, s, t, names, args.filter, gen, site=args.site,
                          include_special=args.include_special, max_probes=args.max_probes,
                          extra_meta={"model": args.model, "token_healing": args.token_healing,
                                      "dictionary": str(args.dict or args.muse_dir),
                                      "split": args.split, "limit": args.limit, "shuffle": args.shuffle,
                                      "seed": args.seed, "skip_identical": args.skip_identical,
                                      "max_new_tokens": args.max_new_tokens, KEY_FIELD: key})
        if not session.is_main:
            continue
        ft, fj = ps.save(args.out)
        m = ps.meta
        summary["pairs"][f"{s}-{t}"] = {k: m[k] for k in ("n_candidates", "n_correct", "translation_accuracy")}
        summary["pairs"][f"{s}-{t}"]["n_probes"] = ps.n
        acc = "not checked" if m["n_correct"] is None else f"{m['n_correct']}/{m['n_candidates']} correct"
        print(f"probe {s}->{t}: {acc}; kept {ps.n} probes (filter {args.filter}); acts {list(ps.acts.shape)}",
              file=sys.stderr)
        print(str(ft))
    if not session.is_main:
        return 0
    if args.filter != "correct":
        print(f"probe: note: --filter {args.filter} keeps words the model may translate wrongly; "
              "the probes are not the paper's correctly-translated set", file=sys.stderr)
    _write_json(Path(args.out) / "probe_summary.json", summary)
    return 0


# ---------------------------------------------------------------------------------------- select
def run_select(args) -> int:
    from ..bridge.overlap import NeuronDefinition, bridge_mask, overlap_mask
    from ..bridge.probe import ProbeSet
    from ..bridge.select import plot_ranking, rank_bridges, save_ranking
    from ..outputs import ensure_dir
    from ..neuronset import NeuronSet
    from ..outputs import KEY_FIELD
    pairs = _pairs(args.pair)
    keyed = [f"ranking-{s}-{t}.json" for s, t in pairs] + ["selection.json"]
    key = _check_out(args, [("statistics directory", args.stats), ("neuron-set file", args.neurons),
                            *[(f"probe file of {s}-{t}", Path(args.probes) / f"probes-{s}-{t}.{x}")
                              for s, t in pairs for x in ("json", "safetensors")]],
                     keyed + [f"ranking-{s}-{t}.png" for s, t in pairs]
                     + ["language_neurons.json", "overlap_neurons.json"], keyed, shared=[args.probes],
                     what="the bridge selection")
    definition = NeuronDefinition(args.overlap, args.bridge_exclude)
    candidates = _codes(args.candidates)
    if not candidates:
        raise UserError("--candidates is empty; give comma-separated codes, e.g. en,de,fr")
    probes = {(s, t): ProbeSet.load(args.probes, s, t) for s, t in pairs}
    masks, _, info = _language_neurons(args)
    L, I = next(iter(masks.values())).shape
    for (s, t), ps in probes.items():
        if tuple(ps.acts.shape[:2]) != (L, I):
            raise UserError(f"probes {s}-{t} have shape {list(ps.acts.shape[:2])} but the language neurons "
                            f"{[L, I]}; use probes and statistics of the same model")
        for c in (s, t):
            if c not in masks:
                raise UserError(f"language {c!r} of pair {s}-{t} has no language neurons (have "
                                f"{', '.join(masks)}); collect statistics for it")
    layers = _layers(args, L)
    available = [c for c in candidates if c in masks]
    dropped = [c for c in candidates if c not in masks]
    if dropped:
        print(f"select: candidates without language neurons skipped: {', '.join(dropped)}", file=sys.stderr)
    out = Path(args.out)
    results = {}
    for (s, t), ps in probes.items():   # everything is computed before anything is written
        res = rank_bridges(ps.acts, masks, s, t, available, layers, definition, args.hsic, args.sigma)
        res.update(n_probes=ps.n, probe_filter=ps.meta.get("filter"), candidates_unavailable=dropped,
                   neurons=info, **{KEY_FIELD: key})
        res["bridge_neurons_per_layer"] = {
            r["bridge"]: {int(l): int(bridge_mask(masks, r["bridge"], s, t, definition.bridge_exclude)[l].sum())
                          for l in layers} for r in res["ranking"]}
        results[(s, t)] = res
    ensure_dir(out)
    selection, overlaps = {}, {}
    for (s, t), res in results.items():
        ps = probes[(s, t)]
        save_ranking(res, out / f"ranking-{s}-{t}.json")
        plot_ranking(res, out / f"ranking-{s}-{t}.png")
        overlaps[f"{s}-{t}"] = overlap_mask(masks, s, t, definition.overlap)
        selection[f"{s}-{t}"] = {"selected": res["selected"],
                                 "scores": {r["bridge"]: r["score"] for r in res["ranking"]}}
        shown = ", ".join(f"{r['bridge']}={'nan' if math.isnan(r['score']) else format(r['score'], '.4g')}"
                          for r in res["ranking"])
        print(f"select {s}->{t}: bridge {res['selected']} ({shown}); {ps.n} probes "
              f"(filter {ps.meta.get('filter')}), layers {layers[0]}-{layers[-1]}", file=sys.stderr)
    model = _model_block(info, L, I)
    method = {"name": "top-prob" if args.neurons is None else "neuron-file", "params": info}
    NeuronSet.from_masks(masks, model, method).save(out / "language_neurons.json")
    NeuronSet.from_masks(overlaps, model, {"name": "bridge-overlap", "params": definition.as_dict()}
                         ).save(out / "overlap_neurons.json")
    _write_json(out / "selection.json", {"format": SELECTION_FORMAT,
                                         "definition": definition.as_dict(), "hsic": args.hsic, "layers": layers,
                                         "pairs": selection, KEY_FIELD: key})
    print(str(out / "selection.json"))
    return 0


# ---------------------------------------------------------------------------------------- bli
def _ranking_for(directory: Path, s: str, t: str) -> dict:
    f = Path(directory) / f"ranking-{s}-{t}.json"
    if not f.is_file():
        raise UserError(f"--ranking {directory} has no {f.name}; run 'langneurons bridge select --pair {s}-{t}' first")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{f} is corrupt; run 'langneurons bridge select' again") from None


def run_bli(args) -> int:
    from ..bridge.icl import HFGenerator, run_bli as bli
    from ..bridge.select import DEFAULT_CANDIDATES
    from ..outputs import KEY_FIELD
    pairs = _pairs(args.pair)
    keyed = [f"bli-{s}-{t}.json" for s, t in pairs] + ["bli_summary.json"]
    key = _check_out(args, [*_dictionary_inputs(args),
                            *[(f"ranking of {s}-{t}", Path(args.ranking) / f"ranking-{s}-{t}.json")
                              for s, t in pairs if args.ranking is not None]],
                     keyed, keyed, shared=[args.ranking], what="the BLI results")
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    plan = {}
    for s, t in pairs:
        selected = None
        if args.ranking is not None:
            rk = _ranking_for(args.ranking, s, t)
            selected = rk.get("selected")
            cands = [r["bridge"] for r in rk.get("ranking", [])]
        else:
            cands = list(DEFAULT_CANDIDATES)
        if args.bridges:
            cands = _codes(args.bridges)
        cands = [c for c in dict.fromkeys(cands) if c not in (s, t)]
        plan[(s, t)] = (cands, selected)
    names = _names(args, [c for (s, t), (cands, _) in plan.items() for c in (s, t, *cands)])
    dicts = _dictionaries(args, pairs)
    session = _load(args)
    gen = HFGenerator(session, args.max_new_tokens, token_healing=args.token_healing)
    out = Path(args.out)
    summary = {"format": BLI_SUMMARY_FORMAT,
               "model": args.model, "split": args.split, "limit": args.limit, "token_healing": args.token_healing,
               "pairs": {}, KEY_FIELD: key}
    for (s, t), entries in dicts.items():
        cands, selected = plan[(s, t)]
        res = bli(gen, entries, s, t, [None, *cands], names)
        res.update(format=BLI_FORMAT, selected=selected, names=names, model=args.model, split=args.split,
                   **{KEY_FIELD: key})
        if not session.is_main:
            continue
        _write_json(out / f"bli-{s}-{t}.json", res)
        accs = {k: v["accuracy"] for k, v in res["conditions"].items()}
        summary["pairs"][f"{s}-{t}"] = {"n_words": res["n_words"], "accuracy": accs, "selected": selected,
                                        "selected_accuracy": accs.get(selected) if selected else None}
        shown = ", ".join(f"{k}{'*' if k == selected else ''}={v:.3f}" for k, v in accs.items())
        print(f"bli {s}->{t} ({res['n_words']} words): {shown}", file=sys.stderr)
    if not session.is_main:
        return 0
    _write_json(out / "bli_summary.json", summary)
    print(str(out / "bli_summary.json"))
    return 0


# ---------------------------------------------------------------------------------------- mrc
def run_mrc(args) -> int:
    from ..bridge.icl import HFChoiceScorer, HFGenerator, load_mrc_jsonl, run_mrc as mrc
    from ..outputs import KEY_FIELD
    key = _check_out(args, [("model directory", args.model), ("data file", args.data)], [f"mrc-{args.lang}.json"],
                     [f"mrc-{args.lang}.json"], what="the MRC results")
    items = load_mrc_jsonl(args.data)
    if args.limit is not None:
        if args.limit < 1:
            raise UserError("--limit must be at least 1")
        items = items[: args.limit]
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    bridges = [c for c in dict.fromkeys(_codes(args.bridges)) if c != args.lang]
    names = _names(args, [args.lang, *bridges])
    session = _load(args)
    translate = HFGenerator(session, args.max_new_tokens, token_healing=args.token_healing)
    choose = HFChoiceScorer(session)
    res = mrc(items, choose, args.lang, [None, *bridges], names, translate)
    res.update(format=MRC_FORMAT, model=args.model, data=str(args.data), names=names, token_healing=args.token_healing,
               **{KEY_FIELD: key})
    if not session.is_main:
        return 0
    out = Path(args.out)
    _write_json(out / f"mrc-{args.lang}.json", res)
    accs = {k: v["accuracy"] for k, v in res["conditions"].items()}
    print(f"mrc {args.lang} ({res['n_items']} items): " + ", ".join(f"{k}={v:.3f}" for k, v in accs.items()),
          file=sys.stderr)
    print(str(out / f"mrc-{args.lang}.json"))
    return 0


# ---------------------------------------------------------------------------------------- spectrum
def run_spectrum(args) -> int:
    import torch
    from ..bridge.probe import PROBE_FORMAT, ProbeSet
    from ..bridge.spectrum import compute_spectrum, save_spectrum
    from ..identify import parse_language_list
    from ..outputs import KEY_FIELD
    probe_inputs = []
    if args.probes is not None and Path(args.probes).is_dir():
        probe_inputs = [("probe file", f) for f in sorted(Path(args.probes).glob("probes-*-*.*"))]
    key = _check_out(args, [("statistics directory", args.stats), ("neuron-set file", args.neurons), *probe_inputs],
                     ["spectrum.json"] + [f"spectrum_{k}.png" for k in ("overlap", "cosine", "jaccard", "hsic")],
                     ["spectrum.json"], shared=[args.probes], what="the spectrum")
    languages = parse_language_list(args.languages)
    masks, probs, info = _language_neurons(args, languages)
    if probs is None or set(probs) != set(masks):
        raise UserError("spectrum needs activation probabilities of every language; pass --stats with all of them")
    L, I = next(iter(masks.values())).shape
    acts, layers, probe_files = None, None, []
    if args.probes is not None:
        files = sorted(Path(args.probes).glob("probes-*-*.json"))
        parts = []
        for f in files:
            try:
                doc = json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UserError(f"{f} is corrupt; run 'langneurons bridge probe' again or remove it") from None
            if not isinstance(doc, dict) or doc.get("format") != PROBE_FORMAT:
                continue
            ps = ProbeSet.load(args.probes, doc["src"], doc["trg"])
            if tuple(ps.acts.shape[:2]) != (L, I):
                raise UserError(f"probes in {f.name} have shape {list(ps.acts.shape[:2])}, the statistics "
                                f"{[L, I]}; use probes of the same model")
            parts.append(ps.acts)
            probe_files.append(f.name)
        if not parts:
            raise UserError(f"--probes {args.probes} holds no probe files; run 'langneurons bridge probe' first")
        acts = torch.cat(parts, dim=2)
        layers = _layers(args, L)
    res = compute_spectrum(probs, masks, acts, layers, args.hsic, args.sigma)
    res.update(neurons=info, probe_files=probe_files, n_probes=int(acts.shape[2]) if acts is not None else 0,
               **{KEY_FIELD: key})
    paths = save_spectrum(res, args.out)
    langs = res["languages"]
    print("spectrum overlap |T_k ∩ T_k'|:", file=sys.stderr)
    for c, row in zip(langs, res["overlap"].tolist()):
        print(f"  {c:>4} " + " ".join(f"{v:5d}" for v in row), file=sys.stderr)
    for p in paths:
        print(str(p))
    return 0
