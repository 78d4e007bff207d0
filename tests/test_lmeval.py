"""The lm-evaluation-harness model ``langneurons`` and the local task ``langneurons_mc``, offline."""

from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed "
                                                "(pip install 'langneurons[eval]' or pip install lm-eval)")

from langneurons.errors import UserError  # noqa: E402
from langneurons.lmeval import TASKS_DIR, LangneuronsLM, build_intervention  # noqa: E402




@pytest.fixture(scope="module")
def offline():
    import datasets
    import huggingface_hub.constants
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    # the libraries read those variables at import time: set the flags they already hold too
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if hasattr(datasets.config, flag):
            mp.setattr(datasets.config, flag, True)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def manager(offline):
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=TASKS_DIR, include_defaults=False)


@pytest.fixture(scope="module")
def neuron_file(demo_model, tmp_path_factory):
    from langneurons.neuronset import NeuronSet
    cfg = json.loads((demo_model / "config.json").read_text())
    L, I = cfg["num_hidden_layers"], cfg["intermediate_size"]
    g = torch.Generator().manual_seed(0)
    masks = {c: torch.rand(L, I, generator=g) < 0.3 for c in ("zh", "fr", "en")}
    path = tmp_path_factory.mktemp("ns") / "ns.json"
    NeuronSet.from_masks(masks, {"num_layers": L, "width": I, "site": "act", "model_type": "llama"},
                         {"name": "random"}).save(path)
    return path


def _run(lm, manager):
    res = lm_eval.simple_evaluate(model=lm, tasks=["langneurons_mc"], task_manager=manager, log_samples=True)
    samples = sorted(res["samples"]["langneurons_mc"], key=lambda s: s["doc_id"])
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    return res["results"]["langneurons_mc"], [s["doc"] for s in samples], lls


def test_registered():
    from lm_eval.api.registry import get_model
    assert get_model("langneurons") is LangneuronsLM


def test_local_task_runs_offline_and_only_interventions_change_scores(demo_model, neuron_file, manager):
    from langneurons.intervene import intervene
    from langneurons.runtime import Session
    lm = LangneuronsLM(pretrained=str(demo_model), device="cpu", batch_size=8)
    assert lm.intervention is None
    res0, docs, ll0 = _run(lm, manager)
    assert len(docs) == 16 and all(len(x) == len(d["choices"]) for x, d in zip(ll0, docs))

    iv = build_intervention(str(neuron_file), "zh+fr", "zero")
    lm.intervention = iv
    res1, _, ll1 = _run(lm, manager)
    changed = sum(abs(a - b) > 1e-4 for x, y in zip(ll0, ll1) for a, b in zip(x, y))
    assert changed == sum(len(x) for x in ll0)  # every continuation's score moved

    # the harness's numbers equal langneurons' own scorer (same pair encoding, BOS from the tokenizer)
    scorer = Session(lm.model, lm.tokenizer, batch_size=8)
    pairs = [(d["context"], c) for d in docs for c in d["choices"]]
    mine0 = [x for x, _ in scorer.loglikelihood(pairs)]
    with intervene(lm.model, iv):
        mine1 = [x for x, _ in scorer.loglikelihood(pairs)]
    flat0 = [v for x in ll0 for v in x]
    flat1 = [v for x in ll1 for v in x]
    assert max(abs(a - b) for a, b in zip(mine0, flat0)) < 1e-5
    assert max(abs(a - b) for a, b in zip(mine1, flat1)) < 1e-5
    acc = sum(int(max(range(len(x)), key=x.__getitem__) == d["label"]) for x, d in zip(ll1, docs)) / len(docs)
    assert res1["acc,none"] == pytest.approx(acc)
    lm.intervention = None
    _, _, ll2 = _run(lm, manager)
    assert ll2 == ll0  # without an intervention the scores are the baseline's again, bit for bit


def test_model_args_string(demo_model, neuron_file, offline):
    lm = LangneuronsLM.create_from_arg_string(
        f"pretrained={demo_model},neurons={neuron_file},languages=zh+fr,operator=scale:2,positions=last",
        {"device": "cpu", "batch_size": 2})
    iv = lm.intervention
    assert iv.languages == ["zh", "fr"] and iv.operator == "scale:2" and iv.positions == "last"
    assert iv.site == "act"


def test_bad_model_args(demo_model, neuron_file):
    with pytest.raises(UserError, match="no operator="):
        build_intervention(str(neuron_file), "zh", None)
    with pytest.raises(UserError, match="no languages="):
        build_intervention(str(neuron_file), None, "zero")
    with pytest.raises(UserError, match="unknown language 'xx'"):
        build_intervention(str(neuron_file), "xx", "zero")
    with pytest.raises(UserError, match="no neurons="):
        LangneuronsLM(pretrained=str(demo_model), device="cpu", operator="zero")


def test_local_task_file_filters_by_language(offline):
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("langneurons_lmeval_task_utils", Path(TASKS_DIR) / "utils.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ds = mod.load_local()
    assert len(ds["test"]) == 16
    fr = mod.load_local(lang="fr")["test"]
    assert len(fr) == 3 and set(fr["lang"]) == {"fr"}
    assert (Path(TASKS_DIR) / "langneurons_mc.yaml").is_file()


def test_generation_under_intervention_matches_own_generator(demo_model, neuron_file, offline):
    from lm_eval.api.instance import Instance
    from langneurons.intervene import intervene
    from langneurons.runtime import Session
    lm = LangneuronsLM(pretrained=str(demo_model), device="cpu", batch_size=2)
    prompts = ["The cat", "Le chat est", "Die Sonne"]
    reqs = [Instance(request_type="generate_until", doc={}, idx=0,
                     arguments=(p, {"until": ["\n"], "max_gen_toks": 8, "do_sample": False})) for p in prompts]
    scorer = Session(lm.model, lm.tokenizer, batch_size=2)
    plain = lm.generate_until(reqs)
    assert [x.strip() for x in plain] == scorer.generate(prompts, 8, stop=("\n",), strip=True)
    lm.intervention = build_intervention(str(neuron_file), "zh", "zero")
    steered = lm.generate_until(reqs)
    with intervene(lm.model, lm.intervention):
        assert [x.strip() for x in steered] == scorer.generate(prompts, 8, stop=("\n",), strip=True)
    assert steered != plain
