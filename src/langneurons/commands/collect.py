"""``langneurons collect``: activation statistics per language."""

from __future__ import annotations

from pathlib import Path

from ..corpus import parse_lang_args
from ..stats import DEFAULT_SKETCH_BINS, SKETCH_DELTA, SKETCH_ERROR_PP, SKETCH_KINDS

HELP = "collect per-language activation statistics of a model (resumable, torchrun-aware)"

EPILOG = """\
SOURCE: a .txt file (one document per line), a .jsonl file (field 'text'), a directory of those,
a comma-separated list of those, or hf:DATASET[:CONFIG[:SPLIT]] (streamed with 'datasets').

OUT holds stats.json and one CODE.safetensors per language. Rerun the same command after an
interruption to resume from the last checkpoint. Under torchrun, ranks share the windows.

example:
  langneurons collect --model meta-llama/Llama-3.1-8B --lang en=wiki.en.txt --lang zh=wiki.zh.txt \\
      --out runs/llama-stats --window 512 --max-tokens 100000000 --batch-size 16
"""


def register(sub) -> None:
    import argparse
    p = sub.add_parser("collect", help=HELP, description=HELP, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    from .options import add_model_options, add_out, add_seed
    add_model_options(p, batch_size=8, batch_help="windows per forward pass")
    p.add_argument("--lang", action="append", required=True, metavar="CODE=SOURCE",
                   help="a language and its corpus (repeat per language)")
    add_out(p, "output directory (a rerun of the same collection resumes in it)", overwrite=False)
    p.add_argument("--site", default="act", help="pre | act (default) | product")
    p.add_argument("--unit", default="window", choices=("window", "sentence"),
                   help="window: packed token windows (default); sentence: one line = one padded sequence, "
                        "with per-sentence means of the first --sentences sentences")
    p.add_argument("--window", type=int, default=512, help="tokens per window (sentence unit: max length) [512]")
    p.add_argument("--sentences", type=int, default=100, help="sentence unit: sentences whose means are kept [100]")
    p.add_argument("--max-tokens", type=int, default=None, help="cap per language (a seeded random subset of windows)")
    add_seed(p, 0, "window selection seed")
    p.add_argument("--sketch-bins", type=int, default=DEFAULT_SKETCH_BINS,
                   help=f"quantile sketch bins per neuron, 0 = no sketch [{DEFAULT_SKETCH_BINS}]")
    p.add_argument("--sketch", default="quantile", choices=SKETCH_KINDS,
                   help="sketch bin edges: quantile (accurate, default) or uniform (faster on CPU)")
    p.add_argument("--sketch-error", type=float, default=SKETCH_ERROR_PP, metavar="PP",
                   help="the sketch sees a seeded sample of positions just large enough that every quantile "
                        f"P1..P99 of every neuron is within PP percentile points of the corpus's own with "
                        f"probability {1 - SKETCH_DELTA:g} (Hoeffding; small corpora are sketched in full; counts "
                        f"and moments always see every token) [{SKETCH_ERROR_PP}]")
    p.add_argument("--sketch-rate", type=float, default=None, metavar="R",
                   help="sketch a fixed share R in (0, 1] of the positions instead (1: every position)")
    p.add_argument("--bos", default="window", choices=("window", "none"), help="BOS at the start of every window")
    p.add_argument("--separator", default="eos", choices=("eos", "none"), help="token between documents")
    p.add_argument("--cache-dir", type=Path, default=None, help="token cache [$LANGNEURONS_CACHE or ~/.cache/langneurons]")
    p.add_argument("--no-cache", action="store_true", help="do not cache token streams")
    p.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds between checkpoints [300]")
    p.add_argument("--text-field", default="text", help="field of .jsonl and hf: records [text]")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def check_outputs(args) -> None:
    """Refuse a bad --out before any model or corpus is read (the same collection resumes in OUT;
    statistics of another model or settings there are refused once the model is loaded)."""
    from ..collect import existing_out
    from ..outputs import check_dir, lang_inputs
    check_dir(args.out, inputs=[("model directory", args.model), *lang_inputs(args.lang)], what="the statistics")
    existing_out(args.out)


def run(args) -> int:
    from ..collect import CollectConfig, collect
    from ..corpus import default_cache_dir
    check_outputs(args)
    cfg = CollectConfig(
        model=args.model, languages=parse_lang_args(args.lang), out=args.out, site=args.site, unit=args.unit,
        window=args.window, sentences=args.sentences, max_tokens=args.max_tokens, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, device_map=args.device_map, seed=args.seed,
        sketch_bins=args.sketch_bins, sketch_kind=args.sketch,
        sketch_rate=args.sketch_rate, sketch_error=args.sketch_error, bos=args.bos, separator=args.separator,
        cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
        checkpoint_every=args.checkpoint_every, arch=args.arch, text_field=args.text_field,
        trust_remote_code=args.trust_remote_code, progress=not args.quiet)
    cfg.validate()
    stats = collect(cfg)
    import sys
    for code in stats.languages:
        print(f"{code}\t{stats.meta['languages'][code]['n_tokens']} tokens", file=sys.stderr)
    print(str(args.out))
    return 0
