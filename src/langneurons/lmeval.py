"""lm-evaluation-harness integration: the ``langneurons`` model (an ``HFLM`` with an intervention).

Importing this module registers the model name ``langneurons`` with lm-evaluation-harness. It is
the harness's HuggingFace model (``HFLM``) with every forward pass and every ``generate`` call
wrapped in :func:`langneurons.intervene.intervene`, so any harness task runs under a neuron
intervention. Model arguments, besides those of ``hf``:

===============  ===========================================================================
``neurons``      neuron-set JSON file (no intervention when absent)
``languages``    whose neurons are written, ``+``-separated (``zh`` or ``zh+ja``)
``operator``     ``zero``, ``set:p_max``, ``set:p90``, ``scale:2``, ``add:mean*0.5``, ...
``stats``        activation-statistics directory (statistic operators)
``site``         ``act`` (default), ``pre`` or ``product``
``positions``    ``all`` (default), ``prompt``, ``generated`` or ``last``
``stats_language``  take every value from this language's statistics (default: each neuron's own)
``arch``         module-path spec for layouts the adapter table does not know (default: the one
                 recorded in ``neurons``/``stats`` when ``collect`` was given ``--arch``)
===============  ===========================================================================

The harness has no plugin discovery, so run it through this module, which registers the model
and then starts the harness command line::

    python -m langneurons.lmeval run --model langneurons --device cuda:0 \\
        --model_args pretrained=Qwen/Qwen2.5-7B,neurons=runs/lape.json,languages=zh,operator=zero \\
        --tasks xnli_zh --include_path "$(python -c 'import langneurons.lmeval as m; print(m.TASKS_DIR)')"

(``--device`` goes on the command line, not in ``--model_args``, as for the harness's ``hf`` model.)

or, from Python, ``lm_eval.simple_evaluate(model=LangneuronsLM(...), tasks=[...],
task_manager=task_manager())``. :data:`TASKS_DIR` holds the local tasks of this package
(``langneurons_mc``: a small multilingual multiple-choice file that runs offline; see its YAML).

Padding. The harness right-pads log-likelihood batches without an attention mask; a causal model
never lets a padded position influence a real one, so the scores are exact, but the
intervention cannot tell those pads from tokens there (it is told about padding only through
``attention_mask``, which the harness does pass to ``generate``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("langneurons.lmeval needs lm-evaluation-harness: pip install 'langneurons[eval]' "
                      f"(or pip install lm-eval) ({e})") from e

from .errors import UserError

#: The local lm-evaluation-harness tasks of this package (pass it as ``include_path``).
TASKS_DIR = str(Path(__file__).resolve().parent / "lmeval_tasks")

__all__ = ["LangneuronsLM", "TASKS_DIR", "task_manager", "build_intervention"]


def build_intervention(neurons, languages, operator, stats=None, site: str = "act", positions: str = "all",
                       stats_language: Optional[str] = None):
    """An :class:`~langneurons.intervene.Intervention` from harness-style arguments (paths, ``a+b``)."""
    from .intervene import Intervention
    from .neuronset import NeuronSet
    from .stats import ActivationStats
    if not operator:
        raise UserError("model_args has neurons= but no operator=; add e.g. operator=zero or operator=set:p_max")
    if not languages:
        raise UserError("model_args has neurons= but no languages=; add e.g. languages=zh or languages=zh+ja")
    ns = neurons if isinstance(neurons, NeuronSet) else NeuronSet.load(str(neurons))
    st = stats
    if stats is not None and not isinstance(stats, ActivationStats):
        st = ActivationStats.load(str(stats))
    langs = languages if isinstance(languages, (list, tuple)) else [c for c in str(languages).split("+") if c]
    return Intervention(neurons=ns, languages=langs, operator=str(operator), stats=st, site=site,
                        positions=positions, stats_language=stats_language)


def _register(cls):
    # ``python -m langneurons.lmeval`` runs this file as ``__main__``; only the importable module
    # registers, so the name is never claimed twice by two copies of the class.
    return cls if __name__ == "__main__" else register_model("langneurons")(cls)


@_register
class LangneuronsLM(HFLM):
    """``HFLM`` whose forward passes and generations run under a neuron intervention.

    Without ``neurons`` it behaves exactly as the harness's ``hf`` model.
    """

    def __init__(self, pretrained, neurons=None, languages=None, operator=None, stats=None, site: str = "act",
                 positions: str = "all", stats_language: Optional[str] = None, arch: Optional[str] = None, **kwargs):
        super().__init__(pretrained=pretrained, **kwargs)
        from .runtime import Session, recorded_arch
        self.session = Session(self.model, self.tokenizer, arch=arch or recorded_arch(neurons, stats))
        self.intervention = None
        if neurons is not None:
            self.intervention = build_intervention(neurons, languages, operator, stats, site, positions,
                                                   stats_language)
        elif operator is not None or languages is not None:
            raise UserError("model_args has operator= or languages= but no neurons=; add neurons=FILE")

    def _intervened(self):
        return self.session.intervened(self.intervention)

    def _model_call(self, inps, attn_mask=None, labels=None):
        with self._intervened():
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        with self._intervened():
            return super()._model_generate(context, max_length, stop, **generation_kwargs)


def task_manager(**kwargs):
    """An lm-evaluation-harness ``TaskManager`` that also knows this package's local tasks."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=TASKS_DIR, **kwargs)


def main(argv=None) -> None:
    """The harness command line, with the ``langneurons`` model registered."""
    import sys
    from lm_eval.__main__ import cli_evaluate
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    from langneurons.lmeval import main as _main  # the registered copy
    _main()
