"""Language names used inside BridgeX-ICL prompts.

Prompts name languages in words (``Deutsch:"Haus"→中文:``). By default each language is named by
its endonym (its own name for itself), as in BridgeX-ICL; English exonyms are available as
``style="english"``, and any name can be overridden per language (``--names de=German,zh=Chinese``).

Endonyms are written capitalised where the script has case (``Français``, ``Русский``), as
labels at the start of a prompt segment.
"""

from __future__ import annotations

from typing import Mapping, Optional

from ..errors import UserError
from ..languages import ENDONYMS, ENGLISH_NAMES

__all__ = ["ENDONYMS", "ENGLISH_NAMES", "NAME_STYLES", "language_name", "parse_name_overrides"]

NAME_STYLES = ("endonym", "english")


def language_name(code: str, style: str = "endonym", overrides: Optional[Mapping[str, str]] = None) -> str:
    """The name of language ``code`` in prompts: an override if given, else from the ``style`` table.

    Raises :class:`UserError` for a code in neither (the message says how to name it).
    """
    if overrides and code in overrides:
        return overrides[code]
    if style not in NAME_STYLES:
        raise UserError(f"unknown name style {style!r}; use one of {', '.join(NAME_STYLES)}")
    table = ENDONYMS if style == "endonym" else ENGLISH_NAMES
    if code not in table:
        raise UserError(f"no {style} name is known for language {code!r}; name it with --names {code}=NAME")
    return table[code]


def parse_name_overrides(text: Optional[str]) -> dict[str, str]:
    """``"de=German,zh=Chinese"`` -> ``{"de": "German", "zh": "Chinese"}`` (empty for ``None``/``""``)."""
    out: dict[str, str] = {}
    if not text:
        return out
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        code, sep, name = item.partition("=")
        if not sep or not code.strip() or not name.strip():
            raise UserError(f"bad --names item {item!r}; write CODE=NAME, comma-separated (e.g. de=German,zh=Chinese)")
        out[code.strip()] = name.strip()
    return out
