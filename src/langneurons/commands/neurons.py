"""``langneurons neurons``: inspect, compare, import and plot neuron-set files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UserError

HELP = "inspect, compare, import and plot neuron sets (show, compare, import, plot)"

EPILOG = """\
FILE may be a langneurons .json set, a published [T24] .pth mask or a published [M25] .pkl file
(read without executing code).

examples:
  langneurons neurons show runs/lape.json
  langneurons neurons compare runs/lape.json                 # Jaccard between its languages
  langneurons neurons compare runs/lape.json runs/ap90.json  # per-language Jaccard between methods
  langneurons neurons import llama-2-7b.pth --out lape-llama2.json --languages en,zh,fr,es,vi,id,ja
  langneurons neurons plot runs/lape.json --out runs/plots
"""


def register(sub) -> None:
    from .options import add_out, add_overwrite
    p = sub.add_parser("neurons", help=HELP, description=HELP, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    cmds.required = True

    s = cmds.add_parser("show", help="counts per language and per layer")
    s.add_argument("file", type=Path, metavar="FILE")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=run_show)

    c = cmds.add_parser("compare", help="Jaccard between the languages of one file, or per language between files")
    c.add_argument("files", type=Path, nargs="+", metavar="FILE")
    c.add_argument("--languages", default=None, metavar="a,b,c", help="restrict to these languages")
    c.add_argument("--json", action="store_true", help="print JSON instead of tables")
    c.set_defaults(func=run_compare)

    i = cmds.add_parser("import", help="convert a published [T24] .pth or [M25] .pkl file to a langneurons .json set")
    i.add_argument("src", type=Path, metavar="SRC")
    i.add_argument("--out", required=True, type=Path, metavar="FILE.json", help="output neuron-set file")
    add_overwrite(i, "replace an existing --out file (refused without it)")
    i.add_argument("--languages", default=None, metavar="a,b,c",
                   help="codes of the file's entries in file order ([T24] default: en,zh,fr,es,vi,id,ja)")
    i.add_argument("--model", dest="name_or_path", default=None, help="model name or path to record")
    i.add_argument("--model-type", default=None, help="HF model_type (e.g. llama)")
    i.add_argument("--num-layers", type=int, default=None, help="layer count (checked against the file)")
    i.add_argument("--width", type=int, default=None, help="MLP intermediate width (needed for unknown [T24] models)")
    i.add_argument("--site", default=None, choices=("pre", "act", "product"), help="activation site to record")
    i.set_defaults(func=run_import)

    pl = cmds.add_parser("plot", help="layer-distribution PNG and Jaccard heatmap PNG")
    pl.add_argument("file", type=Path, metavar="FILE")
    add_out(pl, "output directory of the PNGs", old=("--out-dir",))
    pl.set_defaults(func=run_plot)


# ------------------------------------------------------------------------------------ helpers

def _load(path):
    from ..importers import import_auto
    return import_auto(path)


def _table(header: list[str], rows: list[list], first_left: bool = True) -> str:
    cells = [[str(x) for x in header]] + [[str(x) for x in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, r in enumerate(cells):
        parts = [v.ljust(widths[i]) if (i == 0 and first_left) else v.rjust(widths[i]) for i, v in enumerate(r)]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _describe(ns) -> str:
    m = ns.model
    return (f"{ns.name}: method {ns.method['name']}, model {m.get('name_or_path')} ({m.get('model_type')}, "
            f"{ns.num_layers}x{ns.width}, site {ns.site})")


def show_data(ns) -> dict:
    counts = {c: v.tolist() for c, v in ns.counts().items()}
    return {"file": str(ns.path) if ns.path else None, "model": ns.model, "method": ns.method["name"],
            "languages": ns.languages, "per_layer": counts,
            "totals": {c: sum(v) for c, v in counts.items()}, "unique": ns.unique_total()}


def show_text(ns) -> str:
    """Rows = layers, columns = languages, plus total and distinct-neuron rows."""
    counts = ns.counts()
    union = ns.union_mask().sum(1).tolist() if ns.languages else [0] * ns.num_layers
    header = ["layer"] + ns.languages + ["any"]
    rows = [[layer] + [int(counts[c][layer]) for c in ns.languages] + [union[layer]]
            for layer in range(ns.num_layers)]
    rows.append(["total"] + [ns.total(c) for c in ns.languages] + [ns.unique_total()])
    return _describe(ns) + "\n" + _table(header, rows)


def _fmt(v: float) -> str:
    return f"{v:.3f}"


# ------------------------------------------------------------------------------------ actions

def run_show(args) -> int:
    ns = _load(args.file)
    if args.json:
        print(json.dumps(show_data(ns), indent=1, ensure_ascii=False))
    else:
        print(show_text(ns))
    return 0


def run_compare(args) -> int:
    from ..identify import parse_language_list
    from ..neuronset import jaccard_between, jaccard_matrix, overlap_matrix
    sets = [_load(f) for f in args.files]
    langs = parse_language_list(args.languages)
    if langs is not None:
        sets = [ns.select([c for c in langs if c in ns.languages]) if len(sets) > 1 else ns.select(langs)
                for ns in sets]
        unknown = [c for c in langs if all(c not in ns.languages for ns in sets)]
        if unknown:
            raise UserError(f"no file has language(s) {', '.join(unknown)}; check --languages")
    if len(sets) == 1:
        ns = sets[0]
        names, overlap = overlap_matrix(ns)
        _, jac = jaccard_matrix(ns)
        if args.json:
            print(json.dumps({"file": str(ns.path), "languages": names, "overlap": overlap.tolist(),
                              "jaccard": jac.tolist()}, indent=1, ensure_ascii=False))
            return 0
        print(_describe(ns))
        print("\noverlap |A_k ∩ A_k'| (diagonal: set sizes)")
        print(_table([""] + names, [[a] + overlap[i].tolist() for i, a in enumerate(names)]))
        print("\nJaccard |A_k ∩ A_k'| / |A_k ∪ A_k'|")
        print(_table([""] + names, [[a] + [_fmt(v) for v in jac[i].tolist()] for i, a in enumerate(names)]))
        return 0
    for ns in sets[1:]:
        if (ns.num_layers, ns.width) != (sets[0].num_layers, sets[0].width):
            raise UserError(f"cannot compare {ns.name} ({ns.num_layers}x{ns.width}) with {sets[0].name} "
                            f"({sets[0].num_layers}x{sets[0].width}); compare sets of one model")
    # every pair of files, per language (languages in first-seen order)
    order = []
    for ns in sets:
        order += [c for c in ns.languages if c not in order]
    pairs, columns = [], []
    for a in range(len(sets)):
        for b in range(a + 1, len(sets)):
            names, vals = jaccard_between(sets[a], sets[b])
            pairs.append({"a": str(sets[a].path), "b": str(sets[b].path),
                          "jaccard": dict(zip(names, vals.tolist()))})
            columns.append(f"J({a + 1},{b + 1})")
    if args.json:
        print(json.dumps({"files": [str(ns.path) for ns in sets],
                          "sizes": [{c: ns.total(c) for c in ns.languages} for ns in sets],
                          "pairs": pairs}, indent=1, ensure_ascii=False))
        return 0
    for n, ns in enumerate(sets, 1):
        print(f"[{n}] {_describe(ns)}")
    header = ["language"] + [f"|{n}|" for n in range(1, len(sets) + 1)] + columns
    rows = []
    for c in order:
        sizes = [ns.total(c) if c in ns.languages else "-" for ns in sets]
        jac = [_fmt(p["jaccard"][c]) if c in p["jaccard"] else "-" for p in pairs]
        rows.append([c] + sizes + jac)
    print("\nper-language set sizes and Jaccard between files")
    print(_table(header, rows))
    return 0


def run_import(args) -> int:
    from ..importers import import_auto
    model = {k: v for k, v in (("name_or_path", args.name_or_path), ("model_type", args.model_type),
                               ("num_layers", args.num_layers), ("width", args.width), ("site", args.site))
             if v is not None}
    from ..outputs import check_file, ensure_dir
    out = check_file(args.out, inputs=[("file", args.src)], overwrite=args.overwrite, what="the neuron set")
    ns = import_auto(args.src, languages=args.languages, model=model or None)
    ensure_dir(out.parent)
    ns.save(out)
    sizes = ", ".join(f"{c}={ns.total(c)}" for c in ns.languages)
    print(f"imported {ns.num_layers}x{ns.width} ({ns.method['name']}): {sizes}", file=sys.stderr)
    print(str(out))
    return 0


def run_plot(args) -> int:
    from ..neuronset import jaccard_matrix
    from ..outputs import check_dir, ensure_dir
    from ..plots import plot_heatmap, plot_layer_distribution
    from .options import need_out
    stem = Path(args.file).stem
    out_dir = check_dir(need_out(args), inputs=[("neuron-set file", args.file)],
                        writes=[f"{stem}-layers.png", f"{stem}-jaccard.png"], overwrite=args.overwrite,
                        what="the plots")
    ns = _load(args.file)
    if not ns.languages:
        raise UserError(f"{args.file} holds no languages; nothing to plot")
    ensure_dir(out_dir)
    layers = plot_layer_distribution(ns, out_dir / f"{stem}-layers.png")
    names, jac = jaccard_matrix(ns)
    heat = plot_heatmap(jac, names, names, out_dir / f"{stem}-jaccard.png",
                        title=f"Jaccard between languages ({ns.method['name']}, {stem})", fmt=".2f")
    print(str(layers))
    print(str(heat))
    return 0
