"""``langneurons directions``: residual-stream language directions (DiffMean): collect, show."""

from __future__ import annotations

import argparse
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
    from ..unitsums import add_collect_command
    add_collect_command(cmds, "per-language residual means", EPILOG, run_collect)

    sh = cmds.add_parser("show", help="norms of the DiffMean directions per layer, cosines between languages",
                         description="norms of the DiffMean directions per layer, cosines between languages")
    sh.add_argument("dir", type=Path, metavar="DIR", help="directory written by 'directions collect'")
    sh.add_argument("--languages", default=None, metavar="a,b,c",
                    help="the language set K of DiffMean (its others' mean) [every language in DIR]")
    sh.add_argument("--layer", type=int, default=None, help="layer of the cosine table [the middle layer, L // 2]")
    sh.set_defaults(func=run_show)


def run_collect(args) -> int:
    from ..directions import KIND
    from ..unitsums import run_collect as run
    return run(args, KIND)


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
