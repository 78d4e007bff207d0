"""Attention heads as language units: statistics against brute force, shards and resume, head interventions
against hand-written pre-hooks and weight edits (GQA, fused qkv, Conv1D), KV cache, selection on hand-made
statistics, the head-set format and the command line. Tiny random models only."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from langneurons import artifacts as A
from langneurons import heads as HD
from langneurons import unitsums
from langneurons.arch import ADAPTERS, ATTN_OUT, Adapter, in_features
from langneurons.cli import main
from langneurons.directions import DirectionIntervention
from langneurons.errors import UserError
from langneurons.heads import (HeadIntervention, HeadSet, HeadStats, HeadSums, HeadsConfig, accumulate, collect_heads,
                               hist_edges, identify_heads, lape_heads, top_heads)
from langneurons.intervene import Intervention, intervene_rows
from langneurons.neuronset import NeuronSet
from langneurons.runtime import Session, pad_rows
from langneurons.testing import TINY_CONFIGS, tiny_model

from conftest import DEMO_CORPUS
from unit_helpers import LANGS, WINDOW, logits, model, save_models, small_tokenizer, unit_config, windows_of
from unit_helpers import one_line_error as _one_line_error

#: Llama (GQA: 2 key-value heads for 4 heads), GPT-2 (Conv1D, fused c_attn), Qwen2 (GQA, q/k/v biases)
ARCHS = ["llama", "gpt2", "qwen2"]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


def config(out, langs=LANGS, **kw):
    return unit_config(HeadsConfig, out, langs, **kw)


def attn_out_modules(m):
    a = Adapter(m)
    return [a.layers[l].layer.get_submodule(ATTN_OUT[m.config.model_type]) for l in range(a.num_layers)]


def brute_force_norms(m, ids, mask=None):
    """``[L][B, T, n]``: ||W_O[:, h*d:(h+1)*d] z_h|| from the captured input of each output projection,
    each head's contribution formed explicitly (GPT-2's Conv1D weight is [in, out])."""
    mods = attn_out_modules(m)
    seen = {}
    hs = [mod.register_forward_pre_hook(lambda mod_, args, l=l: seen.__setitem__(l, args[0].detach().clone()))
          for l, mod in enumerate(mods)]
    try:
        with torch.no_grad():
            m(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in hs:
            h.remove()
    n = m.config.num_attention_heads
    out = []
    for l, mod in enumerate(mods):
        z = seen[l].double()
        d = z.shape[-1] // n
        W = mod.weight.double()
        cols = []
        for h in range(n):
            zh = z[..., h * d:(h + 1) * d]
            c = zh @ W[h * d:(h + 1) * d, :] if type(mod).__name__ == "Conv1D" else zh @ W[:, h * d:(h + 1) * d].T
            cols.append(c.norm(dim=-1))
        out.append(torch.stack(cols, -1))
    return out


def zero_by_hand(m, layer_heads: dict, factor=0.0):
    """Pre-hooks multiplying the columns of the given heads of each output projection's input by ``factor``."""
    mods = attn_out_modules(m)
    n = m.config.num_attention_heads

    def make(heads):
        def pre(mod, args):
            z = args[0].clone()
            d = z.shape[-1] // n
            for h in heads:
                z[..., h * d:(h + 1) * d] *= factor
            return (z,) + tuple(args[1:])
        return pre
    return [mods[l].register_forward_pre_hook(make(hs)) for l, hs in layer_heads.items()]


ROWS = [[0, 1], [1, 3], [1, 0]]
BY_LAYER = {0: [1], 1: [3, 0]}


@pytest.fixture(scope="module")
def llama_stats(tok, tmp_path_factory):
    m = model("llama", tok)
    out = tmp_path_factory.mktemp("heads") / "llama"
    return m, collect_heads(config(out), model=m, tokenizer=tok)


# ------------------------------------------------------------------------------------------ the adapter table
def test_every_adapter_names_its_attention_output_projection():
    assert set(ATTN_OUT) == set(ADAPTERS)
    for t in sorted(TINY_CONFIGS):
        m = tiny_model(t)
        att = Adapter(m).attention()
        assert att.source == "table" and att.num_heads == m.config.num_attention_heads
        assert att.width == in_features(att.modules[0]) and att.head_dim * att.num_heads == att.width
        assert att.layout == ("conv1d" if t == "gpt2" else "linear")
        other = Adapter(m)
        other.model_type = "unknown"                      # auto-detection finds the same module
        assert other.attention().path == att.path and other.attention().source == "auto"
    with pytest.raises(UserError, match="--attn-out"):
        Adapter(tiny_model("llama")).attention("self_attn.nope")


# ------------------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("arch", ARCHS)
def test_head_statistics_equal_brute_force_on_padded_rows(arch, tok):
    m = model(arch, tok)
    s = Session(m, tok, batch_size=2)
    ids, mask = pad_rows([[1, 5, 9, 4, 7, 8], [1, 8, 3], [1, 20, 30, 40], [1, 7]], 0, "right")
    sums = accumulate(s, ids, mask=mask)
    real = mask.bool()
    edges = hist_edges()
    assert sums.n_tokens == int(real.sum())
    for l, norms in enumerate(brute_force_norms(m, ids, mask)):
        x = norms[real]                                              # [N, n]
        torch.testing.assert_close(sums.norm_sum[l], x.sum(0), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sums.sq_sum[l], (x * x).sum(0), rtol=1e-10, atol=1e-12)
        want = torch.stack([torch.bincount(torch.bucketize(x[:, h].contiguous(), edges, right=True),
                                           minlength=edges.numel() + 1) for h in range(x.shape[1])])
        assert torch.equal(sums.hist[l], want)
        torch.testing.assert_close(sums.mean_norm()[l], x.mean(0), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sums.std_norm()[l], x.std(0, unbiased=False), rtol=1e-8, atol=1e-10)


def test_collected_artifact_equals_brute_force(llama_stats, tok):
    m, st = llama_stats
    assert st.languages == list(LANGS) and (st.num_layers, st.num_heads, st.head_dim) == (2, 4, 8)
    for code in LANGS:
        W = windows_of(code, tok)
        assert st.count(code) == W.numel()
        for l, norms in enumerate(brute_force_norms(m, W)):
            torch.testing.assert_close(st.mean_norm(code)[l], norms.reshape(-1, 4).mean(0), rtol=1e-10, atol=1e-12)
    from safetensors.torch import load_file
    t = load_file(str(st.path / "heads.safetensors"))
    assert t["norm.en"].dtype == torch.float32 and tuple(t["norm.en"].shape) == (2, 4)
    assert t["norm_sum.en"].dtype == torch.float64 and t["hist.en"].dtype == torch.int64
    assert tuple(t["hist.en"].shape) == (2, 4, HD.n_bins()) and t["count.en"].tolist() == [st.count("en")]
    doc = A.load(st.path / "heads.json")
    assert A.kind_of(doc) == "heads" and doc["num_heads"] == 4 and doc["model"]["attention"]["attn_out"] == \
        "self_attn.o_proj"
    # the secondary statistic: tau at the pooled median's bin edge; P is the share at or above it
    tau = st.threshold()
    for code in LANGS:
        norms = brute_force_norms(m, windows_of(code, tok))[1].reshape(-1, 4)
        torch.testing.assert_close(st.prob(code)[1], (norms >= tau[1]).double().mean(0), rtol=0, atol=1e-12)


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
        torch.testing.assert_close(other.norm_sum, one.norm_sum, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(other.sq_sum, one.sq_sum, rtol=1e-12, atol=1e-12)
        assert torch.equal(other.hist, one.hist)
    with pytest.raises(UserError, match="same model"):
        HeadSums(2, 4).merge(HeadSums(2, 8))


class _Stop(Exception):
    pass


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tok, tmp_path, monkeypatch):
    m = model("gpt2", tok)
    langs = ("en", "fr")
    full = collect_heads(config(tmp_path / "full", langs), model=m, tokenizer=tok)
    monkeypatch.setenv("LANGNEURONS_FAULT_AFTER_BATCHES", "5")   # en: 3 batches; die after fr's 2nd

    def stop():
        raise _Stop
    monkeypatch.setattr(unitsums, "_crash", stop)
    part = tmp_path / "part"
    with pytest.raises(_Stop):
        collect_heads(config(part, langs, checkpoint_every=1e9), model=m, tokenizer=tok)
    assert HeadStats.load(part).languages == ["en"]
    ck = json.loads((part / ".partial" / "heads.fr.rank0.json").read_text())
    assert ck["next_batch"] == 2 and A.kind_of(ck) == "heads.checkpoint"
    monkeypatch.delenv("LANGNEURONS_FAULT_AFTER_BATCHES")
    passes = []
    h = m.transformer.register_forward_pre_hook(lambda mod, args: passes.append(1))
    try:
        resumed = collect_heads(config(part, langs), model=m, tokenizer=tok)
    finally:
        h.remove()
    assert len(passes) == 1 and not (part / ".partial").exists()
    for code in langs:
        a, b = resumed.sums[code], full.sums[code]
        assert a.n_tokens == b.n_tokens and torch.equal(a.norm_sum, b.norm_sum) and torch.equal(a.hist, b.hist)
        assert torch.equal(a.sq_sum, b.sq_sum)


# ------------------------------------------------------------------------------------------ interventions
@pytest.mark.parametrize("arch", ARCHS + ["gpt_neox", "bloom", "falcon", "opt", "phi", "phi3", "gemma2"])
@pytest.mark.parametrize("operator,factor", [("zero", 0.0), ("scale:0.3", 0.3), ("scale:-2", -2.0)])
def test_head_intervention_equals_a_hand_written_prehook(arch, operator, factor, tok):
    m = model(arch, tok)
    s = Session(m, tok, batch_size=4)
    ids, mask = pad_rows([[1, 5, 9, 4, 7, 8, 30], [1, 8, 3], [1, 20, 30, 40, 50]], 0, "right")
    real = mask.bool()
    base = logits(s, ids, mask)
    with s.intervened(HeadIntervention(ROWS, "x", operator)) as ctl:
        got = logits(s, ids, mask)
    assert ctl.calls == [[1, 1]]
    handles = zero_by_hand(m, BY_LAYER, factor)
    try:
        want = logits(s, ids, mask)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
    assert not torch.allclose(got[real], base[real], atol=1e-4)
    assert torch.equal(logits(s, ids, mask), base)


def test_zeroing_heads_equals_zeroing_their_values_gqa(tok):
    """Llama with 4 heads sharing 2 key-value heads: zeroing value head 1 (v_proj rows 8..15) of layer 1 makes
    the outputs of heads 2 and 3 zero, which is what zeroing heads [1, 2] and [1, 3] does."""
    m = model("llama", tok)
    s = Session(m, tok)
    ids, mask = pad_rows([[1, 5, 9, 4, 7, 8], [1, 8, 3, 3, 9, 9]], 0, "right")
    with s.intervened(HeadIntervention([[1, 2], [1, 3]], None, "zero")):
        got = logits(s, ids, mask)
    edited = copy.deepcopy(m)
    with torch.no_grad():
        edited.model.layers[1].self_attn.v_proj.weight[8:16] = 0
    want = logits(Session(edited, tok), ids, mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_zeroing_a_head_equals_zeroing_its_values_fused_conv1d(tok):
    """GPT-2's fused c_attn (Conv1D, weight [in, 3H]: query | key | value, head-major): zeroing the value
    columns of head 2 (weight and bias) of layer 0 equals zeroing head [0, 2]."""
    m = model("gpt2", tok)
    s = Session(m, tok)
    ids, mask = pad_rows([[1, 5, 9, 4, 7, 8], [1, 8, 3, 3, 9, 9]], 0, "right")
    with s.intervened(HeadIntervention([[0, 2]], None, "zero")):
        got = logits(s, ids, mask)
    edited = copy.deepcopy(m)
    H, d = 32, 8
    with torch.no_grad():
        ca = edited.transformer.h[0].attn.c_attn
        ca.weight[:, 2 * H + 2 * d:2 * H + 3 * d] = 0
        ca.bias[2 * H + 2 * d:2 * H + 3 * d] = 0
    want = logits(Session(edited, tok), ids, mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("positions", ["all", "prompt", "generated", "last"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_with_kv_cache_equals_without(arch, positions, tok):
    m = model(arch, tok, dtype=torch.float32)
    s = Session(m, tok, batch_size=4)
    rows = [[1, 5, 9, 4, 7, 8], [1, 8, 3], [1, 20, 30, 40]]
    iv = HeadIntervention([[0, 0], [0, 1], [1, 2], [1, 3], [0, 3]], "x", "scale:-3", positions=positions)
    cfg = m.generation_config
    try:
        with s.intervened(iv):
            cfg.use_cache = True
            cached = s.generate(ids=rows, max_new_tokens=6)
            cfg.use_cache = False
            uncached = s.generate(ids=rows, max_new_tokens=6)
    finally:
        cfg.use_cache = True
    assert cached == uncached
    ids, mask = pad_rows(rows, 0, "left")
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with s.intervened(iv):
        g1 = m.generate(ids, use_cache=True, **kw)
        g2 = m.generate(ids, use_cache=False, **kw)
    assert torch.equal(g1, g2) and "generate" not in vars(m)


def test_positions_last_writes_only_the_last_real_position(tok):
    m = model("llama", tok)
    s = Session(m, tok)
    ids, mask = pad_rows([[1, 5, 9, 4, 7, 8], [1, 8, 3]], 0, "right")
    from langneurons.hooks import observe_heads
    seen = {}
    with observe_heads(s.adapter, lambda l, z: seen.__setitem__("base", z.clone()), layers=[0]):
        s.forward(ids, mask)
    for positions in ("all", "last"):
        with s.intervened(HeadIntervention([[0, 1]], None, "zero", positions=positions)):
            with observe_heads(s.adapter, lambda l, z: seen.__setitem__(positions, z.clone()), layers=[0]):
                s.forward(ids, mask)
        moved = (seen[positions] != seen["base"]).any(-1)
        want = mask.bool() if positions == "all" else torch.tensor([[0, 0, 0, 0, 0, 1], [0, 0, 1, 0, 0, 0]]).bool()
        assert moved.tolist() == want.tolist(), positions
        assert bool((seen[positions][..., 8:16][moved] == 0).all())


def test_composed_with_neuron_and_direction_interventions_equals_all_by_hand(tok):
    m = model("qwen2", tok)
    s = Session(m, tok, batch_size=4)
    a = s.adapter
    g = torch.Generator().manual_seed(0)
    masks = {"aa": torch.rand(a.num_layers, a.width, generator=g) < 0.3}
    ns = NeuronSet.from_masks(masks, {"num_layers": a.num_layers, "width": a.width, "site": "act",
                                      "name_or_path": "tiny"}, {"name": "test"})
    vec = torch.randn(a.hidden_size, generator=g, dtype=torch.float64)
    ids, mask = pad_rows([[1, 5, 9, 4, 7, 8], [1, 8, 3, 3]], 0, "right")
    real = mask.bool()
    ivs = [Intervention(ns, ["aa"], "zero"), DirectionIntervention(vec, None, [1], 0.5),
           HeadIntervention(ROWS, None, "scale:0.25")]
    with s.intervened(ivs):
        got = logits(s, ids, mask)
    with s.intervened(ivs[::-1]):                                   # different sites: order does not matter
        torch.testing.assert_close(logits(s, ids, mask), got, rtol=0, atol=1e-12)

    def zero_hook(l):
        idx = masks["aa"][l].nonzero().flatten()

        def hook(mod, args, out):
            out = out.clone()
            out[..., idx] = 0
            return out
        return hook

    def add_hook(mod, args, out):
        return (out[0] + 0.5 * vec,) + tuple(out[1:]) if isinstance(out, tuple) else out + 0.5 * vec
    handles = [a.layers[l].act.register_forward_hook(zero_hook(l)) for l in range(a.num_layers)]
    handles.append(a.layers[1].layer.register_forward_hook(add_hook))
    handles += zero_by_hand(m, BY_LAYER, 0.25)
    try:
        want = logits(s, ids, mask)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)


def test_intervention_records_and_bad_input(llama_stats, tok, tmp_path):
    m, st = llama_stats
    hs = identify_heads(st, "top", top_rate=0.25)
    hs.save(tmp_path / "hs.json")
    iv = HeadIntervention(tmp_path / "hs.json", ["en", "zh"], "scale:0.5", positions="generated")
    rec = iv.to_dict()
    assert rec["unit"] == "head" and A.kind_of(rec) == "intervention"
    back = HeadIntervention.from_dict(json.loads(json.dumps(rec)))
    assert back.to_dict() == rec and torch.equal(back.rows, iv.rows)
    raw = HeadIntervention(ROWS, "zh", "zero")
    assert HeadIntervention.from_dict(raw.to_dict()).to_dict() == raw.to_dict()
    with pytest.raises(UserError, match="HeadIntervention.from_dict"):
        Intervention.from_dict(rec)
    with pytest.raises(UserError, match="zero or scale:A"):
        HeadIntervention(ROWS, None, "add:1")
    with pytest.raises(UserError, match="zero or scale:A"):
        HeadIntervention(ROWS, None, "set:batch-max")
    with pytest.raises(UserError, match="unknown positions"):
        HeadIntervention(ROWS, None, "zero", positions="middle")
    with pytest.raises(UserError, match="unknown language 'xx'"):
        HeadIntervention(hs, "xx")
    with pytest.raises(UserError, match="non-negative"):
        HeadIntervention([[0, -1]], None)
    s = Session(m, tok)
    with pytest.raises(UserError, match="head 4 is outside 0..3"):
        with s.intervened(HeadIntervention([[0, 4]], None)):
            pass
    with pytest.raises(UserError, match="layer 2 is outside 0..1"):
        with s.intervened(HeadIntervention([[2, 0]], None)):
            pass
    other = Session(model("llama", tok, num_hidden_layers=3), tok)
    with pytest.raises(UserError, match="made for a 2x4 model"):
        with other.intervened(HeadIntervention(hs, "en")):
            pass
    with pytest.raises(UserError, match="stacked rows"):
        with intervene_rows(m, [None, HeadIntervention(ROWS, None)]):
            pass


# ------------------------------------------------------------------------------------------ selection
def test_lape_selection_on_hand_made_statistics():
    # [L=2, n=3, K=2]; head (l, h) -> its mean norms in (en, zh)
    x = torch.tensor([[[1.0, 1.0], [4.0, 1.0], [0.0, 0.0]],
                      [[1.0, 9.0], [2.0, 3.0], [5.0, 5.0]]], dtype=torch.float64)
    masks, info = lape_heads(x, top_rate=2 / 6)
    # entropies: [0,1] p=(.8,.2), [1,0] p=(.1,.9) lowest; [0,2] (all zero) is never eligible
    sel = masks.any(0)
    assert sel.nonzero().tolist() == [[0, 1], [1, 0]]
    assert masks[0].nonzero().tolist() == [[0, 1]] and masks[1].nonzero().tolist() == [[1, 0]]
    assert info["requested"] == 2 and info["eligible"] == 5 and info["unassigned"] == 0
    # more than exist: every eligible head, the uniform ones unassigned
    masks, info = lape_heads(x, top_rate=0.99)
    assert info["selected"] == 5 and info["shortfall"] == 1 and info["unassigned"] == 2
    # the bar: p(en) of head [0, 1] is 0.8 > 1.5/2, p(zh) of head [1, 0] is 0.9 > 0.75
    masks, _ = lape_heads(x, top_rate=2 / 6, bar=1.7)
    assert masks[0].nonzero().tolist() == [] and masks[1].nonzero().tolist() == [[1, 0]]
    with pytest.raises(UserError, match="at least 2 languages"):
        lape_heads(x[..., :1])
    with pytest.raises(UserError, match="between 0 and 1"):
        lape_heads(x, top_rate=1.5)


def test_top_selection_on_hand_made_statistics():
    x = torch.tensor([[[1.0, 1.0, 1.0], [4.0, 1.0, 1.0], [0.0, 0.0, 0.0]],
                      [[1.0, 9.0, 2.0], [2.0, 3.0, 4.0], [3.0, 3.0, 3.0]]], dtype=torch.float64)
    masks, info = top_heads(x, top_rate=1 / 6)                     # one head per language
    # ratios to the mean over languages: en: [0,1] 2.0 is the largest; zh: [1,0] 27/12; fr..: third column
    assert masks[0].nonzero().tolist() == [[0, 1]]
    assert masks[1].nonzero().tolist() == [[1, 0]]
    assert masks[2].nonzero().tolist() == [[1, 1]]                # 4/3 beats [1,0]'s 2/4 and [0,0]'s 1
    masks, _ = top_heads(x, top_rate=2 / 6)
    assert masks[0].nonzero().tolist() == [[0, 0], [0, 1]]         # [0,0] and [1,2] tie at 1: smaller flat index
    assert info["eligible"] == 5


def test_identify_through_the_artifact(llama_stats, tmp_path):
    m, st = llama_stats
    for method in ("lape", "top"):
        for statistic in ("norm", "prob"):
            hs = identify_heads(st, method, top_rate=0.25, statistic=statistic)
            x = st.table(statistic)
            want, _ = (lape_heads(x, 0.25) if method == "lape" else top_heads(x, 0.25))
            for k, c in enumerate(LANGS):
                assert torch.equal(hs.mask(c), want[k])
            assert hs.model["num_heads"] == 4 and hs.method["stats_fingerprint"] == st.fingerprint
            hs.save(tmp_path / f"{method}.json")
            back = HeadSet.load(tmp_path / f"{method}.json")
            assert back == hs and A.kind_of(tmp_path / f"{method}.json") == "headset"
    with pytest.raises(UserError, match="unknown method 'best'"):
        identify_heads(st, "best")


def test_head_set_files_are_validated(tmp_path):
    good = {"format": A.HEADSET_FORMAT, "model": {"num_layers": 2, "num_heads": 4},
            "method": {"name": "hand", "languages": ["en", "zh"]}, "heads": {"en": [[0, 1], [1, 3]], "zh": []}}
    assert HeadSet.from_dict(good).total("en") == 2
    bad = [({"heads": {"en": [[0, 4]], "zh": []}}, "outside the model shape 2 layers x 4 heads"),
           ({"heads": {"en": [[1, 3], [0, 1]], "zh": []}}, "sorted"),
           ({"heads": {"en": [[0, 1], [0, 1]], "zh": []}}, "twice"),
           ({"heads": {"en": [[0, 1]]}}, "no key"),
           ({"heads": {"en": [], "zh": [], "fr": []}}, "does not list"),
           ({"heads": {"en": [[0, 1.5]], "zh": []}}, "bad row"),
           ({"model": {"num_layers": 2}}, "num_heads"),
           ({"format": "langneurons.neuronset.v1"}, "expected")]
    for change, needle in bad:
        p = tmp_path / "h.json"
        p.write_text(json.dumps({**good, **change}))
        with pytest.raises(UserError) as e:
            HeadSet.load(p)
        assert needle in str(e.value) and "\n" not in str(e.value)
    p.write_text(json.dumps(good))
    assert A.load(p, "headset")["heads"]["en"] == [[0, 1], [1, 3]]


# ------------------------------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def model_dirs(tok, tmp_path_factory):
    """Saved tiny Llama models sharing the tokenizer: a (2 layers), b (3 layers)."""
    return save_models(tmp_path_factory.mktemp("models"), tok, {"a": {}, "b": {"num_hidden_layers": 3}})


def _langs(langs=("en", "zh")):
    return [a for c in langs for a in ("--lang", f"{c}={DEMO_CORPUS / (c + '.txt')}")]


def test_cli_collect_show_identify_ablate_and_bad_input(model_dirs, tmp_path, capsys):
    out = tmp_path / "heads"
    common = ["--device", "cpu", "--window", str(WINDOW), "--batch-size", "4", "--no-cache"]
    assert main(["heads", "collect", "--model", str(model_dirs / "a"), "--out", str(out), "--max-tokens",
                 str(WINDOW * 6), "--quiet", *common, *_langs()]) == 0
    assert (out / "heads.json").is_file() and (out / "heads.safetensors").is_file()
    capsys.readouterr()
    assert main(["heads", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "mean ||c_h||" in shown and len([ln for ln in shown.splitlines() if ln[:1].isdigit()]) == 8
    hs_path = tmp_path / "lape.json"
    assert main(["heads", "identify", "--stats", str(out), "--method", "lape", "--top-rate", "0.5",
                 "--out", str(hs_path)]) == 0
    assert A.kind_of(hs_path) == "headset"
    capsys.readouterr()
    assert main(["heads", "show", str(hs_path)]) == 0
    assert "head set" in capsys.readouterr().out
    assert main(["heads", "ablate", "--model", str(model_dirs / "a"), "--heads", str(hs_path), "--max-tokens",
                 str(WINDOW * 4), *common, *_langs()]) == 0
    table = capsys.readouterr().out
    assert "baseline" in table and "perplexity" in table
    # bad input: one line, exit 2
    msg = _one_line_error(capsys, ["heads", "identify", "--stats", str(out), "--method", "best", "--out",
                                   str(tmp_path / "x.json")])
    assert "unknown method 'best'" in msg
    msg = _one_line_error(capsys, ["heads", "identify", "--stats", str(out), "--statistic", "max", "--out",
                                   str(tmp_path / "x.json")])
    assert "unknown statistic" in msg
    msg = _one_line_error(capsys, ["heads", "ablate", "--model", str(model_dirs / "b"), "--heads", str(hs_path),
                                   *common, *_langs()])
    assert "made for a 2x4 model" in msg and "3x4" in msg
    doc = json.loads(hs_path.read_text())
    doc["heads"]["en"] = [[0, 9]]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    msg = _one_line_error(capsys, ["heads", "ablate", "--model", str(model_dirs / "a"), "--heads",
                                   str(tmp_path / "bad.json"), *common, *_langs()])
    assert "[0, 9] outside the model shape 2 layers x 4 heads" in msg
    msg = _one_line_error(capsys, ["heads", "show", str(tmp_path / "bad.json")])
    assert "outside the model shape" in msg
    msg = _one_line_error(capsys, ["heads", "ablate", "--model", str(model_dirs / "a"), "--heads", str(hs_path),
                                   "--operator", "set:mean", *common, *_langs()])
    assert "zero or scale:A" in msg
    msg = _one_line_error(capsys, ["heads", "collect", "--model", str(model_dirs / "b"), "--out", str(out),
                                   "--quiet", *common, *_langs()])
    assert "another model" in msg
    msg = _one_line_error(capsys, ["heads", "show", str(out), "--layer", "5"])
    assert "--layer" in msg
    msg = _one_line_error(capsys, ["heads", "show", str(tmp_path / "nowhere")])
    assert "does not exist" in msg
