"""The runtime: one shape contract for hooks, the passes of steer/eval/bridge on every architecture of
the adapter table, ``--arch`` given once at collect time and read back by every later command, and
the shared command-line vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from langneurons.cli import main
from langneurons.hooks import observe, write
from langneurons.runtime import Session, pad_rows, recorded_arch
from langneurons.testing import TINY_CONFIGS, tiny_model

ARCHS = sorted(TINY_CONFIGS)
SPEC = "layers=layers,gate=mlp.gate_proj,up=mlp.up_proj,act=mlp.act_fn,down=mlp.down_proj"


@pytest.fixture(scope="module")
def tok(demo_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(demo_model)


# ------------------------------------------------------------------------------------------ shape contract
@pytest.mark.parametrize("model_type", ["opt", "llama", "gpt2"])
def test_hooks_see_b_t_i_and_writes_keep_the_module_shape(model_type):
    """OPT runs its MLP on [B*T, I]; every hook still sees [B, T, I], and a write through the hook
    changes exactly the (b, t, j) it names."""
    m = tiny_model(model_type, dtype=torch.float64)
    s = Session(m, None)
    ids, mask = pad_rows([[1, 5, 9, 4], [1, 8, 3]], 0, "right")
    shapes = []
    with observe(s.adapter, "act", lambda l, t: shapes.append(tuple(t.shape))):
        s.forward(ids, mask)
    assert shapes and all(sh == (2, 4, s.adapter.width) for sh in shapes)
    seen = {}

    def bump(layer, t):
        assert t.dim() == 3
        t = t.clone()
        t[1, 2, 3] += 5.0
        return t
    with observe(s.adapter, "act", lambda l, t: seen.__setitem__(l, t.clone())):
        base = s.forward(ids, mask)
    with write(s.adapter, "act", bump, [0]):
        with observe(s.adapter, "act", lambda l, t: seen.__setitem__(("w", l), t.clone()), layers=[0]):
            moved = s.forward(ids, mask)
    assert not torch.equal(base[1, 2:], moved[1, 2:]) and torch.equal(base[0], moved[0])
    assert torch.equal(base[1, :2], moved[1, :2])        # causal: earlier positions are untouched


# ------------------------------------------------------------------------------------------ every architecture
@pytest.mark.parametrize("model_type", ARCHS)
def test_steer_eval_and_probe_passes_on_every_architecture(model_type, tok):
    """The passes behind ``steer`` (LSS, sampled generation under an intervention), ``eval`` (choice and
    letter tasks) and ``bridge probe`` (mean activations) on a tiny model of each adapter-table type."""
    from langneurons.bridge import probe
    from langneurons.intervene import Intervention
    from langneurons.neuronset import NeuronSet
    from langneurons.steer import ClozeItem, generation_shares, lss
    from langneurons.tasks import get_task
    m = tiny_model(model_type, vocab_size=len(tok))
    s = Session(m, tok, batch_size=2)
    L, I = s.adapter.num_layers, s.adapter.width
    ns = NeuronSet({"en": [[l, j] for l in range(L) for j in range(0, I, 3)],
                    "fr": [[l, j] for l in range(L) for j in range(1, I, 3)]},
                   {"num_layers": L, "width": I, "site": "act"}, {"name": "test"})
    # steer: LSS with a strong intervention moves at least one log-likelihood; generation runs with a cache
    items = [ClozeItem("1", {"en": "one, two,", "fr": "un, deux,"}, {"en": "three", "fr": "trois"}, {}),
             ClozeItem("2", {"en": "red, blue,", "fr": "rouge, bleu,"}, {"en": "green", "fr": "vert"}, {})]
    res = lss(s, items, ["en", "fr"], lambda t: Intervention(ns, [t], "scale:8"))
    assert res["items"][0][1] == 2 and res["mean_shift"][0][1] != 0.0
    g = generation_shares(s, ["en", "fr"], lambda t: Intervention(ns, [t], "scale:8"), prompts=("", "1."),
                          samples=1, max_new_tokens=3, identifier=_FirstLetter())
    assert set(g["share"]) == {"en", "fr"}
    # eval: a choice task and a letter task, with and without an intervention
    docs = [{"premise": "The man opened the tap.", "choice1": "The toilet filled.", "choice2": "Water flowed.",
             "question": "effect", "label": 1}]
    task = get_task("xcopa")
    docs = task.from_records(docs, "it", "test") if hasattr(task, "from_records") else docs
    a = task.evaluate(s, docs, "it")
    with s.intervened(Intervention(ns, ["en"], "zero")):
        b = task.evaluate(s, docs, "it")
    assert set(a) >= {"acc"} and set(b) >= {"acc"}
    assert len(s.choose(["Question?\nA. x\nB. y\nC. z\nD. w\nAnswer:"])) == 1
    # bridge probe: mean activations over the prompt tokens equal the hooks' unpadded mean
    prompts = ['Deutsch:"Haus"→中文:', 'English:"a longer word here"→Français:']
    acts = probe.build_probes(s, {"Haus": ["x"], "Hund": ["y"]}, "de", "en", {"de": "Deutsch", "en": "English"},
                              "none").acts
    assert acts.shape == (L, I, 2) and bool(torch.isfinite(acts).all())
    one = Session(m, tok, batch_size=1).mean_activations(prompts)
    torch.testing.assert_close(s.mean_activations(prompts), one, atol=1e-5, rtol=1e-4)


class _FirstLetter:
    """A language identifier stand-in (langid is an optional extra): 'en' for ASCII-initial text,
    with the identifier's interface (``languages``, per-text ``labels``, ``shares``)."""

    languages = ["en", "fr"]

    def labels(self, texts):
        return ["en" if t[:1].isascii() else "fr" for t in texts]

    def shares(self, texts):
        labels = self.labels(texts)
        return {c: sum(x == c for x in labels) / max(1, len(labels)) for c in self.languages}


# ------------------------------------------------------------------------------------------ --arch once
@pytest.fixture(scope="module")
def granite(tok, tmp_path_factory):
    """A tiny model whose MLP the adapter cannot recognise (intermediate == hidden size): it needs --arch."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from langneurons.testing import SPECIAL_IDS
    d = tmp_path_factory.mktemp("granite")
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("granite", vocab_size=len(tok), hidden_size=32, intermediate_size=32,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256, **SPECIAL_IDS)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    m.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    return d


def test_arch_given_to_collect_is_read_back_by_every_later_command(granite, demo_model, tmp_path, capsys):
    d, model = granite, str(granite / "model")
    corpus = {c: demo_model / "heldout" / f"{c}.txt" for c in ("en", "fr", "zh")}
    common = ["--model", model, "--device", "cpu"]
    lang_args = [a for c, f in corpus.items() for a in ("--lang", f"{c}={f}")]
    out = tmp_path
    # without --arch the model is refused with one line
    rc = main(["collect", *common, *lang_args, "--out", str(out / "nostats"), "--window", "32",
               "--max-tokens", "512", "--no-cache", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--arch" in err[0]
    assert main(["collect", *common, "--arch", SPEC, *lang_args, "--out", str(out / "stats"), "--window", "32",
                 "--max-tokens", "512", "--batch-size", "8", "--no-cache", "--quiet"]) == 0
    assert recorded_arch(out / "stats") is not None
    assert main(["identify", "lape", "--stats", str(out / "stats"), "--out", str(out / "ns.json"),
                 "--top-rate", "0.1"]) == 0
    assert json.loads((out / "ns.json").read_text())["model"]["arch"] == recorded_arch(out / "stats")
    capsys.readouterr()
    # none of these repeats --arch
    assert main(["ppl", *common, "--neurons", str(out / "ns.json"), *lang_args[:4], "--out", str(out / "ppl"),
                 "--window", "32", "--max-tokens", "128", "--random-seeds", "none", "--no-cache", "--quiet"]) == 0
    assert main(["steer", *common, "--neurons", str(out / "ns.json"), "--target", "zh", "--operator", "zero",
                 "--prompt", "The", "--max-new-tokens", "3"]) == 0
    xc = out / "xcopa"
    xc.mkdir()
    (xc / "test.zh.jsonl").write_text(json.dumps({"premise": "男人打开了水龙头。", "choice1": "马桶满了。",
                                                  "choice2": "水流了出来。", "question": "effect", "label": 1},
                                                 ensure_ascii=False) + "\n", encoding="utf-8")
    assert main(["eval", "xcopa", *common, "--languages", "zh", "--data", str(xc), "--neurons", str(out / "ns.json"),
                 "--operator", "zero", "--setting", "none,self", "--out", str(out / "eval"), "--quiet"]) == 0
    (out / "dict.txt").write_text("Haus house\nHund dog\n", encoding="utf-8")
    assert main(["bridge", "probe", *common, "--stats", str(out / "stats"), "--dict", str(out / "dict.txt"),
                 "--pair", "de-en", "--filter", "none", "--out", str(out / "probe")]) == 0
    nli = out / "nli.tsv"
    nli.write_text("premise\thypothesis\tlabel\nA man sleeps.\tA person rests.\tentailment\n"
                   "A dog runs.\tA cat sleeps.\tcontradiction\nIt rains.\tThe sky is dark.\tneutral\n"
                   "Kids play.\tChildren are playing.\tentailment\n", encoding="utf-8")
    assert main(["finetune", "train", "--model", model, "--task", "nli", "--train", str(nli), "--out",
                 str(out / "ft"), "--neurons", str(out / "ns.json"), "--languages", "en", "--max-steps", "1",
                 "--batch-size", "2", "--device", "cpu", "--quiet"]) == 0
    # every model-loading command also takes --arch itself (here: a neuron set that records none)
    doc = json.loads((out / "ns.json").read_text())
    del doc["model"]["arch"]
    (out / "plain.json").write_text(json.dumps(doc))
    capsys.readouterr()
    base = ["steer", *common, "--neurons", str(out / "plain.json"), "--target", "zh", "--operator", "zero",
            "--prompt", "The", "--max-new-tokens", "2"]
    assert main(base) == 2 and "--arch" in capsys.readouterr().err
    assert main([*base, "--arch", SPEC]) == 0


# ------------------------------------------------------------------------------------------ vocabulary
def test_old_spellings_work_with_a_one_line_note(demo_model, tmp_path, capsys):
    from langneurons.identify import select  # noqa: F401  (the neuron-set writer below needs the package)
    from langneurons.neuronset import NeuronSet
    ns = NeuronSet({"en": [[0, 1]], "fr": [[1, 2]]}, {"num_layers": 4, "width": 384, "site": "act"}, {"name": "x"})
    ns.save(tmp_path / "ns.json")
    assert main(["neurons", "plot", str(tmp_path / "ns.json"), "--out-dir", str(tmp_path / "plots")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out-dir is deprecated" in err[0] and "use --out" in err[0]
    assert any(p.suffix == ".png" for p in (tmp_path / "plots").iterdir())
    rc = main(["eval", "xcopa", "--model", str(tmp_path / "missing"), "--langs", "zh", "--limit", "-1",
               "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "--langs is deprecated" in err[0] and len(err) == 2


def test_every_model_command_shares_the_model_options(capsys):
    for argv in (["collect"], ["ppl"], ["steer"], ["eval", "xcopa"], ["bridge", "probe"], ["bridge", "bli"],
                 ["bridge", "mrc"]):
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        out = capsys.readouterr().out
        for opt in ("--model", "--arch", "--dtype", "--device", "--device-map", "--trust-remote-code",
                    "--batch-size"):
            assert opt in out, (argv, opt)
