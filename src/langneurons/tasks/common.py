"""What every task shares: reading local files and ``hf:`` datasets, few-shot demonstrations, and
the three task kinds (choice by log-likelihood, answer letter by next token, generation).

A task is a small object (one module per task) that says where its files are, how a record
becomes a document, and how a document becomes a prompt. Evaluation of a list of documents
returns ``{metric: value}``; :mod:`langneurons.tasks.runner` adds languages, interventions and
the output files.

Data sources (``--data``):

* a directory: the task's own file naming inside it (e.g. ``DIR/xnli_test_zh.tsv``);
* a file: used as it is (a ``{lang}`` placeholder in the name is replaced by the language;
  tasks whose files carry a language column keep the rows of the language asked for);
* ``hf:DATASET[:CONFIG[:SPLIT]]``: loaded with ``datasets.load_dataset`` (cached datasets and
  local dataset directories work offline). CONFIG defaults to the task's usual one for each
  language (none for a local directory) and SPLIT to the task's split; ``{lang}`` and
  ``{flores}`` in CONFIG are replaced by the language code and its FLORES-200 code.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import UserError

#: ISO 639-1 (or XWinograd's) code -> FLORES-200 code (script included).
FLORES_CODES = {
    "ar": "arb_Arab", "bg": "bul_Cyrl", "bn": "ben_Beng", "de": "deu_Latn", "el": "ell_Grek", "en": "eng_Latn",
    "es": "spa_Latn", "et": "est_Latn", "fr": "fra_Latn", "hi": "hin_Deva", "ht": "hat_Latn", "id": "ind_Latn",
    "it": "ita_Latn", "ja": "jpn_Jpan", "ko": "kor_Hang", "pt": "por_Latn", "qu": "quy_Latn", "ro": "ron_Latn",
    "ru": "rus_Cyrl", "sw": "swh_Latn", "ta": "tam_Taml", "th": "tha_Thai", "tr": "tur_Latn", "ur": "urd_Arab",
    "vi": "vie_Latn", "zh": "zho_Hans", "zh-Hant": "zho_Hant",
}

def flores_code(lang: str) -> str:
    """``zh`` -> ``zho_Hans``; a FLORES code (``xxx_Yyyy``) is returned as it is."""
    if "_" in lang and len(lang) == 8:
        return lang
    if lang in FLORES_CODES:
        return FLORES_CODES[lang]
    raise UserError(f"no FLORES-200 code known for language {lang!r}; give the FLORES code itself "
                    f"(e.g. zho_Hans) or one of {', '.join(sorted(FLORES_CODES))}")


# ---------------------------------------------------------------------------------------------- files
def read_json(path: Path) -> Any:
    if not Path(path).is_file():
        raise UserError(f"data file {path} does not exist; give an existing JSON file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; convert the file to UTF-8") from None


csv.field_size_limit(1 << 30)  # long documents in one field


def read_tsv(path: Path, columns: Sequence[str],
             aliases: Optional[dict[str, Sequence[str]]] = None) -> list[dict]:
    """Rows of a tab-separated file with a header naming at least ``columns`` (no quoting).

    ``aliases`` maps a column name to other spellings of it: the first header cell equal, ignoring
    case, to the name or else to one of its spellings (in order) is read as that column; names
    in ``aliases`` but not in ``columns`` are optional. Rows whose cells are all blank are skipped.
    """
    if not Path(path).is_file():
        raise UserError(f"data file {path} does not exist; give an existing TSV file")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; convert the file to UTF-8") from None
    except csv.Error as e:
        raise UserError(f"{path}: not a readable TSV file ({e}); fix the file") from None
    if not rows:
        raise UserError(f"{path}: empty file; expected a header line with columns {', '.join(columns)}")
    given = [h.strip() for h in rows[0]]
    header = list(given)
    aliases = aliases or {}
    for name, others in aliases.items():
        low = [h.lower() for h in header]
        for spelling in (name, *others):
            if spelling.lower() in low:
                header[low.index(spelling.lower())] = name
                break
    missing = [c for c in columns if c not in header]
    if missing:
        named = [c + (f" (or {', '.join(aliases[c])})" if aliases.get(c) else "") for c in missing]
        raise UserError(f"{path}: header {given} lacks column(s) {', '.join(named)}; "
                        f"the file needs a tab-separated header with {', '.join(columns)}")
    out = []
    for n, row in enumerate(rows[1:], 2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise UserError(f"{path} line {n}: {len(row)} tab-separated fields, the header has {len(header)}; "
                            "fix that line (tabs inside a field are not allowed)")
        out.append(dict(zip(header, row)))
    return out


def need(rec: dict, key: str, where: str, kind=str):
    """``rec[key]`` checked to be of ``kind``; else a one-line UserError naming the record."""
    if key not in rec:
        raise UserError(f"{where}: missing field {key!r}; every record needs it")
    v = rec[key]
    if kind is int:
        try:
            if isinstance(v, bool):
                raise ValueError
            return int(v)
        except (TypeError, ValueError):
            raise UserError(f"{where}: field {key!r} must be an integer, got {v!r}; fix the record") from None
    if not isinstance(v, kind):
        raise UserError(f"{where}: field {key!r} must be {kind.__name__}, got {type(v).__name__}; fix the record")
    return v


def parse_hf_spec(spec: str) -> tuple[str, Optional[str], Optional[str]]:
    """``hf:DATASET[:CONFIG[:SPLIT]]`` -> ``(dataset, config or None, split or None)``."""
    body = spec[3:]
    parts = body.split(":")
    if not parts[0] or len(parts) > 3:
        raise UserError(f"bad data source {spec!r}; write hf:DATASET[:CONFIG[:SPLIT]]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else None
    return name, config, split


def load_hf_records(name: str, config: Optional[str], split: str) -> list[dict]:
    """All records of one split of a ``datasets`` dataset (cached or local: works offline)."""
    try:
        import datasets
    except ImportError:
        raise UserError("hf: data sources need the 'datasets' package: pip install 'langneurons[data]'") from None
    try:
        ds = datasets.load_dataset(name, config, split=split) if config else datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - every loader failure is the user's source
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise UserError(f"cannot load hf:{name}{':' + config if config else ''} split {split!r} "
                        f"({e.__class__.__name__}: {first}); check the name, config and split, or download it "
                        "while online first") from None
    return [dict(r) for r in ds]


# ---------------------------------------------------------------------------------------------- tasks
class Task:
    """Base class of the tasks. Subclasses set the attributes and implement the hooks below.

    Attributes: ``name``; ``kind`` (``"choice"``, ``"letter"`` or ``"generate"``); ``languages``
    (the languages of the benchmark); ``splits`` and ``default_split``; ``hf`` (default
    ``hf:`` source or ``None``); ``metrics`` (names, the first is the headline metric);
    ``fraction_metrics`` (metrics in [0, 1], shown x100 in tables).
    """

    name = ""
    kind = "choice"
    languages: tuple[str, ...] = ()
    splits: tuple[str, ...] = ("test",)
    default_split = "test"
    hf: Optional[str] = None
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    fraction_metrics: tuple[str, ...] = ("acc", "acc_norm", "em", "f1")
    description = ""
    #: task options (``--option KEY=VALUE``): name -> (default, help, allowed values or None)
    options: dict[str, tuple[str, str, Optional[tuple[str, ...]]]] = {}

    def resolve_options(self, given: dict[str, str]) -> dict[str, str]:
        """Defaults overridden by ``given``; unknown names or values are one-line UserErrors."""
        out = {k: v[0] for k, v in self.options.items()}
        for k, v in given.items():
            if k not in self.options:
                known = ", ".join(self.options) or "none"
                raise UserError(f"{self.name} has no option {k!r}; its options: {known}")
            allowed = self.options[k][2]
            if allowed is not None and v not in allowed:
                raise UserError(f"{self.name} option {k} must be one of {', '.join(allowed)}, got {v!r}")
            out[k] = v
        return out

    # ---- data ------------------------------------------------------------------------------
    def check_split(self, split: Optional[str]) -> str:
        split = split or self.default_split
        aliases = {"dev": "validation", "val": "validation", "valid": "validation"}
        split = aliases.get(split, split) if "validation" in self.splits else split
        if split not in self.splits:
            raise UserError(f"{self.name} has no split {split!r}; use one of {', '.join(self.splits)}")
        return split

    def fewshot_split(self, split: str) -> Optional[str]:
        """A split to draw demonstrations from when evaluating ``split`` (None: the same docs)."""
        return None

    def local_file(self, directory: Path, lang: str, split: str) -> Path:
        raise NotImplementedError

    def read_file(self, path: Path, lang: str, split: str) -> list[dict]:
        raise NotImplementedError

    def hf_config(self, lang: str) -> Optional[str]:
        return lang

    def hf_split(self, split: str) -> str:
        return split

    def from_records(self, records: list[dict], lang: str, where: str) -> list[dict]:
        """Documents from ``datasets`` records (defaults to the local-file reader's record rule)."""
        raise NotImplementedError

    def load(self, data: Optional[str], lang: str, split: Optional[str] = None, **options) -> list[dict]:
        """Documents of ``lang`` from a directory, a file or an ``hf:`` source (see the module doc)."""
        split = self.check_split(split)
        data = data or self.hf
        if not data:
            raise UserError(f"{self.name} has no default data source; give --data DIR|FILE|hf:DATASET")
        if data.startswith("hf:"):
            name, config, hsplit = parse_hf_spec(data)
            if config is None and not Path(name).exists():  # a local dataset directory has no configs
                config = self.hf_config(lang)
            if config:
                config = config.replace("{lang}", lang)
                if "{flores}" in config:
                    config = config.replace("{flores}", flores_code(lang))
            records = load_hf_records(name, config, hsplit or self.hf_split(split))
            docs = self.from_records(records, lang, f"hf:{name}")
        else:
            path = Path(data.replace("{lang}", lang))
            if path.is_dir():
                path = self.local_file(path, lang, split)
                if not path.is_file():
                    raise UserError(f"no {self.name} {split} file for language {lang!r}: {path} does not exist; "
                                    "check --data, --languages and --split")
            elif not path.is_file():
                raise UserError(f"{self.name} data {path} does not exist; give a directory, a file or hf:DATASET")
            docs = self.read_file(path, lang, split)
        if not docs:
            raise UserError(f"{self.name}: no {split} documents for language {lang!r} in {data}; "
                            "check the language code and the source")
        return docs

    # ---- prompts ---------------------------------------------------------------------------
    def solved(self, doc: dict, lang: str, **options) -> str:
        """A document with its answer filled in (a few-shot demonstration)."""
        raise NotImplementedError

    def fewshot_prefix(self, demos: Sequence[dict], lang: str, **options) -> str:
        """The demonstrations, each followed by a blank line (empty without demonstrations)."""
        return "".join(self.solved(d, lang, **options) + "\n\n" for d in demos)

    def evaluate(self, scorer, docs: Sequence[dict], lang: str, demos: Sequence[dict] = (), **options) -> dict:
        raise NotImplementedError

    def options_info(self, lang: str, **options) -> dict:
        """Task-specific settings to record in the result file (prompt words, tokenizers...)."""
        return {}


class ChoiceTask(Task):
    """Multiple choice by summed continuation log-likelihood.

    ``requests(doc, lang)`` gives one ``(context, continuation)`` per choice and ``doc["label"]``
    the gold index. ``acc`` = mean over documents of ``[argmax_i ll_i == gold]`` (first index on
    ties); ``acc_norm`` the same with ``ll_i / bytes(continuation_i)`` (UTF-8 bytes, as
    lm-evaluation-harness).
    """

    kind = "choice"

    def requests(self, doc: dict, lang: str, **options) -> list[tuple[str, str]]:
        raise NotImplementedError

    def solved(self, doc, lang, **options):
        context, cont = self.requests(doc, lang, **options)[doc["label"]]
        return context + cont

    def evaluate(self, scorer, docs, lang, demos=(), **options) -> dict:
        import torch
        prefix = self.fewshot_prefix(demos, lang, **options)
        flat, spans = [], []
        for doc in docs:
            reqs = self.requests(doc, lang, **options)
            spans.append((len(flat), len(reqs)))
            flat.extend((prefix + c, x) for c, x in reqs)
        lls = scorer.loglikelihood(flat)
        correct = correct_norm = 0
        for doc, (start, n) in zip(docs, spans):
            ll = torch.tensor([lls[start + k][0] for k in range(n)], dtype=torch.float64)
            nbytes = torch.tensor([max(1, len(flat[start + k][1].encode("utf-8"))) for k in range(n)],
                                  dtype=torch.float64)
            correct += int(int(ll.argmax()) == doc["label"])
            correct_norm += int(int((ll / nbytes).argmax()) == doc["label"])
        n = max(1, len(docs))
        return {"acc": correct / n, "acc_norm": correct_norm / n}


class GenerateTask(Task):
    """Greedy generation (left padded) followed by a task metric.

    ``prompt(doc, lang)`` is the model input (after the few-shot prefix); generation stops at
    the first newline (``stop``) or EOS, at most ``max_new_tokens`` tokens (``--max-new-tokens``).
    ``score(predictions, docs, lang, scorer, **options)`` returns the metrics.
    """

    kind = "generate"
    max_new_tokens = 64
    stop: tuple[str, ...] = ("\n",)
    n_samples = 3

    def prompt(self, doc: dict, lang: str, **options) -> str:
        raise NotImplementedError

    def reference(self, doc: dict) -> str:
        raise NotImplementedError

    def score(self, predictions: list[str], docs: Sequence[dict], lang: str, scorer, **options) -> dict:
        raise NotImplementedError

    def evaluate(self, scorer, docs, lang, demos=(), max_new_tokens: Optional[int] = None, **options) -> dict:
        prefix = self.fewshot_prefix(demos, lang, **options)
        prompts = [prefix + self.prompt(d, lang, **options) for d in docs]
        preds = scorer.generate(prompts, int(max_new_tokens or self.max_new_tokens), stop=self.stop, strip=True)
        out = self.score(preds, docs, lang, scorer, **options)
        out["samples"] = [{"prompt_end": self.prompt(d, lang, **options)[-200:], "prediction": p,
                           "reference": self.reference(d)} for d, p in list(zip(docs, preds))[:self.n_samples]]
        return out


LETTERS = "ABCDEFGHIJ"


class LetterTask(Task):
    """Multiple choice answered by the next token: ``argmax_k log p(" " + LETTER_k | prompt)``.

    ``prompt(doc, lang)`` ends with ``"Answer:"``; the candidates are the runtime's answer-letter
    tokens (:meth:`langneurons.runtime.Session.letter_ids`: the first token of ``" A"``, ``" B"``, ...,
    skipping a leading token that decodes to whitespace only), one forward pass per document. ``acc`` = share of documents whose argmax is the gold letter.
    """

    kind = "letter"
    metrics = ("acc",)

    def prompt(self, doc: dict, lang: str, **options) -> str:
        raise NotImplementedError

    def solved(self, doc, lang, **options):
        return self.prompt(doc, lang, **options) + " " + LETTERS[doc["label"]]

    def evaluate(self, scorer, docs, lang, demos=(), **options) -> dict:
        import torch
        prefix = self.fewshot_prefix(demos, lang, **options)
        n_max = max(len(d["choices"]) for d in docs)
        ids = scorer.letter_ids(LETTERS[:n_max])
        lp = scorer.next_token_logprobs([prefix + self.prompt(d, lang, **options) for d in docs], ids)  # [N, C]
        n_choices = torch.tensor([len(d["choices"]) for d in docs])
        valid = torch.arange(n_max).unsqueeze(0) < n_choices.unsqueeze(1)             # [N, C]
        lp = lp.masked_fill(~valid, float("-inf"))
        gold = torch.tensor([d["label"] for d in docs])
        return {"acc": float((lp.argmax(dim=1) == gold).double().mean()) if docs else 0.0}
