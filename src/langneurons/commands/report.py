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
    p = sub.add_parser("report", help=HELP, description=HELP, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a directory written by langneurons commands")
    p.add_argument("--out", type=Path, default=None, help="output HTML file [RUN_DIR/report.html]")
    p.add_argument("--title", default=None, help="page title [langneurons report: RUN_DIR name]")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..report import render_report
    print(render_report(args.run_dir, args.out, args.title))
    return 0
