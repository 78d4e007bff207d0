"""FLORES-200 translation from English (or another ``source``) into each language.

Prompt (zero-shot; with ``--shots K`` the first K sentence pairs of the file are demonstrations,
each followed by a blank line, and are left out of the scored set):

    "{Source name}: {source sentence}\\n{Target name}:"

Greedy generation up to the first newline. Scores are sacreBLEU **corpus** statistics over all
scored sentences of a language (never averages of per-batch or per-sentence scores, which depend
on the batch size):

* ``bleu``: ``sacrebleu.corpus_bleu(hyps, [refs], tokenize=T)``; option ``bleu_tokenize``
  ``auto`` (default) uses ``zh`` for Chinese, ``char`` for Japanese, Korean and Thai (no word
  spaces) and ``13a`` otherwise; any sacreBLEU tokenizer name can be given.
* ``chrf++``: ``sacrebleu.corpus_chrf(hyps, [refs], word_order=2)``.

The sacreBLEU signatures are recorded with the scores.

Local files: ``DIR/{FLORES code}.{split}`` (``DIR/zho_Hans.devtest``), or the same under
``DIR/{split}/``: one sentence per line, line-aligned across languages.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..languages import ENGLISH_NAMES
from .common import GenerateTask, flores_code, load_hf_records, parse_hf_spec

NO_SPACE_CHAR = ("ja", "ko", "th", "jpn_Jpan", "kor_Hang", "tha_Thai")


def bleu_tokenizer(lang: str, choice: str = "auto") -> str:
    if choice != "auto":
        return choice
    if lang in ("zh", "zh-Hant", "zho_Hans", "zho_Hant"):
        return "zh"
    if lang in NO_SPACE_CHAR:
        return "char"
    return "13a"


def corpus_scores(hypotheses: list[str], references: list[str], lang: str, tokenize: str = "auto") -> dict:
    """``{"bleu", "chrf++", "signatures"}`` of a whole corpus (sacreBLEU)."""
    try:
        import sacrebleu
    except ImportError:
        raise UserError("FLORES scores need sacrebleu: pip install 'langneurons[eval]'") from None
    tok = bleu_tokenizer(lang, tokenize)
    try:
        bleu = sacrebleu.metrics.BLEU(tokenize=tok)
    except Exception as e:  # noqa: BLE001 - an unknown or unavailable tokenizer
        raise UserError(f"sacreBLEU tokenizer {tok!r} is not available ({e}); choose another bleu_tokenize") from None
    chrf = sacrebleu.metrics.CHRF(word_order=2)
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    return {"bleu": b.score, "chrf++": c.score,
            "signatures": {"bleu": str(bleu.get_signature()), "chrf++": str(chrf.get_signature())}}


class Flores(GenerateTask):
    name = "flores"
    description = "FLORES-200 translation from English: sacreBLEU corpus BLEU and chrF++"
    languages = ("ar", "de", "es", "fr", "hi", "id", "ja", "pt", "ru", "sw", "th", "ur", "vi", "zh")
    splits = ("devtest", "dev")
    default_split = "devtest"
    hf = "hf:openlanguagedata/flores_plus"
    metrics = ("chrf++", "bleu")
    max_new_tokens = 256
    options = {"source": ("en", "source language code (ISO or FLORES)", None),
               "bleu_tokenize": ("auto", "sacreBLEU tokenizer: auto (zh / char / 13a by language) or a name", None)}

    def hf_config(self, lang):
        return flores_code(lang)

    def local_file(self, directory: Path, lang, split):
        code = flores_code(lang)
        for p in (directory / f"{code}.{split}", directory / split / f"{code}.{split}"):
            if p.is_file():
                return p
        return directory / f"{code}.{split}"

    @staticmethod
    def _lines(path: Path) -> list[str]:
        try:
            return Path(path).read_text(encoding="utf-8").rstrip("\n").split("\n")
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text; convert the file to UTF-8") from None

    def load(self, data, lang, split=None, source: str = "en", **options):
        split = self.check_split(split)
        data = data or self.hf
        if data.startswith("hf:"):
            name, config, hsplit = parse_hf_spec(data)

            def sentences(code):
                cfg = (config or "{flores}").replace("{lang}", code).replace("{flores}", flores_code(code))
                recs = load_hf_records(name, cfg, hsplit or split)
                field = "text" if recs and "text" in recs[0] else "sentence"
                if recs and field not in recs[0]:
                    raise UserError(f"hf:{name} records have no 'text' or 'sentence' field")
                return [str(r[field]) for r in recs]
            src, tgt = sentences(source), sentences(lang)
            where = f"hf:{name}"
        else:
            base = Path(data)
            if not base.is_dir():
                raise UserError(f"flores --data must be a directory of FLORES files ({base} is not one)")
            paths = [self.local_file(base, code, split) for code in (source, lang)]
            for p in paths:
                if not p.is_file():
                    raise UserError(f"no FLORES file {p}; check --data, --languages and --split")
            src, tgt = self._lines(paths[0]), self._lines(paths[1])
            where = str(paths[1])
        if len(src) != len(tgt):
            raise UserError(f"{where}: {len(tgt)} sentences but the {source} side has {len(src)}; "
                            "FLORES files must be line-aligned")
        return [{"source": s, "reference": t} for s, t in zip(src, tgt)]

    def names(self, lang: str, source: str) -> tuple[str, str]:
        return ENGLISH_NAMES.get(source, source), ENGLISH_NAMES.get(lang, lang)

    def prompt(self, doc, lang, source: str = "en", **options):
        src_name, tgt_name = self.names(lang, source)
        return f"{src_name}: {doc['source']}\n{tgt_name}:"

    def reference(self, doc):
        return doc["reference"]

    def solved(self, doc, lang, source: str = "en", **options):
        return self.prompt(doc, lang, source) + " " + doc["reference"]

    def score(self, predictions, docs, lang, scorer, bleu_tokenize: str = "auto", **options):
        return corpus_scores(predictions, [d["reference"] for d in docs], lang, bleu_tokenize)

    def options_info(self, lang, source: str = "en", bleu_tokenize: str = "auto", **options):
        return {"source": source, "bleu_tokenize": bleu_tokenizer(lang, bleu_tokenize),
                "prompt": self.prompt({"source": "<source>"}, lang, source)}


TASK = Flores()
