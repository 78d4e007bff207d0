"""Matched random control.

For a neuron set ``A`` (``--of``) and a seed: per language and per layer, as many neurons as ``A``
has there, drawn uniformly without replacement among that layer's neurons that belong to *no*
language of ``A`` (:func:`langneurons.neuronset.random_control`). With ``--languages`` the control
is drawn for the whole file (every language's neurons stay excluded) and then restricted to the
chosen languages.

Several seeds (``--seeds 0,1,2``) write one file per seed: ``--out runs/rand.json`` becomes
``runs/rand-seed0.json``, ``runs/rand-seed1.json``, ... Report results over several seeds.
No statistics are needed.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..neuronset import random_control

NAME = "random"
HELP = "matched random control: same count per language and layer as --of, outside every language set"
NEEDS_STATS = False


def add_arguments(parser) -> None:
    parser.add_argument("--of", required=True, type=Path, metavar="FILE",
                        help="the neuron set to match (.json; .pth/.pkl published files also work)")
    parser.add_argument("--seed", type=int, default=None, help="random seed [0]")
    parser.add_argument("--seeds", default=None, metavar="S1,S2,...",
                        help="several seeds: one file per seed, OUT-seedS.json (instead of --seed)")


def parse_seeds(seed, seeds) -> list[int]:
    if seed is not None and seeds is not None:
        raise UserError("give either --seed or --seeds, not both")
    if seeds is None:
        out = [0 if seed is None else seed]
    else:
        try:
            out = [int(s) for s in str(seeds).split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--seeds must be comma-separated integers, got {seeds!r}; e.g. --seeds 0,1,2") from None
        if not out:
            raise UserError("--seeds is empty; e.g. --seeds 0,1,2")
        if len(set(out)) != len(out):
            raise UserError(f"--seeds lists a seed twice: {seeds}")
    bad = [s for s in out if s < 0]
    if bad:
        raise UserError(f"seeds must be non-negative integers, got {bad[0]}")
    return out


def seed_path(out: Path, seed: int) -> Path:
    """``runs/rand.json`` -> ``runs/rand-seed3.json``."""
    out = Path(out)
    suffix = out.suffix or ".json"
    return out.with_name(f"{out.stem if out.suffix else out.name}-seed{seed}{suffix}")


def run(stats, languages, args):
    """A NeuronSet for one ``--seed``; ``{path: NeuronSet}`` (one per seed) for ``--seeds``."""
    from ..importers import import_auto
    source = import_auto(args.of)
    seeds = parse_seeds(args.seed, args.seeds)
    if languages is not None:
        unknown = [c for c in languages if c not in source.languages]
        if unknown:
            raise UserError(f"unknown language(s) {', '.join(unknown)}; {args.of} has {', '.join(source.languages)}")
        if len(set(languages)) != len(languages):
            raise UserError("a language is named twice in --languages")
    sets = []
    for s in seeds:
        ns = random_control(source, s)
        if languages is not None:
            ns = ns.select(languages)
        ns.method["params"]["selected_languages"] = languages
        sets.append(ns)
    if args.seeds is None:
        return sets[0]
    return {seed_path(args.out, s): ns for s, ns in zip(seeds, sets)}
