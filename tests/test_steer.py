"""Steering: cloze data loaders, continuation log-likelihoods, LSS, language identification, the
command, and steering behaviour on a trained 8-language model."""

from __future__ import annotations

import json
import re

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
    printed = capsys.readouterr().out
    assert "best per target" in printed and "95% CI" in printed and "vs unsteered" in printed
    # 95% bootstrap intervals next to every headline number, each containing its point value
    inside = lambda ci, v: ci is not None and len(ci) == 2 and ci[0] - 1e-12 <= v <= ci[1] + 1e-12
    n_prompts = len(rec["settings"]["neutral_prompts"])
    base = rec["generation_baseline"]
    assert set(base) >= {"share", "share_ci95", "examples", "n"} and not any(k.startswith("_") for k in base)
    assert all(inside(base["share_ci95"][t], base["share"][t]) for t in rec["languages"])
    for r in rec["operators"].values():
        K = len(rec["languages"])
        for a in range(K):
            for b in range(K):
                assert (r["lss_ci95"][a][b] is None) == (r["lss"][a][b] is None)
                assert r["lss"][a][b] is None or inside(r["lss_ci95"][a][b], r["lss"][a][b])
        assert all(inside(r["lss_by_target_ci95"][t], v) for t, v in r["lss_by_target"].items())
        assert inside(r["lss_mean_ci95"], r["lss_mean"])
        g = r["generation"]
        assert g["n"] == n_prompts * 2
        for key in ("share", "baseline_share", "delta"):
            assert all(inside(g[key + "_ci95"][t], g[key][t]) for t in rec["languages"])
            assert inside(g[key + "_mean_ci95"], g[key + "_mean"])
        assert g["baseline_share_ci95"] == base["share_ci95"]        # the same draw of runs
        assert g["baseline_share_mean"] == pytest.approx(sum(base["share"].values()) / K)
        assert isinstance(g["separated"], bool) and (g["ratio"] is None or g["ratio"] >= 0)
        for t, pairs in g["pairs"].items():
            assert len(pairs) == 3 and len({p["prompt"] for p in pairs}) == 3    # distinct prompts
            assert [p["prompt"] for p in pairs] == rec["settings"]["neutral_prompts"][:3]
            assert set(pairs[0]) == {"prompt", "unsteered", "steered", "unsteered_label", "steered_label"}
        assert g["examples"] and "labels" not in g
    # unsteered side of a pair is the same run whatever the operator
    unsteered = [[p["unsteered"] for p in r["generation"]["pairs"]["en"]] for r in rec["operators"].values()]
    assert unsteered[0] == unsteered[1]



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


# ------------------------------------------------------------------------------------------ intervals
class _FakeSession:
    """Scores and generates without a model: under the intervention toward ``t`` (the intervention is
    the code itself), the continuation ``t<i>`` of item ``i`` gains log-likelihood 1 when ``i`` is in
    ``winners[t]``; generations are run labels, rewritten to ``t`` for the runs in ``steered[t]``."""
    is_main = True

    def __init__(self, winners=None, base_labels=None, steered=None):
        self.winners, self.base_labels, self.steered = winners or {}, base_labels or [], steered or {}
        self.iv = None
        self.calls = []

    def intervened(self, iv):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self.iv = iv
            try:
                yield
            finally:
                self.iv = None
        return ctx()

    def loglikelihood(self, pairs):
        out = []
        for ctx, cont in pairs:
            i = int(ctx.split("-")[-1])
            t = self.iv
            out.append((1.0 if t is not None and cont.strip() == f"{t}{i}" and i in self.winners.get(t, ()) else 0.0, 1))
        return out

    def generate(self, prompts, max_new_tokens, sample=False, seed=0):
        self.calls.append((tuple(prompts), seed, self.iv))
        labels = list(self.base_labels)
        for i in self.steered.get(self.iv, ()):
            labels[i] = self.iv
        return [f"{p}|{i}|{lab}" for i, (p, lab) in enumerate(zip(prompts, labels))]


class _FakeIdentifier:
    def __init__(self, languages):
        self.languages = list(languages)

    def labels(self, texts):
        return [None if t.rsplit("|", 1)[1] == "None" else t.rsplit("|", 1)[1] for t in texts]


def _toy_items(n, langs, missing=None):
    missing = missing or {}
    return [ClozeItem(str(i), {c: f"q-{c}-{i}" for c in langs if c not in missing.get(i, ())},
                      {c: f"{c}{i}" for c in langs if c not in missing.get(i, ())}, {})
            for i in range(n)]


def test_lss_intervals_all_wins_is_one():
    langs = ["en", "fr", "zh"]
    items = _toy_items(6, langs)
    res = lss(_FakeSession(winners={t: range(6) for t in langs}), items, langs, lambda t: t, seed=3)
    assert res["lss_mean"] == 1.0 and res["lss_mean_ci95"] == [1.0, 1.0]
    assert all(v == 1.0 for v in res["lss_by_target"].values())
    assert all(ci == [1.0, 1.0] for ci in res["lss_by_target_ci95"].values())
    for a in range(3):
        for b in range(3):
            assert res["lss_ci95"][a][b] == (None if a == b else [1.0, 1.0])
    assert res["_wins"][0][1] == {"items": list(range(6)), "wins": [1] * 6}
    none = lss(_FakeSession(), items, langs, lambda t: t)                # nothing changes: ties fail
    assert none["lss_mean"] == 0.0 and none["lss_mean_ci95"] == [0.0, 0.0]


def test_lss_intervals_mix_joint_item_draw():
    from langneurons.uncertainty import N_BOOT, interval, resample_indices
    langs = ["en", "fr", "zh"]
    # items 7-9 lack fr: the cells with fr use 7 of the 10 items
    items = _toy_items(10, langs, missing={7: ["fr"], 8: ["fr"], 9: ["fr"]})
    winners = {"en": {0, 2, 4, 6, 8}, "fr": {1, 2, 3}, "zh": {0, 1, 2, 3, 4, 5, 8}}
    res = lss(_FakeSession(winners=winners), items, langs, lambda t: t, seed=11)
    assert res["items"][0][1] == 7 and res["items"][2][0] == 10
    assert res["lss"][0][1] == pytest.approx(3 / 7) and res["lss"][1][2] == pytest.approx(6 / 7)
    assert res["lss"][0][2] == pytest.approx(7 / 10)
    for a in range(3):
        for b in range(3):
            if a != b:
                lo, hi = res["lss_ci95"][a][b]
                assert lo <= res["lss"][a][b] <= hi and lo < hi
    for t, (lo, hi) in res["lss_by_target_ci95"].items():
        assert lo <= res["lss_by_target"][t] <= hi
    lo, hi = res["lss_mean_ci95"]
    assert lo <= res["lss_mean"] <= hi
    # brute force: one item draw per replicate over all 10 items, each cell counts its valid items
    idx = resample_indices(10, N_BOOT, 11)
    cells = {(a, b): res["_wins"][a][b] for a in range(3) for b in range(3) if a != b}
    reps_zh, reps_all = [], []
    for row in idx:
        vals = {}
        for (a, b), c in cells.items():
            pos = {i: j for j, i in enumerate(c["items"])}
            drawn = [c["wins"][pos[i]] for i in row if i in pos]
            if drawn:                    # (seed 11 has one replicate without any item that has fr)
                vals[(a, b)] = sum(drawn) / len(drawn)
        zh = [vals[c] for c in ((0, 2), (1, 2)) if c in vals]
        reps_zh.append(sum(zh) / len(zh))
        reps_all.append(sum(vals.values()) / len(vals))
    assert res["lss_by_target_ci95"]["zh"] == pytest.approx(interval(reps_zh))
    assert res["lss_mean_ci95"] == pytest.approx(interval(reps_all))


def _gen(session, langs, **kw):
    from langneurons.steer import generation_shares
    return generation_shares(session, langs, lambda t: t, prompts=("a", "b", "c", "d"), samples=3,
                             identifier=_FakeIdentifier(langs), **kw)


def test_generation_intervals_identical_labels_paired_delta_is_zero():
    langs = ["en", "fr", "zh"]
    base = ["en", "fr", "zh", None, "en", "en", "fr", "zh", "zh", "en", None, "fr"]
    g = _gen(_FakeSession(base_labels=base), langs, seed=4)              # steering changes nothing
    assert g["n"] == 12
    assert g["delta_ci95"] == {t: [0.0, 0.0] for t in langs} and g["delta_mean_ci95"] == [0.0, 0.0]
    assert g["share_ci95"] == g["baseline_share_ci95"]
    for t in langs:
        lo, hi = g["share_ci95"][t]
        assert lo <= g["share"][t] <= hi and lo < hi
    assert g["share"] == {"en": 4 / 12, "fr": 3 / 12, "zh": 3 / 12} and g["ratio"] == 1.0
    assert not g["separated"]
    assert g["_baseline"]["share_ci95"] == g["baseline_share_ci95"]
    for t, pairs in g["pairs"].items():
        assert [p["prompt"] for p in pairs] == ["a", "b", "c"]
        assert all(p["steered"] == p["unsteered"] for p in pairs)
        assert [p["steered_label"] for p in pairs] == [base[0], base[3], base[6]]


def test_generation_intervals_steered_shift_and_baseline_reuse():
    from langneurons.uncertainty import N_BOOT, interval, resample_indices
    langs = ["en", "fr"]
    base = [None] * 11 + ["en"]
    steered = {"en": range(0, 12), "fr": range(0, 12, 2)}
    s = _FakeSession(base_labels=base, steered=steered)
    g = _gen(s, langs, seed=7)
    assert g["share"] == {"en": 1.0, "fr": 0.5} and g["baseline_share"] == {"en": 1 / 12, "fr": 0.0}
    assert g["share_ci95"]["en"] == [1.0, 1.0]
    assert g["separated"] and g["ratio"] == pytest.approx(0.75 / (1 / 24))
    # the paired delta by hand: the same run indices for steered and unsteered
    idx = resample_indices(12, N_BOOT, 7)
    d_en = [(12 - sum(base[i] == "en" for i in row)) / 12 for row in idx]
    assert g["delta_ci95"]["en"] == pytest.approx(interval(d_en))
    assert all(seed == 7 and prompts == tuple(p for p in "abcd" for _ in range(3)) for prompts, seed, _ in s.calls)
    assert [p["steered_label"] for p in g["pairs"]["fr"]] == ["fr", None, "fr"]      # runs 0, 3, 6
    # a later operator pairs with the same unsteered runs without regenerating them
    s2 = _FakeSession(base_labels=base, steered=steered)
    g2 = _gen(s2, langs, seed=7, baseline=g["_baseline"])
    assert {k: v for k, v in g2.items() if k != "_baseline"} == {k: v for k, v in g.items() if k != "_baseline"}
    assert all(iv is not None for _, _, iv in s2.calls)
    with pytest.raises(ValueError, match="paired"):
        _gen(s2, langs, seed=8, baseline=g["_baseline"])


def test_evaluate_steering_progress_line_and_record(capsys):
    from langneurons.steer import evaluate_steering
    langs = ["en", "fr"]
    s = _FakeSession(winners={"en": {0, 1}, "fr": {0}}, base_labels=["en", None, "fr", None] * 3,
                     steered={"en": range(6), "fr": range(3)})
    ev = evaluate_steering(s, {"op": {t: t for t in langs}}, langs, items=_toy_items(4, langs), generation=True,
                           neutral_prompts=("a", "b", "c", "d"), samples=3, seed=2, progress=True,
                           identifier=_FakeIdentifier(langs))
    err = capsys.readouterr().err
    num = r"\d\.\d\d \[\d\.\d\d, \d\.\d\d\]"
    assert re.search(r"steer op: LSS mean \d\.\d{3} \[\d\.\d\d, \d\.\d\d\], target share " + num
                     + " vs unsteered " + num, err), err
    r = ev["operators"]["op"]
    assert "_wins" not in r and "_baseline" not in r["generation"]
    assert not any(k.startswith("_") for k in ev["generation_baseline"])
    assert ev["best"]["en"]["value_ci95"] == r["lss_by_target_ci95"]["en"]
    assert ev["best_generation"]["fr"]["value_ci95"] == r["generation"]["share_ci95"]["fr"]
    json.dumps(ev, allow_nan=False)                                          # plain JSON


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


# ------------------------------------------------------------------------------------------ language arithmetic
def _toy_ns(langs=("en", "fr", "zh")):
    from langneurons.neuronset import NeuronSet
    g = torch.Generator().manual_seed(0)
    masks = {c: torch.rand(2, 16, generator=g) < 0.3 for c in langs}
    return NeuronSet.from_masks(masks, {"num_layers": 2, "width": 16, "site": "act", "name_or_path": "toy"},
                                {"name": "toy"})


class _RecordingSession(_FakeSession):
    """A fake session that records every intervention entered (nothing changes under them)."""

    def __init__(self):
        super().__init__(base_labels=["en"] * 64)
        self.entered = []

    def intervened(self, iv):
        self.entered.append(iv)
        return super().intervened(iv)

    def generate(self, prompts, max_new_tokens, sample=False, seed=0):
        return [f"{p}|{i}|en" for i, p in enumerate(prompts)]


def test_arith_source_is_the_prompt_language_in_lss_and_every_other_language_in_generation():
    from langneurons.intervene import ArithmeticIntervention
    from langneurons.steer import build_interventions, generation_shares
    langs = ["en", "fr", "zh"]
    ivs, skipped = build_interventions(_toy_ns(), None, langs, ["arith:mul", "zero", "arith:mul*0.5"])
    assert not skipped and list(ivs) == ["arith:mul", "zero", "arith:mul*0.5"]
    assert isinstance(ivs["arith:mul"]["zh"], ArithmeticIntervention) and isinstance(ivs["zero"]["zh"], Intervention)
    assert ivs["arith:mul"]["zh"].sources == ["en", "fr"] and ivs["arith:mul"]["en"].sources == ["fr", "zh"]
    s = _RecordingSession()
    res = lss(s, _toy_items(4, langs), langs, ivs["arith:mul"].get)
    cells = [(iv.sources, iv.target) for iv in s.entered if iv is not None]
    assert cells == [([src], t) for t in langs for src in langs if src != t]      # one pass per (s, t)
    assert res["lss_mean"] == 0.0                                                 # nothing changed: ties fail
    assert set(res["_ll0"]) == {(src, t) for t in langs for src in langs if src != t}
    s = _RecordingSession()
    generation_shares(s, langs, ivs["arith:mul"].get, prompts=("a", "b"), samples=2,
                      identifier=_FakeIdentifier(langs))
    assert [(iv.sources, iv.target) for iv in s.entered if iv is not None] == \
        [(["fr", "zh"], "en"), (["en", "zh"], "fr"), (["en", "fr"], "zh")]


def test_arith_in_a_sweep_leaves_other_operators_identical_and_scores_by_hand(demo64, demo_stats):
    from langneurons.intervene import ArithmeticIntervention, intervene
    from langneurons.stats import ActivationStats
    from langneurons.steer import build_interventions, evaluate_steering
    m, tok = demo64
    stats = ActivationStats.load(demo_stats)
    langs = ["en", "fr", "zh"]
    ns = select("lape", stats, langs, top_rate=0.05)
    items = [ClozeItem(str(i), {"en": f"one, two, {w}", "fr": f"un, deux, {v}", "zh": f"一、二、{z}"},
                       {"en": "four", "fr": "quatre", "zh": "四"}, {})
             for i, (w, v, z) in enumerate([("three", "trois", "三"), ("five", "cinq", "五")])]
    session = Session(m, tok, batch_size=16)
    alone, _ = build_interventions(ns, stats, langs, ["scale:5"])
    ref = evaluate_steering(session, alone, langs, items=items)["operators"]["scale:5"]
    ivs, _ = build_interventions(ns, stats, langs, ["arith:add", "scale:5", "arith:mul*0.5"])
    ev = evaluate_steering(session, ivs, langs, items=items)
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert drop(ev["operators"]["scale:5"]) == drop(ref)                       # bit-identical
    assert list(ev["operators"]) == ["arith:add", "scale:5", "arith:mul*0.5"] and set(ev["best"]) == set(langs)
    # cell (en -> zh) of arith:add by hand: en's neurons down, zh's up, on the English prompts
    q = [(it.prompts["en"], " " + it.objects["zh"]) for it in items] + \
        [(it.prompts["en"], " " + it.objects["en"]) for it in items]
    b = continuation_loglik(session, q)
    with intervene(m, ArithmeticIntervention(ns, "zh", ["en"], "arith:add", stats=stats)):
        a = continuation_loglik(session, q)
    d0, d1 = b[:2] - b[2:], a[:2] - a[2:]
    r = ev["operators"]["arith:add"]
    assert r["lss"][0][2] == pytest.approx(float(((d1 - d0) > 0).double().mean()))
    assert r["mean_shift"][0][2] == pytest.approx(float((d1 - d0).mean()), abs=1e-9)
    assert r["mean_shift"][0][2] != 0.0


def test_steer_print_mode_arith(demo_model, demo_stats, tmp_path, capsys):
    ns = _lape_file(demo_stats, tmp_path)
    rc = main(["steer", "--model", str(demo_model), "--neurons", str(ns), "--stats", str(demo_stats),
               "--target", "zh", "--source", "en", "--operator", "arith:add*2", "--prompt", "The",
               "--max-new-tokens", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "=== target zh: arith:add*2[en->zh]@act/all ===" in out and out.count("steered:") == 1


@pytest.mark.parametrize("case", ["kind", "strength", "no_stats", "source_other_op", "source_scoring",
                                  "target_is_source"])
def test_steer_arith_bad_input(case, demo_model, demo_stats, tmp_path, capsys):
    ns = _lape_file(demo_stats, tmp_path)
    base = ["steer", "--model", str(demo_model), "--neurons", str(ns), "--device", "cpu"]
    stats = ["--stats", str(demo_stats)]
    printing = ["--target", "zh", "--prompt", "x"]
    args, fragment = {
        "kind": (stats + printing + ["--operator", "arith:foo"], "unknown language-arithmetic kind 'foo'"),
        "strength": (stats + printing + ["--operator", "arith:add*x"], "'x' is not a number"),
        "no_stats": (printing + ["--operator", "arith:add"], "needs activation statistics"),
        "source_other_op": (stats + printing + ["--operator", "zero", "--source", "en"], "drop --source"),
        "source_scoring": (stats + ["--operator", "arith:mul", "--source", "en", "--generation",
                                    "--out", str(tmp_path / "o")], "--source is for print mode"),
        "target_is_source": (stats + printing + ["--operator", "arith:mul", "--source", "zh"], "also a source"),
    }[case]
    rc = main(base + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("langneurons: error:"), err
    assert fragment in err[0], err[0]
    assert not (tmp_path / "o").exists()
