"""``langneurons tiny-train``: a tiny multilingual model for tests, demos and experiments."""

from __future__ import annotations

from pathlib import Path

HELP = "train a tiny Llama and byte-level BPE tokenizer on given languages (CPU, minutes)"


def register(sub) -> None:
    from .options import add_overwrite
    from ..tiny import TinyConfig
    d = TinyConfig()
    p = sub.add_parser("tiny-train", help=HELP, description=HELP + ". Writes a HuggingFace model directory "
                       "that AutoModelForCausalLM and AutoTokenizer load offline; the last 5%% of each language's "
                       "lines are held out and written to OUT/heldout/CODE.txt. Training ends with a held-out "
                       "evaluation, printed and kept in OUT/langneurons_train.json: perplexity per language on "
                       "the held-out lines (windows of 64 tokens, as ppl --window 64) and the share of sampled "
                       "continuations of held-out line prefixes that the offline language identifier assigns "
                       "to the prefix's language, each with a 95%% bootstrap interval.")
    p.add_argument("--lang", action="append", required=True, metavar="CODE=SOURCE",
                   help="a language and its text (as in collect; repeat per language)")
    p.add_argument("--out", required=True, type=Path, help="model directory to write")
    add_overwrite(p, "retrain over an existing tiny-train model in --out (refused without it)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimiser steps [{d.steps}]")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed [{d.seed}]")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help=f"BPE vocabulary [{d.vocab_size}]")
    p.add_argument("--hidden-size", type=int, default=d.hidden_size, help=f"[{d.hidden_size}]")
    p.add_argument("--intermediate-size", type=int, default=d.intermediate_size, help=f"MLP width [{d.intermediate_size}]")
    p.add_argument("--layers", type=int, default=d.num_layers, help=f"decoder layers [{d.num_layers}]")
    p.add_argument("--context", type=int, default=d.context, help=f"training window [{d.context}]")
    p.add_argument("--batch-per-language", type=int, default=d.batch_per_language,
                   help=f"windows per language per step [{d.batch_per_language}]")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate [{d.lr}]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..corpus import parse_lang_args
    from ..outputs import check_dir, lang_inputs
    from ..tiny import TinyConfig, train_tiny
    check_dir(args.out, inputs=lang_inputs(args.lang), writes=["langneurons_train.json"], overwrite=args.overwrite,
              what="the model")
    cfg = TinyConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                     intermediate_size=args.intermediate_size, num_layers=args.layers, context=args.context,
                     steps=args.steps, batch_per_language=args.batch_per_language, lr=args.lr, seed=args.seed,
                     threads=args.threads)
    rec = train_tiny(parse_lang_args(args.lang), args.out, cfg, progress=not args.quiet)
    import sys
    print(f"tiny-train: loss {rec['loss_first']:.3f} -> {rec['loss_last_50']:.3f} in {rec['train_seconds']} s",
          file=sys.stderr)
    from ..tiny import heldout_lines
    for line in heldout_lines(rec.get("heldout") or {}):
        print(f"tiny-train: {line}", file=sys.stderr)
    print(str(args.out))
    return 0
