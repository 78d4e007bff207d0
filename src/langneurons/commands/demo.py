"""``langneurons demo``: the whole pipeline offline on the embedded corpus."""

from __future__ import annotations

from pathlib import Path

HELP = "run the whole pipeline offline on the embedded 10-language corpus and write OUT/report.html"

EPILOG = """
Steps: tiny-train, collect, identify (lape, act-prob-percentile, top-prob, random), neurons plot,
ppl, collect --unit sentence, steer, report; each is the command of that name, and its output in
OUT is reused when the demo is run again.

examples:
  langneurons demo                                   # embedded corpus, about 4 minutes on 2 cores (3 of them training)
  langneurons demo --out runs/mine --lang en=en.txt --lang fr=fr.txt --lang zh=zh.txt --steps 1500 \\
      --top-rate 0.05 --muse data/muse              # your text; adds cloze steering scores (LSS)
"""


def register(sub) -> None:
    import argparse
    from ..demo import DEMO_TOP_RATE
    p = sub.add_parser("demo", help=HELP, description=HELP + " (a few minutes on a 2-core CPU; "
                       "rerunning resumes: finished steps are skipped).", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory [demo-out]")
    p.add_argument("--steps", type=int, default=400, help="tiny-train steps [400]")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens per language for statistics [16384]")
    p.add_argument("--lang", action="append", default=None, metavar="CODE=SOURCE",
                   help="a language and its text instead of the embedded corpus (repeatable, at least 2)")
    p.add_argument("--top-rate", type=float, default=DEMO_TOP_RATE,
                   help=f"LAPE rate (top-prob gets it divided among the languages) [{DEMO_TOP_RATE}: the tiny "
                        "model has only 4 x 384 neurons]")
    p.add_argument("--muse", type=Path, default=None, metavar="DIR",
                   help="MUSE dictionaries (en-xx.txt): add cloze steering scores (LSS)")
    p.add_argument("--samples", type=int, default=4, help="sampled generations per neutral prompt [4]")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..corpus import parse_lang_args
    from ..demo import run_demo
    from ..errors import UserError
    from ..outputs import check_dir, lang_inputs
    check_dir(args.out, inputs=[*lang_inputs(args.lang), ("MUSE directory", args.muse)], what="the demo")
    languages = None
    if args.lang:
        sources = parse_lang_args(args.lang)
        if len(sources) < 2:
            raise UserError("the demo needs at least two languages; give --lang CODE=SOURCE twice or more")
        languages = {s.code: s.spec for s in sources}
    if args.muse is not None and not args.muse.is_dir():
        raise UserError(f"--muse {args.muse} is not a directory; give the folder of en-xx.txt dictionaries")
    print(run_demo(args.out, steps=args.steps, max_tokens=args.max_tokens, quiet=args.quiet, languages=languages,
                   top_rate=args.top_rate, muse=args.muse, samples=args.samples))
    return 0
