"""Steering: cloze data loaders, continuation log-likelihoods, LSS, language identification, the
command, and steering behaviour on a trained 8-language model."""

from __future__ import annotations

import json

import pytest
import torch

from langneurons.cli import main
from langneurons.errors import UserError
from langneurons.identify import select
from langneurons.intervene import Intervention
from langneurons.runtime import Session
from langneurons.steer import (ClozeItem, build_muse_cloze, continuation_loglik, load_cloze_jsonl, load_mlama,
                               lss, mlama_prompt, save_cloze_jsonl)





# ------------------------------------------------------------------------------------------ data
def test_cloze_jsonl_round_trip_and_errors(tmp_path):
    items = [ClozeItem("1", {"en": "Paris is the capital of", "zh": "巴黎是"}, {"en": "France", "zh": "法国"}),
             ClozeItem("2", {"en": "x", "fr": "y"}, {"en": "a", "fr": "b"}, {"fr": "-"})]
    save_cloze_jsonl(items, tmp_path / "c.jsonl")
    back = load_cloze_jsonl(tmp_path / "c.jsonl")
    assert [b.to_json() for b in back] == [i.to_json() for i in items]
    assert back[0].sep("en") == " " and back[0].sep("zh") == "" and back[1].sep("fr") == "-"
    assert [b.id for b in load_cloze_jsonl(tmp_path / "c.jsonl", ["en", "fr"])] == ["2"]
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "lang": {"en": {"prompt": "a"}}}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1.*'object'"):
        load_cloze_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="bad2.jsonl:1 is not valid JSON"):
        load_cloze_jsonl(tmp_path / "bad2.jsonl")


def test_mlama_layout(tmp_path):
    for code, tpl, rows in (
        ("en", "[X] was born in [Y] .", [("u1", "Albert Einstein", "Ulm"), ("u2", "Marie Curie", "Warsaw")]),
        ("de", "[X] wurde in [Y] geboren .", [("u1", "Albert Einstein", "Ulm"), ("u3", "Goethe", "Frankfurt")]),
        ("ja", "[Y] で生まれた [X] 。", [("u1", "アインシュタイン", "ウルム")]),
    ):
        d = tmp_path / code
        d.mkdir()
        (d / "templates.jsonl").write_text(json.dumps({"relation": "P19", "template": tpl}) + "\n")
        (d / "P19.jsonl").write_text("".join(json.dumps({"uuid": u, "sub_label": s, "obj_label": o}) + "\n"
                                             for u, s, o in rows))
    items = load_mlama(tmp_path, ["en", "de", "ja"])
    assert [it.id for it in items] == ["P19:u1"]                       # only u1 exists in two languages
    assert items[0].prompts == {"en": "Albert Einstein was born in", "de": "Albert Einstein wurde in"}
    assert items[0].objects == {"en": "Ulm", "de": "Ulm"}              # ja's [Y] precedes [X]: skipped
    items = load_mlama(tmp_path, ["en", "de", "ja"], mode="remove")
    assert items[0].prompts["de"] == "Albert Einstein wurde in geboren ." and items[0].prompts["ja"] == "で生まれた アインシュタイン 。"
    assert mlama_prompt("[X] is a [Y]", "Rome") == "Rome is a"
    with pytest.raises(UserError, match="templates.jsonl"):
        load_mlama(tmp_path, ["en", "fr"])


def test_muse_word_list_cloze(shared_data):
    langs = ["en", "fr", "zh", "hi"]
    items = build_muse_cloze(shared_data / "muse", langs, n_items=20, seed=1)
    assert len(items) == 20 and items == build_muse_cloze(shared_data / "muse", langs, n_items=20, seed=1)
    first_fr = {}
    for line in (shared_data / "muse" / "full" / "en-fr.txt").read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 2:
            first_fr.setdefault(parts[0], parts[1])
    for it in items:
        assert set(it.prompts) == set(langs)
        assert len({it.objects[c] for c in langs}) == 4                  # objects differ across languages
        assert first_fr[it.objects["en"]] == it.objects["fr"]            # the first listed translation
        assert it.prompts["en"].endswith(",") and it.prompts["en"].count(", ") == 2 and it.sep("en") == " "
        assert it.prompts["zh"].endswith("、") and it.sep("zh") == ""
        en_words = it.prompts["en"].rstrip(",").split(", ")
        assert [first_fr[w] for w in en_words] == it.prompts["fr"].rstrip(",").split(", ")


# ------------------------------------------------------------------------------------------ scoring
@pytest.fixture(scope="module")
def demo64(demo_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float64).eval()
    return m, AutoTokenizer.from_pretrained(demo_model)


def test_continuation_loglik_by_hand_and_batch_invariant(demo64):
    m, tok = demo64
    pairs = [("The cat sat on the", " mat"), ("Le chat", " noir et blanc"), ("猫", "在睡觉"), ("A", " b c d e f")]
    ll = continuation_loglik(Session(m, tok, batch_size=4), pairs)
    for (ctx, cont), got in zip(pairs, ll.tolist()):
        c = tok(ctx)["input_ids"]
        whole = tok(ctx + cont)["input_ids"]
        assert whole[:len(c)] == c
        with torch.no_grad():
            lp = torch.log_softmax(m(input_ids=torch.tensor([whole])).logits[0], -1)
        want = sum(float(lp[t - 1, whole[t]]) for t in range(len(c), len(whole)))
        assert got == pytest.approx(want, abs=1e-9)
    torch.testing.assert_close(continuation_loglik(Session(m, tok, batch_size=1), pairs), ll, rtol=0, atol=1e-9)


def test_lss_by_hand_and_ties_fail(demo64, demo_stats):
    from langneurons.stats import ActivationStats
    m, tok = demo64
    stats = ActivationStats.load(demo_stats)
    ns = select("lape", stats, ["en", "fr", "zh"], top_rate=0.05)
    items = [ClozeItem(str(i), {"en": f"one, two, {w}", "fr": f"un, deux, {v}", "zh": f"一、二、{z}"},
                       {"en": "four", "fr": "quatre", "zh": "四"}, {})
             for i, (w, v, z) in enumerate([("three", "trois", "三"), ("five", "cinq", "五")])]
    langs = ["en", "fr", "zh"]
    session = Session(m, tok, batch_size=16)
    none = lss(session, items, langs, lambda t: None)
    assert none["lss"][0][1] == 0.0 and none["lss_mean"] == 0.0      # no intervention: D1 == D0, ties fail
    assert none["lss"][0][0] is None
    make = lambda t: Intervention(ns, [t], "scale:5")
    res = lss(session, items, langs, make)
    # brute force for s = en, t = zh
    from langneurons.intervene import intervene
    q = [(it.prompts["en"], " " + it.objects["zh"]) for it in items] + \
        [(it.prompts["en"], " " + it.objects["en"]) for it in items]
    b = continuation_loglik(session, q)
    with intervene(m, make("zh")):
        a = continuation_loglik(session, q)
    d0 = b[:2] - b[2:]
    d1 = a[:2] - a[2:]
    assert res["lss"][0][2] == pytest.approx(float(((d1 - d0) > 0).double().mean()))
    assert res["mean_shift"][0][2] == pytest.approx(float((d1 - d0).mean()), abs=1e-9)
    vals = [res["lss"][s][2] for s in (0, 1)]
    assert res["lss_by_target"]["zh"] == pytest.approx(sum(vals) / 2)


def test_language_identifier():
    pytest.importorskip("langid")
    from langneurons.langid import LanguageIdentifier, normalise_code
    idf = LanguageIdentifier(["en", "fr", "zho_Hans", "ru"])
    texts = ["The weather is nice today and we are going to the park.",
             "Le temps est magnifique aujourd'hui et nous allons au parc.",
             "今天天气很好，我们要去公园。", "Сегодня хорошая погода, и мы идём в парк.", "   "]
    assert idf.labels(texts) == ["en", "fr", "zho_Hans", "ru", None]
    assert idf.shares(texts) == {"en": 0.2, "fr": 0.2, "zho_Hans": 0.2, "ru": 0.2}
    assert normalise_code("pt_BR") == "pt" and normalise_code("arb_Arab") == "ar"
    with pytest.raises(UserError, match="does not know"):
        LanguageIdentifier(["en", "qqq"])


# ------------------------------------------------------------------------------------------ the command
def _lape_file(demo_stats, tmp_path):
    from langneurons.stats import ActivationStats
    ns = select("lape", ActivationStats.load(demo_stats), top_rate=0.05)
    ns.save(tmp_path / "ns.json")
    return tmp_path / "ns.json"


def test_steer_print_mode(demo_model, demo_stats, tmp_path, capsys):
    ns = _lape_file(demo_stats, tmp_path)
    rc = main(["steer", "--model", str(demo_model), "--neurons", str(ns), "--stats", str(demo_stats),
               "--target", "zh", "--operator", "set:p90*3", "--prompt", "The", "--prompt", "Le",
               "--max-new-tokens", "5", "--device", "cpu", "--baseline"])
    out = capsys.readouterr().out
    assert rc == 0 and "=== target zh: set:p90*3[zh]@act/all ===" in out
    assert out.count("steered:") == 2 and out.count("baseline:") == 2


def test_steer_scoring_mode_writes_record(demo_model, demo_stats, tmp_path, capsys):
    pytest.importorskip("langid")
    ns = _lape_file(demo_stats, tmp_path)
    items = [ClozeItem(str(i), {"en": f"one, two, {a},", "fr": f"un, deux, {b},", "zh": f"一、二、{c}、"},
                       {"en": "four", "fr": "quatre", "zh": "四"}, {"zh": ""})
             for i, (a, b, c) in enumerate([("three", "trois", "三"), ("five", "cinq", "五"), ("six", "six", "六")])]
    save_cloze_jsonl(items, tmp_path / "c.jsonl")
    out = tmp_path / "steer"
    rc = main(["steer", "--model", str(demo_model), "--neurons", str(ns), "--stats", str(demo_stats),
               "--cloze", str(tmp_path / "c.jsonl"), "--languages", "en,fr,zh", "--operator", "scale:4,zero",
               "--generation", "--samples", "2", "--max-new-tokens", "6", "--out", str(out), "--device", "cpu",
               "--quiet"])
    assert rc == 0
    rec = json.loads((out / "steer.json").read_text())
    assert rec["languages"] == ["en", "fr", "zh"] and list(rec["operators"]) == ["scale:4", "zero"]
    for r in rec["operators"].values():
        assert r["lss"][0][0] is None and all(0 <= v <= 1 for v in r["lss_by_target"].values())
        assert set(r["generation"]["share"]) == {"en", "fr", "zh"}
    assert set(rec["best"]) == {"en", "fr", "zh"}
    assert (out / "steer.png").is_file() and (out / "steer_operators.png").is_file()
    assert "best per target" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing_stat", "unknown_target", "other_model", "no_data"])
def test_steer_bad_input(case, demo_model, demo_stats, tmp_path, capsys):
    ns = _lape_file(demo_stats, tmp_path)
    if case == "other_model":
        from langneurons.neuronset import NeuronSet
        NeuronSet({"zh": [[0, 1]]}, {"num_layers": 2, "width": 7, "site": "act"}, {"name": "x"}).save(ns)
    args = ["steer", "--model", str(demo_model), "--neurons", str(ns), "--stats", str(demo_stats), "--device", "cpu"]
    args += {"missing_stat": ["--target", "zh", "--operator", "set:p_max", "--prompt", "x"],
             "unknown_target": ["--target", "xx", "--operator", "zero", "--prompt", "x"],
             "other_model": ["--target", "zh", "--operator", "zero", "--prompt", "x"],
             "no_data": ["--out", str(tmp_path / "o")]}[case]
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("langneurons: error:")
    assert {"missing_stat": "--unit sentence", "unknown_target": "unknown language 'xx'", "other_model": "2x7",
            "no_data": "cloze data"}[case] in err[0]
    assert not (tmp_path / "o").exists()


def test_best_per_target():
    from langneurons.steer import best_per_target
    res = {"a": {"lss_by_target": {"x": 0.5, "y": 0.9}}, "b": {"lss_by_target": {"x": 0.7, "y": 0.9}},
           "c": {"lss_by_target": {"x": None, "y": 0.1}}}
    assert best_per_target(res, ["x", "y"]) == {"x": {"operator": "b", "value": 0.7},
                                                "y": {"operator": "a", "value": 0.9}}   # ties: first listed


# ------------------------------------------------------------------------------------------ behaviour
@pytest.fixture(scope="module")
def shared_sentence_stats(shared_model, shared_data):
    """Sentence-unit statistics (per-sentence means of the first 100 sentences: p_max, p_median)."""
    from conftest import SHARED_TEXT, _collect
    langs = {c: [shared_data / fs[0]] for c, fs in SHARED_TEXT.items()}
    return _collect(shared_model, langs, "shared8-sentence-stats", unit="sentence", sentences=100)


@pytest.fixture(scope="module")
def steering_setup(shared_model, shared_stats, shared_sentence_stats, shared_data):
    from langneurons.runtime import load_model
    from langneurons.stats import ActivationStats
    stats = ActivationStats.load(shared_stats)
    ns = select("lape", stats, top_rate=0.1)
    model, tok = load_model(str(shared_model), torch.device("cpu"), torch.float32)
    return model, tok, ns, ActivationStats.load(shared_sentence_stats), stats.languages


def test_steering_lss_on_trained_model(steering_setup, shared_data):
    """set:p_max of the target shifts cloze preferences toward the target far more often than
    deactivation (zero) or the batch P10 value do ([R25]'s ordering).

    Measured (MUSE word lists, 20 items, 8 languages, LAPE top_rate 0.1): mean LSS
    set:p_max 0.62, zero 0.21, set:batch-p10 0.20.
    """
    from langneurons.steer import build_interventions, evaluate_steering
    model, tok, ns, sent, langs = steering_setup
    items = build_muse_cloze(shared_data / "muse", langs, n_items=12)
    ivs, _ = build_interventions(ns, sent, langs, ["set:p_max", "zero", "set:batch-p10"])
    ev = evaluate_steering(Session(model, tok, batch_size=48), ivs, langs, items=items)
    mean = {op: r["lss_mean"] for op, r in ev["operators"].items()}
    print("\nmean LSS:", {k: round(v, 3) for k, v in mean.items()})
    for op, r in ev["operators"].items():
        print(f"  {op:>14}", {t: round(v, 2) for t, v in r["lss_by_target"].items()})
    assert mean["set:p_max"] > mean["zero"] + 0.2
    assert mean["set:p_max"] > mean["set:batch-p10"] + 0.2
    by_t = ev["operators"]["set:p_max"]["lss_by_target"]
    assert sum(by_t[t] > ev["operators"]["zero"]["lss_by_target"][t] for t in langs) >= 7


@pytest.mark.slow
def test_steering_generation_on_trained_model(steering_setup):
    """Generations from neutral prompts drift toward the target language more under set:p_max
    than under zero or set:batch-p10 (shares from langid over the 8 languages).

    Measured (8 prompts x 4 samples, 24 new tokens): mean target share set:p_max 0.145, zero 0.082,
    set:batch-p10 0.062, unsteered 0.098; set:p_max*4 0.48.
    """
    pytest.importorskip("langid")
    from langneurons.steer import build_interventions, evaluate_steering
    model, tok, ns, sent, langs = steering_setup
    ivs, _ = build_interventions(ns, sent, langs, ["set:p_max", "zero", "set:batch-p10", "set:p_max*4"])
    ev = evaluate_steering(Session(model, tok, batch_size=32), ivs, langs, generation=True, samples=4,
                           max_new_tokens=24)
    share = {op: r["generation"]["share_mean"] for op, r in ev["operators"].items()}
    print("\nmean target share:", {k: round(v, 3) for k, v in share.items()},
          "baseline", round(sum(ev["generation_baseline"]["share"].values()) / len(langs), 3))
    assert share["set:p_max"] > share["zero"] and share["set:p_max"] > share["set:batch-p10"]
    assert share["set:p_max*4"] > 2 * share["zero"]
