"""The artifact registry: every file langneurons writes, its format tag, its loader, its report section.

Every artifact is a JSON object carrying ``"format": "langneurons.<kind>.v<N>"`` (the fine-tuning
checkpoint is a torch file holding the same key). The tag constants below are the only definitions;
the writing modules import them from here. :func:`load` reads a file and checks it (a JSON object
with no repeated key, a known tag and the keys its readers need; a kind with a ``loader``, such as
``neuronset``, is checked in full by that loader, the one validation of its files); :func:`kind_of`
names the kind of a file or document; each kind names the function of
:mod:`langneurons.report.sections` that renders it.

=======================  ===================================  ==========================================
kind                     file                                 written by
=======================  ===================================  ==========================================
stats                    ``stats.json`` (+ ``CODE.safetensors``)  ``collect``
collect.checkpoint       ``.partial/CODE.rankR.json``         ``collect`` (until a language is done)
directions               ``directions.json`` (+ safetensors)  ``directions collect``
directions.checkpoint    ``.partial/directions.CODE.rankR.json``  ``directions collect`` (until a language is done)
heads                    ``heads.json`` (+ ``heads.safetensors``)  ``heads collect``
heads.checkpoint         ``.partial/heads.CODE.rankR.json``   ``heads collect`` (until a language is done)
headset                  ``*.json`` head sets                 ``heads identify``
neuronset                ``*.json`` neuron sets               ``identify``, ``neurons``, ``bridge select``
intervention             ``Intervention.to_dict()``           library (embedded in results)
ppl                      ``ppl.json``                         ``ppl``
ppl.partial              ``.partial/ppl.json``                ``ppl`` (until every column is done)
steer                    ``steer.json``                       ``steer``
compare                  ``compare.json``                     ``compare``
task                     ``TASK.json``                        ``eval``
task.partial             ``.partial/TASK.json``               ``eval`` (until every row is done)
tiny                     ``langneurons_train.json``           ``tiny-train``
masked_lora              ``langneurons_mask.json``            ``finetune train``
finetune.run             ``langneurons_finetune.json``        ``finetune train``
finetune.checkpoint      ``checkpoint.pt`` (torch)            ``finetune train`` (until it finishes)
finetune.eval            ``eval.json``                        ``finetune train --eval``, ``finetune eval``
finetune.run_scores      ``runs/*/seed*/eval_scores.json``    ``finetune experiment``
finetune.experiment      ``results.json``                     ``finetune experiment``
bridge.probes            ``probes-S-T.json`` (+ safetensors)  ``bridge probe``
bridge.probe_summary     ``probe_summary.json``               ``bridge probe``
bridge.ranking           ``ranking-S-T.json``                 ``bridge select``
bridge.selection         ``selection.json``                   ``bridge select``
bridge.spectrum          ``spectrum.json``                    ``bridge spectrum``
bridge.bli               ``bli-S-T.json``                     ``bridge bli``
bridge.bli_summary       ``bli_summary.json``                 ``bridge bli``
bridge.mrc               ``mrc-L.json``                       ``bridge mrc``
=======================  ===================================  ==========================================

Older tags still read: ``langneurons.finetune.v1`` (before the run record and the checkpoint had
kinds of their own). This module imports nothing heavy: loaders of binary files and report
sections are imported when used.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from .errors import UserError

__all__ = ["Kind", "KINDS", "kinds", "kind_of", "load", "loads_json", "validate", "tag_of", "renderer",
           "python_loader"]

PREFIX = "langneurons."

# ------------------------------------------------------------------------------------------------ tags
STATS_FORMAT = "langneurons.stats.v1"
COLLECT_CHECKPOINT_FORMAT = "langneurons.collect.checkpoint.v1"
DIRECTIONS_FORMAT = "langneurons.directions.v1"
DIRECTIONS_CHECKPOINT_FORMAT = "langneurons.directions.checkpoint.v1"
HEADS_FORMAT = "langneurons.heads.v1"
HEADS_CHECKPOINT_FORMAT = "langneurons.heads.checkpoint.v1"
HEADSET_FORMAT = "langneurons.headset.v1"
NEURONSET_FORMAT = "langneurons.neuronset.v1"
INTERVENTION_FORMAT = "langneurons.intervention.v1"
PPL_FORMAT = "langneurons.ppl.v1"
PPL_PARTIAL_FORMAT = "langneurons.ppl.partial.v1"
STEER_FORMAT = "langneurons.steer.v1"
COMPARE_FORMAT = "langneurons.compare.v1"
TASK_FORMAT = "langneurons.task.v1"
TASK_PARTIAL_FORMAT = "langneurons.task.partial.v1"
TINY_FORMAT = "langneurons.tiny.v1"
MASK_FORMAT = "langneurons.masked_lora.v1"
FINETUNE_RUN_FORMAT = "langneurons.finetune.run.v1"
FINETUNE_CHECKPOINT_FORMAT = "langneurons.finetune.checkpoint.v1"
FINETUNE_EVAL_FORMAT = "langneurons.finetune.eval.v1"
FINETUNE_RUN_SCORES_FORMAT = "langneurons.finetune.run_scores.v1"
FINETUNE_EXPERIMENT_FORMAT = "langneurons.finetune.experiment.v1"
PROBE_FORMAT = "langneurons.bridge.probes.v1"
PROBE_SUMMARY_FORMAT = "langneurons.bridge.probe_summary.v1"
RANKING_FORMAT = "langneurons.bridge.ranking.v1"
SELECTION_FORMAT = "langneurons.bridge.selection.v1"
SPECTRUM_FORMAT = "langneurons.bridge.spectrum.v1"
BLI_FORMAT = "langneurons.bridge.bli.v1"
BLI_SUMMARY_FORMAT = "langneurons.bridge.bli_summary.v1"
MRC_FORMAT = "langneurons.bridge.mrc.v1"

#: The tag of the fine-tuning run record and checkpoint before they were told apart.
LEGACY_FINETUNE_FORMAT = "langneurons.finetune.v1"


# ------------------------------------------------------------------------------------------------ kinds
@dataclass(frozen=True)
class Kind:
    """One kind of artifact: its tag, where it lives, who writes it, how it is read and shown."""

    tag: str
    files: str                      # file name (pattern), for messages and documentation
    writer: str                     # the command that writes it
    title: str                      # heading of its report section
    section: str                    # MODULE.FUNCTION of langneurons.report.sections: f(items, ctx) -> html
    fields: dict = field(default_factory=dict)   # keys its readers need -> type (or tuple of types)
    python: str = "langneurons.artifacts.load(path)"
    legacy: tuple = ()              # older tags read as this kind
    binary: bool = False            # a torch file, not JSON
    loader: str = ""                # MODULE:CALLABLE(doc, where) that checks a document in full

    @property
    def name(self) -> str:
        return self.tag[len(PREFIX):].rsplit(".v", 1)[0]


_D, _L, _S = dict, list, str
_KINDS = [
    Kind(STATS_FORMAT, "stats.json", "collect", "Activation statistics", "core.section_stats",
         {"model": _D, "languages": _D}, "langneurons.ActivationStats.load(directory)"),
    Kind(DIRECTIONS_FORMAT, "directions.json (+ directions.safetensors)", "directions collect",
         "Residual-stream language directions", "core.section_generic",
         {"model": _D, "languages": _L, "num_layers": int, "hidden_size": int, "token_counts": _D},
         "langneurons.directions.Directions.load(directory)", loader="langneurons.directions:validate_doc"),
    Kind(HEADS_FORMAT, "heads.json (+ heads.safetensors)", "heads collect", "Attention-head statistics",
         "core.section_generic", {"model": _D, "languages": _L, "num_layers": int, "num_heads": int,
                                  "token_counts": _D},
         "langneurons.heads.HeadStats.load(directory)", loader="langneurons.heads:validate_doc"),
    Kind(HEADSET_FORMAT, "*.json (head set)", "heads identify", "Head sets", "core.section_generic",
         {"model": _D, "method": _D, "heads": _D}, "langneurons.heads.HeadSet.load(path)",
         loader="langneurons.heads:HeadSet.from_dict"),
    Kind(NEURONSET_FORMAT, "*.json (neuron set)", "identify, neurons import, bridge select", "Neuron sets",
         "core.section_neurons", {"model": _D, "method": _D, "neurons": _D}, "langneurons.NeuronSet.load(path)",
         loader="langneurons.neuronset:NeuronSet.from_dict"),
    Kind(INTERVENTION_FORMAT, "*.json (Intervention.to_dict())", "library", "Interventions",
         "core.section_intervention", {"operator": _S, "languages": _L},
         "langneurons.intervene.Intervention.from_dict(load(path))"),
    Kind(PPL_FORMAT, "ppl.json", "ppl", "Perplexity under deactivation", "core.section_ppl",
         {"rows": _L, "columns": _L, "ppl": _L}),
    Kind(STEER_FORMAT, "steer.json", "steer", "Steering", "core.section_steer", {"languages": _L}),
    Kind(COMPARE_FORMAT, "compare.json", "compare", "Localisation methods compared", "compare.section_compare",
         {"methods": _L, "targets": _L, "rows": _L}, loader="langneurons.compare:validate_doc"),
    Kind(TASK_FORMAT, "TASK.json", "eval", "Downstream tasks", "core.section_task",
         {"task": _S, "languages": _L, "metrics": _L, "rows": _L}),
    Kind(FINETUNE_EXPERIMENT_FORMAT, "results.json", "finetune experiment", "Fine-tuning experiments",
         "finetune.section_finetune_experiment", {"languages": _L, "conditions": _L, "table": _D}),
    Kind(FINETUNE_EVAL_FORMAT, "eval.json", "finetune train --eval, finetune eval --out",
         "Fine-tuned model evaluations", "finetune.section_finetune_eval", {"metrics": _D}),
    Kind(FINETUNE_RUN_FORMAT, "langneurons_finetune.json", "finetune train", "Fine-tuning runs",
         "finetune.section_finetune_runs", {"task": _S, "config": _D},
         "langneurons.finetune.train.load_finetuned(directory)",
         legacy=(LEGACY_FINETUNE_FORMAT,)),
    Kind(FINETUNE_RUN_SCORES_FORMAT, "runs/*/seed*/eval_scores.json", "finetune experiment",
         "Fine-tuning experiment runs", "finetune.section_finetune_run_scores", {"run": _D, "scores": _D}),
    Kind(MASK_FORMAT, "langneurons_mask.json", "finetune train", "Neuron-masked LoRA adapters",
         "finetune.section_masks", {"targets": _D}, "langneurons.finetune.masked_lora.read_mask_file(directory)"),
    Kind(FINETUNE_CHECKPOINT_FORMAT, "checkpoint.pt", "finetune train (until it finishes)",
         "Fine-tuning checkpoints", "core.section_generic", {"fingerprint": _S, "step": int},
         legacy=(LEGACY_FINETUNE_FORMAT,), binary=True),
    Kind(PROBE_FORMAT, "probes-S-T.json", "bridge probe", "Bridge probes", "bridge.section_probes",
         {"src": _S, "trg": _S, "probes": _L}, "langneurons.bridge.probe.ProbeSet.load(directory, src, trg)"),
    Kind(PROBE_SUMMARY_FORMAT, "probe_summary.json", "bridge probe", "Bridge probe summaries",
         "bridge.section_probe_summary", {"pairs": _D}),
    Kind(SELECTION_FORMAT, "selection.json", "bridge select", "Bridge selection", "bridge.section_selection",
         {"pairs": _D}),
    Kind(RANKING_FORMAT, "ranking-S-T.json", "bridge select", "Bridge rankings", "bridge.section_ranking",
         {"src": _S, "trg": _S, "ranking": _L}),
    Kind(SPECTRUM_FORMAT, "spectrum.json", "bridge spectrum", "Linguistic spectrum", "bridge.section_spectrum",
         {"languages": _L, "overlap": _L}),
    Kind(BLI_SUMMARY_FORMAT, "bli_summary.json", "bridge bli", "Bilingual lexicon induction: summaries",
         "bridge.section_bli_summary", {"pairs": _D}),
    Kind(BLI_FORMAT, "bli-S-T.json", "bridge bli", "Bilingual lexicon induction", "bridge.section_conditions",
         {"src": _S, "trg": _S, "conditions": _D}),
    Kind(MRC_FORMAT, "mrc-L.json", "bridge mrc", "Reading comprehension through a bridge", "bridge.section_conditions",
         {"src": _S, "conditions": _D}),
    Kind(TINY_FORMAT, "langneurons_train.json", "tiny-train", "Tiny models", "core.section_tiny",
         {"languages": _D, "config": _D}),
    Kind(COLLECT_CHECKPOINT_FORMAT, ".partial/CODE.rankR.json", "collect (until a language is done)",
         "Unfinished statistics", "core.section_generic", {"key": _S, "next_batch": int}),
    Kind(DIRECTIONS_CHECKPOINT_FORMAT, ".partial/directions.CODE.rankR.json", "directions collect (until a language "
         "is done)", "Unfinished direction collections", "core.section_generic", {"key": _S, "next_batch": int}),
    Kind(HEADS_CHECKPOINT_FORMAT, ".partial/heads.CODE.rankR.json", "heads collect (until a language is done)",
         "Unfinished head collections", "core.section_generic", {"key": _S, "next_batch": int}),
    Kind(PPL_PARTIAL_FORMAT, ".partial/ppl.json", "ppl (until every column is done)", "Unfinished perplexity runs",
         "core.section_generic", {"key": _S, "columns": _D}),
    Kind(TASK_PARTIAL_FORMAT, ".partial/TASK.json", "eval (until every row is done)", "Unfinished task runs",
         "core.section_generic", {"key": _S, "rows": _D}),
]

#: Every registered kind by name, in report order.
KINDS: dict[str, Kind] = {k.name: k for k in _KINDS}
_BY_TAG: dict[str, str] = {k.tag: k.name for k in _KINDS}


def kinds() -> list[str]:
    """The names of the registered kinds, in report order."""
    return list(KINDS)


def tag_of(kind: str) -> str:
    """The current format tag of ``kind``."""
    return _kind(kind).tag


def _kind(name: str) -> Kind:
    if name not in KINDS:
        raise UserError(f"unknown artifact kind {name!r}; use one of {', '.join(KINDS)}")
    return KINDS[name]


def _kind_of_doc(doc: Any) -> Optional[str]:
    if not isinstance(doc, dict):
        return None
    tag = doc.get("format")
    if not isinstance(tag, str):
        return None
    if tag in _BY_TAG:
        return _BY_TAG[tag]
    if tag == LEGACY_FINETUNE_FORMAT:   # the run record and the checkpoint shared this tag
        return "finetune.checkpoint" if "trainable" in doc or "optimizer" in doc else "finetune.run"
    return None


class _DuplicateKey(ValueError):
    def __init__(self, key):
        super().__init__(key)
        self.key = key


def _unique_pairs(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def loads_json(text: str, where: str) -> Any:
    """``json.loads`` that refuses a key repeated in one object (which plain ``json`` keeps silently:
    the last one wins) and nesting too deep to parse, with a :class:`UserError` naming ``where``.
    Syntax errors propagate as :class:`json.JSONDecodeError` for the caller to word."""
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except _DuplicateKey as e:
        raise UserError(f"{where}: the key {e.key!r} appears twice in one JSON object; each key (a language, "
                        f"a field) may appear once: remove the duplicate or regenerate the file") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply to read; it is not a langneurons file") from None
    except MemoryError:
        raise UserError(f"{where}: too large to read; it is not a langneurons file") from None


def _read(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"{path} does not exist; give the path of a file written by langneurons")
    if path.suffix == ".pt":
        import torch
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
            raise UserError(f"{path} is not a readable torch file ({e.__class__.__name__}); "
                            "delete it and rerun the command that wrote it") from None
    try:
        return loads_json(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e.__class__.__name__}: {e}); "
                        "rerun the langneurons command that wrote it") from None


def kind_of(path_or_doc: Union[str, os.PathLike, dict]) -> Optional[str]:
    """The kind of a document or file (``"ppl"``, ``"bridge.ranking"``...), ``None`` if untagged or unknown.

    A path that does not exist or does not parse raises :class:`UserError`.
    """
    if isinstance(path_or_doc, (str, os.PathLike)):
        return _kind_of_doc(_read(Path(path_or_doc)))
    return _kind_of_doc(path_or_doc)


def _type_name(t) -> str:
    return " or ".join(x.__name__ for x in t) if isinstance(t, tuple) else t.__name__


def validate(doc: Any, kind: Optional[str] = None, where: str = "document") -> dict:
    """Check that ``doc`` is a tagged langneurons artifact (of ``kind``, if given) with the keys its
    readers need; return it. Raises :class:`UserError` naming ``where`` and the fix."""
    if not isinstance(doc, dict):
        raise UserError(f"{where} holds a JSON {type(doc).__name__}, not a langneurons artifact; "
                        "give a file written by a langneurons command")
    found = _kind_of_doc(doc)
    if found is None:
        tag = doc.get("format")
        what = "no format tag" if tag is None else f"format {tag!r}, which this version does not know"
        raise UserError(f"{where} has {what}; give a file written by langneurons "
                        f"(tags langneurons.<kind>.vN; kinds: {', '.join(KINDS)})")
    k = KINDS[found]
    if kind is not None:
        want = _kind(kind)
        if found != kind:
            raise UserError(f"{where} is a {found} file ({k.tag}), not {kind} ({want.tag}); "
                            f"give a {want.files} file written by {want.writer}")
    bad = [f"{key!r} ({_type_name(t)})" for key, t in k.fields.items()
           if key not in doc or not isinstance(doc[key], t) or isinstance(doc[key], bool) and t is int]
    if bad:
        raise UserError(f"{where}: this {k.tag} file lacks {', '.join(bad)}; it is damaged or truncated, "
                        f"rerun {k.writer}")
    if k.loader:
        _loader(k)(doc, where)
    return doc


def _loader(k: Kind) -> Callable:
    module, qualname = k.loader.split(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def load(path: Union[str, os.PathLike], kind: Optional[str] = None) -> dict:
    """Read the artifact at ``path`` and :func:`validate` it (as ``kind``, when given); return the document."""
    path = Path(path)
    if kind is not None:
        _kind(kind)
    return validate(_read(path), kind, str(path))


def renderer(kind: str) -> Callable:
    """The report section of ``kind``: ``section(items, ctx) -> html`` (imported on first use)."""
    module, function = _kind(kind).section.rsplit(".", 1)
    return getattr(importlib.import_module(f"{__package__}.report.sections.{module}"), function)


def python_loader(kind: str) -> str:
    """How to load ``kind`` in Python, as text (the README's table)."""
    return _kind(kind).python
