"""Offline language identification for the generation-based steering score.

A thin wrapper around ``langid`` (langid.py, Lui and Baldwin 2012; ``pip install langid``, also the
``steer`` extra): a naive-Bayes classifier over byte n-grams whose model ships inside the package,
so nothing is downloaded at run time. The classifier is restricted to the languages being
compared (a K-way decision), which is both faster and more accurate than the 97-way default.

Codes: ISO 639-1 codes (``en``, ``zh``) are used as they are; region or script suffixes are dropped
(``zh-Hans``, ``pt_BR``); FLORES-style and ISO 639-3 codes of common languages are mapped
(``zho_Hans`` -> ``zh``, ``arb`` -> ``ar``). A language langid does not know raises UserError.
"""

from __future__ import annotations

import copy
from typing import Iterable, Optional, Sequence

from .errors import UserError

#: ISO 639-3 (and FLORES prefixes) -> ISO 639-1, for languages langid knows.
ISO3 = {"eng": "en", "fra": "fr", "spa": "es", "deu": "de", "zho": "zh", "cmn": "zh", "rus": "ru", "arb": "ar",
        "ara": "ar", "hin": "hi", "jpn": "ja", "vie": "vi", "ind": "id", "tha": "th", "swh": "sw", "swa": "sw",
        "tur": "tr", "ell": "el", "bul": "bg", "urd": "ur", "tel": "te", "tam": "ta", "ben": "bn", "por": "pt",
        "ita": "it", "nld": "nl", "pol": "pl", "ukr": "uk", "ces": "cs", "kor": "ko", "heb": "he", "fin": "fi",
        "hun": "hu", "tgl": "tl", "fas": "fa", "pes": "fa", "ron": "ro", "swe": "sv", "dan": "da", "mar": "mr",
        "est": "et", "lit": "lt", "lav": "lv", "slk": "sk", "slv": "sl", "hrv": "hr", "srp": "sr", "cat": "ca",
        "eus": "eu", "glg": "gl", "msa": "ms", "zsm": "ms", "kat": "ka", "hye": "hy", "amh": "am", "mal": "ml",
        "kan": "kn", "guj": "gu", "pan": "pa", "nep": "ne", "sin": "si", "khm": "km", "lao": "lo", "mya": "my"}


def normalise_code(code: str) -> str:
    """``zh-Hans`` -> ``zh``; ``zho_Hans`` -> ``zh``; ``EN`` -> ``en``."""
    base = code.replace("_", "-").split("-")[0].lower()
    return ISO3.get(base, base)


_IDENTIFIERS: dict = {}


def _identifier(labels: Optional[tuple] = None):
    """A langid identifier restricted to ``labels`` (cached: decoding the model takes seconds)."""
    try:
        from langid.langid import LanguageIdentifier as _LI, model as _model_string
    except ImportError:
        raise UserError("the generation steering score needs the 'langid' package (offline language "
                        "identifier); install it with: pip install langid  (or pip install 'langneurons[steer]')"
                        ) from None
    if None not in _IDENTIFIERS:
        _IDENTIFIERS[None] = _LI.from_modelstring(_model_string, norm_probs=True)
    if labels not in _IDENTIFIERS:
        # set_languages rebinds the copy's tables from the full model; the base stays untouched
        idf = copy.copy(_IDENTIFIERS[None])
        idf.set_languages(list(labels))
        _IDENTIFIERS[labels] = idf
    return _IDENTIFIERS[labels]


class LanguageIdentifier:
    """Classify texts among ``languages`` (our codes); ``classify`` returns ``(code, probability)``.

    Empty or whitespace-only texts are not classified (``(None, 0.0)``).
    """

    def __init__(self, languages: Sequence[str]):
        languages = list(dict.fromkeys(languages))
        if not languages:
            raise UserError("language identification needs at least one language")
        known = set(_identifier().nb_classes)
        mapped = {code: normalise_code(code) for code in languages}
        unknown = [c for c, m in mapped.items() if m not in known]
        if unknown:
            raise UserError(f"the language identifier does not know {', '.join(unknown)}; drop them or use "
                            f"ISO 639-1 codes it supports (e.g. {', '.join(sorted(known)[:12])}, ...)")
        self.languages = languages
        self._back = {}
        for code, m in mapped.items():
            self._back.setdefault(m, code)
        self._idf = _identifier(tuple(sorted(set(mapped.values()))))

    def classify(self, text: str) -> tuple[Optional[str], float]:
        if not text or not text.strip():
            return None, 0.0
        label, prob = self._idf.classify(text)
        return self._back.get(label, label), float(prob)

    def labels(self, texts: Iterable[str]) -> list[Optional[str]]:
        return [self.classify(t)[0] for t in texts]

    def shares(self, texts: Sequence[str]) -> dict[str, float]:
        """Fraction of ``texts`` identified as each language (unclassified texts count in the total)."""
        labels = self.labels(texts)
        n = max(1, len(labels))
        return {code: sum(1 for x in labels if x == code) / n for code in self.languages}
