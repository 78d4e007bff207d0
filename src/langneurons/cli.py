"""The ``langneurons`` command line: one subcommand per pipeline step.

Every subcommand lives in ``langneurons.commands.<name>`` and provides ``register(subparsers)``
(which sets ``func``). Bad input raises :class:`~langneurons.errors.UserError`; it is printed as
one line on stderr and the exit status is 2, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import UserError

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS = ("collect", "identify", "neurons", "ppl", "steer", "compare", "eval", "finetune", "bridge", "directions",
            "heads", "report", "tiny_train", "demo")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own convention)
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="langneurons", description=__doc__.splitlines()[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"langneurons {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"langneurons.commands.{name}").register(sub)
    return parser


def _leaf_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)subcommand parser that ``argv`` selects, e.g. the one of ``identify random``."""
    for token in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs and token in subs[0].choices:
            parser = subs[0].choices[token]
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extras = parser.parse_known_args(argv)
    if extras:   # reported by the subcommand that was given them, whose --help lists what it takes
        _leaf_parser(parser, argv).error(f"unrecognized arguments: {' '.join(extras)}")
    try:
        rc = args.func(args)
    except UserError as e:
        print(f"langneurons: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("langneurons: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
