"""Residual-stream language directions (DiffMean): collection against brute force, shards and resume,
the direction intervention against a hand-written hook (alone, with a neuron intervention, under
generation with and without KV cache), the artifact and the command line. Tiny random models only."""

from __future__ import annotations

import json

import pytest
import torch

from langneurons import artifacts as A
from langneurons import unitsums
from langneurons.arch import Adapter
from langneurons.cli import main
from langneurons.directions import (DirectionIntervention, Directions, DirectionsConfig, ResidualSums, accumulate,
                                    collect_directions, diffmean)
from langneurons.errors import UserError
from langneurons.intervene import Intervention
from langneurons.neuronset import NeuronSet
from langneurons.runtime import Session, forward_kwargs, pad_rows
from langneurons.testing import tiny_model

from conftest import DEMO_CORPUS
from unit_helpers import LANGS, WINDOW, logits, model, save_models, small_tokenizer, unit_config, windows_of
from unit_helpers import one_line_error as _one_line_error
#: the module holding the final norm (HF applies it to the last entry of hidden_states)
FINAL_NORM = {"llama": "model.norm", "qwen2": "model.norm", "gpt2": "transformer.ln_f",
              "opt": "model.decoder.final_layer_norm"}


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


def config(out, langs=LANGS, **kw):
    return unit_config(DirectionsConfig, out, langs, **kw)


def hidden_by_brute_force(m, arch, ids, mask=None):
    """``[L][B, T, H]``: hidden_states[l + 1] for l < L - 1, the input of the final norm for the last layer."""
    mod = m
    for part in FINAL_NORM[arch].split("."):
        mod = getattr(mod, part)
    seen = {}
    h = mod.register_forward_pre_hook(lambda mod_, args: seen.__setitem__("x", args[0].clone()))
    try:
        with torch.no_grad():
            out = m(input_ids=ids, output_hidden_states=True, **forward_kwargs(m, mask))
    finally:
        h.remove()
    L = len(out.hidden_states) - 1
    return [out.hidden_states[l + 1] for l in range(L - 1)] + [seen["x"]]


def add_by_hand(adapter, layer_vectors: dict):
    """Forward hooks that add a vector to decoder layers' outputs (returns the handles)."""
    def make(v):
        def hook(mod, args, out):
            if isinstance(out, tuple):
                return (out[0] + v.to(out[0].dtype),) + out[1:]
            return out + v.to(out.dtype)
        return hook
    return [adapter.layers[l].layer.register_forward_hook(make(v)) for l, v in layer_vectors.items()]


@pytest.fixture(scope="module")
def llama_dirs(tok, tmp_path_factory):
    """A float64 tiny Llama (GQA) and its directions on three languages."""
    m = model("llama", tok)
    out = tmp_path_factory.mktemp("dirs") / "llama"
    return m, collect_directions(config(out), model=m, tokenizer=tok)


# ------------------------------------------------------------------------------------------ collection
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_collected_means_equal_brute_force(arch, tok, tmp_path):
    m = model(arch, tok)
    dirs = collect_directions(config(tmp_path / "d", langs=("en", "zh")), model=m, tokenizer=tok)
    a = Adapter(m)
    assert dirs.languages == ["en", "zh"] and (dirs.num_layers, dirs.hidden_size) == (a.num_layers, a.hidden_size)
    for code in dirs.languages:
        W = windows_of(code, tok)
        hs = hidden_by_brute_force(m, arch, W)
        assert dirs.count(code) == W.numel()
        for l, h in enumerate(hs):
            flat = h.reshape(-1, h.shape[-1]).double()
            torch.testing.assert_close(dirs.mean(code)[l], flat.mean(0), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(dirs.mean_norm(code)[l], flat.norm(dim=-1).mean(), rtol=1e-10, atol=1e-12)
    # the stored float32 means and the documented layout
    from safetensors.torch import load_file
    t = load_file(str(tmp_path / "d" / "directions.safetensors"))
    assert t["mean.en"].dtype == torch.float32 and tuple(t["mean.en"].shape) == (a.num_layers, a.hidden_size)
    assert t["sum.en"].dtype == torch.float64 and t["count.en"].tolist() == [dirs.count("en")]
    doc = A.load(tmp_path / "d" / "directions.json")
    assert A.kind_of(doc) == "directions" and doc["token_counts"] == {"en": dirs.count("en"), "zh": dirs.count("zh")}
    assert doc["window"] == WINDOW and set(doc["sources"]) == {"en", "zh"}
    assert doc["model"]["fingerprint"] and doc["hidden_size"] == a.hidden_size


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padded_rows_count_only_real_positions(arch, tok):
    m = model(arch, tok)
    s = Session(m, tok, batch_size=2)
    rows = [[1, 5, 9, 4, 7, 8], [1, 8, 3], [1, 20, 30, 40]]
    ids, mask = pad_rows(rows, 0, "right")
    sums = accumulate(s, ids, mask=mask)
    hs = hidden_by_brute_force(m, arch, ids, mask)
    real = mask.bool()
    assert sums.n_tokens == int(real.sum())
    for l, h in enumerate(hs):
        torch.testing.assert_close(sums.mean()[l], h[real].double().mean(0), rtol=1e-10, atol=1e-12)


def test_two_shards_summed_equal_one_run(tok):
    m = model("qwen2", tok)
    W = windows_of("fr", tok)
    one = accumulate(Session(m, tok, batch_size=3), W)
    halves = accumulate(Session(m, tok, batch_size=3), W[:5]).merge(accumulate(Session(m, tok, batch_size=3), W[5:]))
    ranks = []
    for r in range(2):                      # the rank split of the runtime (rank r takes batches r, r + 2, ...)
        s = Session(m, tok, batch_size=3)
        s.rank, s.world = r, 2
        ranks.append(accumulate(s, W))
    assert ranks[0].n_tokens > 0 and ranks[1].n_tokens > 0
    merged = ranks[0].merge(ranks[1])
    for other in (halves, merged):
        assert other.n_tokens == one.n_tokens == W.numel()
        torch.testing.assert_close(other.sum, one.sum, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(other.norm_sum, one.norm_sum, rtol=1e-12, atol=1e-12)


class _Stop(Exception):
    pass


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tok, tmp_path, monkeypatch):
    m = model("llama", tok)
    langs = ("en", "fr")
    full = collect_directions(config(tmp_path / "full", langs), model=m, tokenizer=tok)
    # en has 10 windows = 3 batches of 4; die after the 5th batch (2nd of fr), right after its checkpoint
    monkeypatch.setenv("LANGNEURONS_FAULT_AFTER_BATCHES", "5")

    def stop():
        raise _Stop
    monkeypatch.setattr(unitsums, "_crash", stop)
    part = tmp_path / "part"
    with pytest.raises(_Stop):
        collect_directions(config(part, langs, checkpoint_every=1e9), model=m, tokenizer=tok)
    assert Directions.load(part).languages == ["en"]            # en finished and written, fr checkpointed
    ck = json.loads((part / ".partial" / "directions.fr.rank0.json").read_text())
    assert ck["next_batch"] == 2 and A.kind_of(ck) == "directions.checkpoint"
    monkeypatch.delenv("LANGNEURONS_FAULT_AFTER_BATCHES")
    passes = []
    h = m.model.register_forward_pre_hook(lambda mod, args: passes.append(1))
    try:
        resumed = collect_directions(config(part, langs), model=m, tokenizer=tok)
    finally:
        h.remove()
    assert len(passes) == 1                                      # fr's 3rd batch only; en was skipped
    assert not (part / ".partial").exists()
    for code in langs:
        assert resumed.count(code) == full.count(code)
        assert torch.equal(resumed.sums[code].sum, full.sums[code].sum)
        assert torch.equal(resumed.sums[code].norm_sum, full.sums[code].norm_sum)


def test_diffmean_is_the_unweighted_contrast(llama_dirs):
    _, dirs = llama_dirs
    for t in LANGS:
        others = [c for c in LANGS if c != t]
        want = dirs.mean(t) - (dirs.mean(others[0]) + dirs.mean(others[1])) / 2
        torch.testing.assert_close(diffmean(dirs, t), want, rtol=0, atol=1e-12)
        torch.testing.assert_close(diffmean(dirs, t, layer=1), want[1], rtol=0, atol=1e-12)
        unit = diffmean(dirs, t, normalise=True)
        torch.testing.assert_close(unit.norm(dim=-1), torch.ones(dirs.num_layers, dtype=torch.float64))
    pair = diffmean(dirs, "en", languages=["en", "zh"])
    torch.testing.assert_close(pair, dirs.mean("en") - dirs.mean("zh"), rtol=0, atol=1e-12)
    with pytest.raises(UserError, match="unknown language 'xx'"):
        diffmean(dirs, "xx")
    with pytest.raises(UserError, match="at least one other"):
        diffmean(dirs, "en", languages=["en"])


# ------------------------------------------------------------------------------------------ the intervention
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("normalise", [False, True])
def test_direction_intervention_equals_adding_the_vector_by_hand(arch, normalise, tok, tmp_path):
    m = model(arch, tok)
    dirs = collect_directions(config(tmp_path / "d"), model=m, tokenizer=tok)
    s = Session(m, tok, batch_size=4)
    ids, mask = pad_rows([[1, 5, 9, 4, 7, 8, 30], [1, 8, 3], [1, 20, 30, 40, 50]], 0, "right")
    real = mask.bool()
    base = logits(s, ids, mask)
    alpha, layer = 0.7, 1
    v = diffmean(dirs, "zh", layer=layer)
    if normalise:
        rbar = torch.stack([dirs.sums[c].norm_sum[layer] / dirs.count(c) for c in LANGS]).mean()
        v = rbar * v / v.norm()
    iv = DirectionIntervention(dirs, "zh", [layer], alpha, normalise=normalise)
    with s.intervened(iv):
        got = logits(s, ids, mask)
    handles = add_by_hand(s.adapter, {layer: alpha * v})
    try:
        want = logits(s, ids, mask)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
    assert not torch.allclose(got[real], base[real], atol=1e-3)       # it does move the logits
    assert torch.equal(logits(s, ids, mask), base)                     # and goes away
    # a raw tensor gives the same as its vector
    vec = torch.zeros(dirs.num_layers, dirs.hidden_size, dtype=torch.float64)
    vec[layer] = v
    with s.intervened(DirectionIntervention(vec, None, layer, alpha)):
        torch.testing.assert_close(logits(s, ids, mask)[real], want[real], rtol=0, atol=1e-5)


def test_composed_with_a_neuron_zero_equals_both_by_hand(llama_dirs, tok):
    m, dirs = llama_dirs
    s = Session(m, tok, batch_size=4)
    a = s.adapter
    g = torch.Generator().manual_seed(0)
    masks = {"aa": torch.rand(a.num_layers, a.width, generator=g) < 0.3}
    ns = NeuronSet.from_masks(masks, {"num_layers": a.num_layers, "width": a.width, "site": "act",
                                      "name_or_path": "tiny"}, {"name": "test"})
    ids, mask = pad_rows([[1, 5, 9, 4, 7, 8], [1, 8, 3, 3]], 0, "right")
    real = mask.bool()
    zero = Intervention(ns, ["aa"], "zero")
    dv = DirectionIntervention(dirs, "fr", [0, 1], -1.5, normalise=True, positions="all")
    with s.intervened([zero, dv]):
        got = logits(s, ids, mask)
    with s.intervened([dv, zero]):                                     # different sites: order does not matter
        torch.testing.assert_close(logits(s, ids, mask), got, rtol=0, atol=1e-12)

    def zero_hook(l):
        idx = masks["aa"][l].nonzero().flatten()

        def hook(mod, args, out):
            out = out.clone()
            out[..., idx] = 0
            return out
        return hook
    handles = [a.layers[l].act.register_forward_hook(zero_hook(l)) for l in range(a.num_layers)]
    handles += add_by_hand(a, dv.deltas())
    try:
        want = logits(s, ids, mask)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("positions", ["all", "prompt", "generated", "last"])
def test_generation_with_kv_cache_equals_without(positions, llama_dirs, tok):
    m, dirs = llama_dirs
    s = Session(m, tok, batch_size=4)
    rows = [[1, 5, 9, 4, 7, 8], [1, 8, 3], [1, 20, 30, 40]]
    iv = DirectionIntervention(dirs, "zh", [0, 1], 4.0, normalise=True, positions=positions)
    cfg = m.generation_config
    base = s.generate(ids=rows, max_new_tokens=6)
    try:
        with s.intervened(iv):
            cfg.use_cache = True
            cached = s.generate(ids=rows, max_new_tokens=6)
            cfg.use_cache = False
            uncached = s.generate(ids=rows, max_new_tokens=6)
    finally:
        cfg.use_cache = True
    assert cached == uncached
    # token ids too, through model.generate (left padding)
    ids, mask = pad_rows(rows, 0, "left")
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with s.intervened(iv):
        g1 = m.generate(ids, use_cache=True, **kw)
        g2 = m.generate(ids, use_cache=False, **kw)
    assert torch.equal(g1, g2)
    if positions in ("all", "generated"):
        assert cached != base or not torch.equal(g1, m.generate(ids, use_cache=True, **kw))
    assert "generate" not in vars(m)


def test_positions_follow_the_neuron_interventions(llama_dirs, tok):
    """'last' outside generate writes only the last real position of each row; pads are never written."""
    m, dirs = llama_dirs
    s = Session(m, tok)
    ids, mask = pad_rows([[1, 5, 9, 4, 7, 8], [1, 8, 3]], 0, "right")
    seen = {}
    from langneurons.hooks import observe_residual
    with observe_residual(s.adapter, lambda l, h: seen.__setitem__("base", h.clone()), layers=[0]):
        s.forward(ids, mask)
    for positions in ("all", "last"):
        iv = DirectionIntervention(dirs, "en", [0], 1.0, normalise=True, positions=positions)
        with s.intervened(iv):       # the observer is registered after the writer: it sees the written stream
            with observe_residual(s.adapter, lambda l, h: seen.__setitem__(positions, h.clone()), layers=[0]):
                s.forward(ids, mask)
        moved = (seen[positions] != seen["base"]).any(-1)
        want = mask.bool() if positions == "all" else torch.tensor([[0, 0, 0, 0, 0, 1], [0, 0, 1, 0, 0, 0]]).bool()
        assert moved.tolist() == want.tolist(), positions


def test_serialisation_and_bad_input(llama_dirs, tok, tmp_path):
    m, dirs = llama_dirs
    iv = DirectionIntervention(dirs.path, "zh", [1, 0], 0.5, normalise=True, positions="generated")
    rec = iv.to_dict()
    (tmp_path / "iv.json").write_text(json.dumps(rec))
    assert A.kind_of(tmp_path / "iv.json") == "intervention" and rec["unit"] == "direction"
    back = DirectionIntervention.from_dict(json.loads((tmp_path / "iv.json").read_text()))
    assert back.to_dict() == rec and back.layers == [0, 1]
    with pytest.raises(UserError, match="DirectionIntervention.from_dict"):
        Intervention.from_dict(rec)
    with pytest.raises(UserError, match="unknown language 'xx'"):
        DirectionIntervention(dirs, "xx", 0, 1.0)
    with pytest.raises(UserError, match="outside"):
        DirectionIntervention(dirs, "en", 5, 1.0)
    with pytest.raises(UserError, match="unknown positions"):
        DirectionIntervention(dirs, "en", 0, 1.0, positions="middle")
    with pytest.raises(UserError, match="not a finite number"):
        DirectionIntervention(dirs, "en", 0, float("nan"))
    with pytest.raises(UserError, match="normalise=True needs"):
        DirectionIntervention(torch.zeros(32), None, 0, 1.0, normalise=True)
    other = tiny_model("llama", hidden_size=48, vocab_size=len(tok))
    with pytest.raises(UserError, match="do not fit this model"):
        with Session(other, tok).intervened(DirectionIntervention(dirs, "en", 0, 1.0)):
            pass
    from langneurons.intervene import intervene_rows
    with pytest.raises(UserError, match="stacked rows"):
        with intervene_rows(m, [None, DirectionIntervention(dirs, "en", 0, 1.0)]):
            pass


def test_merge_refuses_other_shapes():
    with pytest.raises(UserError, match="same model"):
        ResidualSums(2, 8).merge(ResidualSums(2, 16))


# ------------------------------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def model_dirs(tok, tmp_path_factory):
    """Two saved tiny Llama models (other seeds) sharing the tokenizer."""
    return save_models(tmp_path_factory.mktemp("models"), tok, {"a": {"seed": 0}, "b": {"seed": 1}})


def _collect_args(model_dir, out, langs=("en", "zh")):
    args = ["directions", "collect", "--model", str(model_dir), "--device", "cpu", "--out", str(out),
            "--window", str(WINDOW), "--max-tokens", str(WINDOW * 6), "--batch-size", "4", "--no-cache", "--quiet"]
    for c in langs:
        args += ["--lang", f"{c}={DEMO_CORPUS / (c + '.txt')}"]
    return args


def test_cli_collect_show_and_bad_input(model_dirs, tmp_path, capsys):
    out = tmp_path / "dirs"
    assert main(_collect_args(model_dirs / "a", out)) == 0
    assert (out / "directions.json").is_file() and (out / "directions.safetensors").is_file()
    capsys.readouterr()
    assert main(["directions", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "cosine" in shown and "en" in shown and "zh" in shown and "layer" in shown
    # rerun of the same command: nothing to do; adding a language keeps the others
    before = (out / "directions.safetensors").read_bytes()
    assert main(_collect_args(model_dirs / "a", out, langs=("en",))) == 0
    assert (out / "directions.safetensors").read_bytes() == before
    # bad input: one line, exit 2, nothing changed
    msg = _one_line_error(capsys, _collect_args(model_dirs / "b", out))
    assert "another model" in msg
    assert (out / "directions.safetensors").read_bytes() == before
    msg = _one_line_error(capsys, ["directions", "show", str(out), "--languages", "en,xx"])
    assert "unknown language 'xx'" in msg
    msg = _one_line_error(capsys, ["directions", "show", str(tmp_path / "nowhere")])
    assert "nowhere" in msg and "does not exist" in msg
    msg = _one_line_error(capsys, ["directions", "show", str(out), "--layer", "9"])
    assert "--layer" in msg
    msg = _one_line_error(capsys, ["directions", "show", str(out), "--languages", "en"])
    assert "at least two languages" in msg
    msg = _one_line_error(capsys, _collect_args(model_dirs / "a", tmp_path / "o2")[:-2]
                          + ["--lang", f"en={tmp_path / 'nope.txt'}"])
    assert "nope.txt" in msg and not (tmp_path / "o2").exists()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    msg = _one_line_error(capsys, _collect_args(model_dirs / "a", tmp_path / "junk"))
    assert "not a langneurons directions directory" in msg
    (out / "directions.safetensors").write_bytes(before[:100])
    msg = _one_line_error(capsys, ["directions", "show", str(out)])
    assert "corrupt" in msg
