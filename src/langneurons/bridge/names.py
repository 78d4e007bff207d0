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

__all__ = ["ENDONYMS", "ENGLISH_NAMES", "NAME_STYLES", "language_name", "parse_name_overrides"]

#: The language's own name for itself.
ENDONYMS: dict[str, str] = {
    "ar": "العربية",
    "bg": "Български",
    "de": "Deutsch",
    "el": "Ελληνικά",
    "en": "English",
    "es": "Español",
    "fi": "Suomi",
    "fr": "Français",
    "he": "עברית",
    "hi": "हिन्दी",
    "hu": "Magyar",
    "id": "Bahasa Indonesia",
    "it": "Italiano",
    "ja": "日本語",
    "ko": "한국어",
    "nl": "Nederlands",
    "pl": "Polski",
    "pt": "Português",
    "ro": "Română",
    "ru": "Русский",
    "sw": "Kiswahili",
    "th": "ไทย",
    "tl": "Tagalog",
    "tr": "Türkçe",
    "uk": "Українська",
    "ur": "اردو",
    "vi": "Tiếng Việt",
    "zh": "中文",
}

#: English names of the same languages.
ENGLISH_NAMES: dict[str, str] = {
    "ar": "Arabic", "bg": "Bulgarian", "de": "German", "el": "Greek", "en": "English", "es": "Spanish",
    "fi": "Finnish", "fr": "French", "he": "Hebrew", "hi": "Hindi", "hu": "Hungarian", "id": "Indonesian",
    "it": "Italian", "ja": "Japanese", "ko": "Korean", "nl": "Dutch", "pl": "Polish", "pt": "Portuguese",
    "ro": "Romanian", "ru": "Russian", "sw": "Swahili", "th": "Thai", "tl": "Tagalog", "tr": "Turkish",
    "uk": "Ukrainian", "ur": "Urdu", "vi": "Vietnamese", "zh": "Chinese",
}

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
