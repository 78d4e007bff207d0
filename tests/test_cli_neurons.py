"""``langneurons neurons show | compare | import | plot``."""

from __future__ import annotations

import json
import os
import pickle

import pytest

from conftest import shared_path
from langneurons.cli import main
from langneurons.neuronset import NeuronSet

MODEL = {"name_or_path": "hand", "model_type": "llama", "num_layers": 3, "width": 10, "site": "act"}


def write_set(path, neurons, name="lape"):
    langs = list(neurons)
    NeuronSet(neurons, MODEL, {"name": name, "params": {}, "languages": langs}).save(path)
    return path


@pytest.fixture
def set_a(tmp_path):
    return write_set(tmp_path / "a.json", {
        "en": [[0, 1], [0, 2], [2, 5]],
        "fr": [[0, 2], [1, 3]],
        "zh": [],
    })


@pytest.fixture
def set_b(tmp_path):
    return write_set(tmp_path / "b.json", {"en": [[0, 1], [1, 1]], "fr": [[0, 2], [1, 3]], "de": [[2, 2]]},
                     name="act-prob-percentile")


def error_line(capsys, *words):
    err = capsys.readouterr().err
    assert err.startswith("langneurons: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err
    return err


def test_show_table_and_json(set_a, capsys):
    assert main(["neurons", "show", str(set_a)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "method lape" in out[0] and "3x10" in out[0]
    assert out[1].split() == ["layer", "en", "fr", "zh", "any"]
    rows = [line.split() for line in out[3:]]
    assert rows == [["0", "2", "1", "0", "2"], ["1", "0", "1", "0", "1"], ["2", "1", "0", "0", "1"],
                    ["total", "3", "2", "0", "4"]]
    assert main(["neurons", "show", str(set_a), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["per_layer"] == {"en": [2, 0, 1], "fr": [1, 1, 0], "zh": [0, 0, 0]}
    assert doc["totals"] == {"en": 3, "fr": 2, "zh": 0} and doc["unique"] == 4 and doc["method"] == "lape"


def test_compare_one_file(set_a, capsys):
    assert main(["neurons", "compare", str(set_a), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["languages"] == ["en", "fr", "zh"]
    assert doc["overlap"] == [[3, 1, 0], [1, 2, 0], [0, 0, 0]]
    assert doc["jaccard"][0] == pytest.approx([1.0, 0.25, 0.0]) and doc["jaccard"][2] == [0.0, 0.0, 0.0]
    assert main(["neurons", "compare", str(set_a)]) == 0
    text = capsys.readouterr().out
    assert "Jaccard" in text and "0.250" in text
    assert main(["neurons", "compare", str(set_a), "--languages", "en,fr", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overlap"] == [[3, 1], [1, 2]]


def test_compare_two_files(set_a, set_b, capsys):
    assert main(["neurons", "compare", str(set_a), str(set_b), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["pairs"]) == 1
    # en: {01, 02, 25} vs {01, 11}: 1 / 4; fr: identical
    assert doc["pairs"][0]["jaccard"] == pytest.approx({"en": 0.25, "fr": 1.0})
    assert main(["neurons", "compare", str(set_a), str(set_b)]) == 0
    text = capsys.readouterr().out
    row = next(line.split() for line in text.splitlines() if line.startswith("en "))
    assert row == ["en", "3", "2", "0.250"]
    row = next(line.split() for line in text.splitlines() if line.startswith("de "))
    assert row == ["de", "-", "1", "-"]


def test_compare_and_show_errors(set_a, tmp_path, capsys):
    other = tmp_path / "other.json"
    NeuronSet({"en": [[0, 1]]}, dict(MODEL, width=20), {"name": "x", "languages": ["en"]}).save(other)
    assert main(["neurons", "compare", str(set_a), str(other)]) == 2
    error_line(capsys, "one model")
    assert main(["neurons", "show", str(tmp_path / "missing.json")]) == 2
    error_line(capsys, "does not exist")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["neurons", "show", str(bad)]) == 2
    error_line(capsys, "JSON")


def test_plot_writes_pngs(set_a, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out_dir = tmp_path / "plots"
    assert main(["neurons", "plot", str(set_a), "--out", str(out_dir)]) == 0
    for name in ("a-layers.png", "a-jaccard.png"):
        data = (out_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_import_published_t24(tmp_path, capsys):
    src = shared_path("published_neurons", "tang2024", "LLaMA-2-7B.pth")
    out = tmp_path / "t24.json"
    assert main(["neurons", "import", str(src), "--out", str(out)]) == 0
    ns = NeuronSet.load(out)
    assert (ns.num_layers, ns.width) == (32, 11008)
    assert {c: ns.total(c) for c in ns.languages} == dict(en=95, zh=583, fr=1022, es=838, vi=836, id=1068, ja=582)
    assert ns.unique_total() == 3523


def test_import_published_m25(tmp_path):
    src = shared_path("published_neurons", "mondal2025", "Meta-Llama-3.1-8B__act_prob_90p.pkl")
    out = tmp_path / "m25.json"
    assert main(["neurons", "import", str(src), "--out", str(out)]) == 0
    ns = NeuronSet.load(out)
    assert (ns.num_layers, ns.width) == (32, 14336)
    assert {c: ns.total(c) for c in ns.languages} == dict(en=573, vi=573, ur=573, hi=573, zh=573)


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_import_hostile_and_corrupt_pickles(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"neurons": _Hostile(marker)}))
    out = tmp_path / "out.json"
    assert main(["neurons", "import", str(evil), "--out", str(out)]) == 2
    error_line(capsys)
    assert not marker.exists() and not out.exists()
    corrupt = tmp_path / "corrupt.pkl"
    corrupt.write_bytes(b"\x80\x04\x95garbage")
    assert main(["neurons", "import", str(corrupt), "--out", str(out)]) == 2
    error_line(capsys)
    assert not out.exists()
    evil_pth = tmp_path / "evil.pth"
    evil_pth.write_bytes(b"not a zip file at all")
    assert main(["neurons", "import", str(evil_pth), "--out", str(out)]) == 2
    error_line(capsys)
    assert not out.exists()


# ---- malformed and hostile files: one error line, exit 2, nothing written --------------------------


def _doc(neurons=None, model=None, method=None):
    return {"format": "langneurons.neuronset.v1", "model": {**MODEL, **(model or {})},
            "method": {"name": "lape", "params": {}, "languages": ["en", "fr"], "stats_fingerprint": None,
                       **(method or {})},
            "neurons": {"en": [[0, 1], [2, 5]], "fr": []} if neurons is None else neurons}


def _json(**kw):
    return lambda: json.dumps(_doc(**kw)).encode()


def _nan():
    return json.dumps(_doc({"en": [[0, 1]], "fr": []})).replace("[[0, 1]]", "[[0, NaN]]").encode()


def _duplicate_key():  # json.dumps cannot repeat a key: splice a second "en" into the neurons object
    text = json.dumps(_doc({"en": [[0, 1]], "fr": []}))
    return text.replace('"fr": []', '"fr": [], "en": [[2, 2]]').encode()


def _pickle(table=None, **fields):
    """An [M25]-style pickle (tensors pickle through the allowed torch globals), as tests/test_importers.py builds."""
    import torch
    doc = {"lang_to_neuron": {"en": torch.tensor([[0, 1], [1, 2]])} if table is None else table,
           "L": 2, "int_d": 4, "m": 2, "lang_list": ["en"], "method": "lape/set1", "model_name": "tiny", **fields}
    return pickle.dumps(doc, protocol=4)


class _StridedTensor:
    """Pickles like a torch tensor, but with the size/stride/offset given (over a 2-element storage)."""

    def __init__(self, size, stride, offset=0, dtype=None):
        self.size, self.stride, self.offset, self.dtype = size, stride, offset, dtype

    def __reduce__(self):
        import collections
        import warnings

        import torch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = torch.tensor([0, 1], dtype=self.dtype or torch.int64).storage()
        return (torch._utils._rebuild_tensor_v2,
                (storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))


def _strided(size, stride, offset=0, dtype=None):
    return lambda: _pickle({"en": _StridedTensor(size, stride, offset, dtype)})


def _absurd_stride():
    return _strided((2, 2), (2**50, 1))()


def _float_indices():
    import torch
    return _strided((1, 2), (2, 1), dtype=torch.float64)()


def _truncated_pickle():
    data = _pickle()
    return data[: len(data) // 2]


def _pth(tensor=None):
    """A [T24]-style torch.save zip file: [[indices of layer 0]] for one language."""
    import io

    import torch
    buf = io.BytesIO()
    torch.save([[torch.tensor([0, 5]) if tensor is None else tensor]], buf)
    return buf.getvalue()


def _truncated_pth():
    data = _pth()
    return data[: len(data) * 2 // 3]


#: Cases that wait for the bounds checks of langneurons.importers (none left: see importers.py).
NEEDS_IMPORT_BOUNDS: set[str] = set()

# (name, suffix, builder of the file's bytes, fragment of the error line)
MALFORMED = [
    ("row-of-three", ".json", _json(neurons={"en": [[0, 1, 2]], "fr": []}), "bad row [0, 1, 2]"),
    ("row-not-a-pair", ".json", _json(neurons={"en": [0, 1], "fr": []}), "bad row 0"),
    ("rows-not-a-list", ".json", _json(neurons={"en": "0,1", "fr": []}), "list of"),
    ("nan-index", ".json", _nan, "bad row [0, nan]"),
    ("float-index", ".json", _json(neurons={"en": [[0, 1.0]], "fr": []}), "bad row [0, 1.0]"),
    ("bool-index", ".json", _json(neurons={"en": [[0, True]], "fr": []}), "bad row [0, True]"),
    ("string-index", ".json", _json(neurons={"en": [[0, "1"]], "fr": []}), "bad row [0, '1']"),
    ("duplicate-rows", ".json", _json(neurons={"en": [[0, 1], [0, 1]], "fr": []}), "lists row [0, 1] twice"),
    ("unsorted-rows", ".json", _json(neurons={"en": [[2, 5], [0, 1]], "fr": []}), "after [2, 5]; rows must be sorted"),
    ("no-languages", ".json", _json(neurons={}, method={"languages": []}), "holds no languages"),
    ("languages-null", ".json", _json(method={"languages": None}), "method.languages must be a list"),
    ("language-not-listed", ".json", _json(neurons={"en": [], "fr": [], "de": [[0, 1]]}), "does not list"),
    ("language-without-key", ".json", _json(neurons={"en": []}), "has no key"),
    ("duplicate-language-key", ".json", _duplicate_key, "'en' appears twice"),
    ("index-beyond-int64", ".json", _json(neurons={"en": [[0, 2**70]], "fr": []}), "outside the model shape"),
    ("layer-below-int64", ".json", _json(neurons={"en": [[-2**70, 0]], "fr": []}), "outside the model shape"),
    ("negative-index", ".json", _json(neurons={"en": [[0, -1]], "fr": []}), "row [0, -1] outside the model shape"),
    ("layer-too-large", ".json", _json(neurons={"en": [[3, 0]], "fr": []}), "row [3, 0] outside the model shape"),
    ("index-too-large", ".json", _json(neurons={"en": [[0, 10]], "fr": []}), "row [0, 10] outside the model shape"),
    ("huge-num-layers", ".json", _json(model={"num_layers": 10**30}), "model.num_layers = 1000000000000000000000000000000 is beyond"),
    ("huge-width", ".json", _json(model={"width": 10**9}), "model.width = 1000000000 is beyond"),
    ("huge-shape", ".json", _json(model={"num_layers": 10**6, "width": 10**6}), "more than 4294967296 neurons"),
    ("zero-layers", ".json", _json(model={"num_layers": 0}), "model.num_layers must be a positive integer"),
    ("float-width", ".json", _json(model={"width": 10.0}), "model.width must be a positive integer"),
    ("deep-nesting", ".json", lambda: b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ("pickle-absurd-stride", ".pkl", _absurd_stride, "stride"),
    ("pickle-huge-layer-count", ".pkl", lambda: _pickle(L=10**30), "model.num_layers = 1000000000000000000000000000000 is beyond"),
    ("pickle-language-twice", ".pkl", lambda: _pickle(lang_list=["en", "en"]), "twice"),
    ("pickle-negative-stride", ".pkl", _strided((2,), (-1,)), "negative stride"),
    ("pickle-size-stride-mismatch", ".pkl", _strided((2, 2), (1,)), "differ in length"),
    ("pickle-offset-beyond-storage", ".pkl", _strided((1, 2), (2, 1), offset=5), "storage offset 5 is beyond"),
    ("pickle-zero-stride-huge", ".pkl", _strided((2**40, 2), (0, 1)), "expands a 2-element storage"),
    ("pickle-float-indices", ".pkl", _float_indices, "dtype float64"),
    ("pickle-truncated", ".pkl", _truncated_pickle, "cannot read"),
    ("pickle-shape-beyond-file", ".pkl", lambda: _pickle(L=10**5, int_d=10**4), "more than a"),
    ("pth-truncated-zip", ".pth", _truncated_pth, "cannot read"),
    ("pth-zero-stride-huge", ".pth", lambda: _pth(_StridedTensor((2**40,), (0,))), "expands a 2-element storage"),
    ("pth-absurd-stride", ".pth", lambda: _pth(_StridedTensor((2,), (2**50,))), "cannot read"),
    ("pth-float-indices", ".pth", lambda: _pth(_StridedTensor((2,), (1,), dtype=__import__("torch").float64)),
     "dtype float64"),
]


@pytest.mark.parametrize("suffix, build, fragment", [
    pytest.param(suffix, build, fragment, id=name, marks=[pytest.mark.xfail(
        strict=True, reason="needs the bounds checks of langneurons.importers")] if name in NEEDS_IMPORT_BOUNDS else [])
    for name, suffix, build, fragment in MALFORMED])
def test_malformed_file_is_one_error_line_and_writes_nothing(suffix, build, fragment, set_a, tmp_path, capsys):
    bad = tmp_path / f"bad{suffix}"
    content = build()
    bad.write_bytes(content)
    out = tmp_path / "out.json"
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in (["neurons", "show", str(bad)], ["neurons", "show", str(bad), "--json"],
                 ["neurons", "compare", str(bad), str(set_a)], ["neurons", "compare", str(set_a), str(bad)],
                 ["neurons", "import", str(bad), "--out", str(out)]):
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        err = captured.err
        assert err.startswith("langneurons: error: ") and err.count("\n") == 1, (argv, err)
        assert "Traceback" not in err and not captured.out, (argv, captured)
        assert fragment in err, (argv, err)
        assert str(bad.name) in err, (argv, err)
        assert bad.read_bytes() == content
        assert sorted(p.name for p in tmp_path.iterdir()) == before, argv
    assert not out.exists()


def test_neuronset_artifact_loader_is_the_one_validation(tmp_path):
    from langneurons import artifacts
    from langneurons.errors import UserError
    bad = tmp_path / "dup.json"
    bad.write_bytes(_json(neurons={"en": [[0, 1], [0, 1]], "fr": []})())
    with pytest.raises(UserError, match="twice"):
        artifacts.load(bad, "neuronset")
    with pytest.raises(UserError, match="twice"):
        artifacts.validate(json.loads(bad.read_text()), "neuronset", str(bad))
    dup_key = tmp_path / "dupkey.json"
    dup_key.write_bytes(_duplicate_key())
    with pytest.raises(UserError, match="appears twice"):
        artifacts.load(dup_key)
    good = tmp_path / "good.json"
    good.write_bytes(_json()())
    assert artifacts.load(good, "neuronset")["neurons"]["en"] == [[0, 1], [2, 5]]
