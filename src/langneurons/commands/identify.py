"""``langneurons identify METHOD``: select language-specific neurons from activation statistics."""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from ..errors import UserError
from ..stats import ActivationStats

HELP = "select language-specific neurons from activation statistics (lape, act-prob-percentile, ...)"

EPILOG = """\
Each method writes one neuron-set JSON file (langneurons.neuronset.v1) recording every parameter,
the derived thresholds, the language list and the fingerprint of the statistics.

--stats may be repeated to combine languages collected in separate runs of the same model at the
same site (and unit); statistics of different models, sites or units are refused.

examples:
  langneurons identify lape --stats runs/stats --out runs/lape.json --languages en,fr,zh
  langneurons identify act-prob-percentile --stats runs/stats --out runs/ap90.json --threshold own
  langneurons identify random --of runs/lape.json --seeds 0,1,2 --out runs/rand.json
"""


def register(sub) -> None:
    from .options import add_overwrite
    from ..identify import METHODS
    p = sub.add_parser("identify", help=HELP, description=HELP, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    methods = p.add_subparsers(dest="method", metavar="METHOD", parser_class=type(p))
    methods.required = True
    for name, module in METHODS.items():
        doc = (module.__doc__ or "").strip()
        mp = methods.add_parser(name, help=module.HELP, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        if getattr(module, "NEEDS_STATS", True):
            mp.add_argument("--stats", required=True, action="append", type=Path, metavar="DIR",
                            help="statistics directory written by 'langneurons collect' (repeatable)")
        mp.add_argument("--out", required=True, type=Path, metavar="FILE.json", help="output neuron-set file")
        add_overwrite(mp, "replace an existing --out file (refused without it)")
        mp.add_argument("--languages", default=None, metavar="a,b,c",
                        help="comma-separated languages to use [all in the statistics]"
                        if getattr(module, "NEEDS_STATS", True) else "languages of --of to keep [all]")
        module.add_arguments(mp)
        mp.set_defaults(func=run, method_module=module)


# ------------------------------------------------------------------------------------ statistics

class _CombinedStats(ActivationStats):
    """Languages of several statistics directories of one model and site, read where they live."""

    def __init__(self, meta: dict, owners: dict):
        super().__init__(meta, None)
        self._owners = owners

    def get(self, code: str):
        if code not in self._owners:
            return super().get(code)  # the standard unknown-language error
        return self._owners[code].get(code)


def _model_key(stats: ActivationStats) -> tuple:
    m = stats.meta["model"]
    fp = stats.meta.get("identity", {}).get("model_fingerprint")
    return (fp,) if fp else (m.get("name_or_path"), m.get("model_type"), m.get("num_layers"), m.get("width"))


def load_stats(dirs) -> ActivationStats:
    """Load one statistics directory, or combine several of one model, site and unit."""
    dirs = [Path(d) for d in dirs]
    loaded = [ActivationStats.load(d) for d in dirs]
    if len(loaded) == 1:
        return loaded[0]
    first = loaded[0]
    owners = {}
    for d, s in zip(dirs, loaded):
        if _model_key(s) != _model_key(first) or (s.num_layers, s.width) != (first.num_layers, first.width):
            raise UserError(f"statistics in {d} are of model {s.meta['model'].get('name_or_path')} "
                            f"({s.num_layers}x{s.width}), those in {dirs[0]} of "
                            f"{first.meta['model'].get('name_or_path')} ({first.num_layers}x{first.width}); "
                            f"combine only statistics of one model")
        if s.site != first.site:
            raise UserError(f"statistics in {d} are at site {s.site}, those in {dirs[0]} at site {first.site}; "
                            f"combine only statistics of one site (collect again with --site {first.site})")
        if s.meta.get("unit") != first.meta.get("unit"):
            raise UserError(f"statistics in {d} use unit {s.meta.get('unit')}, those in {dirs[0]} unit "
                            f"{first.meta.get('unit')}; collect all with the same --unit")
        for code in s.languages:
            if code in owners:
                raise UserError(f"language {code!r} is in both {owners[code].directory} and {d}; "
                                f"give each language once")
            owners[code] = s
    meta = copy.deepcopy(first.meta)
    meta["languages"] = {c: copy.deepcopy(o.meta["languages"][c]) for c, o in owners.items()}
    meta["sources"] = [str(d) for d in dirs]
    return _CombinedStats(meta, owners)


# ------------------------------------------------------------------------------------ command

def _output_files(module, args) -> list[Path]:
    """The files the command will write: ``--out``, or one per seed of ``random --seeds``."""
    out = Path(args.out)
    if getattr(args, "seeds", None) is not None and hasattr(module, "seed_path"):
        try:
            seeds = module.parse_seeds(args.seed, args.seeds)
        except UserError:
            return [out]        # reported by the method itself, with its own message
        return [module.seed_path(out, s) for s in seeds]
    return [out]


def check_outputs(module, args) -> list[Path]:
    """Refuse, before any statistics are read, an --out that is an input, lies inside a statistics
    directory, exists (without --overwrite) or cannot be written."""
    from ..outputs import check_file
    inputs = [("statistics directory", d) for d in (getattr(args, "stats", None) or [])]
    if getattr(args, "of", None) is not None:
        inputs.append(("neuron-set file", args.of))
    return [check_file(path, inputs=inputs, overwrite=args.overwrite, what="the neuron set")
            for path in _output_files(module, args)]


def run(args) -> int:
    from ..identify import parse_language_list
    from ..outputs import ensure_dir
    module = args.method_module
    check_outputs(module, args)
    languages = parse_language_list(args.languages)
    stats = None
    if getattr(module, "NEEDS_STATS", True):
        stats = load_stats(args.stats)
        languages = stats.check_languages(languages)
    out = Path(args.out)
    result = module.run(stats, languages, args)
    outputs = result if isinstance(result, dict) else {out: result}
    for path in outputs:
        ensure_dir(Path(path).parent)
    for path, ns in outputs.items():
        ns.save(path)
        sizes = ", ".join(f"{c}={ns.total(c)}" for c in ns.languages)
        print(f"{module.NAME}: {sizes} (unique {ns.unique_total()})", file=sys.stderr)
        note = ns.method["params"].get("note")
        if note:
            print(f"{module.NAME}: note: {note}", file=sys.stderr)
        print(str(path))
    return 0
