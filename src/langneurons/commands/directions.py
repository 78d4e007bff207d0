"""``langneurons directions``: residual-stream language directions (DiffMean): collect, show."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError

HELP = "residual-stream language directions (DiffMean): collect per-language mean hidden states, show them"

EPILOG = """\
collect  per language and decoder layer, the sum and count of the residual stream each layer outputs
         (hidden_states[l + 1], before the final norm for the last layer) over the tokens of packed
         windows (packed as 'collect' packs them); resumable, torchrun-aware. OUT gets
         directions.safetensors (mean.CODE [L, H], norm.CODE [L], count.CODE, exact sums) and
         directions.json.
show     per layer and language the norm of v_l(t) = mean_l(t) - (unweighted mean over the other
         languages of mean_l(k)), and the cosines between the languages' directions at one layer.

Steer with langneurons.directions.DirectionIntervention (alpha * v_l(t), optionally scaled to the mean
residual norm of the layer) inside Session.intervened([...]), alone or with neuron interventions.

example:
  langneurons directions collect --model meta-llama/Llama-3.1-8B --lang en=wiki.en.txt --lang zh=wiki.zh.txt \\
      --out runs/llama-directions --window 512 --max-tokens 1000000
  langneurons directions show runs/llama-directions
"""


def register(sub) -> None:
    p = sub.add_parser("directions", help=HELP, description=HELP, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    cmds.required = True
    from .options import add_model_options, add_out, add_seed

    co = cmds.add_parser("collect", help="collect per-language residual means (resumable, torchrun-aware)",
                         description="collect per-language residual means", epilog=EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(co, batch_size=8, batch_help="windows per forward pass")
    co.add_argument("--lang", action="append", required=True, metavar="CODE=SOURCE",
                    help="a language and its corpus (repeat per language; sources as for 'collect')")
    add_out(co, "output directory (a rerun of the same collection resumes in it; new languages are added)",
            overwrite=False)
    co.add_argument("--window", type=int, default=512, help="tokens per window [512]")
    co.add_argument("--max-tokens", type=int, default=None, help="cap per language (a seeded random subset of windows)")
    add_seed(co, 0, "window selection seed")
    co.add_argument("--bos", default="window", choices=("window", "none"), help="BOS at the start of every window")
    co.add_argument("--separator", default="eos", choices=("eos", "none"), help="token between documents")
    co.add_argument("--cache-dir", type=Path, default=None,
                    help="token cache [$LANGNEURONS_CACHE or ~/.cache/langneurons]")
    co.add_argument("--no-cache", action="store_true", help="do not cache token streams")
    co.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds between checkpoints [300]")
    co.add_argument("--text-field", default="text", help="field of .jsonl and hf: records [text]")
    co.add_argument("--quiet", action="store_true", help="no progress bar")
    co.set_defaults(func=run_collect)

    sh = cmds.add_parser("show", help="norms of the DiffMean directions per layer, cosines between languages",
                         description="norms of the DiffMean directions per layer, cosines between languages")
    sh.add_argument("dir", type=Path, metavar="DIR", help="directory written by 'directions collect'")
    sh.add_argument("--languages", default=None, metavar="a,b,c",
                    help="the language set K of DiffMean (its others' mean) [every language in DIR]")
    sh.add_argument("--layer", type=int, default=None, help="layer of the cosine table [the middle layer, L // 2]")
    sh.set_defaults(func=run_show)


def run_collect(args) -> int:
    from ..corpus import default_cache_dir, parse_lang_args
    from ..directions import DirectionsConfig, collect_directions, existing_out
    from ..outputs import check_dir, lang_inputs
    check_dir(args.out, inputs=[("model directory", args.model), *lang_inputs(args.lang)], what="the directions")
    existing_out(args.out)
    cfg = DirectionsConfig(
        model=args.model, languages=parse_lang_args(args.lang), out=args.out, window=args.window,
        max_tokens=args.max_tokens, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        device_map=args.device_map, arch=args.arch, trust_remote_code=args.trust_remote_code, seed=args.seed,
        bos=args.bos, separator=args.separator,
        cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
        checkpoint_every=args.checkpoint_every, text_field=args.text_field, progress=not args.quiet)
    dirs = collect_directions(cfg)
    from ..runtime import dist_info
    if dist_info()[0] != 0:
        return 0
    for code in dirs.languages:
        print(f"{code}\t{dirs.count(code)} tokens", file=sys.stderr)
    print(str(Path(args.out) / "directions.json"))
    return 0


def _fmt(v: float, width: int) -> str:
    return ("-" if v != v else f"{v:.3g}").rjust(width)


def run_show(args) -> int:
    from ..directions import Directions
    dirs = Directions.load(args.dir)
    langs = dirs.languages
    if args.languages is not None:
        langs = list(dict.fromkeys(c.strip() for c in args.languages.split(",") if c.strip()))
        for c in langs:
            dirs.check_language(c)
    if len(langs) < 2:
        raise UserError(f"DiffMean needs at least two languages; {args.dir} holds {', '.join(dirs.languages)} "
                        "(and --languages picks " + ", ".join(langs) + "): collect another language")
    L = dirs.num_layers
    layer = L // 2 if args.layer is None else args.layer
    if not 0 <= layer < L:
        raise UserError(f"--layer {layer} is outside 0..{L - 1}")
    m = dirs.meta.get("model") or {}
    w = max(9, *(len(c) + 2 for c in langs))
    print(f"directions {args.dir}: {m.get('name_or_path')} ({L} layers, hidden size {dirs.hidden_size}), "
          f"window {dirs.meta.get('window')}")
    print("tokens: " + ", ".join(f"{c} {dirs.count(c)}" for c in langs))
    print("||v_l(t)||, v_l(t) = mean_l(t) - unweighted mean of the other languages' mean_l; |h| = mean residual norm")
    norms = dirs.diffmean_norms(langs)
    rbar = dirs.residual_norm()
    print("layer".ljust(6) + "".join(c.rjust(w) for c in langs) + "|h|".rjust(w))
    for l in range(L):
        print(str(l).ljust(6) + "".join(_fmt(float(norms[l, k]), w) for k in range(len(langs)))
              + _fmt(float(rbar[l]), w))
    print(f"cosine of v_{layer}(t) between languages (layer {layer}{', the middle' if args.layer is None else ''}):")
    cos = dirs.cosines(layer, langs)
    print("".ljust(6) + "".join(c.rjust(w) for c in langs))
    for i, c in enumerate(langs):
        print(c.ljust(6) + "".join(_fmt(float(cos[i, j]), w) for j in range(len(langs))))
    return 0
