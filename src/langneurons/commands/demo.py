"""``langneurons demo``: the whole pipeline offline on the embedded corpus."""

from __future__ import annotations

from pathlib import Path

HELP = "run the whole pipeline offline on the embedded 10-language corpus and write OUT/report.html"


def register(sub) -> None:
    p = sub.add_parser("demo", help=HELP, description=HELP + " (a few minutes on a 2-core CPU; "
                       "rerunning resumes: finished steps are skipped).")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory [demo-out]")
    p.add_argument("--steps", type=int, default=400, help="tiny-train steps [400]")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens per language for statistics [16384]")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import run_demo
    print(run_demo(args.out, steps=args.steps, max_tokens=args.max_tokens, quiet=args.quiet))
    return 0
