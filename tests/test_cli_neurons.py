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
