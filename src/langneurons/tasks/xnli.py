"""XNLI: natural language inference in 15 languages, scored as a three-way LM choice.

Prompt (the lm-evaluation-harness ``xnli_LANG`` verbalisation, with the words of each language):

    context      = premise + ", " + RIGHT + "?"
    continuation = " " + LABEL + ", " + hypothesis        LABEL in (YES, ALSO, NO)

for entailment, neutral and contradiction (labels 0, 1, 2, the HF ``xnli`` order). English:
``"<premise>, right? Yes, <hypothesis>"``. lm-evaluation-harness scores the whole string from an
empty context; the premise part is the same for the three choices, so the argmax (``acc``) is the
same while only the continuation is scored here (``acc_norm`` divides by the continuation's
bytes). Few-shot demonstrations come from the validation split when evaluating test.

Local files: ``DIR/xnli_{test,validation}_LANG.tsv`` with a header ``id premise hypothesis label``
(read by :func:`read_nli_tsv`, which also reads the English MultiNLI training TSV of fine-tuning).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .common import ChoiceTask, read_tsv

#: language -> (question word, entailment, neutral, contradiction) as in lm-evaluation-harness.
WORDS = {
    "ar": ("صحيح", "نعم", "لذا", "رقم"),
    "bg": ("правилно", "да", "така", "не"),
    "de": ("richtig", "Ja", "Auch", "Nein"),
    "el": ("σωστός", "Ναί", "Έτσι", "όχι"),
    "en": ("right", "Yes", "Also", "No"),
    "es": ("correcto", "Sí", "Asi que", "No"),
    "fr": ("correct", "Oui", "Aussi", "Non"),
    "hi": ("सही", "हाँ", "इसलिए", "नहीं"),
    "ru": ("правильно", "Да", "Так", "Нет"),
    "sw": ("sahihi", "Ndiyo", "Hivyo", "Hapana"),
    "th": ("ถูกต้อง", "ใช่", "ดังนั้น", "ไม่"),
    "tr": ("doğru", "Evet", "Böylece", "Hayır"),
    "ur": ("صحیح", "جی ہاں", "اس لئے", "نہیں"),
    "vi": ("đúng", "Vâng", "Vì vậy", "Không"),
    "zh": ("正确", "是的", "所以", "不是的"),
}


def read_nli_tsv(path: Path) -> list[dict]:
    """Rows of a premise/hypothesis TSV (XNLI, MultiNLI), in file order, fields as written: keys
    ``premise``, ``hypothesis``, ``label`` and ``id`` when the file has one. Header names are matched
    ignoring case; ``hypo`` is read as ``hypothesis``. Labels are not checked here."""
    return read_tsv(Path(path), ("premise", "hypothesis", "label"),
                    aliases={"premise": (), "hypothesis": ("hypo",), "label": (), "id": ()})


class XNLI(ChoiceTask):
    name = "xnli"
    description = "XNLI accuracy (3-way LM choice, lm-eval verbalisation)"
    languages = tuple(WORDS)
    splits = ("test", "validation")
    hf = "hf:facebook/xnli"

    def words(self, lang: str):
        if lang not in WORDS:
            raise UserError(f"xnli has no prompt words for language {lang!r}; use one of {', '.join(WORDS)}")
        return WORDS[lang]

    def fewshot_split(self, split):
        return "validation" if split == "test" else None

    def local_file(self, directory: Path, lang, split):
        return directory / f"xnli_{split}_{lang}.tsv"

    def _doc(self, rec: dict, where: str) -> dict:
        try:
            label = int(rec["label"])
        except (TypeError, ValueError):
            label = -1
        if label not in (0, 1, 2):
            raise UserError(f"{where}: label {rec.get('label')!r} is not 0, 1 or 2 "
                            "(entailment, neutral, contradiction); fix the record")
        return {"premise": str(rec["premise"]), "hypothesis": str(rec["hypothesis"]), "label": label}

    def read_file(self, path, lang, split):
        rows = read_nli_tsv(path)
        return [self._doc(r, f"{path} row {i + 1}") for i, r in enumerate(rows)]

    def from_records(self, records, lang, where):
        for i, r in enumerate(records):
            if "premise" not in r or "hypothesis" not in r or "label" not in r:
                raise UserError(f"{where} record {i}: needs premise, hypothesis and label fields")
        return [self._doc(r, f"{where} record {i}") for i, r in enumerate(records)]

    def requests(self, doc, lang, **options):
        right, *labels = self.words(lang)
        context = f"{doc['premise']}, {right}?"
        return [(context, f" {word}, {doc['hypothesis']}") for word in labels]

    def options_info(self, lang, **options):
        right, yes, also, no = self.words(lang)
        return {"prompt": f"<premise>, {right}? {{{yes}|{also}|{no}}}, <hypothesis>"}


TASK = XNLI()
