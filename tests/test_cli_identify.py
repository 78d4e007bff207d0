"""``langneurons identify``: every method through the command line, and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from langneurons.cli import main
from langneurons.neuronset import NeuronSet
from langneurons.stats import STATS_FORMAT, LanguageStats


def one_error_line(capsys, *words):
    err = capsys.readouterr().err
    assert err.startswith("langneurons: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, err
    return err


def derived_stats(src: Path, dst: Path, languages=None, **model_changes) -> Path:
    """A statistics dir linking to ``src``'s files, with stats.json restricted/edited."""
    dst.mkdir(parents=True)
    meta = json.loads((src / "stats.json").read_text())
    langs = languages or list(meta["languages"])
    meta["languages"] = {c: meta["languages"][c] for c in langs}
    for k, v in model_changes.items():
        meta["model"][k] = v
        meta.setdefault("identity", {})[{"name_or_path": "model_fingerprint"}.get(k, k)] = v
    (dst / "stats.json").write_text(json.dumps(meta))
    for c in langs:
        os.symlink(src / f"{c}.safetensors", dst / f"{c}.safetensors")
    return dst


@pytest.fixture(scope="module")
def sentence_stats(tmp_path_factory) -> Path:
    """A sentence-unit statistics directory on disk (hand-made sentence means, 3 languages)."""
    d = tmp_path_factory.mktemp("sentence-stats")
    g = torch.Generator().manual_seed(0)
    L, I, S = 2, 8, 12
    meta = {"format": STATS_FORMAT, "model": {"name_or_path": "hand", "model_type": "llama", "num_layers": L,
                                              "width": I, "site": "act"},
            "unit": "sentence", "window": 64, "languages": {}}
    for k, code in enumerate(["en", "fr", "zh"]):
        ls = LanguageStats(L, I, sketch_bins=0, sentences=S)
        m = torch.randn(S, L, I, generator=g) * 0.1 - 0.5
        m[:, 1, k] = 1.0 + torch.rand(S, generator=g)    # neuron (1, k) fires on every sentence of language k only
        ls.sentence_mean[:] = m
        ls.add_sentences(S)
        ls.add_tokens(20 * S)
        ls.count_pos += (m > 0).sum(0)
        ls.save(d / f"{code}.safetensors")
        meta["languages"][code] = {"n_tokens": 20 * S, "n_sentence_means": S}
    (d / "stats.json").write_text(json.dumps(meta))
    return d


def test_lape_cli_writes_valid_set(demo_stats, tmp_path, capsys):
    out = tmp_path / "sub" / "lape.json"
    assert main(["identify", "lape", "--stats", str(demo_stats), "--out", str(out)]) == 0
    ns = NeuronSet.load(out)
    assert len(ns.languages) == 10 and ns.method["name"] == "lape"
    prm = ns.method["params"]
    assert prm["requested"] == round(0.01 * 4 * 384) == prm["selected"]
    assert {"top_rate", "filter_rate", "activation_bar_ratio", "tau_f", "tau_b", "filtered_inf"} <= set(prm)
    assert ns.model["site"] == "act" and ns.method["stats_fingerprint"]
    assert capsys.readouterr().out.strip() == str(out)
    # 0.01 of 1536 is 15 neurons for 10 languages (some get none); 0.05 gives every language a set
    out5 = tmp_path / "lape5.json"
    assert main(["identify", "lape", "--stats", str(demo_stats), "--out", str(out5), "--top-rate", "0.05"]) == 0
    ns5 = NeuronSet.load(out5)
    assert all(ns5.total(c) > 0 for c in ns5.languages), ns5.counts()
    # identical inputs, identical output
    out5b = tmp_path / "lape5b.json"
    main(["identify", "lape", "--stats", str(demo_stats), "--out", str(out5b), "--top-rate", "0.05"])
    assert out5.read_text() == out5b.read_text()
    # the Python entry point gives the same set as the command
    from langneurons.identify import select
    py = select("lape", demo_stats, top_rate=0.05)
    assert py.languages == ns5.languages and all(torch.equal(py.mask(c), ns5.mask(c)) for c in ns5.languages)
    assert py.method["params"]["tau_f"] == ns5.method["params"]["tau_f"]
    sub = select("lape", demo_stats, ["en", "fr", "zh"], top_rate=0.05)
    assert sub.languages == ["en", "fr", "zh"]
    from langneurons.errors import UserError
    with pytest.raises(UserError, match="no option top_k"):
        select("lape", demo_stats, top_k=3)
    with pytest.raises(UserError, match="unknown method"):
        select("entropy", demo_stats)


def test_top_prob_and_act_prob_cli(demo_stats, tmp_path):
    out = tmp_path / "tp.json"
    assert main(["identify", "top-prob", "--stats", str(demo_stats), "--out", str(out), "--languages", "en,zh"]) == 0
    ns = NeuronSet.load(out)
    assert ns.languages == ["en", "zh"]
    # kthvalue rank round(0.99 * 1536) = 1521, keep >= : at least 1536 - 1521 + 1 = 16 neurons
    assert all(ns.total(c) >= 16 for c in ns.languages)
    out = tmp_path / "ap90.json"
    assert main(["identify", "act-prob-percentile", "--stats", str(demo_stats), "--out", str(out),
                 "--languages", "en,fr,zh", "--rate", "0.01", "--threshold", "en"]) == 0
    ns = NeuronSet.load(out)
    assert [ns.total(c) for c in ns.languages] == [15, 15, 15]
    assert ns.method["params"]["threshold"] == "en" and ns.method["params"]["site"] == "act"


def test_sentence_methods_cli(sentence_stats, tmp_path, capsys):
    out = tmp_path / "la.json"
    assert main(["identify", "language-activated", "--stats", str(sentence_stats), "--out", str(out)]) == 0
    ns = NeuronSet.load(out)
    assert {c: ns.neurons[c].tolist() for c in ns.languages} == {"en": [[1, 0]], "fr": [[1, 1]], "zh": [[1, 2]]}
    out = tmp_path / "ap.json"
    assert main(["identify", "ap", "--stats", str(sentence_stats), "--out", str(out)]) == 0
    ns = NeuronSet.load(out)
    assert {c: ns.neurons[c].tolist() for c in ns.languages} == {"en": [[1, 0]], "fr": [[1, 1]], "zh": [[1, 2]]}
    assert ns.method["params"]["threshold"] == 0.9


def test_random_control_cli(demo_stats, tmp_path):
    src = tmp_path / "lape.json"
    main(["identify", "lape", "--stats", str(demo_stats), "--out", str(src), "--top-rate", "0.05"])
    lape = NeuronSet.load(src)
    out = tmp_path / "rand.json"
    assert main(["identify", "random", "--of", str(src), "--seed", "3", "--out", str(out)]) == 0
    rnd = NeuronSet.load(out)
    assert rnd.method["name"] == "random" and rnd.method["params"]["seed"] == 3
    taken = lape.union_mask()
    for c in lape.languages:
        assert torch.equal(rnd.counts()[c], lape.counts()[c])
        assert not (rnd.mask(c) & taken).any()
    out2 = tmp_path / "rand2.json"
    main(["identify", "random", "--of", str(src), "--seed", "3", "--out", str(out2)])
    again = NeuronSet.load(out2)
    assert all(torch.equal(again.neurons[c], rnd.neurons[c]) for c in rnd.languages)   # same seed, same set
    many = tmp_path / "many.json"
    assert main(["identify", "random", "--of", str(src), "--seeds", "0,1", "--out", str(many),
                 "--languages", "en,ru"]) == 0
    s0, s1 = NeuronSet.load(tmp_path / "many-seed0.json"), NeuronSet.load(tmp_path / "many-seed1.json")
    assert not many.exists() and s0.languages == ["en", "ru"]
    assert not all(torch.equal(s0.neurons[c], s1.neurons[c]) for c in s0.languages)


def test_sentence_methods_need_sentence_stats(demo_stats, tmp_path, capsys):
    for method in ("language-activated", "ap"):
        out = tmp_path / f"{method}.json"
        assert main(["identify", method, "--stats", str(demo_stats), "--out", str(out)]) == 2
        one_error_line(capsys, "--unit sentence")
        assert not out.exists()


@pytest.mark.parametrize("argv, words", [
    (["lape", "--top-rate", "1.5"], ["--top-rate"]),
    (["lape", "--filter-rate", "0"], ["--filter-rate"]),
    (["lape", "--languages", "en,xx"], ["xx"]),
    (["lape", "--languages", "en"], ["at least 2"]),
    (["top-prob", "--top-rate", "-1"], ["--top-rate"]),
    (["act-prob-percentile", "--percentile", "100"], ["--percentile"]),
    (["act-prob-percentile", "--threshold", "klingon"], ["klingon"]),
    (["ap", "--threshold", "2"], []),
])
def test_bad_input_exit_2_one_line_no_output(demo_stats, tmp_path, capsys, argv, words):
    out = tmp_path / "out.json"
    out.write_text("previous result")
    # --overwrite: the previous result may be replaced, but not by a run that fails
    assert main(["identify", argv[0], "--stats", str(demo_stats), "--out", str(out), "--overwrite", *argv[1:]]) == 2
    one_error_line(capsys, *words)
    assert out.read_text() == "previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]   # no temporary file left either


def test_missing_stats_and_random_errors(tmp_path, capsys):
    out = tmp_path / "x.json"
    assert main(["identify", "lape", "--stats", str(tmp_path / "nope"), "--out", str(out)]) == 2
    one_error_line(capsys, "stats.json")
    assert main(["identify", "random", "--of", str(tmp_path / "nope.json"), "--out", str(out)]) == 2
    one_error_line(capsys, "does not exist")
    assert not out.exists()


def test_combined_stats_and_mixed_refused(demo_stats, tmp_path, capsys):
    a = derived_stats(demo_stats, tmp_path / "a", ["en", "fr"])
    b = derived_stats(demo_stats, tmp_path / "b", ["zh"])
    out = tmp_path / "lape.json"
    assert main(["identify", "lape", "--stats", str(a), "--stats", str(b), "--out", str(out), "--top-rate", "0.05"]) == 0
    combined = NeuronSet.load(out)
    ref = tmp_path / "ref.json"
    main(["identify", "lape", "--stats", str(demo_stats), "--languages", "en,fr,zh", "--out", str(ref),
          "--top-rate", "0.05"])
    single = NeuronSet.load(ref)
    assert combined.languages == ["en", "fr", "zh"]
    assert all(torch.equal(combined.neurons[c], single.neurons[c]) for c in combined.languages)
    capsys.readouterr()
    bad_site = derived_stats(demo_stats, tmp_path / "c", ["zh"], site="pre")
    out2 = tmp_path / "mixed.json"
    assert main(["identify", "lape", "--stats", str(a), "--stats", str(bad_site), "--out", str(out2)]) == 2
    one_error_line(capsys, "site")
    other_model = derived_stats(demo_stats, tmp_path / "d", ["zh"], name_or_path="other-model")
    assert main(["identify", "lape", "--stats", str(a), "--stats", str(other_model), "--out", str(out2)]) == 2
    one_error_line(capsys, "model")
    assert main(["identify", "lape", "--stats", str(a), "--stats", str(a), "--out", str(out2)]) == 2
    one_error_line(capsys, "both")
    assert not out2.exists()


def test_unknown_option_is_reported_by_its_subcommand(capsys):
    """An option a (sub)subcommand does not take: one line naming it and that subcommand's --help."""
    with pytest.raises(SystemExit) as e:
        main(["identify", "random", "--stats", "x", "--of", "y.json", "--out", "z.json"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("langneurons identify random: error: unrecognized arguments: --stats x; "
                   "see langneurons identify random --help")
