"""``langneurons heads``: attention heads as language units: collect, show, identify, ablate."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

from ..errors import UserError

HELP = "attention heads as language units: per-language head statistics, head selection, head ablation"

EPILOG = """\
collect   per language, layer and head: the sum of ||c_h|| (c_h = W_O[:, h*d:(h+1)*d] z_h, the head's
          contribution through the attention output projection), of ||c_h||^2, a log2 histogram of ||c_h||
          and the token count, over packed windows (packed as 'collect' packs them); resumable,
          torchrun-aware. OUT gets heads.safetensors (norm.CODE [L, n] = mean ||c_h||, the exact sums)
          and heads.json.
show      the mean contribution norm of every head per language, its entropy over the languages and the
          language where it is strongest; or the heads of a head set (heads.json from 'identify').
identify  --method lape: p_h(k) = x_h(k) / sum_k' x_h(k'), keep the top-rate lowest-entropy heads, assign
          each to the languages with p_h(k) > bar / K. --method top: per language the top-rate heads by
          x_h(k) / mean_k' x_h(k'). x = mean ||c_h|| (--statistic norm, default) or P(||c_h|| >= tau_h)
          (--statistic prob, tau_h = the pooled median's bin edge). Writes a head set (langneurons.headset.v1).
ablate    perplexity of every language's windows with the heads of each language of a head set zeroed
          (or scaled), next to the untouched model.

Apply a head set from Python with langneurons.heads.HeadIntervention inside Session.intervened([...]),
alone or with neuron and direction interventions.

example:
  langneurons heads collect --model Qwen/Qwen2.5-0.5B --lang en=wiki.en.txt --lang zh=wiki.zh.txt \\
      --out runs/heads --window 512 --max-tokens 1000000
  langneurons heads show runs/heads
  langneurons heads identify --stats runs/heads --method lape --top-rate 0.05 --out runs/heads-lape.json
  langneurons heads ablate --model Qwen/Qwen2.5-0.5B --heads runs/heads-lape.json \\
      --lang en=heldout.en.txt --lang zh=heldout.zh.txt
"""


def register(sub) -> None:
    p = sub.add_parser("heads", help=HELP, description=HELP, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    cmds.required = True
    from ..unitsums import add_collect_command, add_corpus_options
    from .options import add_model_options, add_out

    def attn_out_option(q) -> None:
        q.add_argument("--attn-out", default=None, metavar="PATH",
                       help="the attention output projection, relative to one decoder layer (e.g. self_attn.o_proj) "
                            "[the adapter table, else auto-detected]")

    add_collect_command(cmds, "per-language head statistics", EPILOG, run_collect, attn_out_option)

    sh = cmds.add_parser("show", help="mean contribution norm per head and language, or the heads of a head set",
                         description="mean contribution norm per head and language, or the heads of a head set")
    sh.add_argument("path", type=Path, metavar="PATH",
                    help="directory written by 'heads collect', or a head set written by 'heads identify'")
    sh.add_argument("--languages", default=None, metavar="a,b,c", help="languages to show [all]")
    sh.add_argument("--layer", type=int, default=None, help="show this layer only [all]")
    sh.set_defaults(func=run_show)

    idf = cmds.add_parser("identify", help="select language heads (lape | top) into a head set",
                          description="select language heads (lape | top) into a head set", epilog=EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    idf.add_argument("--stats", type=Path, required=True, metavar="DIR", help="directory written by 'heads collect'")
    idf.add_argument("--method", default="lape", metavar="NAME", help="lape or top [lape]")
    idf.add_argument("--top-rate", type=float, default=0.05,
                     help="fraction of all L*n heads kept (lape: in total; top: per language), at least one [0.05]")
    idf.add_argument("--statistic", default="norm", metavar="NAME",
                     help="norm (mean ||c_h||) or prob (P(||c_h|| >= tau_h)) [norm]")
    idf.add_argument("--bar", type=float, default=1.0,
                     help="lape: a kept head belongs to the languages with p_h(k) > bar / K [1]")
    idf.add_argument("--languages", default=None, metavar="a,b,c", help="the language set [every language in --stats]")
    add_out(idf, "the head-set file to write (JSON)", metavar="FILE")
    idf.set_defaults(func=run_identify)

    ab = cmds.add_parser("ablate", help="perplexity per language with each language's heads zeroed (or scaled)",
                         description="perplexity per language with each language's heads zeroed (or scaled)",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(ab, batch_size=8, batch_help="windows per forward pass")
    ab.add_argument("--heads", type=Path, required=True, metavar="FILE", help="head set written by 'heads identify'")
    add_corpus_options(ab, "cap per language [4096]")
    attn_out_option(ab)
    ab.add_argument("--rows", default=None, metavar="a,b,c", help="head-set languages to ablate [every language]")
    ab.add_argument("--operator", default="zero", metavar="OP", help="zero or scale:A [zero]")
    ab.set_defaults(func=run_ablate, max_tokens=4096)


def _split(text):
    from .options import split_languages
    return split_languages(text)


def run_collect(args) -> int:
    from ..heads import KIND
    from ..unitsums import run_collect as run
    return run(args, KIND, attn_out=args.attn_out)


def _fmt(v: float, width: int) -> str:
    return ("-" if v != v else f"{v:.3g}").rjust(width)


def _show_headset(path: Path, args) -> int:
    from ..heads import HeadSet
    hs = HeadSet.load(path)
    langs = _split(args.languages) or hs.languages
    for c in langs:
        hs.check_language(c)
    m = hs.model
    print(f"head set {path}: method {hs.method.get('name')}, model {m.get('name_or_path')} "
          f"({hs.num_layers} layers x {hs.num_heads} heads)")
    for c in langs:
        rows = hs.heads[c].tolist()
        if args.layer is not None:
            rows = [r for r in rows if r[0] == args.layer]
        print(f"{c}\t{len(rows)} heads\t" + " ".join(f"{l}.{h}" for l, h in rows))
    return 0


def run_show(args) -> int:
    from .. import artifacts as A
    path = args.path
    if path.suffix == ".json" and path.name != "heads.json":
        if not path.is_file():
            raise UserError(f"{path} does not exist; give a head set written by 'langneurons heads identify' or a "
                            "directory written by 'langneurons heads collect'")
        kind = A.kind_of(path)
        if kind == "headset":
            return _show_headset(path, args)
        if kind != "heads":
            raise UserError(f"{path} is {'a ' + kind + ' file' if kind else 'not a langneurons file'}, not a head "
                            "set or head statistics; give a file written by 'langneurons heads identify'")
    from ..heads import HeadStats
    st = HeadStats.load(path)
    langs = st._langs(_split(args.languages))
    L, n = st.num_layers, st.num_heads
    if args.layer is not None and not 0 <= args.layer < L:
        raise UserError(f"--layer {args.layer} is outside 0..{L - 1}")
    m = st.meta.get("model") or {}
    att = (m.get("attention") or {}).get("attn_out")
    print(f"heads {path}: {m.get('name_or_path')} ({L} layers x {n} heads of dim {st.head_dim}), "
          f"window {st.meta.get('window')}, attention output projection {att}")
    print("tokens: " + ", ".join(f"{c} {st.count(c)}" for c in langs))
    x = st.table("norm", langs)                                      # [L, n, K]
    K = len(langs)
    print("mean ||c_h|| per language; H = entropy of p_h(k) = m_h(k) / sum_k' m_h(k')"
          + (f" (uniform: ln {K} = {math.log(K):.3g})" if K > 1 else "") + "; top = the strongest language")
    w = max(9, *(len(c) + 2 for c in langs))
    print("layer".ljust(6) + "head".ljust(6) + "".join(c.rjust(w) for c in langs) + "H".rjust(w) + "top".rjust(w))
    from ..heads import _entropy
    H = _entropy(x)
    layers = range(L) if args.layer is None else [args.layer]
    for l in layers:
        for h in range(n):
            top = langs[int(x[l, h].argmax())]
            print(str(l).ljust(6) + str(h).ljust(6) + "".join(_fmt(float(x[l, h, k]), w) for k in range(K))
                  + _fmt(float(H[l, h]), w) + top.rjust(w))
    return 0


def run_identify(args) -> int:
    from ..heads import METHODS, STATISTICS, HeadStats, identify_heads
    from ..outputs import check_file
    from .options import need_out
    if args.method not in METHODS:                     # checked before anything is read
        raise UserError(f"unknown method {args.method!r}; use one of {', '.join(METHODS)}")
    if args.statistic not in STATISTICS:
        raise UserError(f"unknown statistic {args.statistic!r}; use one of {', '.join(STATISTICS)}")
    out = need_out(args)
    check_file(out, inputs=[("statistics", args.stats)], overwrite=args.overwrite)
    hs = identify_heads(HeadStats.load(args.stats), args.method, args.top_rate, _split(args.languages),
                        args.statistic, args.bar)
    hs.save(out)
    for c in hs.languages:
        print(f"{c}\t{hs.total(c)} heads", file=sys.stderr)
    print(str(out))
    return 0


def run_ablate(args) -> int:
    import torch
    from ..corpus import Packing, cut_windows, default_cache_dir, load_stream, parse_lang_args, select_windows
    from ..heads import HeadIntervention, HeadSet, head_operator
    from ..runtime import ModelOptions, open_session
    from ..collect import check_run_options
    head_operator(args.operator)                                   # everything is checked before the model loads
    check_run_options(args.window, args.batch_size, args.max_tokens, args.dtype)
    hs = HeadSet.load(args.heads)
    rows = _split(args.rows) or hs.languages
    for c in rows:
        hs.check_language(c)
    sources = parse_lang_args(args.lang)
    session = open_session(ModelOptions(args.model, args.arch, args.dtype, args.device, args.device_map,
                                        args.trust_remote_code), batch_size=args.batch_size)
    att = session.adapter.attention(args.attn_out)
    hs.validate_for(session.adapter.num_layers, att.num_heads, att.head_dim)
    packing = Packing(args.window, args.bos, args.separator).resolve(session.tokenizer)
    cache = None if args.no_cache else (args.cache_dir or default_cache_dir())
    windows = {}
    for src in sources:
        stream, _ = load_stream(src, session.tokenizer, packing, cache, args.text_field,
                                stream_cap=(args.max_tokens * 4 if args.max_tokens else None))
        w = cut_windows(stream, packing, session.tokenizer.bos_token_id, src.code)
        windows[src.code] = torch.as_tensor(w[select_windows(len(w), args.window, args.max_tokens, args.seed)]
                                            .astype("int64"))

    def mean_nll(W: torch.Tensor) -> float:
        B = session.batch_size
        batches = [list(range(s, min(s + B, W.shape[0]))) for s in range(0, W.shape[0], B)]

        def run(k: int, idx: list[int]) -> dict:
            nll, cnt = session.token_nll(W[idx])
            return {k: (float(nll.sum()), int(cnt.sum()))}
        res = session.map_batches(batches, run)
        total = sum(v[0] for v in res.values())
        count = sum(v[1] for v in res.values())
        return total / max(count, 1)

    table = {}
    for row in [None, *rows]:
        ctx = (session.intervened(HeadIntervention(hs, row, args.operator)) if row is not None
               else contextlib.nullcontext())
        with ctx:
            table[row] = {c: math.exp(mean_nll(W)) for c, W in windows.items()}
    if not session.is_main:
        return 0
    cols = list(windows)
    w = max(10, *(len(c) + 2 for c in cols))
    print(f"perplexity ({args.operator} on the heads of the row language; {args.heads})")
    print("row".ljust(12) + "heads".rjust(7) + "".join(c.rjust(w) for c in cols))
    for row, vals in table.items():
        label = "baseline" if row is None else row
        count = "-" if row is None else str(hs.total(row))
        print(label.ljust(12) + count.rjust(7) + "".join(f"{vals[c]:.2f}".rjust(w) for c in cols))
    return 0
