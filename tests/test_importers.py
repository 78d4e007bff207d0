"""Tests for langneurons.importers on the published [T24] and [M25] files, and on hostile/corrupt pickles.

The published files are read from ../shared/data/published_neurons (relative to the repository
root) or from $LANGNEURONS_SHARED_DATA/published_neurons; they are never copied into the repo.
Expected figures are those of that folder's README.md.
"""

import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from langneurons.errors import UserError
from langneurons.importers import import_auto, import_mondal2025_pkl, import_tang2024_pth
from langneurons.neuronset import NeuronSet


def _shared_data() -> Path:
    env = os.environ.get("LANGNEURONS_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


PUBLISHED = _shared_data() / "published_neurons"
needs_data = pytest.mark.skipif(
    not PUBLISHED.is_dir(),
    reason=f"published neuron files not found at {PUBLISHED} (set LANGNEURONS_SHARED_DATA to the shared data folder)",
)

# file: (layers, width, unique, {language: count}) from published_neurons/README.md
TANG = {
    "LLaMA-2-7B.pth": (32, 11008, 3523, dict(en=95, zh=583, fr=1022, es=838, vi=836, id=1068, ja=582)),
    "LLaMA-2-13B.pth": (40, 13824, 5530, dict(en=161, zh=1168, fr=1583, es=1255, vi=1252, id=1384, ja=1435)),
    "LLaMA-2-70B.pth": (80, 28672, 22938, dict(en=731, zh=5366, fr=6482, es=5873, vi=5515, id=6522)),
    "BLOOM-7B.pth": (30, 16384, 4915, dict(en=445, zh=653, fr=680, es=918, vi=551, id=2823)),
    "Mistral-7B.pth": (32, 14336, 4588, dict(en=76, zh=1190, fr=919, es=838, vi=1554, id=1445)),
    "OPT-6.7B.pth": (32, 16384, 5243, dict(en=347, zh=833, fr=1571, es=1517, vi=752, id=1129)),
    "Phi-2-2.7B.pth": (32, 10240, 3277, dict(en=52, zh=196, fr=1032, es=1119, vi=511, id=764)),
}

LLAMA3, NEMO = (32, 14336), (40, 14336)
# file: ((layers, width), {language: count}, m)
MONDAL = {
    "Meta-Llama-3.1-8B__lape__set1.pkl": (LLAMA3, dict(en=145, fr=1157, es=1041, vi=917, id=1404, ja=1240, zh=888), 4588),
    "Meta-Llama-3.1-8B__lape__set6.pkl": (LLAMA3, dict(en=341, bn=483, hi=467, ta=1093, te=873, mr=1213, ur=1229,
                                                       kn=646, ml=760, pa=732), 4588),
    "Meta-Llama-3.1-8B__lape__set2.pkl": (LLAMA3, dict(en=244, fr=998, vi=632, zh=705, bn=1278, hi=1173, te=1771,
                                                       mr=1723), 4588),
    "Meta-Llama-3.1-8B__lape__set3.pkl": (LLAMA3, dict(bn=443, hi=399, ta=1070, te=737, mr=1286, ur=1291, kn=546,
                                                       ml=679, pa=635), 4588),
    "Meta-Llama-3.1-8B__lape__set4.pkl": (LLAMA3, dict(en=179, fr=750, es=655, vi=484, id=590, ja=771, zh=629,
                                                       bn=1396, hi=1301, te=1895), 4588),
    "Mistral-Nemo-Base-2407__lape__set1.pkl": (NEMO, dict(en=221, fr=1133, es=1076, vi=1521, id=1268, ja=2046,
                                                          zh=1491), 5734),
    "Mistral-Nemo-Base-2407__lape__set6.pkl": (NEMO, dict(en=761, bn=843, hi=457, ta=816, te=1179, mr=1722, ur=2122,
                                                          kn=723, ml=695, pa=433), 5734),
    "Meta-Llama-3.1-8B__act_prob_90p.pkl": (LLAMA3, dict(en=573, vi=573, ur=573, hi=573, zh=573), 573),
    "Mistral-Nemo-Base-2407__act_prob_90p.pkl": (NEMO, dict(en=717, vi=717, ur=717, hi=717, zh=717), 717),
}


@needs_data
def test_every_published_file_is_covered():
    on_disk = {p.name for p in (PUBLISHED / "tang2024").glob("*.pth")} | {p.name for p in (PUBLISHED / "mondal2025").glob("*.pkl")}
    assert on_disk == set(TANG) | set(MONDAL)


@needs_data
@pytest.mark.parametrize("name", sorted(TANG))
def test_tang2024_files(name, tmp_path):
    layers, width, unique, counts = TANG[name]
    ns = import_tang2024_pth(PUBLISHED / "tang2024" / name)
    assert (ns.num_layers, ns.width, ns.site) == (layers, width, "act")
    assert ns.languages == list(counts)  # en zh fr es vi id [ja]
    assert {lang: ns.total(lang) for lang in ns.languages} == counts
    assert ns.unique_total() == unique == round(0.01 * layers * width)
    assert ns.method["name"] == "lape" and ns.method["params"]["top_rate"] == 0.01
    # round trip through the interchange format
    path = ns.save(tmp_path / "set.json")
    assert NeuronSet.load(path) == ns


@needs_data
def test_tang2024_llama7b_layer_profile():
    ns = import_tang2024_pth(PUBLISHED / "tang2024" / "LLaMA-2-7B.pth")
    per_layer = sum(ns.counts().values())
    assert per_layer[0].item() == 1144 and per_layer[1].item() == 160
    late = per_layer[22:].tolist()  # README: "layers 22-31 hold about 200-316 each"
    assert max(late) == 316 and min(late) >= 190
    assert per_layer[2:10].sum().item() < per_layer[22:30].sum().item() / 5  # sparse middle


@needs_data
def test_tang2024_width_sources(tmp_path):
    src = PUBLISHED / "tang2024" / "Phi-2-2.7B.pth"
    renamed = tmp_path / "unknown-model.pth"
    renamed.write_bytes(src.read_bytes())
    ns = import_tang2024_pth(renamed)  # not in the table: width = max index + 1, with a note
    assert ns.width <= 10240 and "largest index" in ns.method["params"]["width_source"]
    ns = import_tang2024_pth(renamed, model={"width": 10240, "name_or_path": "microsoft/phi-2"})
    assert ns.width == 10240 and ns.model["name_or_path"] == "microsoft/phi-2"
    with pytest.raises(UserError, match="index"):
        import_tang2024_pth(renamed, model={"width": 100})
    with pytest.raises(UserError, match="layers"):
        import_tang2024_pth(src, model={"num_layers": 4})
    with pytest.raises(UserError, match="6 languages"):
        import_tang2024_pth(src, languages=["en", "zh"])
    assert import_tang2024_pth(src, languages="a,b,c,d,e,f").languages == list("abcdef")


@needs_data
@pytest.mark.parametrize("name", sorted(MONDAL))
def test_mondal2025_files(name):
    (layers, width), counts, m = MONDAL[name]
    ns = import_mondal2025_pkl(PUBLISHED / "mondal2025" / name)
    assert (ns.num_layers, ns.width) == (layers, width)
    assert set(ns.languages) == set(counts)
    assert {lang: ns.total(lang) for lang in ns.languages} == counts
    assert ns.method["params"]["m"] == m
    if "lape" in name:
        assert ns.method["name"] == "lape" and ns.site == "act"
        assert m == round(0.01 * layers * width)
        assert ns.unique_total() == m  # LAPE selects m neurons over all languages jointly
    else:
        assert ns.method["name"] == "act-prob-percentile" and ns.site == "pre"
        assert m == round(0.00125 * layers * width)
        assert ns.unique_total() <= len(counts) * m


@needs_data
def test_import_auto_dispatch(tmp_path):
    ns = import_auto(PUBLISHED / "tang2024" / "BLOOM-7B.pth")
    assert ns.width == 16384
    assert import_auto(PUBLISHED / "mondal2025" / "Meta-Llama-3.1-8B__lape__set1.pkl").total("fr") == 1157
    saved = ns.save(tmp_path / "bloom.json")
    assert import_auto(saved) == NeuronSet.load(saved)
    # sniffing by content when the extension says nothing
    odd = tmp_path / "mystery.bin"
    odd.write_bytes((PUBLISHED / "mondal2025" / "Meta-Llama-3.1-8B__lape__set1.pkl").read_bytes())
    assert import_auto(odd).total("en") == 145


# ---- hostile and corrupt files (no shared data needed) --------------------------------------


class _Evil:
    """Pickles to a call of os.system that would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilOpen:
    """Pickles to builtins.open(marker, 'w'), which would create the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload", [_Evil, _EvilOpen])
def test_hostile_pickle_is_refused_and_not_executed(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    doc = {"lang_to_neuron": {"en": torch.zeros(1, 2, dtype=torch.int64)}, "L": 2, "int_d": 4,
           "m": 1, "lang_list": ["en"], "x": payload(marker)}
    path.write_bytes(pickle.dumps(doc, protocol=4))
    with pytest.raises(UserError, match="refusing") as info:
        import_mondal2025_pkl(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()
    with pytest.raises(UserError):
        import_auto(path)
    assert not marker.exists()


def test_hostile_nested_storage_blob_is_refused(tmp_path):
    """A hostile payload hidden inside the nested torch.save blob is stopped by weights_only."""
    marker = tmp_path / "pwned"
    inner = io.BytesIO()
    torch.save(_Evil(marker), inner, _use_new_zipfile_serialization=False)

    class Wrapper:  # pickles as a call of the real torch.storage._load_from_bytes, like the published files
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (inner.getvalue(),))

    raw = pickle.dumps({"lang_to_neuron": {"en": Wrapper()}, "L": 1, "int_d": 1}, protocol=4)
    assert b"_load_from_bytes" in raw
    path = tmp_path / "nested.pkl"
    path.write_bytes(raw)
    with pytest.raises(UserError, match="refusing") as info:
        import_mondal2025_pkl(path)
    assert "system" in str(info.value) and "weights_only" not in str(info.value)
    assert not marker.exists()


def test_hostile_pth_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save([[_Evil(marker)]], path)
    with pytest.raises(UserError, match="refusing") as info:
        import_tang2024_pth(path, model={"width": 8})
    assert "system" in str(info.value) and "weights_only" not in str(info.value)
    assert not marker.exists()


def test_corrupt_files(tmp_path):
    good = tmp_path / "good.pkl"
    doc = {"lang_to_neuron": {"en": torch.tensor([[1, 3], [0, 2]])}, "L": 2, "int_d": 4, "m": 2,
           "lang_list": ["en"], "method": "lape/set1", "model_name": "tiny"}
    good.write_bytes(pickle.dumps(doc, protocol=4))
    ns = import_mondal2025_pkl(good)  # torch tensors pickle through the allowed globals
    assert ns.neurons["en"].tolist() == [[0, 2], [1, 3]] and (ns.num_layers, ns.width) == (2, 4)

    data = good.read_bytes()
    truncated = tmp_path / "trunc.pkl"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"\x80\x04not a pickle at all" * 10)
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    for path in (truncated, garbage, empty):
        with pytest.raises(UserError, match="cannot read") as info:
            import_mondal2025_pkl(path)
        assert "\n" not in str(info.value)

    wrong = tmp_path / "wrong.pkl"
    wrong.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(UserError, match="lang_to_neuron"):
        import_mondal2025_pkl(wrong)
    out_of_range = tmp_path / "range.pkl"
    out_of_range.write_bytes(pickle.dumps({**doc, "int_d": 3}, protocol=4))
    with pytest.raises(UserError, match="outside the model shape"):
        import_mondal2025_pkl(out_of_range)

    pth = tmp_path / "masks.pth"
    torch.save([[torch.tensor([0, 5]), torch.tensor([2])]], pth)
    assert import_tang2024_pth(pth, model={"width": 8}).neurons["en"].tolist() == [[0, 0], [0, 5], [1, 2]]
    cut = tmp_path / "cut.pth"
    cut.write_bytes(pth.read_bytes()[:100])
    with pytest.raises(UserError, match="cannot read"):
        import_tang2024_pth(cut)
    with pytest.raises(UserError, match="does not exist"):
        import_tang2024_pth(tmp_path / "none.pth")


# ---- resource bounds: declared sizes are checked against the file before anything is allocated ----


def _m25_doc(table):
    return {"lang_to_neuron": table, "L": 2, "int_d": 4, "m": 2, "lang_list": list(table), "method": "lape/set1"}


def _storage_blob(values=(1, 2), numel=None):
    """The nested legacy torch.save blob of an int64 storage, optionally declaring another element count."""
    import warnings
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(torch.tensor(list(values)).storage(), buf, _use_new_zipfile_serialization=False)
    blob = buf.getvalue()
    if numel is not None:  # the storage record ends (..., 'cpu', numel, None) -> rewrite numel as LONG1
        head, sep, tail = blob.partition(b"cpuq\x03K\x02N")
        assert sep, "unexpected legacy layout"
        blob = head + b"cpuq\x03\x8a\x08" + numel.to_bytes(8, "little") + b"N" + tail
    return blob


class _BlobTensor:
    """Pickles as a tensor over a storage read from ``blob`` (like the published [M25] files)."""

    def __init__(self, blob, size=(1, 2), stride=(2, 1)):
        self.blob, self.size, self.stride = blob, size, stride

    def __reduce__(self):
        import collections
        storage = _Call(torch.storage._load_from_bytes, (self.blob,))
        return (torch._utils._rebuild_tensor_v2, (storage, 0, self.size, self.stride, False, collections.OrderedDict()))


class _Call:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def test_nested_blob_declaring_a_huge_storage_is_refused_before_allocating(tmp_path):
    ok = tmp_path / "ok.pkl"
    ok.write_bytes(pickle.dumps(_m25_doc({"en": _BlobTensor(_storage_blob())}), protocol=4))
    assert import_mondal2025_pkl(ok).neurons["en"].tolist() == [[1, 2]]
    huge = tmp_path / "huge.pkl"
    huge.write_bytes(pickle.dumps(_m25_doc({"en": _BlobTensor(_storage_blob(numel=2**45))}), protocol=4))
    with pytest.raises(UserError, match="declares 35184372088832 int64 elements") as info:
        import_mondal2025_pkl(huge)
    assert "\n" not in str(info.value) and "huge.pkl" in str(info.value)


def test_pickled_dict_setting_a_language_twice_is_refused(tmp_path):
    raw = pickle.dumps(_m25_doc({"en": torch.tensor([[0, 1]]), "xx": torch.tensor([[1, 2]])}), protocol=4)
    path = tmp_path / "twice.pkl"
    path.write_bytes(raw.replace(b"\x8c\x02xx", b"\x8c\x02en"))
    with pytest.raises(UserError, match="sets key 'en' twice"):
        import_mondal2025_pkl(path)


class _BuildTensor:
    """Pickles as REDUCE then BUILD: tensor.__setstate__ would call set_ with an absurd size."""

    def __reduce__(self):
        import collections
        return (torch._utils._rebuild_tensor_v2,
                (torch.tensor([0, 1]).storage(), 0, (1, 2), (2, 1), False, collections.OrderedDict()),
                (torch.tensor([0, 1]).storage(), 0, (2**40,), (1,)))


def test_build_opcode_is_refused(tmp_path):
    path = tmp_path / "build.pkl"
    path.write_bytes(pickle.dumps(_m25_doc({"en": _BuildTensor()}), protocol=4))
    with pytest.raises(UserError, match="BUILD"):
        import_mondal2025_pkl(path)


def test_oversized_file_is_refused_before_reading(tmp_path, monkeypatch):
    from langneurons import importers
    path = tmp_path / "big.pkl"
    path.write_bytes(pickle.dumps(_m25_doc({"en": torch.tensor([[0, 1]])}), protocol=4))
    monkeypatch.setattr(importers, "MAX_IMPORT_BYTES", 100)
    for load in (import_mondal2025_pkl, import_tang2024_pth):
        with pytest.raises(UserError, match="more than any neuron file"):
            load(path)


class _Strided:
    def __init__(self, size, stride, offset=0):
        self.size, self.stride, self.offset = size, stride, offset

    def __reduce__(self):
        import collections
        return (torch._utils._rebuild_tensor_v2,
                (torch.tensor([0, 1, 5]).storage(), self.offset, self.size, self.stride, False,
                 collections.OrderedDict()))


def test_legacy_pth_is_scanned_before_torch_load(tmp_path):
    good = tmp_path / "legacy.pth"
    torch.save([[torch.tensor([0, 5])]], good, _use_new_zipfile_serialization=False)
    assert import_tang2024_pth(good, model={"width": 8}).neurons["en"].tolist() == [[0, 0], [0, 5]]
    for name, tensor, fragment in [("stride", _Strided((2,), (2**50,)), "reaches element"),
                                   ("negative", _Strided((2,), (-1,)), "negative stride"),
                                   ("offset", _Strided((1,), (1,), offset=2**40), "storage offset"),
                                   ("zero", _Strided((2**40,), (0,)), "expands a 3-element storage")]:
        bad = tmp_path / f"{name}.pth"
        torch.save([[tensor]], bad, _use_new_zipfile_serialization=False)
        with pytest.raises(UserError, match=fragment) as info:
            import_tang2024_pth(bad, model={"width": 8})
        assert "\n" not in str(info.value)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(UserError, match="truncated"):
        import_tang2024_pth(cut, model={"width": 8})


def test_compressed_pth_record_is_refused(tmp_path):
    import zipfile
    src = tmp_path / "masks.pth"
    torch.save([[torch.tensor([0, 5])]], src)
    packed = tmp_path / "packed.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    with pytest.raises(UserError, match="compressed"):
        import_tang2024_pth(packed, model={"width": 8})


def test_shared_storage_cannot_exceed_the_file(tmp_path):
    """Many tensors viewing one storage: their elements together may not exceed the file's bytes."""
    big = torch.arange(50_000)
    path = tmp_path / "shared.pth"
    torch.save([[big] * 200], path)  # one 400 KB storage referenced 200 times: 10M elements
    with pytest.raises(UserError, match="more than a"):
        import_tang2024_pth(path, model={"width": 50_000})


def test_languages_given_twice_are_refused(tmp_path):
    path = tmp_path / "masks.pth"
    torch.save([[torch.tensor([0])], [torch.tensor([1])]], path)
    with pytest.raises(UserError, match="twice"):
        import_tang2024_pth(path, languages="en,en", model={"width": 8})


@pytest.mark.parametrize("args, fragment", [
    ((2, 0, (2,), (1,)), None),
    ((2, 0, (2, 2), (0, 1)), None),  # small zero-stride expansion is tolerated
    ((2, 0, (0,), (2**60,)), None),  # empty: strides are irrelevant
    ((2, 3, (0,), (1,)), "storage offset 3 is beyond"),
    ((2, 2, (1,), (1,)), "storage offset 2 is beyond"),
    ((2, 0, (3,), (1,)), "reaches element 2"),
    ((2, 0, (2,), (-1,)), "negative stride"),
    ((2, 0, (-1,), (1,)), "negative size"),
    ((2, 0, (2, 2), (1,)), "differ in length"),
    ((2, -1, (1,), (1,)), "storage offset -1"),
    ((2, 0, [2], [1]), "not a tuple"),
    ((2, 0, (2.0,), (1,)), "not a tuple"),
    ((2, 0, (True,), (1,)), "not a tuple"),
    ((2, 0, (2**31, 2), (0, 1)), "expands a 2-element storage"),
])
def test_check_view(args, fragment):
    from langneurons.importers import _BoundsError, _check_view
    if fragment is None:
        _check_view(*args)
    else:
        with pytest.raises(_BoundsError, match=fragment):
            _check_view(*args)
