"""Tests for the BridgeX-ICL pipeline: langneurons.bridge.{names,icl,probe,overlap,select,spectrum} and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from langneurons.runtime import Session
from langneurons.bridge import icl, names, overlap, probe, select, spectrum
from langneurons.bridge.hsic import hsic_matrix, layer_score
from langneurons.cli import main
from langneurons.errors import UserError



ARROW = "\u2192"


# ------------------------------------------------------------------------------------------ names
def test_endonym_table_covers_the_paper_and_muse_languages():
    need = "zh ja ar he id tl fi hu sw en de fr it pt es ru hi th vi el bg tr".split()
    assert all(c in names.ENDONYMS and c in names.ENGLISH_NAMES for c in need)
    assert names.language_name("de") == "Deutsch"
    assert names.language_name("zh") == "中文"
    assert names.language_name("de", "english") == "German"
    over = names.parse_name_overrides("de=German, zh=Chinese")
    assert over == {"de": "German", "zh": "Chinese"}
    assert names.language_name("zh", overrides=over) == "Chinese"
    with pytest.raises(UserError, match="--names xx=NAME"):
        names.language_name("xx")
    with pytest.raises(UserError, match="CODE=NAME"):
        names.parse_name_overrides("de")


# ------------------------------------------------------------------------------------------ prompts and answers
def test_prompt_strings_are_exact():
    assert icl.translation_prompt("Deutsch", "Haus", "中文") == 'Deutsch:"Haus"\u2192中文:'
    assert icl.chained_prompt("Deutsch", "Haus", "English", "house", "中文") == \
        'Deutsch:"Haus"\u2192English:"house"\u2192中文:'
    assert icl.ARROW == "→" and len(icl.ARROW) == 1 and ord(icl.ARROW) == 0x2192


@pytest.mark.parametrize("text,expected", [
    ('"Haus"', "Haus"),
    (' "Haus"\u2192English:"house"', "Haus"),
    ("Haus\nmore", "Haus"),
    ("  Haus  ", "Haus"),
    ("Haus\u2192English:", "Haus"),
    ('"Haus', "Haus"),
    ("«maison»", "maison"),
    ("", ""),
])
def test_extract_answer(text, expected):
    assert icl.extract_answer(text) == expected


def test_is_correct_exact_match_case_insensitive_quotes_stripped():
    assert icl.is_correct("Haus", ["haus"])
    assert icl.is_correct(' "HAUS" ', ["Haus"])
    assert icl.is_correct("house", ["home", "house"])
    assert not icl.is_correct("Hause", ["Haus"])       # exact, not prefix
    assert not icl.is_correct("", ["", "Haus"])         # an empty answer is never correct
    assert icl.extract_passage('"Der Fluss.""\u2192Français:') == "Der Fluss."
    assert icl.extract_passage(' "A long text."\u2192English:"x"') == "A long text."


# ------------------------------------------------------------------------------------------ BLI / MRC on stubs
class StubGenerator:
    """Answers from a prompt -> continuation table (default: a wrong word); records every prompt."""

    def __init__(self, table, default=' "zzz"'):
        self.table, self.default, self.seen = table, default, []

    def __call__(self, prompts):
        self.seen.extend(prompts)
        return [self.table.get(p, self.default) for p in prompts]


def test_bli_accuracy_over_unique_source_words_with_and_without_bridge():
    nm = {"de": "Deutsch", "zh": "中文", "en": "English"}
    # 'Haus' appears twice with two references: it counts once
    pairs = [("Haus", "房子"), ("Haus", "家"), ("Hund", "狗"), ("Katze", "猫")]
    tp, cp = icl.translation_prompt, icl.chained_prompt
    table = {
        tp("Deutsch", "Haus", "中文"): ' "家"',                  # correct (second reference)
        tp("Deutsch", "Hund", "中文"): ' "猫"',                  # wrong
        tp("Deutsch", "Katze", "中文"): ' "猫"\u2192English:',   # correct
        tp("Deutsch", "Haus", "English"): ' "house"',
        tp("Deutsch", "Hund", "English"): ' "dog"',
        tp("Deutsch", "Katze", "English"): ' "cat"',
        cp("Deutsch", "Haus", "English", "house", "中文"): ' "房子"',
        cp("Deutsch", "Hund", "English", "dog", "中文"): ' "狗"',
        cp("Deutsch", "Katze", "English", "cat", "中文"): ' "狗"',
    }
    gen = StubGenerator(table)
    res = icl.run_bli(gen, pairs, "de", "zh", [None, "en"], nm)
    assert res["n_words"] == 3
    base, br = res["conditions"]["baseline"], res["conditions"]["en"]
    assert (base["n_correct"], base["n"]) == (2, 3) and base["accuracy"] == pytest.approx(2 / 3)
    assert (br["n_correct"], br["n"]) == (2, 3) and br["accuracy"] == pytest.approx(2 / 3)
    assert [r["correct"] for r in br["records"]] == [True, True, False]
    assert br["records"][0]["bridge_word"] == "house"
    assert br["records"][0]["prompt"] == 'Deutsch:"Haus"→English:"house"→中文:'
    assert base["records"][0]["references"] == ["房子", "家"]
    # the chained prompt was built from the model's own bridge translation
    assert 'Deutsch:"Hund"→English:"dog"→中文:' in gen.seen


def test_mrc_accuracy_on_stub_scorer(tmp_path):
    f = tmp_path / "mrc.jsonl"
    rows = [
        {"passage": "P1", "question": "Q1", "options": ["a", "b", "c", "d"], "answer": "B"},
        {"passage": "P2", "question": "Q2", "options": ["a", "b", "c", "d"], "answer": 4},
        {"flores_passage": "P3", "question": "Q3", "mc_answer1": "w", "mc_answer2": "x", "mc_answer3": "y",
         "mc_answer4": "z", "correct_answer_num": "1"},
        {"passage": "P4", "question": "Q4", "options": ["a", "b", "c", "d"], "answer": "c"},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    items = icl.load_mrc_jsonl(f)
    assert [it.answer for it in items] == [1, 3, 0, 2]
    assert items[2].options == ["w", "x", "y", "z"] and items[2].passage == "P3"
    nm = {"sw": "Kiswahili", "en": "English"}
    translate = StubGenerator({icl.translation_prompt("Kiswahili", f"P{i}", "English"): f' "T{i}"\u2192Deutsch:'
                               for i in range(1, 5)})
    seen = []

    def choose(prompts):
        seen.extend(prompts)
        # always B on an untranslated passage (only item 1 is right), the right letter on a translated one
        return [1 if p.startswith("P") else items[int(p[1]) - 1].answer for p in prompts]

    res = icl.run_mrc(items, choose, "sw", [None, "en"], nm, translate)
    assert res["conditions"]["baseline"]["accuracy"] == pytest.approx(1 / 4)
    assert res["conditions"]["en"]["accuracy"] == 1.0
    assert res["conditions"]["en"]["records"][0]["passage_used"] == "T1"
    assert translate.seen[0] == 'Kiswahili:"P1"→English:'
    assert seen[0] == "P1\nQuestion: Q1\nA. a\nB. b\nC. c\nD. d\nAnswer:"


def test_mrc_bad_records_are_user_errors(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"passage": "p", "question": "q", "options": ["a", "b"], "answer": "A"}) + "\n")
    with pytest.raises(UserError, match="4 options"):
        icl.load_mrc_jsonl(f)
    f.write_text(json.dumps({"passage": "p", "question": "q", "options": list("abcd"), "answer": "E"}) + "\n")
    with pytest.raises(UserError, match="not A-D"):
        icl.load_mrc_jsonl(f)


# ------------------------------------------------------------------------------------------ dictionaries
def _muse(tmp_path: Path) -> Path:
    d = tmp_path / "muse"
    (d / "full").mkdir(parents=True)
    (d / "splits_reconstructed").mkdir()
    (d / "full" / "en-de.txt").write_text("house Haus\nhouse Heim\ndog Hund\ncat Katze\n", encoding="utf-8")
    (d / "full" / "en-zh.txt").write_text("house 房子\ndog 狗\ndog 犬\nbird 鸟\n", encoding="utf-8")
    (d / "splits_reconstructed" / "en-de.5000-6500.txt").write_text("dog Hund\n", encoding="utf-8")
    return d


def test_dictionaries_direct_reversed_and_triangulated(tmp_path):
    d = _muse(tmp_path)
    assert dict(probe.load_dictionary("en", "de", muse_dir=d)) == {"house": ["Haus", "Heim"], "dog": ["Hund"],
                                                                   "cat": ["Katze"]}
    assert dict(probe.load_dictionary("de", "en", muse_dir=d)) == {"Haus": ["house"], "Heim": ["house"],
                                                                   "Hund": ["dog"], "Katze": ["cat"]}
    tri = probe.load_dictionary("de", "zh", muse_dir=d)
    assert list(tri.items()) == [("Haus", ["房子"]), ("Heim", ["房子"]), ("Hund", ["狗", "犬"])]
    # test split: source words from the split file, references from the full target dictionary
    assert dict(probe.load_dictionary("de", "zh", muse_dir=d, split="test")) == {"Hund": ["狗", "犬"]}
    with pytest.raises(UserError, match="missing en-ja"):
        probe.load_dictionary("de", "ja", muse_dir=d)
    sel = probe.select_words({"a": ["a"], "b": ["x"], "c": ["y"]}, limit=1, skip_identical=True)
    assert dict(sel) == {"b": ["x"]}


# ------------------------------------------------------------------------------------------ overlap definitions
def _masks():
    L, I = 3, 6
    z = lambda: torch.zeros(L, I, dtype=torch.bool)  # noqa: E731
    s, t, b = z(), z(), z()
    s[0, [0, 1, 2]] = True
    s[1, [0]] = True
    t[0, [1, 2, 3]] = True
    t[2, [5]] = True
    b[0, [2, 4]] = True
    b[1, [0, 3]] = True
    return {"s": s, "t": t, "b": b}


def test_overlap_and_bridge_definitions_on_hand_made_masks():
    m = _masks()
    x = overlap.overlap_mask(m, "s", "t")
    assert x.nonzero().tolist() == [[0, 1], [0, 2]]
    assert overlap.layer_counts(x) == [2, 0, 0]
    u = overlap.overlap_mask(m, "s", "t", "union")
    assert u.nonzero().tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [2, 5]]
    y = overlap.bridge_mask(m, "b", "s", "t")
    assert y.nonzero().tolist() == [[0, 2], [0, 4], [1, 0], [1, 3]]
    y2 = overlap.bridge_mask(m, "b", "s", "t", "pair")
    assert y2.nonzero().tolist() == [[0, 4], [1, 3]]          # (0,2) is in T_s, (1,0) in T_s
    assert overlap.layer_rows(y2, 1).tolist() == [3]
    d = overlap.NeuronDefinition("intersection", "pair").as_dict()
    assert d["x"] == "T_s & T_t" and d["y"] == "T_b - (T_s | T_t)"
    with pytest.raises(UserError, match="--overlap"):
        overlap.NeuronDefinition("sum")
    with pytest.raises(UserError, match="no language neurons for 'q'"):
        overlap.overlap_mask(m, "s", "q")


# ------------------------------------------------------------------------------------------ layer window and scores
def test_window_layers_scale_with_depth():
    assert select.window_layers(32) == list(range(10, 22))
    assert select.window_layers(4) == [1, 2, 3]            # round(1.25)=1 .. round(2.625)=3
    assert select.window_layers(28) == list(range(9, 19))  # 8.75 -> 9, 18.375 -> 18
    assert select.window_layers(16) == list(range(5, 12))  # 5.0 .. 10.5 -> 11 (half up)
    assert select.parse_layers("3-5,9", 12) == [3, 4, 5, 9]
    with pytest.raises(UserError, match="0..3"):
        select.parse_layers("2-7", 4)


def _acts(L=6, I=5, N=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(L, I, N, generator=g, dtype=torch.float64)
    a += torch.arange(L, dtype=torch.float64)[:, None, None] * a.square()  # every layer different
    return a


def test_bridge_score_skips_empty_layers_and_uses_true_layer_ids():
    L, I, N = 6, 5, 9
    acts = _acts(L, I, N)
    x = torch.zeros(L, I, dtype=torch.bool)
    y = torch.zeros(L, I, dtype=torch.bool)
    x[2, [0, 1]] = True
    y[2, [3]] = True
    x[4, [2]] = True
    y[4, [1, 4]] = True
    x[3, [0]] = True            # layer 3: overlap neurons but no bridge neurons -> skipped
    y[0, [0]] = x[0, [0]] = True  # layer 0 is outside the window
    window = [2, 3, 4]
    r = select.bridge_score(acts, x, y, window)
    s2 = layer_score(hsic_matrix(acts[2][[0, 1]], acts[2][[3]]))
    s4 = layer_score(hsic_matrix(acts[4][[2]], acts[4][[1, 4]]))
    assert r["layers_used"] == [2, 4]
    assert r["score"] == pytest.approx((s2 + s4) / 2, rel=1e-12)
    assert r["score"] != pytest.approx((s2 + s4) / 3)                      # not averaged with a 0
    assert [e["score"] is None for e in r["per_layer"]] == [False, True, False]
    assert [(e["layer"], e["n_overlap"], e["n_bridge"]) for e in r["per_layer"]] == [(2, 2, 1), (3, 1, 0), (4, 1, 2)]
    # positions 0 and 2 of the window would be layers 0 and 2; the value must come from layers 2 and 4
    wrong = layer_score(hsic_matrix(acts[0][[2]], acts[0][[1, 4]]))
    assert r["per_layer"][2]["score"] == pytest.approx(s4) and s4 != pytest.approx(wrong)
    empty = select.bridge_score(acts, x, torch.zeros(L, I, dtype=torch.bool), window)
    assert math.isnan(empty["score"]) and empty["layers_used"] == []


def test_bridge_score_with_too_few_probes_is_a_user_error():
    acts = _acts(2, 3, 1)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(UserError, match="more probes"):
        select.bridge_score(acts, m, m, [0, 1])
    assert select.bridge_score(acts, m, m, [0, 1], variant="paper")["layers_used"] == [0, 1]


def test_rank_bridges_orders_best_first_nan_last_and_drops_the_pair():
    L, I, N = 4, 6, 12
    acts = _acts(L, I, N, seed=3)
    m = {c: torch.zeros(L, I, dtype=torch.bool) for c in ("s", "t", "good", "weak", "none")}
    m["s"][1, [0, 1]] = True
    m["t"][1, [0, 1]] = True
    m["good"][1, [0, 1]] = True        # the overlap neurons themselves: maximal dependence
    m["weak"][1, [5]] = True
    m["none"][3, [0]] = True           # only outside the window
    res = select.rank_bridges(acts, m, "s", "t", ["none", "weak", "s", "good"], [1, 2])
    assert [r["bridge"] for r in res["ranking"]] == ["good", "weak", "none"]
    assert [r["rank"] for r in res["ranking"]] == [1, 2, 3]
    assert res["selected"] == "good"
    assert math.isnan(res["ranking"][2]["score"])
    assert res["ranking"][0]["score"] > res["ranking"][1]["score"]
    allnan = select.rank_bridges(acts, m, "s", "t", ["none"], [1, 2])
    assert allnan["selected"] is None


def test_ranking_json_and_plot(tmp_path):
    acts = _acts(4, 6, 10)
    m = {c: torch.zeros(4, 6, dtype=torch.bool) for c in ("s", "t", "a", "b")}
    for c in m:
        m[c][1, [0, 1, 2]] = True
    m["b"][1] = False
    res = select.rank_bridges(acts, m, "s", "t", ["a", "b"], [1, 2], variant="paper")
    select.save_ranking(res, tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["ranking"][1]["score"] is None and doc["hsic"] == "paper"
    select.plot_ranking(res, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------ spectrum
def test_spectrum_matrices_on_hand_made_sets(tmp_path):
    L, I = 2, 4
    probs = {"a": torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.5, 0.1, 0.0, 0.7]], dtype=torch.float64),
             "b": torch.tensor([[0.3, 0.4, 0.9, 0.0], [0.2, 0.1, 0.0, 0.6]], dtype=torch.float64),
             "c": torch.tensor([[0.0, 0.0, 0.0, 0.9], [0.0, 0.8, 0.0, 0.0]], dtype=torch.float64)}
    masks = {k: v >= 0.3 for k, v in probs.items()}   # a: 4 neurons, b: 4, c: 2
    acts = _acts(L, I, 8)
    res = spectrum.compute_spectrum(probs, masks, acts, [0, 1])
    assert res["languages"] == ["a", "b", "c"]
    assert res["overlap"].tolist() == [[4, 3, 0], [3, 4, 0], [0, 0, 2]]
    # cosine of a and b on their intersection {(0,0),(0,1),(1,3)}
    pa, pb = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0.3, 0.4, 0.6])
    assert res["cosine"][0, 1] == pytest.approx(float(pa @ pb / pa.norm() / pb.norm()))
    assert res["jaccard"][0, 1] == pytest.approx(3 / 5) and res["jaccard"][0, 2] == 0.0
    h = res["hsic"]
    assert torch.equal(h, h.T)
    want = select.bridge_score(acts, masks["a"], masks["c"], [0, 1])["score"]
    assert h[0, 2] == pytest.approx(want)
    paths = spectrum.save_spectrum(res, tmp_path)
    assert {p.name for p in paths} == {"spectrum.json", "spectrum_overlap.png", "spectrum_cosine.png",
                                       "spectrum_jaccard.png", "spectrum_hsic.png"}
    doc = json.loads((tmp_path / "spectrum.json").read_text())
    assert doc["overlap"][0] == [4, 3, 0] and len(doc["hsic"]) == 3


# ------------------------------------------------------------------------------------------ model-based pieces
_TOY_TEXT = ['Deutsch:"Haus"→中文:"房子"', 'English:"house"→Français:"maison"', 'Español:"sí"→English:"yes"',
             "The river floods in spring.", "Question: When?\nA. winter\nB. autumn\nC. spring\nD. never\nAnswer: C"]


def _toy(model_type: str):
    """A random-weight tiny model with a real byte-level BPE tokenizer (BOS added, pad id 0)."""
    from langneurons.testing import tiny_model
    from langneurons.tiny import train_tokenizer
    tok = train_tokenizer({"x": _TOY_TEXT * 4}, vocab_size=320)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    return tiny_model(model_type, vocab_size=len(tok)), tok


@pytest.fixture(scope="module")
def demo():
    return _toy("llama")


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_probe_mean_over_prompt_tokens_equals_by_hand_mean_from_hooks(model_type):
    from langneurons.arch import Adapter
    from langneurons.hooks import observe
    model, tok = _toy(model_type)
    adapter = Adapter(model)
    prompts = ['Deutsch:"Haus"→中文:', 'English:"a much longer word here"→Français:', 'Español:"sí"→English:']
    acts = Session(model, tok, batch_size=2, adapter=adapter).mean_activations(prompts)
    assert acts.shape == (adapter.num_layers, adapter.width, 3) and acts.dtype == torch.float32
    with_bos = Session(model, tok, batch_size=3).mean_activations(prompts, include_special=True)
    for n, p in enumerate(prompts):
        ids = tok(p, return_tensors="pt")["input_ids"]
        assert ids[0, 0].item() == tok.bos_token_id
        seen = {}
        with observe(adapter, "act", lambda l, t: seen.__setitem__(l, t[0].double())):
            model.base_model(input_ids=ids)
        for l in range(adapter.num_layers):
            hand = seen[l][1:].mean(0)                 # prompt tokens, BOS left out
            torch.testing.assert_close(acts[l, :, n].double(), hand, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(with_bos[l, :, n].double(), seen[l].mean(0), atol=2e-5, rtol=1e-4)


def test_batched_left_padded_generation_equals_one_by_one(demo):
    model, tok = demo
    prompts = ['Deutsch:"Haus"→中文:', 'English:"a much longer word here"→Français:', 'fr:"x"→', "The"]
    batched = icl.HFGenerator(Session(model, tok, batch_size=4), max_new_tokens=6)(prompts)
    single = [icl.HFGenerator(Session(model, tok, batch_size=1), max_new_tokens=6)([p])[0] for p in prompts]
    assert batched == single
    assert all("\n" not in t for t in batched)


def test_choice_scorer_is_next_token_argmax_over_letters(demo):
    model, tok = demo
    session = Session(model, tok)
    scorer = icl.HFChoiceScorer(session)
    prompt = icl.mrc_prompt("The river floods in spring.", "When?", ["winter", "autumn", "spring", "never"])
    got = scorer([prompt, "Answer:"])
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    logits = model(input_ids=ids).logits[0, -1]
    assert got[0] == int(logits[session.letter_ids()].argmax())
    assert all(0 <= g <= 3 for g in got)


def test_build_probes_filters(demo):
    session = Session(*demo)
    nm = {"de": "Deutsch", "en": "English"}
    entries = {"Haus": ["house"], "Hund": ["dog"], "Katze": ["cat"]}
    gen = StubGenerator({icl.translation_prompt("Deutsch", "Hund", "English"): ' "Dog"',
                         icl.translation_prompt("Deutsch", "Katze", "English"): ' "cats"'})
    ps = probe.build_probes(session, entries, "de", "en", nm, "correct", gen)
    assert [p["word"] for p in ps.probes] == ["Hund"] and ps.n == 1
    assert ps.meta["filter"] == "correct" and ps.meta["n_correct"] == 1 and ps.meta["n_candidates"] == 3
    ps_all = probe.build_probes(session, entries, "de", "en", nm, "all", gen)
    assert ps_all.n == 3 and [p["correct"] for p in ps_all.probes] == [False, True, False]
    torch.testing.assert_close(ps_all.acts[:, :, 1], ps.acts[:, :, 0])

    def refuse(prompts):
        raise AssertionError("filter none must not generate")
    ps_none = probe.build_probes(session, entries, "de", "en", nm, "none", refuse, max_probes=2)
    assert ps_none.n == 2 and ps_none.probes[0]["correct"] is None and ps_none.meta["translation_accuracy"] is None
    with pytest.raises(UserError, match="--filter all"):
        probe.build_probes(session, {"Haus": ["house"]}, "de", "en", nm, "correct", StubGenerator({}))


def test_probe_set_round_trip(tmp_path, demo):
    ps = probe.build_probes(Session(*demo), {"Hund": ["dog"]}, "de", "en", {"de": "Deutsch", "en": "English"}, "none")
    ps.save(tmp_path)
    back = probe.ProbeSet.load(tmp_path, "de", "en")
    assert torch.equal(back.acts, ps.acts) and back.probes == ps.probes and back.meta["filter"] == "none"
    with pytest.raises(UserError, match="bridge probe --pair en-de"):
        probe.ProbeSet.load(tmp_path, "en", "de")


# ------------------------------------------------------------------------------------------ CLI
def test_cli_help_lists_every_action(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bridge", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for action in ("probe", "select", "bli", "mrc", "spectrum"):
        assert action in out
    for action in ("probe", "select", "bli", "mrc", "spectrum"):
        with pytest.raises(SystemExit) as e:
            main(["bridge", action, "--help"])
        assert e.value.code == 0
    assert "--filter" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["bridge", "probe", "--model", "x", "--pair", "dezh", "--dict", "d.txt", "--out", "o"], "bad --pair"),
    (["bridge", "probe", "--model", "x", "--pair", "de-zh", "--out", "o"], "--muse-dir"),
    (["bridge", "probe", "--model", "x", "--pair", "de-zh", "--pair", "fr-ru", "--dict", "d.txt", "--out", "o"],
     "exactly one --pair"),
    (["bridge", "bli", "--model", "x", "--pair", "de-zh", "--dict", "d.txt", "--names", "de", "--out", "o"],
     "CODE=NAME"),
    (["bridge", "select", "--probes", "NOPE", "--pair", "de-zh", "--stats", "NOPE", "--out", "o"],
     "bridge probe --pair de-zh"),
    (["bridge", "mrc", "--model", "x", "--data", "missing.jsonl", "--lang", "en", "--out", "o"], "does not exist"),
])
def test_cli_errors_are_one_line_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("langneurons: error:") and needle in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ end to end
def test_end_to_end_on_tiny_trained_model(shared_model, shared_stats, shared_data, tmp_path, capsys):
    muse = shared_data / "muse"
    out = tmp_path / "bridge"
    m = str(shared_model)
    common = ["--model", m, "--muse-dir", str(muse), "--device", "cpu", "--batch-size", "16"]
    assert main(["bridge", "probe", *common, "--pair", "de-zh", "--pair", "fr-ru", "--limit", "10",
                 "--filter", "all", "--out", str(out)]) == 0
    ps = probe.ProbeSet.load(out, "de", "zh")
    assert ps.acts.shape[2] == 10 and ps.meta["filter"] == "all" and ps.meta["n_candidates"] == 10
    assert ps.probes[0]["prompt"] == f'Deutsch:"{ps.probes[0]["word"]}"→中文:'
    assert main(["bridge", "select", "--stats", str(shared_stats), "--probes", str(out), "--pair", "de-zh",
                 "--pair", "fr-ru", "--top-rate", "0.05", "--out", str(out)]) == 0
    rk = json.loads((out / "ranking-de-zh.json").read_text())
    assert [r["bridge"] for r in rk["ranking"]] and {r["bridge"] for r in rk["ranking"]} == {"en", "fr", "es"}
    assert rk["candidates_unavailable"] == ["it", "pt"] and rk["layers"] == [1, 2, 3]
    assert (out / "ranking-de-zh.png").is_file() and (out / "overlap_neurons.json").is_file()
    assert main(["bridge", "spectrum", "--stats", str(shared_stats), "--probes", str(out), "--top-rate", "0.05",
                 "--out", str(out / "spectrum")]) == 0
    sp = json.loads((out / "spectrum" / "spectrum.json").read_text())
    assert sorted(sp["languages"]) == sorted(["en", "fr", "es", "de", "zh", "ru", "ar", "hi"])
    assert all(sp["overlap"][k][k] > 0 for k in range(8)) and len(sp["hsic"]) == 8
    assert sp["n_probes"] == 20
    assert main(["bridge", "bli", *common, "--pair", "de-zh", "--limit", "5", "--ranking", str(out),
                 "--out", str(out)]) == 0
    bl = json.loads((out / "bli-de-zh.json").read_text())
    assert set(bl["conditions"]) == {"baseline", "en", "fr", "es"}
    assert all(0.0 <= c["accuracy"] <= 1.0 and c["n"] == 5 for c in bl["conditions"].values())
    assert bl["selected"] == rk["selected"]


def test_token_healing_takes_back_the_last_token_and_constrains_the_first(demo):
    """Healing removes each prompt's last token; the first generated token must start with its text.
    Where the constrained greedy choice is that very token, the healed continuation equals the plain
    one (the model then reads the same tokens)."""
    model, tok = demo
    prompts = ['Deutsch:"Haus"→中文:', 'English:"house"→Français:', 'Español:"sí"→English:"yes"']
    plain = icl.HFGenerator(Session(model, tok, batch_size=2), max_new_tokens=6)
    healed = icl.HFGenerator(Session(model, tok, batch_size=2), max_new_tokens=6, token_healing=True)
    ids, prefixes, allowed = healed._healed(prompts)
    full = tok(prompts, add_special_tokens=True)["input_ids"]
    for row, (x, y, p) in enumerate(zip(ids, full, prefixes)):
        assert x == y[:-1] and p == tok.decode(y[-1:]) and allowed[row, y[-1]]
        assert all(tok.decode([i]).startswith(p) for i in torch.nonzero(allowed[row]).flatten().tolist())
    out_plain, out_healed = plain(prompts), healed(prompts)
    for x, y, row in zip(ids, full, range(len(prompts))):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([x])).logits[0, -1]
        first = int(logits.masked_fill(~allowed[row], float("-inf")).argmax())
        if first == y[-1]:
            assert out_healed[row] == out_plain[row]
    assert healed(prompts[:1]) == out_healed[:1]           # batching does not change the result
    assert all(isinstance(o, str) for o in out_healed)


def test_token_healing_makes_a_memorised_bridge_work(shared_data):
    """experiments/bridge_synthetic.py (a tiny model trained on dictionary lines in the BLI prompt
    format; about 80 s to train, cached): with token healing, BLI de->zh through English on words whose
    de->zh chain the model never saw is far above the direct prompt and the unseen bridge fr; the
    plain prompt, which stops inside the merged ':"' token, gets (almost) nothing."""
    import importlib.util
    from conftest import CACHE, _build, _key
    import langneurons.tiny as tiny_mod
    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bridge_synthetic", repo / "experiments" / "bridge_synthetic.py")
    exp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exp)
    if not (exp.SHARED / "muse" / "full" / "en-zh.txt").is_file():
        pytest.skip(f"needs {exp.SHARED / 'muse'} (the shared data)")
    target = CACHE / f"bridge-synthetic-{_key(tiny_mod.TRAINER_VERSION, 'words=400,steps=1200,seed=0')}"
    out = _build(target, lambda tmp: exp.run(tmp))      # the trained model is cached, BLI is recomputed
    r = exp.run(out)
    assert r["merged_colon_quote"]
    test = r["healed/test"]
    assert test["en"] >= 0.8 and test["baseline"] <= 0.1 and test["fr"] <= 0.1, test
    assert r["healed/train"]["en"] >= 0.9
    assert r["plain/test"]["en"] < test["en"] - 0.5
