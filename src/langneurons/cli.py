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
COMMANDS = ("collect", "identify", "neurons", "ppl", "steer", "eval", "finetune", "bridge", "report", "tiny_train",
            "demo")


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
        try:
            module = importlib.import_module(f"langneurons.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"langneurons.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
