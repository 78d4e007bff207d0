"""The shared command-line vocabulary: one spelling for one thing in every command.

``add_model_options`` (every command that loads a model), ``add_languages``, ``add_operator``,
``add_out`` (with ``--overwrite``), ``add_overwrite``, ``add_batch_size`` and ``add_seed``. Old spellings
(``--langs``, ``--neuron-langs``, ``--intervene``, ``--interventions``, ``--out-dir``) keep working for one
release and print a one-line deprecation note on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from ..errors import UserError


class _Deprecated(argparse.Action):
    """Stores like the new option and says once, on stderr, which spelling to use."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"langneurons: note: {option_string} is deprecated and will be removed in the next release; "
              f"use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _alias(p, old: str, new: str, dest: str, **kw) -> None:
    p.add_argument(old, dest=dest, action=_Deprecated, new=new, help=argparse.SUPPRESS, **kw)


def add_model_options(p, required: bool = True, batch_size: Optional[int] = None, batch_help: str = "") -> None:
    """``--model --arch --dtype --device --device-map --trust-remote-code`` (and ``--batch-size``)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, help="HF model id or local directory")
    g.add_argument("--arch", default=None, metavar="SPEC",
                   help="module paths for a layout the adapter table does not know: layers=...,gate=...,act=...,"
                        "down=...[,up=...][,layout=linear|fused_gate_up|conv1d] [read back from --stats or "
                        "--neurons when collect was given one]")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16, "
                                                   "float64")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto [auto]")
    g.add_argument("--device-map", default=None, help="HF device_map (e.g. auto) for models larger than one device")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the model repository's own code")
    if batch_size is not None:
        add_batch_size(g, batch_size, batch_help)


def add_batch_size(p, default, help_text: str = "") -> None:
    shown = "" if default is None else f" [{default}]"
    p.add_argument("--batch-size", type=int, default=default, help=(help_text or "sequences per forward pass") + shown)


def add_seed(p, default, help_text: str = "seed") -> None:
    shown = "" if default is None else f" [{default}]"
    p.add_argument("--seed", type=int, default=default, help=help_text + shown)


def add_languages(p, help_text: str, required: bool = False, old: tuple[str, ...] = ()) -> None:
    """``--languages a,b,c`` (old spellings in ``old``, e.g. ``--langs``)."""
    p.add_argument("--languages", default=None, required=required, metavar="a,b,c", help=help_text)
    for o in old:
        _alias(p, o, "--languages", "languages")


def add_operator(p, default, help_text: str, old: tuple[str, ...] = ()) -> None:
    """``--operator OP[,OP...]`` (old spellings in ``old``, e.g. ``--intervene``)."""
    p.add_argument("--operator", default=default, metavar="OP", help=help_text)
    for o in old:
        _alias(p, o, "--operator", "operator")


def add_out(p, help_text: str, required: bool = True, old: tuple[str, ...] = (), metavar: str = "DIR",
            overwrite: bool = True) -> None:
    """``--out PATH`` (old spellings in ``old``, e.g. ``--out-dir``) and, with ``overwrite``, ``--overwrite``."""
    p.add_argument("--out", type=Path, default=None, required=required and not old, metavar=metavar, help=help_text)
    for o in old:
        _alias(p, o, "--out", "out", type=Path)
    if overwrite:
        add_overwrite(p)


def add_overwrite(p, help_text: str = "replace existing results of another run in --out (refused without it)") -> None:
    """``--overwrite``: an existing result is never replaced without it (see langneurons.outputs)."""
    p.add_argument("--overwrite", action="store_true", help=help_text)


def need_out(args) -> Path:
    """``args.out`` of a command whose ``--out`` is required but also has an old spelling."""
    if args.out is None:
        raise UserError("give --out")
    return args.out


def split_languages(text: Optional[str]) -> Optional[list[str]]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (None stays None)."""
    if text is None:
        return None
    return [c.strip() for c in text.split(",") if c.strip()]
