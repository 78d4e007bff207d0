"""``langneurons report``: one self-contained HTML page of a run directory."""

from __future__ import annotations

from pathlib import Path

HELP = "render a run directory (every langneurons artifact in it) as one HTML page"

EPILOG = """\
Every JSON file a langneurons command writes carries "format": "langneurons.<kind>.vN"; each kind
has a section (statistics, neuron sets, PPL, steering, tasks, fine-tuning results and runs, bridge
probes, rankings, selection, spectrum, BLI, MRC, ...; see langneurons.artifacts). Untagged or unknown
JSON files are listed under "Other files"; paths are shown relative to RUN_DIR.
The page embeds its figures as base64 PNG data and its CSS inline: no scripts, no network, one file.

example:
  langneurons report runs/llama --out runs/llama/report.html
"""


def register(sub) -> None:
    import argparse
    from .options import add_overwrite
    p = sub.add_parser("report", help=HELP, description=HELP, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a directory written by langneurons commands")
    p.add_argument("--out", type=Path, default=None, help="output HTML file [RUN_DIR/report.html]")
    p.add_argument("--title", default=None, help="page title [langneurons report: RUN_DIR name]")
    add_overwrite(p, "replace an existing report (an .html file inside RUN_DIR)")
    p.set_defaults(func=run)


def check_outputs(args) -> Path:
    """Refuse a bad --out before the run directory is read. The report may live inside RUN_DIR (the
    default), but never replaces a file the report reads: inside RUN_DIR only an .html file may be
    replaced, with --overwrite."""
    from ..errors import UserError
    from ..outputs import check_file, inside
    out = Path(args.out) if args.out is not None else Path(args.run_dir) / "report.html"
    check_file(out, inputs=[("run directory", args.run_dir)], shared=[args.run_dir], overwrite=args.overwrite,
               what="the report", option="--out" if args.out is not None else "the report")
    if (out.exists() and Path(args.run_dir).is_dir() and inside(out, args.run_dir)
            and out.suffix.lower() not in (".html", ".htm")):
        raise UserError(f"--out {out} is a file of the run directory {args.run_dir} that the report reads; "
                        "write the report to a new .html file")
    return out


def run(args) -> int:
    from ..report import render_report
    out = check_outputs(args)
    print(render_report(args.run_dir, out, args.title))
    return 0
