"""Downstream tasks: loaders on the real files, prompts, scoring by hand, padding and batch
invariance, metrics against their definitions, interventions, and the eval command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import shared_path
from langneurons.cli import main
from langneurons.tasks import get_task
from langneurons.runtime import Session
from langneurons.testing import tiny_model




# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tok(demo_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(demo_model)


@pytest.fixture(scope="module")
def llama64(tok):
    return tiny_model("llama", dtype=torch.float64, vocab_size=len(tok), max_position_embeddings=256)


@pytest.fixture(scope="module")
def gpt2_64(tok):
    return tiny_model("gpt2", dtype=torch.float64, vocab_size=len(tok), n_positions=256)


@pytest.fixture(scope="module")
def demo(demo_model):
    from langneurons.runtime import load_model
    return load_model(str(demo_model), torch.device("cpu"), torch.float32)


PAIRS = [("The cat sat on", " the mat."), ("Le chat", " est noir et blanc."), ("Hi", " there"),
         ("一二三四五六七八九十 abc def ghi", " jkl"), ("Die Sonne geht im Osten", " auf"),
         ("Это", " тест, который проверяет длинное продолжение текста.")]


def by_hand(model, scorer, context, continuation) -> float:
    """sum_k log softmax(logits[len(ctx) - 1 + k])[cont_k] from one unpadded forward pass."""
    ctx, cont = scorer.encode_pair(context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(float(lp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ loaders on real files
def test_xcopa_counts(shared_data):
    task = get_task("xcopa")
    d = shared_path("xcopa")
    for lang in task.languages:
        assert len(task.load(str(d), lang, "validation")) == 100
        assert len(task.load(str(d), lang, "val")) == 100
        assert len(task.load(str(d), lang, "test")) == 500


def test_xnli_counts(shared_data):
    task = get_task("xnli")
    d = shared_path("xnli")
    for lang in task.languages:
        docs = task.load(str(d), lang, "test")
        assert len(docs) == 5010
        assert {x["label"] for x in docs} == {0, 1, 2}
    assert len(task.load(str(d), "en", "validation")) == 2490


def test_xquad_counts(shared_data):
    task = get_task("xquad")
    for lang in task.languages:
        docs = task.load(str(shared_path("xquad")), lang)
        assert len(docs) == 1190
        assert all(d["answers"] for d in docs)


def test_xwinograd_counts(shared_data):
    task = get_task("xwinograd")
    f = shared_path("xwinograd", "dataset.tsv")
    counts = {lang: len(task.load(str(f), lang)) for lang in task.languages}
    assert counts == {"en": 2325, "fr": 83, "ja": 959, "pt": 263, "ru": 315, "zh": 16}
    assert len(task.load(str(f), "jp")) == 959  # the file's own code
    assert len(task.load(str(f.parent), "fr")) == 83  # directory form
    ja = task.load(str(f), "ja")[0]
    assert ja == {"prefix": "狙撃兵はテロリストを撃った。", "options": ["狙撃兵", "テロリスト"],
                  "suffix": "は悪漢だったからだ。", "label": 1}
    en = task.load(str(f), "en")[0]
    assert task.requests(en, "en") == [
        ("The city councilmen refused the demonstrators a permit because The city councilmen", " feared violence."),
        ("The city councilmen refused the demonstrators a permit because the demonstrators", " feared violence.")]
    assert en["label"] == 0


def test_sib200_and_flores_counts(shared_data):
    sib = get_task("sib200")
    d = shared_path("sib200")
    for lang in ("en", "zh", "hi"):
        assert [len(sib.load(str(d), lang, s)) for s in ("test", "dev", "train")] == [204, 99, 701]
    assert len(sib.load(str(d), "eng_Latn", "test")) == 204
    fl = get_task("flores")
    docs = fl.load(str(shared_path("flores200", "devtest")), "zh")
    assert len(docs) == 1012
    assert docs[0]["source"].startswith('"We now have 4-month-old mice')


# ------------------------------------------------------------------------------------------ prompts
def test_xcopa_prompt_exact(shared_data, tmp_path):
    task = get_task("xcopa")
    it = task.load(str(shared_path("xcopa")), "it", "validation")[0]
    assert task.requests(it, "it") == [("L'uomo aprì il rubinetto quindi", " il gabinetto si riempì d'acqua."),
                                       ("L'uomo aprì il rubinetto quindi", " dell'acqua fluì dal beccuccio.")]
    zh = task.load(str(shared_path("xcopa")), "zh", "validation")[0]
    assert task.requests(zh, "zh")[1] == ("那人打开水龙头 所以", " 水从水龙头喷口流出。")


def test_xcopa_prompt_handwritten_and_strip_option(tmp_path):
    task = get_task("xcopa")
    f = write(tmp_path / "test.sw.jsonl",
              '{"premise": "Mtoto alilia.", "choice1": "Alikuwa na njaa.", "choice2": "Alicheka.", '
              '"question": "cause", "label": 0}\n'
              '{"premise": "Mlango ulifunguka", "choice1": "Upepo.", "choice2": "Jua.", '
              '"question": "effect", "label": 1}\n')
    docs = task.load(str(tmp_path), "sw", "test")
    assert task.requests(docs[0], "sw") == [("Mtoto alilia kwa sababu", " alikuwa na njaa."),
                                            ("Mtoto alilia kwa sababu", " alicheka.")]
    # no final period: the default keeps the premise whole, strip=last cuts a letter as lm-eval does
    assert task.requests(docs[1], "sw")[0][0] == "Mlango ulifunguka kwa hiyo"
    assert task.requests(docs[1], "sw", strip="last")[0][0] == "Mlango ulifunguk kwa hiyo"
    assert task.solved(docs[1], "sw") == "Mlango ulifunguka kwa hiyo jua."
    assert f.is_file()


def test_xnli_prompt():
    task = get_task("xnli")
    doc = {"premise": "He came home.", "hypothesis": "He is at home.", "label": 0}
    assert task.requests(doc, "en") == [("He came home., right?", " Yes, He is at home."),
                                        ("He came home., right?", " Also, He is at home."),
                                        ("He came home., right?", " No, He is at home.")]
    assert task.requests(doc, "zh")[2] == ("He came home., 正确?", " 不是的, He is at home.")


# ------------------------------------------------------------------------------------------ scoring
def test_loglikelihood_equals_by_hand(llama64, tok):
    scorer = Session(llama64, tok, batch_size=4)
    got = scorer.loglikelihood(PAIRS)
    for (c, x), (ll, n) in zip(PAIRS, got):
        assert ll == pytest.approx(by_hand(llama64, scorer, c, x), abs=1e-10)
        assert n == len(scorer.encode_pair(c, x)[1])
    # the context carries the tokenizer's BOS; a trailing space moves to the continuation
    ctx, cont = scorer.encode_pair("The cat sat on ", "the mat.")
    assert ctx[0] == tok.bos_token_id
    assert (ctx, cont) == scorer.encode_pair("The cat sat on", " the mat.")


def test_choice_task_equals_by_hand(llama64, tok):
    task = get_task("xcopa")
    docs = [{"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
             "choice2": "Water flowed from the spout.", "question": "effect", "label": 1},
            {"premise": "The girl found a bug in her cereal.", "choice1": "She poured milk in the bowl.",
             "choice2": "She lost her appetite.", "question": "effect", "label": 1},
            {"premise": "I wanted to save energy.", "choice1": "I swept the floor.",
             "choice2": "I switched off the lights.", "question": "cause", "label": 0}]
    scorer = Session(llama64, tok, batch_size=2)
    res = task.evaluate(scorer, docs, "en")
    correct = correct_norm = 0
    for d in docs:
        reqs = task.requests(d, "en")
        lls = [by_hand(llama64, scorer, c, x) for c, x in reqs]
        norm = [ll / len(x.encode()) for ll, (_, x) in zip(lls, reqs)]
        correct += int(max(range(2), key=lambda i: lls[i]) == d["label"])
        correct_norm += int(max(range(2), key=lambda i: norm[i]) == d["label"])
    assert res["acc"] == pytest.approx(correct / 3)
    assert res["acc_norm"] == pytest.approx(correct_norm / 3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_side_and_batch_size_do_not_change_scores(arch, llama64, gpt2_64, tok):
    model = llama64 if arch == "llama" else gpt2_64
    ref = Session(model, tok, batch_size=1).loglikelihood(PAIRS)
    for bs in (2, 3, 8):
        for side in ("right", "left"):
            got = Session(model, tok, batch_size=bs, padding_side=side).loglikelihood(PAIRS)
            assert max(abs(a[0] - b[0]) for a, b in zip(got, ref)) < 1e-9
    prompts = [c for c, _ in PAIRS]
    cand = [5, 17, 300]
    lp1 = Session(model, tok, batch_size=1).next_token_logprobs(prompts, cand)
    for bs, side in ((3, "right"), (8, "left")):
        lp = Session(model, tok, batch_size=bs, padding_side=side).next_token_logprobs(prompts, cand)
        assert torch.allclose(lp, lp1, atol=1e-9, rtol=0)
    # by hand: the last prompt position of an unpadded pass
    ids = torch.tensor([[tok.bos_token_id] + Session(model, tok).encode(prompts[0])])
    with torch.no_grad():
        hand = torch.log_softmax(model(ids).logits[0, -1].double(), -1)[cand]
    assert torch.allclose(lp1[0], hand, atol=1e-10, rtol=0)


def test_left_padded_batched_generation_equals_one_by_one(llama64, tok):
    prompts = ["The cat", "Le chat est noir et", "一二三", "Die Sonne geht im Osten auf und"]
    one = Session(llama64, tok, batch_size=1).generate(prompts, max_new_tokens=6, stop=(), strip=True)
    many = Session(llama64, tok, batch_size=4).generate(prompts, max_new_tokens=6, stop=(), strip=True)
    assert one == many
    # greedy by hand for the first prompt
    ids = [tok.bos_token_id] + Session(llama64, tok).encode(prompts[0])
    for _ in range(6):
        with torch.no_grad():
            ids.append(int(llama64(torch.tensor([ids])).logits[0, -1].argmax()))
    assert one[0] == tok.decode(ids[-6:], skip_special_tokens=True).strip()


def test_generation_stops_at_stop_string(llama64, tok):
    full = Session(llama64, tok).generate(["Hello"], max_new_tokens=12, stop=(), strip=True)[0]
    assert len(full) > 2
    stop = full[1:3]  # a substring the greedy continuation is known to contain
    cut = Session(llama64, tok).generate(["Hello"], max_new_tokens=12, stop=(stop,), strip=True)[0]
    assert cut == full[:full.find(stop)].strip()


# ------------------------------------------------------------------------------------------ metrics
def test_squad_normalisation_and_scores():
    from langneurons.tasks.xquad import normalize_answer, squad_em_f1, token_em_f1
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("北京。") == "北京"  # Unicode punctuation too
    assert squad_em_f1("Paris, France", ["Paris"]) == (0.0, pytest.approx(2 / 3))
    # P = 2/2, R = 2/3 -> F1 = 0.8
    assert squad_em_f1("the cat sat", ["a cat sat down"]) == (0.0, pytest.approx(0.8))
    assert squad_em_f1("Denver Broncos", ["Broncos", "the Denver Broncos"]) == (1.0, 1.0)
    assert squad_em_f1("no overlap", ["something else"]) == (0.0, 0.0)

    class Chars:  # a tokenizer with one id per character, to check the token-id variant by hand
        def __call__(self, s, add_special_tokens=False):
            return type("E", (), {"input_ids": [ord(c) for c in s]})()
    assert token_em_f1(" ab", ["ab"], Chars()) == (1.0, 1.0)
    # pred ids {a, b, c}, gold {a, b, d, e}: P = 2/3, R = 2/4 -> F1 = 4/7
    assert token_em_f1("abc", ["abde"], Chars()) == (0.0, pytest.approx(4 / 7))


def test_xquad_score_averages():
    task = get_task("xquad")
    docs = [{"answers": ["Paris"]}, {"answers": ["the cat sat down"]}]
    res = task.score(["Paris", "cat sat"], docs, "en", None)
    assert res == {"em": 0.5, "f1": pytest.approx((1 + 0.8) / 2)}


def test_bleu_chrf_are_sacrebleu_corpus_scores():
    import sacrebleu
    from langneurons.tasks.flores import corpus_scores
    hyps = ["the cat sat on the mat", "a dog barked loudly", "it is raining today"]
    refs = ["the cat is on the mat", "the dog barked loudly", "it rains today"]
    got = corpus_scores(hyps, refs, "en")
    assert got["bleu"] == sacrebleu.corpus_bleu(hyps, [refs]).score
    assert got["chrf++"] == sacrebleu.corpus_chrf(hyps, [refs], word_order=2).score
    assert got["bleu"] == pytest.approx(30.0156, abs=1e-3)  # sacreBLEU 2.x, tokenize 13a
    per_sentence = sum(sacrebleu.sentence_bleu(h, [r]).score for h, r in zip(hyps, refs)) / 3
    assert abs(per_sentence - got["bleu"]) > 1  # a corpus score, not a mean of sentence scores
    zh = corpus_scores(["猫坐在垫子上"], ["猫在垫子上"], "zh")
    assert zh["bleu"] == sacrebleu.corpus_bleu(["猫坐在垫子上"], [["猫在垫子上"]], tokenize="zh").score
    assert "tok:zh" in zh["signatures"]["bleu"]
    assert "nw:2" in got["signatures"]["chrf++"]


# ------------------------------------------------------------------------------------------ multiple choice by letter
MCQ = [
    {"lang": "en", "passage": "Tom has a red ball.", "question": "What colour is the ball?",
     "choices": ["blue", "red", "green", "black"], "answer": 1},
    {"lang": "en", "question": "Two plus two?", "choices": ["four", "five"], "answer": "A"},
    {"lang": "fr", "question": "Capitale de la France ?", "choices": ["Lyon", "Nice", "Paris"], "answer": 2},
    {"lang": "en", "flores_passage": "The sun is hot.", "question": "What is hot?", "mc_answer1": "ice",
     "mc_answer2": "snow", "mc_answer3": "the sun", "mc_answer4": "rain", "correct_answer_num": "3"},
]


def test_mcq_prompt_and_letter_scoring(tmp_path, llama64, tok):
    f = write(tmp_path / "mc.jsonl", "".join(json.dumps(r) + "\n" for r in MCQ))
    task = get_task("mcq")
    docs = task.load(str(f), "en")
    assert [d["label"] for d in docs] == [1, 0, 2]
    assert [len(d["choices"]) for d in docs] == [4, 2, 4]
    assert task.prompt(docs[0], "en") == ("P: Tom has a red ball.\nQ: What colour is the ball?\nA: blue\nB: red\n"
                                          "C: green\nD: black\nAnswer:")
    assert task.prompt(docs[1], "en") == "Q: Two plus two?\nA: four\nB: five\nAnswer:"
    assert len(task.load(str(f), "fr")) == 1
    scorer = Session(llama64, tok, batch_size=2)
    res = task.evaluate(scorer, docs, "en")
    letters = [scorer.encode(" " + L)[0] for L in "ABCD"]
    correct = 0
    for d in docs:
        ids = torch.tensor([[tok.bos_token_id] + scorer.encode(task.prompt(d, "en"))])
        with torch.no_grad():
            last = llama64(ids).logits[0, -1]
        pick = max(range(len(d["choices"])), key=lambda k: float(last[letters[k]]))
        correct += int(pick == d["label"])
    assert res["acc"] == pytest.approx(correct / 3)


# ------------------------------------------------------------------------------------------ bad input
def _eval(argv, capsys):
    rc = main(["eval", *argv])
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("task,files,expect", [
    ("xcopa", {"test.zh.jsonl": '{"premise": "a.", "choice1": "b", "choice2": "c", "question": "effect", '
                                '"label": 1}\n{not json}\n'}, ":2 is not valid JSON"),
    ("xcopa", {"test.zh.jsonl": '{"premise": "a.", "choice1": "b", "choice2": "c", "question": "why", '
                                '"label": 1}\n'}, "question must be 'cause' or 'effect'"),
    ("xnli", {"xnli_test_zh.tsv": "id\tpremise\thypothesis\tlabel\n0\ta\tb\t7\n"}, "is not 0, 1 or 2"),
    ("xnli", {"xnli_test_zh.tsv": "id\tpremise\tlabel\n0\ta\t1\n"}, "lacks column(s) hypothesis"),
    ("xquad", {"xquad.zh.json": '{"version": 1}'}, "not SQuAD format"),
    ("mcq", {"zh.jsonl": '{"question": "q?", "choices": ["a"], "answer": 0}\n'}, "needs 'choices'"),
    ("sib200", {"zho_Hans/test.tsv": "index_id\tcategory\ttext\n1\tcooking\tsome text\n"}, "is not one of"),
    ("xcopa", {}, "does not exist"),
])
def test_malformed_task_files_exit_2_with_one_line(tmp_path, capsys, task, files, expect):
    for name, text in files.items():
        write(tmp_path / "data" / name, text)
    (tmp_path / "data").mkdir(exist_ok=True)
    out = tmp_path / "out"
    rc, err = _eval([task, "--model", str(tmp_path / "no-model"), "--languages", "zh", "--data", str(tmp_path / "data"),
                     "--out", str(out)], capsys)
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("langneurons: error:")
    assert expect in err
    assert not out.exists()  # nothing written


def test_bad_arguments_exit_2(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    for argv, expect in ((["nosuch"], "unknown task"),
                         (["xcopa", "--setting", "self"], "needs --neurons"),
                         (["xcopa", "--setting", "both"], "unknown --setting"),
                         (["xcopa", "--option", "strip=middle"], "strip must be one of"),
                         (["xcopa", "--option", "nope=1"], "has no option"),
                         (["xcopa", "--limit", "0"], "--limit must be at least 1")):
        rc, err = _eval([*argv, "--model", "m", "--languages", "zh", "--data", str(tmp_path / "d"), "--out",
                         str(tmp_path / "o")], capsys)
        assert rc == 2 and len(err.splitlines()) == 1 and expect in err, (argv, err)


# ------------------------------------------------------------------------------------------ hf: sources
def test_hf_source_from_a_local_dataset_directory(tmp_path):
    recs = [{"premise": "Il pleut.", "choice1": "Je prends un parapluie.", "choice2": "Je bronze.",
             "question": "effect", "label": 0}] * 3
    write(tmp_path / "ds" / "test.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
    docs = get_task("xcopa").load(f"hf:{tmp_path / 'ds'}", "en", "test")
    assert len(docs) == 3 and docs[0]["premise"] == "Il pleut."


# ------------------------------------------------------------------------------------------ interventions
def _neuron_set(model, path: Path, langs=("zh", "it", "en")) -> Path:
    from langneurons.arch import Adapter
    from langneurons.neuronset import NeuronSet
    ad = Adapter(model)
    g = torch.Generator().manual_seed(0)
    masks = {c: torch.rand(ad.num_layers, ad.width, generator=g) < 0.3 for c in langs}
    NeuronSet.from_masks(masks, {"num_layers": ad.num_layers, "width": ad.width, "site": "act",
                                 "model_type": model.config.model_type}, {"name": "random"}).save(path)
    return path


def test_scores_change_under_intervention_and_return_after(demo, tmp_path):
    from langneurons.intervene import Intervention, intervene
    from langneurons.neuronset import NeuronSet
    model, tokz = demo
    ns = NeuronSet.load(_neuron_set(model, tmp_path / "ns.json"))
    scorer = Session(model, tokz, batch_size=3)
    base = scorer.loglikelihood(PAIRS)
    with intervene(model, Intervention(neurons=ns, languages=["zh"], operator="zero")):
        iv = scorer.loglikelihood(PAIRS)
        gen_iv = scorer.generate(["The cat"], max_new_tokens=8, stop=())
    after = scorer.loglikelihood(PAIRS)
    assert all(abs(a[0] - b[0]) > 1e-4 for a, b in zip(base, iv))
    assert [a[0] for a in after] == [b[0] for b in base]
    assert isinstance(gen_iv[0], str)


def test_eval_command_with_settings(demo_model, demo, tmp_path, capsys):
    model, _ = demo
    ns_path = _neuron_set(model, tmp_path / "ns.json")
    rec = lambda p, c1, c2, q, l: json.dumps({"premise": p, "choice1": c1, "choice2": c2, "question": q,
                                             "label": l}) + "\n"
    write(tmp_path / "d" / "test.zh.jsonl", rec("男人打开了水龙头。", "马桶满了。", "水流了出来。", "effect", 1)
          + rec("女孩在麦片中发现了虫子。", "她倒了牛奶。", "她没了胃口。", "effect", 1)
          + rec("我想节约能源。", "我扫了地。", "我关了灯。", "cause", 0))
    write(tmp_path / "d" / "test.it.jsonl", rec("L'uomo aprì il rubinetto.", "Il water si riempì.",
                                                 "L'acqua scorreva.", "effect", 1)
          + rec("La ragazza trovò un insetto.", "Versò il latte.", "Perse l'appetito.", "effect", 1))
    out = tmp_path / "out"
    rc = main(["eval", "xcopa", "--model", str(demo_model), "--languages", "zh,it", "--data", str(tmp_path / "d"),
               "--neurons", str(ns_path), "--operator", "zero", "--setting", "none,self,cross", "--out", str(out),
               "--device", "cpu", "--batch-size", "4", "--quiet", "--limit", "2"])
    assert rc == 0
    res = json.loads((out / "xcopa.json").read_text())
    assert res["format"] == "langneurons.task.v1" and res["languages"] == ["zh", "it"]
    labels = [(r["lang"], r["setting"], r["neurons_lang"]) for r in res["rows"]]
    assert labels == [("zh", "none", None), ("zh", "self", "zh"), ("zh", "cross", "it"), ("zh", "cross", "en"),
                      ("it", "none", None), ("it", "self", "it"), ("it", "cross", "zh"), ("it", "cross", "en")]
    assert all(r["n"] == 2 for r in res["rows"])
    assert res["rows"][1]["intervention"]["operator"] == "zero"
    assert res["rows"][1]["intervention"]["languages"] == ["zh"]
    assert res["table"]["rows"] == ["none", "self", "cross:it", "cross:en", "cross:zh", "cross (mean)"]
    # the mean row is the mean of the cross rows of each language
    t = dict(zip(res["table"]["rows"], res["table"]["values"]))
    assert t["cross (mean)"][0] == pytest.approx((t["cross:it"][0] + t["cross:en"][0]) / 2)
    assert t["cross (mean)"][1] == pytest.approx((t["cross:zh"][1] + t["cross:en"][1]) / 2)
    md = (out / "xcopa.md").read_text()
    assert "| setting | zh | it |" in md and "| cross (mean) |" in md
    assert "| cross (mean) |" in capsys.readouterr().out  # the tables are printed too


def test_interrupted_eval_resumes_finished_rows(demo_model, demo, tmp_path, monkeypatch):
    """A run killed after two (language, setting) rows reuses them from OUT/.partial on rerun and
    ends with the result of an uninterrupted run; other settings do not reuse them."""
    from langneurons.tasks.xcopa import XCOPA
    model, _ = demo
    ns_path = _neuron_set(model, tmp_path / "ns.json")
    rec = lambda p, c1, c2, q, l: json.dumps({"premise": p, "choice1": c1, "choice2": c2, "question": q,
                                             "label": l}) + "\n"
    write(tmp_path / "d" / "test.zh.jsonl", rec("男人打开了水龙头。", "马桶满了。", "水流了出来。", "effect", 1)
          + rec("我想节约能源。", "我扫了地。", "我关了灯。", "cause", 0))
    write(tmp_path / "d" / "test.it.jsonl", rec("L'uomo aprì il rubinetto.", "Il water si riempì.",
                                                 "L'acqua scorreva.", "effect", 1))

    def run(out, *extra):
        return main(["eval", "xcopa", "--model", str(demo_model), "--languages", "zh,it", "--data", str(tmp_path / "d"),
                     "--neurons", str(ns_path), "--operator", "zero", "--setting", "none,self", "--out", str(out),
                     "--device", "cpu", "--batch-size", "4", "--quiet", *extra])
    assert run(tmp_path / "whole") == 0
    whole = json.loads((tmp_path / "whole" / "xcopa.json").read_text())

    real, calls = XCOPA.evaluate, []

    def flaky(self, *a, **kw):
        calls.append(a[2])
        if len(calls) == 3:
            raise KeyboardInterrupt          # killed during the third row
        return real(self, *a, **kw)
    monkeypatch.setattr(XCOPA, "evaluate", flaky)
    out = tmp_path / "cut"
    assert run(out) == 130
    assert (out / ".partial" / "xcopa.json").is_file() and not (out / "xcopa.json").exists()
    calls.clear()
    monkeypatch.setattr(XCOPA, "evaluate", lambda self, *a, **kw: (calls.append(a[2]), real(self, *a, **kw))[1])
    assert run(out) == 0
    assert calls == ["it", "it"]                     # the two zh rows came from the checkpoint
    again = json.loads((out / "xcopa.json").read_text())
    assert [r["metrics"] for r in again["rows"]] == [r["metrics"] for r in whole["rows"]]
    assert again["table"] == whole["table"] and not (out / ".partial").exists()
    # a checkpoint of another setting (here: another operator) is not reused
    calls.clear()
    monkeypatch.setattr(XCOPA, "evaluate", flaky)
    assert run(out) == 130 and (out / ".partial" / "xcopa.json").is_file()
    calls.clear()
    monkeypatch.setattr(XCOPA, "evaluate", lambda self, *a, **kw: (calls.append(a[2]), real(self, *a, **kw))[1])
    assert run(out, "--operator", "set:-1") == 2 and calls == []   # another run's xcopa.json is kept
    assert run(out, "--operator", "set:-1", "--overwrite") == 0
    assert calls == ["zh", "zh", "it", "it"]


def test_self_setting_needs_the_language_in_the_set(demo_model, demo, tmp_path, capsys):
    ns_path = _neuron_set(demo[0], tmp_path / "ns.json", langs=("en",))
    write(tmp_path / "d" / "test.zh.jsonl", '{"premise": "a.", "choice1": "b", "choice2": "c", "question": '
                                            '"effect", "label": 1}\n')
    rc, err = _eval(["xcopa", "--model", str(demo_model), "--languages", "zh", "--data", str(tmp_path / "d"),
                     "--neurons", str(ns_path), "--operator", "zero", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "has no language zh" in err and len(err.splitlines()) == 1


def test_generation_tasks_end_to_end(demo, tmp_path):
    """XQuAD and FLORES through the runner on hand-written files (a trained tiny model)."""
    from langneurons.tasks.runner import EvalConfig, run_eval
    model, tokz = demo
    squad = {"data": [{"paragraphs": [{"context": "Paris is the capital of France.", "qas": [
        {"id": "q1", "question": "What is the capital of France?", "answers": [{"text": "Paris", "answer_start": 0}]},
        {"id": "q2", "question": "Which country?", "answers": [{"text": "France", "answer_start": 24}]}]}]}]}
    write(tmp_path / "xq" / "xquad.en.json", json.dumps(squad))
    res = run_eval(EvalConfig(task="xquad", model="demo", out=tmp_path / "o", langs=["en"],
                              data=str(tmp_path / "xq"), max_new_tokens=5, progress=False), model, tokz)
    row = res["rows"][0]
    assert row["n"] == 2 and 0.0 <= row["metrics"]["f1"] <= 1.0 and len(row["samples"]) == 2
    from langneurons.tasks.xquad import squad_em_f1
    em = [squad_em_f1(s["prediction"], [s["reference"]])[0] for s in row["samples"]]
    assert row["metrics"]["em"] == pytest.approx(sum(em) / 2)

    write(tmp_path / "fl" / "eng_Latn.devtest", "Hello world.\nThe cat sleeps.\nGood morning.\n")
    write(tmp_path / "fl" / "fra_Latn.devtest", "Bonjour le monde.\nLe chat dort.\nBonjour.\n")
    res = run_eval(EvalConfig(task="flores", model="demo", out=tmp_path / "o", langs=["fr"], shots=1,
                              data=str(tmp_path / "fl"), max_new_tokens=8, progress=False), model, tokz)
    row = res["rows"][0]
    assert row["n"] == 2  # the demonstration is not scored
    assert row["samples"][0]["prompt_end"].endswith("English: The cat sleeps.\nFrench:")
    import sacrebleu
    hyps = [s["prediction"] for s in row["samples"]]
    assert row["metrics"]["bleu"] == sacrebleu.corpus_bleu(hyps, [["Le chat dort.", "Bonjour."]]).score
    assert res["fewshot_source"]["fr"].startswith("first 1 of the evaluated split")
    assert math.isfinite(row["metrics"]["chrf++"])


def test_fewshot_demonstrations_come_from_the_other_split(tmp_path, llama64, tok):
    from langneurons.tasks.runner import EvalConfig, load_task_docs, run_eval
    rows = "id\tpremise\thypothesis\tlabel\n" + "".join(f"{i}\tP{i}.\tH{i}.\t{i % 3}\n" for i in range(3))
    write(tmp_path / "x" / "xnli_test_en.tsv", rows)
    write(tmp_path / "x" / "xnli_validation_en.tsv", rows.replace("P", "V"))
    task = get_task("xnli")
    cfg = EvalConfig(task="xnli", model="m", out=tmp_path / "o", data=str(tmp_path / "x"), shots=1)
    docs, demos, source = load_task_docs(task, cfg, "en", {})
    assert len(docs) == 3 and demos[0]["premise"] == "V0." and source == "first 1 of split validation"
    assert task.fewshot_prefix(demos, "en") == "V0., right? Yes, H0.\n\n"
    # a single file cannot change split: the first document becomes the demonstration and is not scored
    cfg.data = str(tmp_path / "x" / "xnli_test_en.tsv")
    docs, demos, source = load_task_docs(task, cfg, "en", {})
    assert [d["premise"] for d in docs] == ["P1.", "P2."] and demos[0]["premise"] == "P0."
    res = run_eval(EvalConfig(task="xnli", model="m", out=tmp_path / "o", langs=["en"], data=str(tmp_path / "x"),
                              shots=1, progress=False), llama64, tok)
    assert res["rows"][0]["n"] == 3 and res["shots"] == 1
