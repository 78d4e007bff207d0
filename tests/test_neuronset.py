"""Tests for langneurons.neuronset (format, validation, set algebra, overlaps, random control) and plots."""

import json

import pytest
import torch

from langneurons.errors import UserError
from langneurons.neuronset import (
    FORMAT,
    NeuronSet,
    jaccard,
    jaccard_between,
    jaccard_matrix,
    layer_distribution,
    overlap_matrix,
    random_control,
)

MODEL = {"name_or_path": "tiny", "model_type": "llama", "num_layers": 4, "width": 10, "site": "act"}


def make(neurons, name="test", model=MODEL, languages=None):
    method = {"name": name, "params": {"k": 1}, "stats_fingerprint": "abc"}
    if languages is not None:
        method["languages"] = languages
    return NeuronSet(neurons, dict(model), method)


@pytest.fixture
def ns():
    return make({"en": [[3, 4], [0, 1], [0, 1], [1, 9]], "zh": torch.tensor([[0, 1], [2, 2]]), "fr": []})


# ---- construction and accessors -------------------------------------------------------------


def test_rows_sorted_unique_and_accessors(ns):
    assert ns.languages == ["en", "zh", "fr"]
    assert ns.neurons["en"].tolist() == [[0, 1], [1, 9], [3, 4]]
    assert ns.neurons["en"].dtype == torch.int64
    assert ns.neurons["fr"].shape == (0, 2)
    assert (ns.num_layers, ns.width, ns.site) == (4, 10, "act")
    assert ns.total("en") == 3 and ns.total("fr") == 0
    assert ns.unique_total() == 4  # (0,1) shared by en and zh
    assert ns.counts()["en"].tolist() == [1, 1, 0, 1]
    per_layer = ns.per_layer("en")
    assert sorted(per_layer) == [0, 1, 2, 3]
    assert per_layer[0].tolist() == [1] and per_layer[2].tolist() == [] and per_layer[3].tolist() == [4]
    assert layer_distribution(ns) == {"en": [1, 1, 0, 1], "zh": [1, 0, 1, 0], "fr": [0, 0, 0, 0]}
    assert ns.method["languages"] == ["en", "zh", "fr"]


def test_language_order_from_method_and_missing_are_empty():
    s = make({"zh": [[0, 0]]}, languages=["en", "zh"])
    assert s.languages == ["en", "zh"] and s.total("en") == 0
    with pytest.raises(UserError, match="does not list"):
        make({"de": [[0, 0]]}, languages=["en"])


def test_masks_round_trip(ns):
    m = ns.mask("en")
    assert m.dtype == torch.bool and m.shape == (4, 10) and int(m.sum()) == 3
    assert m[1, 9] and m[3, 4] and not m[2, 2]
    back = NeuronSet.from_masks(ns.masks(), {"site": "act"}, {"name": "x"})
    assert (back.num_layers, back.width) == (4, 10)
    for lang in ns.languages:
        assert torch.equal(back.neurons[lang], ns.neurons[lang])
    with pytest.raises(UserError):
        NeuronSet.from_masks({"en": torch.zeros(4, 10, dtype=torch.bool)}, {"num_layers": 5}, {})


@pytest.mark.parametrize("rows, pattern", [
    ([[4, 0]], "outside the model shape"),
    ([[0, 10]], "outside the model shape"),
    ([[-1, 0]], "outside the model shape"),
    ([[0, 1.5]], "bad row"),
    ([[0, 1, 2]], "bad row"),
    (torch.tensor([[0.0, 1.0]]), "integers"),
])
def test_constructor_rejects_bad_rows(rows, pattern):
    with pytest.raises(UserError, match=pattern):
        make({"en": rows})


# ---- file format ----------------------------------------------------------------------------


def test_save_load_round_trip(ns, tmp_path):
    path = tmp_path / "set.json"
    ns.save(path)
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT
    assert list(doc) == ["format", "model", "method", "neurons"]
    assert doc["model"] == MODEL
    assert doc["method"]["languages"] == ["en", "zh", "fr"]
    assert doc["method"]["stats_fingerprint"] == "abc"
    assert doc["neurons"] == {"en": [[0, 1], [1, 9], [3, 4]], "zh": [[0, 1], [2, 2]], "fr": []}
    back = NeuronSet.load(path)
    assert back == ns
    assert back.path == path
    assert not [p for p in tmp_path.iterdir() if p.name != "set.json"]  # no temp files left


def _write(tmp_path, doc, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


def _doc(ns):
    return ns.to_dict()


@pytest.mark.parametrize("rows, pattern, repaired", [
    ([[3, 4], [0, 1], [1, 9]], r"row \[0, 1\] after \[3, 4\]; rows must be sorted", [[0, 1], [1, 9], [3, 4]]),
    ([[0, 1], [1, 9], [1, 9]], r"lists row \[1, 9\] twice", [[0, 1], [1, 9]]),
])
def test_load_refuses_unsorted_or_duplicate_rows_unless_normalising(ns, tmp_path, rows, pattern, repaired):
    """Files hold sorted unique rows (the format says so); normalise=True repairs one."""
    doc = _doc(ns)
    doc["neurons"]["en"] = rows
    path = _write(tmp_path, doc)
    with pytest.raises(UserError, match=pattern) as info:
        NeuronSet.load(path)
    assert str(path) in str(info.value) and "normalise=True" in str(info.value)
    with pytest.raises(UserError, match=pattern):
        NeuronSet.from_dict(doc)
    fixed = NeuronSet.load(path, normalise=True)
    assert fixed.neurons["en"].tolist() == repaired
    fixed.save(path)
    assert NeuronSet.load(path) == fixed
    assert make({"en": rows}).neurons["en"].tolist() == repaired  # the constructor sorts and de-duplicates


@pytest.mark.parametrize("rows, model, pattern", [
    ([[0, 2**70]], {}, "outside the model shape"),
    ([[-2**64, 0]], {}, "outside the model shape"),
    (torch.tensor([[0, 10]]), {}, "outside the model shape"),
    ([], {"num_layers": 10**6 + 1}, "beyond any real model"),
    ([], {"width": 10**8 + 1}, "beyond any real model"),
    ([], {"num_layers": 10**5, "width": 10**5}, "more than"),
])
def test_constructor_rejects_out_of_range(rows, model, pattern):
    with pytest.raises(UserError, match=pattern):
        NeuronSet({"en": rows}, {**MODEL, **model}, {"name": "x"})


def test_save_refuses_a_set_without_languages(tmp_path):
    with pytest.raises(UserError, match="no languages"):
        NeuronSet({}, MODEL, {"name": "x"}).save(tmp_path / "empty.json")
    assert not (tmp_path / "empty.json").exists()


@pytest.mark.parametrize("mutate, pattern", [
    (lambda d: d.update(format="langneurons.neuronset.v0"), "format"),
    (lambda d: d.pop("neurons"), "missing key"),
    (lambda d: d["neurons"].update(en=[[0, 1], [4, 0]]), r"\[4, 0\]"),
    (lambda d: d["neurons"].update(en=[[0, -3]]), r"\[0, -3\]"),
    (lambda d: d["neurons"].update(en=[[0, 2.5]]), "bad row"),
    (lambda d: d["neurons"].update(en=[[0, True]]), "bad row"),
    (lambda d: d["neurons"].update(en="0,1"), "list of"),
    (lambda d: d["neurons"].pop("fr"), "no key"),
    (lambda d: d["model"].update(width="ten"), "width"),
    (lambda d: d["model"].update(site="mlp"), "site"),
    (lambda d: d["model"].pop("site"), "site"),
    (lambda d: d["model"].update(num_layers=10**30), "beyond any real model"),
    (lambda d: d["neurons"].update(en=[[0, 2**63]]), "outside the model shape"),
    (lambda d: d["neurons"].update(en=[[0, 1], [0, 1]]), "twice"),
    (lambda d: d["method"].update(languages=None), "method.languages must be a list"),
    (lambda d: d["method"].update(languages=[["en"]]), "method.languages must be a list"),
    (lambda d: (d["method"].update(languages=[]), d.update(neurons={})), "no languages"),
])
def test_load_rejects_bad_files(ns, tmp_path, mutate, pattern):
    doc = _doc(ns)
    mutate(doc)
    path = _write(tmp_path, doc)
    with pytest.raises(UserError, match=pattern) as info:
        NeuronSet.load(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_load_corrupt_and_missing(tmp_path, ns):
    full = tmp_path / "ok.json"
    ns.save(full)
    truncated = _write(tmp_path, full.read_text()[:-20], "trunc.json")
    with pytest.raises(UserError, match="not valid JSON"):
        NeuronSet.load(truncated)
    with pytest.raises(UserError, match="does not exist"):
        NeuronSet.load(tmp_path / "nope.json")
    with pytest.raises(UserError, match="JSON object"):
        NeuronSet.load(_write(tmp_path, [1, 2], "list.json"))


def test_save_does_not_clobber_on_failure(ns, tmp_path):
    path = tmp_path / "set.json"
    ns.save(path)
    before = path.read_text()
    bad = make({"en": [[0, 0]]})
    bad.method["params"]["obj"] = object()  # not JSON-serialisable
    with pytest.raises(UserError, match="JSON"):
        bad.save(path)
    assert path.read_text() == before
    with pytest.raises(UserError, match="does not exist"):
        ns.save(tmp_path / "missing_dir" / "x.json")


def test_validate_for(ns):
    ns.validate_for(4, 10)
    ns.validate_for(4, 10, "act")
    with pytest.raises(UserError, match=r"made for a 4x10 model at site act; this model is 32x11008"):
        ns.validate_for(32, 11008)
    with pytest.raises(UserError, match="site"):
        ns.validate_for(4, 10, "pre")


# ---- set algebra ----------------------------------------------------------------------------


@pytest.fixture
def pair():
    a = make({"en": [[0, 1], [1, 2], [2, 3]], "zh": [[0, 0]], "fr": [[3, 3]]}, name="a")
    b = make({"en": [[1, 2], [3, 9]], "zh": [[0, 0], [0, 5]], "de": [[1, 1]]}, name="b")
    return a, b


def test_union_intersection_difference(pair):
    a, b = pair
    u, i, d = a.union(b), a.intersection(b), a.difference(b)
    for res in (u, i, d):
        assert res.languages == ["en", "zh"]  # common languages, order of a
        assert res.method["languages"] == ["en", "zh"]
        assert res.method["params"]["left"]["name"] == "a" and res.method["params"]["right"]["name"] == "b"
        assert res.method["stats_fingerprint"] == "abc"
    assert u.method["name"] == "union" and i.method["name"] == "intersection" and d.method["name"] == "difference"
    assert u.neurons["en"].tolist() == [[0, 1], [1, 2], [2, 3], [3, 9]]
    assert u.neurons["zh"].tolist() == [[0, 0], [0, 5]]
    assert i.neurons["en"].tolist() == [[1, 2]]
    assert i.neurons["zh"].tolist() == [[0, 0]]
    assert d.neurons["en"].tolist() == [[0, 1], [2, 3]]
    assert d.neurons["zh"].shape == (0, 2)
    assert b.difference(a).neurons["zh"].tolist() == [[0, 5]]


def test_algebra_rejects_other_shapes(pair):
    a, _ = pair
    other = make({"en": [[0, 1]]}, model={**MODEL, "width": 11})
    with pytest.raises(UserError, match="different model shapes"):
        a.union(other)
    pre = make({"en": [[0, 1]]}, model={**MODEL, "site": "pre"})
    with pytest.raises(UserError, match="different sites"):
        a.intersection(pre)
    assert a.intersection(pre.with_model(site="act")).neurons["en"].tolist() == [[0, 1]]


def test_select_and_rename(pair):
    a, _ = pair
    s = a.select(["fr", "en"])
    assert s.languages == ["fr", "en"] and s.neurons["fr"].tolist() == [[3, 3]]
    assert a.select("zh").languages == ["zh"]
    with pytest.raises(UserError, match="no language 'xx'"):
        a.select(["xx"])
    r = a.rename({"zh": "zho"})
    assert r.languages == ["en", "zho", "fr"] and r.neurons["zho"].tolist() == [[0, 0]]
    with pytest.raises(UserError, match="share a code"):
        a.rename({"zh": "en"})


# ---- overlaps -------------------------------------------------------------------------------


def test_jaccard_values():
    a = torch.tensor([[True, True, False], [False, False, True]])
    b = torch.tensor([[True, False, False], [False, True, True]])
    assert jaccard(a, b) == pytest.approx(2 / 4)
    assert jaccard(a, a) == 1.0
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert jaccard(empty, empty) == 0.0  # 0/0 is defined as 0
    assert jaccard(a, empty) == 0.0
    with pytest.raises(UserError):
        jaccard(a, torch.zeros(3, 2, dtype=torch.bool))


def test_overlap_and_jaccard_matrix():
    s = make({"en": [[0, 1], [0, 2], [1, 1]], "zh": [[0, 2], [1, 1], [2, 0], [3, 3]], "fr": []})
    langs, o = overlap_matrix(s)
    assert langs == ["en", "zh", "fr"]
    assert o.tolist() == [[3, 2, 0], [2, 4, 0], [0, 0, 0]]
    langs, j = jaccard_matrix(s)
    assert j.dtype == torch.float64
    assert j[0, 1].item() == pytest.approx(2 / 5) and j[1, 0].item() == pytest.approx(2 / 5)
    assert j[0, 0].item() == 1.0 and j[1, 1].item() == 1.0
    assert j[2, 2].item() == 0.0 and j[0, 2].item() == 0.0
    # agrees with the mask-based definition
    masks = s.masks()
    for x, lx in enumerate(langs):
        for y, ly in enumerate(langs):
            assert j[x, y].item() == pytest.approx(jaccard(masks[lx], masks[ly]))


def test_jaccard_between(pair):
    a, b = pair
    langs, values = jaccard_between(a, b)
    assert langs == ["en", "zh"]
    assert values.tolist() == pytest.approx([1 / 4, 1 / 2])
    with pytest.raises(UserError, match="different model shapes"):
        jaccard_between(a, make({"en": []}, model={**MODEL, "num_layers": 5}))


# ---- random control -------------------------------------------------------------------------


def test_random_control_matches_counts_and_avoids_sets():
    gen = torch.Generator().manual_seed(0)
    model = {**MODEL, "num_layers": 6, "width": 50}
    neurons = {}
    for lang, n in (("en", 40), ("zh", 60), ("fr", 25)):
        keys = torch.randperm(300, generator=gen)[:n]
        neurons[lang] = torch.stack([keys // 50, keys % 50], dim=1)
    s = NeuronSet(neurons, model, {"name": "lape"})
    taken = s.union_mask()
    c1 = random_control(s, seed=1)
    assert c1.languages == s.languages
    assert (c1.num_layers, c1.width, c1.site) == (6, 50, "act")
    for lang in s.languages:
        assert torch.equal(c1.counts()[lang], s.counts()[lang])
        assert not bool((c1.mask(lang) & taken).any())
    assert c1.method["name"] == "random"
    assert c1.method["params"]["seed"] == 1
    assert c1.method["params"]["matched_to"]["name"] == "lape"
    assert random_control(s, seed=1) == c1
    c2 = random_control(s, seed=2)
    assert any(not torch.equal(c1.neurons[lang], c2.neurons[lang]) for lang in s.languages)


def test_random_control_errors():
    # layer 0 of a width-4 model: en takes 3 neurons, so only 1 free but en needs 3
    s = make({"en": [[0, 0], [0, 1], [0, 2]]}, model={**MODEL, "width": 4})
    with pytest.raises(UserError, match="layer 0"):
        random_control(s, seed=0)
    with pytest.raises(UserError, match="seed"):
        random_control(make({"en": []}), seed=-1)


# ---- plots ----------------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plots_write_png(ns, tmp_path):
    pytest.importorskip("matplotlib")
    from langneurons.plots import plot_heatmap, plot_layer_distribution

    p1 = plot_layer_distribution(ns, tmp_path / "layers.png")
    langs, j = jaccard_matrix(ns)
    p2 = plot_heatmap(j, langs, langs, tmp_path / "jaccard.png", title="Jaccard", fmt=".2f")
    _, o = overlap_matrix(ns)
    p3 = plot_heatmap(o, langs, langs, tmp_path / "overlap.png", title="overlap", fmt="d")
    p4 = plot_heatmap([[1.0, float("nan")], [3.5, 4.0]], ["a", "b"], ["x", "y"], tmp_path / "ppl.png", "PPL", ".1f")
    for p in (p1, p2, p3, p4):
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000
    assert sorted(x.name for x in tmp_path.iterdir()) == ["jaccard.png", "layers.png", "overlap.png", "ppl.png"]
    with pytest.raises(UserError, match="labels"):
        plot_heatmap(j, langs[:1], langs, tmp_path / "bad.png", "t", ".2f")


def test_bar_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from langneurons.plots import plot_bars

    p1 = plot_bars([0.3, float("nan"), -0.1], ["fr", "de", "zh"], tmp_path / "rank.png", highlight="fr",
                   value_fmt=".3g", ylabel="score", title="bridges")
    p2 = plot_bars([[40.0, 30.0], [42.0, float("nan")]], ["en", "fr"], tmp_path / "grouped.png",
                   series=["attn", "ln"], errors=[[1.0, 2.0], [0.5, 0.0]], ylabel="accuracy (%)")
    for p in (p1, p2):
        assert p.read_bytes().startswith(PNG_MAGIC) and p.stat().st_size > 2000
    with pytest.raises(UserError, match="one value per label"):
        plot_bars([1.0, 2.0], ["a"], tmp_path / "bad.png")
    with pytest.raises(UserError, match="series names"):
        plot_bars([[1.0], [2.0]], ["a"], tmp_path / "bad.png", series=["x"])
    assert not (tmp_path / "bad.png").exists()
