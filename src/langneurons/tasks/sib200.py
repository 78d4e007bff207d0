"""SIB-200: topic classification of FLORES sentences (7 topics), by LM scoring of topic names.

    context      = text + "\\nTopic:"
    continuation = " " + category          category in CATEGORIES (English names, as labelled)

The prediction is the category with the larger summed log-probability (``acc``) or per-byte
log-probability (``acc_norm``; the names differ in length, "science/technology" against
"travel", so ``acc_norm`` is the fairer of the two). Few-shot demonstrations come from ``train``.

Local files: ``DIR/<FLORES code>/{train,dev,test}.tsv`` (``eng_Latn/test.tsv``) with a header
``index_id category text``; languages are given as ISO codes (``en``) or FLORES codes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import UserError
from .common import ChoiceTask, flores_code, read_tsv

CATEGORIES = ("science/technology", "travel", "politics", "sports", "health", "entertainment", "geography")


def read_sib200_tsv(path: Path) -> list[dict]:
    """Rows of a SIB-200 TSV (header ``index_id  category  text``; ``index_id`` optional), in file
    order, fields as written (the fine-tuning data and the task's documents both come from here)."""
    return read_tsv(Path(path), ("category", "text"))


def read_sib200_labels(path: Path) -> Optional[list[str]]:
    """The categories listed in ``labels.txt`` beside a SIB-200 file (one a line), or None without one."""
    lab_file = Path(path).parent / "labels.txt"
    if not lab_file.is_file():
        return None
    return [s.strip() for s in lab_file.read_text(encoding="utf-8").splitlines() if s.strip()]


class SIB200(ChoiceTask):
    name = "sib200"
    description = "SIB-200 topic accuracy (category-name log-likelihood)"
    languages = ("en", "ar", "de", "es", "fr", "hi", "id", "ja", "pt", "ru", "sw", "th", "ur", "vi", "zh")
    splits = ("test", "validation", "train")
    hf = "hf:Davlan/sib200"
    metrics = ("acc_norm", "acc")

    def fewshot_split(self, split):
        return "train" if split != "train" else None

    def hf_config(self, lang):
        return flores_code(lang)

    def local_file(self, directory: Path, lang, split):
        name = "dev" if split == "validation" else split
        p = directory / lang / f"{name}.tsv"  # a directory named by the code given
        return p if p.is_file() else directory / flores_code(lang) / f"{name}.tsv"

    def _docs(self, rows, where):
        docs = []
        for i, r in enumerate(rows):
            cat = str(r.get("category", "")).strip()
            if cat not in CATEGORIES:
                raise UserError(f"{where} row {i + 1}: category {cat!r} is not one of {', '.join(CATEGORIES)}; "
                                "fix the row")
            text = str(r.get("text", ""))
            if not text.strip():
                raise UserError(f"{where} row {i + 1}: empty text; fix or remove the row")
            docs.append({"text": text.strip(), "category": cat, "label": CATEGORIES.index(cat)})
        return docs

    def read_file(self, path, lang, split):
        return self._docs(read_sib200_tsv(path), str(path))

    def from_records(self, records, lang, where):
        return self._docs(records, where)

    def requests(self, doc, lang, **options):
        context = f"{doc['text']}\nTopic:"
        return [(context, f" {c}") for c in CATEGORIES]


TASK = SIB200()
