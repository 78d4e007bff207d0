"""Task fine-tuning: data readers, loss masks, schedule, metrics, bootstrap, resume, CLI, experiment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from langneurons.cli import main
from langneurons.errors import UserError
from langneurons.finetune import data as D
from langneurons.finetune.evaluate import qa_scores
from langneurons.tasks.xquad import answer_words, normalize_answer
from langneurons.finetune.experiment import paired_bootstrap
from langneurons.finetune.train import FinetuneConfig, TrainingStopped, lr_lambda, train

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
REPO = Path(__file__).resolve().parents[1]



TOPICS = {
    "sports": ["The team won the match by two goals.", "She ran the race in record time.",
               "The players trained on the field all week.", "Our club scored late in the game.",
               "The coach praised the young striker.", "Fans cheered as the ball hit the net."],
    "health": ["Doctors warn about the new virus.", "Eat vegetables to stay healthy.",
               "The hospital opened a new clinic.", "Patients received the vaccine today.",
               "Sleep helps the body recover.", "The nurse checked his blood pressure."],
    "travel": ["The train to Paris leaves at noon.", "Tourists visit the old castle every summer.",
               "Book your hotel before the trip.", "The flight was delayed by fog.",
               "We hiked through the mountains for days.", "The museum is close to the station."],
}


def _sib(dir_: Path, name: str = "train.tsv", repeat: int = 1) -> Path:
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / "labels.txt").write_text("\n".join(["travel", "sports", "health"]) + "\n")
    lines = ["index_id\tcategory\ttext"]
    k = 0
    for _ in range(repeat):
        for cat, texts in TOPICS.items():
            for t in texts:
                lines.append(f"{k}\t{cat}\t{t}")
                k += 1
    (dir_ / name).write_text("\n".join(lines) + "\n")
    return dir_ / name


def _squad(path: Path) -> Path:
    doc = {"data": [{"title": "t", "paragraphs": [
        {"context": "Paris is the capital of France. It lies on the Seine.",
         "qas": [{"id": "q1", "question": "What is the capital of France?", "answers": [{"text": "Paris", "answer_start": 0}]},
                 {"id": "q2", "question": "Which river?", "answers": [{"text": "the Seine", "answer_start": 42},
                                                                      {"text": "Seine", "answer_start": 46}]}]},
        {"context": "Water boils at 100 degrees.",
         "qas": [{"id": "q3", "question": "At what temperature does water boil?",
                  "answers": [{"text": "100 degrees", "answer_start": 15}]},
                 {"id": "q4", "question": "No answer here?", "answers": []}]}]}]}
    path.write_text(json.dumps(doc))
    return path


# ------------------------------------------------------------------------------------ data
def test_load_sib200_uses_labels_txt_order(tmp_path):
    p = _sib(tmp_path)
    d = D.load_sib200(p)
    assert d.label_names == ["travel", "sports", "health"]
    assert len(d) == 18
    assert d.labels[:6] == [1] * 6 and d.labels[6:12] == [2] * 6 and d.labels[12:] == [0] * 6
    assert d.texts[0] == TOPICS["sports"][0] and d.ids[0] == "0"
    bad = tmp_path / "bad" / "x.tsv"
    bad.parent.mkdir()
    bad.write_text("index_id\tcategory\ttext\n1\tweather\tRain.\n")
    with pytest.raises(UserError, match="not among the labels"):
        D.load_sib200(bad, label_names=["travel"])


def test_load_nli_names_and_ints(tmp_path):
    p = tmp_path / "mnli.tsv"
    p.write_text("premise\thypo\tlabel\nA man.\tA person.\tentailment\nA dog.\tA cat.\tcontradiction\n"
                 "X.\tY.\t-\nS.\tT.\tneutral\n")
    d = D.load_nli(p)
    assert d.labels == [0, 2, 1] and d.texts[1] == ("A dog.", "A cat.")
    q = tmp_path / "xnli.tsv"
    q.write_text("id\tpremise\thypothesis\tlabel\n7\tP\tH\t2\n8\tP2\tH2\t0\n")
    d = D.load_nli(q)
    assert d.labels == [2, 0] and d.ids == ["7", "8"]


def test_load_squad(tmp_path):
    d = D.load_squad(_squad(tmp_path / "s.json"))
    assert d.ids == ["q1", "q2", "q3"]            # q4 has no answer
    assert d.answers[1] == ["the Seine", "Seine"]
    with pytest.raises(UserError, match="SQuAD"):
        (tmp_path / "x.json").write_text('{"data": [{"nope": 1}]}')
        D.load_squad(tmp_path / "x.json")


def test_load_matches_the_task_readers(tmp_path):
    """Fine-tuning data and task documents come from the same reader of each file format."""
    from langneurons.tasks import get_task

    sib = tmp_path / "sib" / "eng_Latn" / "test.tsv"
    sib.parent.mkdir(parents=True)
    sib.write_text("index_id\tcategory\ttext\n3\tsports\tThe team won.\n\t\t\n5\ttravel\tThe train left.\n"
                   "9\thealth\tEat well.\n")
    d = D.load_sib200(sib)
    docs = get_task("sib200").load(str(tmp_path / "sib"), "en")
    assert d.ids == ["3", "5", "9"] and d.label_names == ["health", "sports", "travel"]
    assert d.texts == [x["text"] for x in docs] and [d.label_names[y] for y in d.labels] == [x["category"] for x in docs]

    nli = tmp_path / "xnli_test_en.tsv"
    nli.write_text("id\tpremise\thypothesis\tlabel\n7\tA man.\tA person.\t0\n8\tA dog.\tA cat.\t2\n9\tS.\tT.\t1\n")
    d = D.load_nli(nli)
    docs = get_task("xnli").load(str(nli), "en")
    assert d.ids == ["7", "8", "9"]
    assert d.texts == [(x["premise"], x["hypothesis"]) for x in docs] and d.labels == [x["label"] for x in docs]

    sq = tmp_path / "xquad.en.json"
    sq.write_text(json.dumps({"data": [{"paragraphs": [
        {"context": "Paris is in France.", "qas": [{"id": "a", "question": "Where is Paris?",
                                                    "answers": [{"text": "France"}, {"text": "in France"}]}]},
        {"context": "Water boils.", "qas": [{"question": "What boils?", "answers": [{"text": "Water"}]}]}]}]}))
    d = D.load_squad(sq)
    docs = get_task("xquad").load(str(sq), "en")
    assert d.ids == ["a", "1"] == [x["id"] for x in docs]
    assert (d.contexts, d.questions, d.answers) == ([x["context"] for x in docs], [x["question"] for x in docs],
                                                   [x["answers"] for x in docs])


def test_select_fraction_and_batches():
    assert D.select_fraction(10, 0.3, "first", 0) == [0, 1, 2]
    a = D.select_fraction(100, 0.25, "random", 3)
    assert len(a) == 25 and a == D.select_fraction(100, 0.25, "random", 3) and a != D.select_fraction(100, 0.25, "random", 4)
    order = D.batches(10, 4, 2.0, 0)
    assert [len(b) for b in order] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(order[:3], [])) == list(range(10))
    assert len(D.batches(10, 4, 0.5, 0)) == 2


def test_lr_schedule_by_hand():
    f = lr_lambda(total=10, warmup=2)
    assert [round(f(t), 6) for t in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    g = lr_lambda(total=4, warmup=0)
    assert [g(t) for t in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_qa_sequences_mask_the_prompt(demo_model, tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(demo_model)
    d = D.load_squad(_squad(tmp_path / "s.json"))
    enc = D.encode_qa(tok, d, max_length=24)
    for e in enc:
        assert len(e.prompt) + len(e.answer) <= 24
        assert e.answer[-1] == tok.eos_token_id
        assert tok.decode(e.prompt).rstrip().endswith("Answer:")     # the question part is never cut
    seqs, labs = D.qa_training_sequences(enc, "answer")
    for e, s, y in zip(enc, seqs, labs):
        assert s == e.prompt + e.answer
        assert y == [-100] * len(e.prompt) + e.answer
    seqs2, labs2 = D.qa_training_sequences(enc, "m25")
    assert labs2 == seqs2
    with pytest.raises(UserError, match="qa-loss"):
        D.qa_training_sequences(enc, "bogus")


def test_qa_metrics_by_hand():
    assert normalize_answer("The  Seine!") == "seine"
    assert answer_words("北京大学", mixed=True) == ["北", "京", "大", "学"]
    assert answer_words("北京大学") == ["北京大学"]
    s = qa_scores("in the Seine river", ["the Seine"])
    assert s["em"] == 0.0 and s["f1"] == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert qa_scores("Seine", ["Paris", "the Seine"])["em"] == 1.0
    assert qa_scores("北京", ["北京大学"])["f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)


# ------------------------------------------------------------------------------------ bootstrap
def test_paired_bootstrap_by_hand():
    x = np.array([[1, 1, 1, 1], [1, 1, 1, 1]], dtype=float)
    y = np.zeros_like(x)
    r = paired_bootstrap(x, y, 500)
    assert r["diff"] == 1.0 and r["ci95"] == [1.0, 1.0] and r["p"] == pytest.approx(1 / 501)
    same = paired_bootstrap(x, x, 500)
    assert same["diff"] == 0.0 and same["p"] == 1.0
    # mixed differences that cancel exactly: D = 0, p = 1
    half = np.array([[1, 0, 1, 0]], dtype=float)
    assert paired_bootstrap(half, half[:, ::-1].copy(), 200)["p"] == 1.0
    # noisy data: the interval holds D and the p-value matches the normal approximation of the
    # bootstrap distribution of a mean (sd of the example differences / sqrt(N))
    from math import erf, sqrt
    rng = np.random.default_rng(0)
    a = (rng.random((3, 400)) < 0.6).astype(float)
    b = (rng.random((3, 400)) < 0.6).astype(float)
    r = paired_bootstrap(a, b, 4000)
    assert r["diff"] == pytest.approx(a.mean() - b.mean())
    assert r["ci95"][0] < r["diff"] < r["ci95"][1]
    d = (a - b).mean(0)
    z = abs(d.mean()) / (d.std() / sqrt(d.size))
    p_normal = 2 * (1 - 0.5 * (1 + erf(z / sqrt(2))))
    assert r["p"] == pytest.approx(p_normal, abs=0.01)


# ------------------------------------------------------------------------------------ training
def _cfg(demo_model, train_file, out, **kw) -> FinetuneConfig:
    base = dict(model=str(demo_model), task="sib200", train=str(train_file), out=out, lr=5e-3, max_steps=6,
                batch_size=4, grad_accum=2, max_length=32, progress=False, device="cpu", checkpoint_every=2,
                dropout=0.1)
    base.update(kw)
    return FinetuneConfig.build(**base)


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file
    w = load_file(str(out / "adapter_model.safetensors"))
    w.update({f"head.{k}": v for k, v in load_file(str(out / "classifier_head.safetensors")).items()})
    return w


def _hand_neurons(path: Path, L=4, I=384) -> Path:
    from langneurons.neuronset import NeuronSet
    g = torch.Generator().manual_seed(0)
    r = torch.rand(L, I, generator=g)
    ns = NeuronSet.from_masks({"en": r < 0.03, "fr": r > 0.97}, {"num_layers": L, "width": I, "site": "act"},
                              {"name": "hand"})
    ns.save(path)
    return path


def test_resume_equals_uninterrupted(demo_model, tmp_path):
    train_file = _sib(tmp_path / "data")
    ns = _hand_neurons(tmp_path / "ns.json")
    kw = dict(neurons=str(ns), neuron_langs="en", mlp_modules="gate,down")
    full = train(_cfg(demo_model, train_file, tmp_path / "full", **kw))
    with pytest.raises(TrainingStopped):
        train(_cfg(demo_model, train_file, tmp_path / "resumed", **kw), stop_after=3)
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    assert not (tmp_path / "resumed" / "langneurons_finetune.json").exists()
    resumed = train(_cfg(demo_model, train_file, tmp_path / "resumed", **kw))
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full.record["steps"] == resumed.record["steps"] == 6
    assert not (tmp_path / "resumed" / "checkpoint.pt").exists()
    assert resumed.mask.max_masked() == 0.0
    # a finished run is loaded, not retrained; other settings in the same directory are refused
    again = train(_cfg(demo_model, train_file, tmp_path / "full", **kw))
    assert again.record["fingerprint"] == full.record["fingerprint"]
    with pytest.raises(UserError, match="other settings"):
        train(_cfg(demo_model, train_file, tmp_path / "full", lr=1e-3, **kw))


def test_training_learns_a_separable_toy_task(demo_model, tmp_path):
    train_file = _sib(tmp_path / "data", repeat=2)
    tm = train(_cfg(demo_model, train_file, tmp_path / "out", max_steps=40, batch_size=8, grad_accum=1, lr=3e-3,
                    head_lr=2e-2, pooling="mean"))
    assert tm.record["loss_last"] < tm.record["loss_first"]
    res = tm.evaluate(D.load_sib200(train_file))
    assert res["accuracy"] > 0.6            # training accuracy on three topics (chance 1/3)


def test_nli_pairs_train_with_the_m25_preset(demo_model, tmp_path):
    p = tmp_path / "nli.tsv"
    rows = ["premise\thypo\tlabel"] + [f"A man plays {w}.\tSomeone plays.\t{lab}" for w, lab in
                                        [("golf", "entailment"), ("chess", "neutral"), ("tennis", "contradiction")] * 4]
    p.write_text("\n".join(rows) + "\n")
    cfg = FinetuneConfig.build(preset="m25-xnli", model=str(demo_model), task="nli", train=str(p), out=tmp_path / "o",
                               progress=False, device="cpu", max_length=32)
    tm = train(cfg)
    assert tm.record["train_examples"] == 3            # 25 % of 12 pairs
    assert tm.record["steps"] == 1 and tm.label_names == list(D.NLI_LABELS)
    res = tm.evaluate(D.load_nli(p))
    assert res["n"] == 12 and set(res["predictions"]) <= {0, 1, 2}


def test_qa_training_and_generation(demo_model, tmp_path):
    sq = _squad(tmp_path / "s.json")
    tm = train(FinetuneConfig.build(model=str(demo_model), task="qa", train=str(sq), out=tmp_path / "qa", lr=1e-2,
                                    max_steps=3, batch_size=3, max_length=64, progress=False, device="cpu",
                                    attn_modules="q,v"))
    res = tm.evaluate(D.load_squad(sq), max_new_tokens=4)
    assert res["n"] == 3 and len(res["predictions"]) == 3
    assert 0.0 <= res["f1"] <= 100.0 and "em_tokens" in res
    assert (tmp_path / "qa" / "adapter_config.json").is_file()
    assert not (tmp_path / "qa" / "classifier_head.safetensors").exists()


def test_cli_train_then_eval_and_peft_loading(demo_model, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    train_file = _sib(tmp_path / "data")
    ns = _hand_neurons(tmp_path / "ns.json")
    out = tmp_path / "run"
    rc = main(["finetune", "train", "--model", str(demo_model), "--task", "sib200", "--train", str(train_file),
               "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--max-length", "32", "--lr", "1e-3",
               "--neurons", str(ns), "--languages", "en,fr", "--mlp-modules", "gate,up,down", "--quiet",
               "--eval", f"en={train_file}", "--device", "cpu"])
    assert rc == 0
    for f in ("adapter_config.json", "adapter_model.safetensors", "langneurons_mask.json",
              "classifier_head.safetensors", "langneurons_finetune.json", "eval.json"):
        assert (out / f).is_file(), f
    mask = json.loads((out / "langneurons_mask.json").read_text())
    assert mask["languages"] == ["en", "fr"] and mask["mlp_modules"] == ["gate", "up", "down"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_model), str(out))
    assert any("mlp.gate_proj.lora_B" in n for n, _ in model.named_parameters())
    capsys.readouterr()
    rc = main(["finetune", "eval", "--run", str(out), "--data", f"en={train_file}", "--out", str(tmp_path / "e.json"),
               "--quiet", "--device", "cpu"])
    assert rc == 0
    doc = json.loads((tmp_path / "e.json").read_text())
    first = json.loads((out / "eval.json").read_text())
    assert doc["metrics"]["en"]["accuracy"] == first["metrics"]["en"]["accuracy"]
    assert doc["scores"]["en"] == first["scores"]["en"]
    # bad input: one line, exit 2
    capsys.readouterr()
    rc = main(["finetune", "train", "--model", str(demo_model), "--task", "sib200", "--train", str(train_file),
               "--out", str(tmp_path / "x"), "--neurons", str(ns), "--languages", "xx", "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no language xx" in err and "\n" not in err


def test_presets_and_explicit_overrides():
    c = FinetuneConfig.build(preset="m25-xnli", model="m", task="nli", train="t", out=Path("o"))
    assert (c.r, c.alpha, c.lr, c.epochs, c.data_fraction, c.batch_size) == (8, 16.0, 1e-5, 1.0, 0.25, 8)
    assert (c.beta1, c.beta2, c.weight_decay, c.warmup_ratio, c.grad_clip) == (0.95, 0.999, 0.1, 0.01, 10.0)
    c = FinetuneConfig.build(preset="m25-xquad", model="m", task="qa", train="t", out=Path("o"), lr=1e-4)
    assert (c.r, c.alpha, c.lr, c.epochs, c.attn_modules) == (64, 128.0, 1e-4, 10.0, "q,k,v")
    with pytest.raises(UserError, match="preset"):
        FinetuneConfig.build(preset="nope", model="m", task="qa", train="t", out=Path("o"))


def test_experiment_end_to_end_small(demo_model, demo_stats, tmp_path):
    from langneurons.finetune.experiment import ExperimentConfig, run_experiment
    dd = tmp_path / "data"
    train_file = _sib(dd)
    ns = _hand_neurons(tmp_path / "ns.json")
    ops = ["set:mean"]
    cfg = ExperimentConfig(model=str(demo_model), train=str(train_file), eval={"en": str(train_file), "fr": str(train_file)},
                           neurons=str(ns), out=tmp_path / "exp", seeds=[0, 1],
                           conditions=["attn", "ln-target", "rand-target"], interventions=ops, stats=str(demo_stats),
                           bootstrap=200, progress=False,
                           train_options=dict(lr=1e-3, max_steps=2, batch_size=6, max_length=32, device="cpu"))
    res = run_experiment(cfg)
    for f in ("results.json", "table.md", "plot.png"):
        assert (tmp_path / "exp" / f).is_file()
    t = res["table"]
    assert set(t["attn"]) == {"en", "fr"}
    # target conditions train one model per target language; their source column would repeat
    # ln-source/rand-source, which this run leaves out
    assert set(t["ln-target"]) == {"fr"}
    assert len(t["rand-target"]["fr"]["per_seed"]) == 2
    assert "fr" in res["ln_vs_random"]["target"]
    if ops:
        assert "fr" in t["attn+set:mean"]
    # rerun resumes: nothing is retrained, same numbers
    res2 = run_experiment(cfg)
    assert res2["table"]["attn"]["fr"]["per_seed"] == t["attn"]["fr"]["per_seed"]
    md = (tmp_path / "exp" / "table.md").read_text()
    assert "| attn |" in md and "matched random" in md


def test_cli_experiment(demo_model, tmp_path, capsys):
    train_file = _sib(tmp_path / "data")
    ns = _hand_neurons(tmp_path / "ns.json")
    out = tmp_path / "exp"
    args = ["finetune", "experiment", "--model", str(demo_model), "--task", "sib200", "--train", str(train_file),
            "--eval", f"en={train_file}", "--eval", f"fr={train_file}", "--neurons", str(ns), "--seeds", "0,1",
            "--conditions", "attn,ln-source,rand-source", "--max-steps", "1", "--batch-size", "4", "--max-length", "24",
            "--bootstrap", "50", "--out", str(out), "--quiet", "--device", "cpu"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0, 1] and res["conditions"] == ["attn", "ln-source", "rand-source"]
    assert set(res["table"]["rand-source"]) == {"en", "fr"}
    assert "| ln-source |" in capsys.readouterr().out
    bad = [a if a != "attn,ln-source,rand-source" else "ln-source" for a in args]
    bad[bad.index(str(out))] = str(tmp_path / "bad")
    assert main(bad) == 2
    assert "must include attn" in capsys.readouterr().err


@pytest.mark.slow
def test_experiment_workers_match_one_process(demo_model, tmp_path):
    """Spawned worker processes (one thread each) reproduce the one-process numbers exactly."""
    import dataclasses
    from langneurons.finetune.experiment import ExperimentConfig, run_experiment
    train_file = _sib(tmp_path / "data")
    ns = _hand_neurons(tmp_path / "ns.json")
    cfg = ExperimentConfig(model=str(demo_model), train=str(train_file), eval={"en": str(train_file), "fr": str(train_file)},
                           neurons=str(ns), out=tmp_path / "one", seeds=[0, 1], conditions=["attn", "ln-target"],
                           bootstrap=100, progress=False,
                           train_options=dict(lr=1e-3, max_steps=2, batch_size=6, max_length=32, device="cpu"))
    a = run_experiment(cfg)
    b = run_experiment(dataclasses.replace(cfg, out=tmp_path / "two"), workers=2, threads_per_worker=1)
    assert a["scores"] == b["scores"]


# ------------------------------------------------------------------------------------ real data
def test_sib200_english_above_chance(shared_model, shared_data, tmp_path):
    """English SIB-200 (7 topics) on the tiny shared model: well above chance (1/7) and above the
    majority class (25 % of the test split). Mean pooling: the tiny model's last token carries little
    topic information (a frozen linear probe gets ~27 % from it, ~37 % from the mean)."""
    sib = shared_data / "sib200"
    if not (sib / "eng_Latn" / "test.tsv").is_file():
        pytest.skip(f"needs {sib} (SIB-200 in the shared data)")
    tm = train(FinetuneConfig.build(model=str(shared_model), task="sib200", train=str(sib / "eng_Latn" / "train.tsv"),
                                    out=tmp_path / "sib", lr=2e-3, head_lr=3e-2, max_steps=100, batch_size=16,
                                    max_length=64, pooling="mean", progress=False, device="cpu", warmup_ratio=0.05))
    test = D.load_sib200(sib / "eng_Latn" / "test.tsv", tm.label_names)
    res = tm.evaluate(test, batch_size=64, max_length=128)
    majority = max(np.bincount(test.labels)) / res["n"]
    assert majority == pytest.approx(51 / 204)
    assert res["accuracy"] > majority + 0.05, (res["accuracy"], majority)


@pytest.mark.slow
def test_crosslingual_sib200_script(shared_model, shared_stats, tmp_path):
    out = tmp_path / "xling"
    r = subprocess.run([sys.executable, str(REPO / "experiments" / "crosslingual_sib200.py"), "--model", str(shared_model),
                        "--stats", str(shared_stats), "--out", str(out), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert len(res["languages"]) >= 8 and len(res["seeds"]) >= 3
    assert (out / "table.md").is_file() and (out / "plot.png").is_file()
    assert res["table"]["attn"]["en"]["mean"] > 1 / 7
