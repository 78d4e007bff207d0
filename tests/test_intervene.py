"""Interventions: operators, values, sites, positions, padding, KV cache, architectures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from langneurons.arch import Adapter
from langneurons.errors import UserError
from langneurons.hooks import observe, write
from langneurons.intervene import Intervention, batch_statistic, intervene, parse_operator
from langneurons.neuronset import NeuronSet
from langneurons.stats import STATS_FORMAT, ActivationStats, LanguageStats
from langneurons.testing import tiny_model




ARCHS = ["llama", "phi3", "gpt2", "opt", "gemma", "qwen2", "gpt_neox", "bloom", "falcon", "phi"]


# ------------------------------------------------------------------------------------------ helpers
def make_ns(L, I, langs=("aa", "bb"), rate=0.2, seed=0, overlap=True) -> NeuronSet:
    g = torch.Generator().manual_seed(seed)
    masks = {c: torch.rand(L, I, generator=g) < rate for c in langs}
    if overlap and len(langs) > 1:
        masks[langs[1]][0, :3] = True
        masks[langs[0]][0, :3] = True   # neurons (0, 0..2) belong to both languages
    if L > 1:
        for m in masks.values():
            m[L - 1] = False             # the last layer is left untouched
    return NeuronSet.from_masks(masks, {"num_layers": L, "width": I, "site": "act", "name_or_path": "tiny"},
                                {"name": "test"})


def make_stats(L, I, langs=("aa", "bb"), site="act", sentences=4, bins=16, seed=0) -> ActivationStats:
    g = torch.Generator().manual_seed(seed)
    per = {}
    for k, code in enumerate(langs):
        ls = LanguageStats(L, I, sketch_bins=bins, sentences=sentences)
        x = torch.randn(L, 200, I, generator=g) * (1 + k) + 0.5 * k
        for l in range(L):
            ls.add_layer(l, x[l])
            if sentences:
                ls.add_sentence_means(l, x[l, : sentences * 10].reshape(sentences, 10, I).mean(1), 0)
        ls.add_tokens(200)
        ls.add_sentences(sentences)
        per[code] = ls
    meta = {"format": STATS_FORMAT, "languages": {c: {"n_tokens": 200} for c in langs},
            "model": {"name_or_path": "tiny", "model_type": "x", "num_layers": L, "width": I, "site": site}}
    return ActivationStats(meta, None, per)


def model_and_ns(arch, dtype=torch.float64, seed=0):
    m = tiny_model(arch, dtype=dtype, seed=seed)
    a = Adapter(m)
    return m, a, make_ns(a.num_layers, a.width, seed=seed)


def batch(B=3, T=7, seed=0, pad_side=None, lengths=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad_side and lengths:
        for b, n in enumerate(lengths):
            if pad_side == "left":
                ids[b, : T - n] = 0
                mask[b, : T - n] = 0
            else:
                ids[b, n:] = 0
                mask[b, n:] = 0
    return ids, mask


class Capture:
    """Observer storing a copy of every call's activations per layer (copies: writers work in place)."""

    def __init__(self):
        self.calls: dict[int, list[torch.Tensor]] = {}

    def __call__(self, layer, t):
        self.calls.setdefault(layer, []).append(t.clone())

    def __getitem__(self, layer):
        return self.calls[layer][-1]


def forward(m, ids, mask=None):
    from langneurons.runtime import forward_kwargs
    with torch.no_grad():
        return m(input_ids=ids, **forward_kwargs(m, mask)).logits


# ------------------------------------------------------------------------------------------ operators
@pytest.mark.parametrize("spec,expect", [
    ("zero", ("set", "const", None, 0.0, 1.0)),
    ("set:mean", ("set", "stat", "mean", 0.0, 1.0)),
    ("set:p90", ("set", "stat", "p90", 0.0, 1.0)),
    ("set:p5", ("set", "stat", "p5", 0.0, 1.0)),
    ("set:p_max", ("set", "stat", "p_max", 0.0, 1.0)),
    ("set:p_median*2", ("set", "stat", "p_median", 0.0, 2.0)),
    ("set:std", ("set", "stat", "std", 0.0, 1.0)),
    ("set:-1", ("set", "const", None, -1.0, 1.0)),
    ("set:10", ("set", "const", None, 10.0, 1.0)),
    ("scale:2.5", ("scale", "const", None, 2.5, 1.0)),
    ("add:mean*0.5", ("add", "stat", "mean", 0.0, 0.5)),
    ("add:3", ("add", "const", None, 3.0, 1.0)),
    ("set:batch-max", ("set", "batch", "max", 0.0, 1.0)),
    ("add:batch-max", ("add", "batch", "max", 0.0, 1.0)),
    ("set:batch-p10", ("set", "batch", "p10", 0.0, 1.0)),
])
def test_parse_operator(spec, expect):
    op = parse_operator(spec)
    assert (op.mode, op.source, op.stat, op.value, op.factor) == expect
    if op.stat == "p90":
        assert op.quantile == pytest.approx(0.9)


@pytest.mark.parametrize("spec", ["", "foo", "set:", "set:p101", "scale:abc", "add:mean*x", "set:batch-std",
                                  "set:medianx", "mul:2", "set:nan"])
def test_parse_operator_errors(spec):
    with pytest.raises(UserError):
        parse_operator(spec)


# ------------------------------------------------------------------------------------------ exact effects
def test_zero_equals_mlp_by_hand():
    """zero on a set = the gated MLP recomputed by hand from the weights with those neurons removed."""
    m, a, ns = model_and_ns("llama")
    ids, _ = batch()
    iv = Intervention(ns, ["aa"], "zero")
    sel = ns.mask("aa")
    seen = {}
    hooks = []
    for l in range(a.num_layers):
        mlp = a.layers[l].layer.mlp
        hooks.append(mlp.register_forward_hook(lambda mod, args, out, l=l: seen.__setitem__(l, (args[0], out))))
    try:
        with intervene(m, iv):
            forward(m, ids)
    finally:
        for h in hooks:
            h.remove()
    for l in range(a.num_layers):
        x, out = seen[l]
        Wg, _ = a.gate_rows(l)
        Wu, _ = a.up_rows(l)
        act = F.silu(x @ Wg.T) * (~sel[l]).double()
        hand = (act * (x @ Wu.T)) @ a.layers[l].down.weight.T
        torch.testing.assert_close(out, hand, rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", ["zero", "set:mean", "scale:3", "set:-1"])
def test_writes_exactly_and_nothing_else(arch, spec):
    """Selected neurons get the operator's value, unselected neurons and other layers stay
    bit-identical, and the logits equal a hand-written dense hook doing the same."""
    m, a, ns = model_and_ns(arch)
    L, I = a.num_layers, a.width
    stats = make_stats(L, I)
    iv = Intervention(ns, ["aa"], spec, stats=stats)
    # right padding: BLOOM's fully masked pad rows under left padding are NaN and leak into real rows
    ids, mask = batch(pad_side="right", lengths=[7, 4, 6])
    sel = ns.mask("aa")
    mean = stats.get("aa").mean()
    before, after = Capture(), Capture()
    with observe(a, "act", before):
        with intervene(m, iv) as ctl:
            with observe(a, "act", after):
                logits = forward(m, ids, mask)
    assert ctl.calls[0][0] == 1 and ctl.calls[0][L - 1] == 0
    real = mask.bool()                                     # [B, T]: hooks see [B, T, I] on every architecture
    for l in range(L):
        pre, post = before[l], after[l]
        s = sel[l]
        assert torch.equal(post[..., ~s], pre[..., ~s])
        assert torch.equal(post[~real], pre[~real])          # pad positions are never written
        got, old = post[real][:, s], pre[real][:, s]
        want = {"zero": torch.zeros_like(old), "set:-1": torch.full_like(old, -1.0), "scale:3": old * 3,
                "set:mean": mean[l][s].to(old.dtype).expand_as(old)}[spec]
        assert torch.equal(got, want)

    def dense(l, t):
        t = t.clone()
        s = sel[l].to(t.device)
        r = real.unsqueeze(-1) & s
        if spec == "zero":
            v = torch.zeros_like(t)
        elif spec == "set:-1":
            v = torch.full_like(t, -1.0)
        elif spec == "scale:3":
            v = t * 3
        else:
            v = mean[l].to(t.dtype).expand_as(t)
        return torch.where(r, v, t)
    with write(a, "act", dense, list(range(L))):
        ref = forward(m, ids, mask)
    assert torch.equal(logits, ref)
    assert not torch.equal(logits, forward(m, ids, mask))


def test_values_come_from_the_right_language_and_site():
    m, a, ns = model_and_ns("llama")
    L, I = a.num_layers, a.width
    stats = make_stats(L, I)
    ids, _ = batch()
    A, B = ns.mask("aa"), ns.mask("bb")
    both = A & B
    assert int(both.sum()) >= 3

    def written(iv):
        cap = Capture()
        with intervene(m, iv):
            with observe(a, "act", cap):
                forward(m, ids)
        return {l: cap[l][0, 0] for l in range(L)}

    ma, mb = stats.get("aa").mean(), stats.get("bb").mean()
    w = written(Intervention(ns, ["aa", "bb"], "set:mean", stats=stats))
    for l in range(L):
        only_a, only_b, ab = A[l] & ~B[l], B[l] & ~A[l], both[l]
        assert torch.equal(w[l][only_a], ma[l][only_a])
        assert torch.equal(w[l][only_b], mb[l][only_b])
        assert torch.equal(w[l][ab], ((ma[l][ab] + mb[l][ab]) / 2))           # documented rule: the mean
    w = written(Intervention(ns, ["aa"], "set:mean", stats=stats, stats_language="bb"))
    assert torch.equal(w[0][A[0]], mb[0][A[0]])
    w = written(Intervention(ns, ["bb"], "set:p_max", stats=stats))
    pmax = stats.get("bb").sentence_patch_values()[0].double()
    assert torch.equal(w[0][B[0]], pmax[0][B[0]])
    w = written(Intervention(ns, ["bb"], "set:p90", stats=stats))
    assert torch.equal(w[0][B[0]], stats.get("bb").quantile(0.9)[0][B[0]])
    w = written(Intervention(ns, ["aa"], "add:mean*0.5", stats=stats))
    # add: captured after the writer equals the activation plus half the mean
    base = Capture()
    with observe(a, "act", base):
        forward(m, ids)
    torch.testing.assert_close(w[0][A[0]], base[0][0, 0][A[0]] + 0.5 * ma[0][A[0]], rtol=0, atol=1e-15)

    # sites: statistics of another site are refused, except the explicit [M25] option
    pre_stats = make_stats(L, I, site="pre")
    with pytest.raises(UserError, match="site"):
        Intervention(ns, ["aa"], "set:mean", stats=pre_stats)
    iv = Intervention(ns, ["aa"], "set:mean", stats=pre_stats, stats_site="pre")
    assert torch.equal(written(iv)[0][A[0]], pre_stats.get("aa").mean()[0][A[0]])
    with pytest.raises(UserError, match="stats_site"):
        Intervention(ns, ["aa"], "set:mean", stats=stats, stats_site="product")
    prod = Capture()
    with intervene(m, Intervention(ns, ["aa"], "set:mean", stats=make_stats(L, I, site="product"),
                                   site="product")):
        with observe(a, "product", prod):
            forward(m, ids)
    assert torch.equal(prod[0][0, 0][A[0]], make_stats(L, I, site="product").get("aa").mean()[0][A[0]])


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_zero_at_act_equals_zero_at_down_input_but_set_does_not(arch):
    m, a, ns = model_and_ns(arch)
    ids, _ = batch()
    z_act = Intervention(ns, ["aa"], "zero", site="act")
    z_prod = Intervention(ns, ["aa"], "zero", site="product")
    with intervene(m, z_act):
        la = forward(m, ids)
    with intervene(m, z_prod):
        lp = forward(m, ids)
    assert torch.equal(la, lp)
    with intervene(m, Intervention(ns, ["aa"], "set:1", site="act")):
        sa = forward(m, ids)
    with intervene(m, Intervention(ns, ["aa"], "set:1", site="product")):
        sp = forward(m, ids)
    assert (sa - sp).abs().max() > 1e-6        # at act the MLP still multiplies by up(x)


def test_non_gated_act_is_product():
    m, a, ns = model_and_ns("gpt2")
    ids, _ = batch()
    with intervene(m, Intervention(ns, ["aa"], "set:1", site="act")):
        sa = forward(m, ids)
    with intervene(m, Intervention(ns, ["aa"], "set:1", site="product")):
        sp = forward(m, ids)
    assert torch.equal(sa, sp)


# ------------------------------------------------------------------------------------------ batch statistics
def test_batch_statistic_by_hand():
    x = torch.tensor([[[1.0, -2.0], [3.0, 5.0], [9.0, 9.0]],
                      [[4.0, 0.0], [-1.0, 1.0], [7.0, 7.0]]], dtype=torch.float64)   # [R=2, P=3, n=2]
    real = torch.tensor([[True, True, False], [True, True, True]])
    assert torch.equal(batch_statistic(x, real, "max"), torch.tensor([[3.0, 5.0], [7.0, 7.0]], dtype=torch.float64))
    assert torch.equal(batch_statistic(x, real, "min"), torch.tensor([[1.0, -2.0], [-1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(batch_statistic(x, real, "mean"),
                               torch.tensor([[2.0, 1.5], [10 / 3, 8 / 3]], dtype=torch.float64))
    for name, q in (("p10", 0.1), ("p50", 0.5), ("p95", 0.95)):
        want = [[np.quantile(x[r][real[r]][:, j].numpy(), q) for j in range(2)] for r in range(2)]
        torch.testing.assert_close(batch_statistic(x, real, name), torch.tensor(want, dtype=torch.float64))


@pytest.mark.parametrize("spec,scope", [("set:batch-max", "batch"), ("set:batch-p10", "batch"),
                                        ("add:batch-max", "batch"), ("set:batch-p10", "sequence"),
                                        ("set:batch-mean*2", "sequence")])
def test_batch_operators_write_statistics_of_non_pad_positions(spec, scope):
    m, a, ns = model_and_ns("llama")
    ids, mask = batch(B=3, T=8, pad_side="right", lengths=[8, 3, 5])
    iv = Intervention(ns, ["aa"], spec, batch_scope=scope)
    before, after = Capture(), Capture()
    with observe(a, "act", before):
        with intervene(m, iv):
            with observe(a, "act", after):
                forward(m, ids, mask)
    s = ns.mask("aa")[0]
    pre, post = before[0][..., s], after[0][..., s]
    real = mask.bool()
    op = parse_operator(spec)
    name = op.stat
    q = {"p10": 0.1}.get(name)
    for b in range(3):
        pool = pre[real] if scope == "batch" else pre[b][real[b]]
        if name == "max":
            v = pool.amax(0)
        elif name == "mean":
            v = pool.mean(0) * op.factor
        else:
            v = torch.tensor(np.quantile(pool.numpy(), q, axis=0))
        want = v.expand(int(real[b].sum()), -1) + (pre[b][real[b]] if op.mode == "add" else 0)
        torch.testing.assert_close(post[b][real[b]], want, rtol=0, atol=1e-12)
        assert torch.equal(post[b][~real[b]], pre[b][~real[b]])


# ------------------------------------------------------------------------------------------ generation
GEN_OPS = ["zero", "set:mean", "set:p90", "set:p_max", "scale:2", "add:mean*0.5", "set:-1", "set:10",
           "set:batch-max", "add:batch-max", "set:batch-p10", "set:batch-p10*3"]


@pytest.mark.parametrize("arch,positions", [("llama", "all"), ("llama", "prompt"), ("llama", "generated"),
                                            ("llama", "last"), ("opt", "all"), ("opt", "generated")])
def test_generate_with_cache_equals_without(arch, positions):
    """Greedy generation under every operator gives the same tokens with and without KV cache
    (every operator at positions=all, a representative subset at the other positions)."""
    m, a, ns = model_and_ns(arch, dtype=torch.float64)
    stats = make_stats(a.num_layers, a.width)
    ids, mask = batch(B=3, T=6, pad_side="left", lengths=[6, 2, 4])
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    ops = GEN_OPS if positions == "all" else ["set:-1", "set:mean", "set:batch-max", "add:batch-p10"]
    changed = 0
    base = m.generate(ids, use_cache=True, **kw)
    for spec in ops:
        iv = Intervention(ns, ["aa", "bb"], spec, stats=stats, positions=positions)
        with intervene(m, iv):
            g1 = m.generate(ids, use_cache=True, **kw)
            g2 = m.generate(ids, use_cache=False, **kw)
        assert torch.equal(g1, g2), (spec, positions)
        changed += not torch.equal(g1, base)
    assert changed >= 1
    assert "generate" not in vars(m)


def test_generate_positions_prompt_and_generated():
    """With cache: the prompt pass is written only for 'prompt', the decode steps only for 'generated'."""
    m, a, ns = model_and_ns("llama")
    ids, mask = batch(B=2, T=5, pad_side="left", lengths=[5, 3])
    s = ns.mask("aa")[0]
    for positions in ("prompt", "generated", "last"):
        cap = Capture()
        with intervene(m, Intervention(ns, ["aa"], "set:7", positions=positions)):
            with observe(a, "act", cap):
                m.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        first, steps = cap.calls[0][0], cap.calls[0][1:]
        assert len(steps) == 2 and steps[0].shape[1] == 1
        sevens = first[..., s] == 7
        real = mask.bool()
        if positions == "prompt":
            assert bool(sevens[real].all()) and not bool(sevens[~real].any())
            assert not any(bool((st[..., s] == 7).any()) for st in steps)
        elif positions == "generated":
            assert not bool(sevens.any())
            assert all(bool((st[..., s] == 7).all()) for st in steps)
        else:  # last: the last prompt position, then every new token
            assert bool(sevens[:, -1].all()) and not bool(sevens[:, :-1].any())
            assert all(bool((st[..., s] == 7).all()) for st in steps)


def test_positions_in_plain_forward():
    m, a, ns = model_and_ns("llama")
    ids, mask = batch(B=2, T=6, pad_side="right", lengths=[6, 3])
    s = ns.mask("aa")[0]
    cap = Capture()
    with intervene(m, Intervention(ns, ["aa"], "set:7", positions="last")):
        with observe(a, "act", cap):
            forward(m, ids, mask)
    hit = (cap[0][..., s] == 7).all(-1)
    assert hit.tolist() == [[False] * 5 + [True], [False, False, True, False, False, False]]
    for positions, want in (("prompt", [True] * 4 + [False] * 2), ("generated", [False] * 4 + [True] * 2)):
        cap = Capture()
        with intervene(m, Intervention(ns, ["aa"], "set:7", positions=positions)) as ctl:
            ctl.prompt_length = 4
            with observe(a, "act", cap):
                forward(m, ids)
        assert (cap[0][..., s] == 7).all(-1)[0].tolist() == want


# ------------------------------------------------------------------------------------------ padding and batch size
@pytest.mark.parametrize("spec,scope", [("zero", "batch"), ("set:mean", "batch"), ("scale:2", "batch"),
                                        ("add:std*2", "batch"), ("set:batch-max", "sequence"),
                                        ("set:batch-p10", "sequence")])
def test_padding_side_and_batch_size_do_not_change_scores(spec, scope):
    m, a, ns = model_and_ns("llama")
    stats = make_stats(a.num_layers, a.width)
    lengths = [7, 3, 5]
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, 90, (n,), generator=g) for n in lengths]
    iv = Intervention(ns, ["aa", "bb"], spec, stats=stats, batch_scope=scope)
    with intervene(m, iv):
        alone = [forward(m, s[None])[0] for s in seqs]
        for side in ("left", "right"):
            ids = torch.zeros(3, 7, dtype=torch.long)
            mask = torch.zeros(3, 7, dtype=torch.long)
            for b, s in enumerate(seqs):
                sl = slice(7 - len(s), 7) if side == "left" else slice(0, len(s))
                ids[b, sl] = s
                mask[b, sl] = 1
            out = forward(m, ids, mask)
            for b, s in enumerate(seqs):
                sl = slice(7 - len(s), 7) if side == "left" else slice(0, len(s))
                torch.testing.assert_close(out[b, sl], alone[b], rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------ misc behaviour
def test_several_interventions_apply_in_order_and_hooks_go_away():
    m, a, ns = model_and_ns("llama")
    ids, _ = batch()
    base = forward(m, ids)
    cap = Capture()
    with intervene(m, [Intervention(ns, ["aa"], "set:2"), Intervention(ns, ["aa"], "scale:3")]):
        with observe(a, "act", cap):
            forward(m, ids)
    s = ns.mask("aa")[0]
    assert bool((cap[0][..., s] == 6).all())
    assert torch.equal(forward(m, ids), base)
    with pytest.raises(RuntimeError):
        with intervene(m, Intervention(ns, ["aa"], "zero")):
            raise RuntimeError("boom")
    assert torch.equal(forward(m, ids), base) and "generate" not in vars(m)


def test_gradient_path_matches_in_place_path():
    m, a, ns = model_and_ns("gpt2")
    ids, _ = batch()
    iv = Intervention(ns, ["aa"], "set:0.5")
    with intervene(m, iv):
        want = forward(m, ids)
        out = m(input_ids=ids).logits
        out.sum().backward()
    assert torch.equal(out.detach(), want)
    assert m.transformer.h[0].mlp.c_fc.weight.grad is not None


def test_serialisation_round_trip(tmp_path):
    m, a, ns = model_and_ns("llama")
    stats = make_stats(a.num_layers, a.width)
    iv = Intervention(ns, ["aa", "bb"], "add:mean*0.5", stats=stats, positions="last", layers=[0])
    d = json.loads(json.dumps(iv.to_dict()))
    back = Intervention.from_dict(d, neurons=ns, stats=stats)
    assert back.to_dict() == iv.to_dict()
    ids, mask = batch(pad_side="left", lengths=[7, 5, 2])
    with intervene(m, iv):
        x = forward(m, ids, mask)
    with intervene(m, back):
        y = forward(m, ids, mask)
    assert torch.equal(x, y)
    with pytest.raises(UserError, match="differs"):
        Intervention.from_dict(d, neurons=make_ns(a.num_layers, a.width, seed=5), stats=stats)
    ns.save(tmp_path / "ns.json")
    iv2 = Intervention(NeuronSet.load(tmp_path / "ns.json"), ["bb"], "zero")
    again = Intervention.from_dict(json.loads(json.dumps(iv2.to_dict())))      # neurons from the recorded path
    assert again.to_dict() == iv2.to_dict()


def test_bad_input_errors():
    m, a, ns = model_and_ns("llama")
    L, I = a.num_layers, a.width
    stats = make_stats(L, I)
    with pytest.raises(UserError, match="unknown language 'xx'"):
        Intervention(ns, ["xx"], "zero")
    with pytest.raises(UserError, match="unknown statistic 'bogus'"):
        Intervention(ns, ["aa"], "set:bogus", stats=stats)
    with pytest.raises(UserError, match="needs activation statistics"):
        Intervention(ns, ["aa"], "set:mean")
    with pytest.raises(UserError, match=r"p_max.*--unit sentence"):
        Intervention(ns, ["aa"], "set:p_max", stats=make_stats(L, I, sentences=0))
    with pytest.raises(UserError, match=r"p90.*sketch"):
        Intervention(ns, ["aa"], "set:p90", stats=make_stats(L, I, bins=0))
    with pytest.raises(UserError, match="unknown positions"):
        Intervention(ns, ["aa"], "zero", positions="middle")
    other = make_ns(L + 1, I)
    with pytest.raises(UserError, match=r"made for a 3x64 model"):
        with intervene(m, Intervention(other, ["aa"], "zero")):
            pass
    with pytest.raises(UserError, match="statistics .* are for a"):
        Intervention(ns, ["aa"], "set:mean", stats=make_stats(L, I + 1))


# ------------------------------------------------------------------------------------------ language arithmetic
@pytest.mark.parametrize("spec,expect", [
    ("arith:add", ("add", 1.0, "add:mean*-1.0", "add:mean*1.0")),
    ("arith:add*0.5", ("add", 0.5, "add:mean*-0.5", "add:mean*0.5")),
    ("arith:mul", ("mul", 1.0, "scale:0.0", "scale:2.0")),
    ("arith:mul*0.25", ("mul", 0.25, "scale:0.75", "scale:1.25")),
    ("arith:mul*3", ("mul", 3.0, "scale:0.0", "scale:4.0")),          # the source factor clips at 0
    (" arith: add * 2 ", ("add", 2.0, "add:mean*-2.0", "add:mean*2.0")),
])
def test_parse_arith(spec, expect):
    from langneurons.intervene import is_arith, parse_arith
    op = parse_arith(spec)
    assert is_arith(spec) and (op.kind, op.strength, op.source_operator, op.target_operator) == expect
    assert parse_operator(op.source_operator).mode == parse_operator(op.target_operator).mode  # ordinary ones


@pytest.mark.parametrize("spec,match", [("arith:foo", "unknown language-arithmetic kind 'foo'"),
                                        ("arith:add*x", "'x' is not a number"), ("arith:", "names no kind"),
                                        ("arith:mul*-1", ">= 0"), ("arith:add*nan", "not a number"),
                                        ("arith", "names no kind")])
def test_parse_arith_errors(spec, match):
    from langneurons.intervene import parse_arith
    with pytest.raises(UserError, match=match):
        parse_arith(spec)
    with pytest.raises(UserError, match="language arithmetic"):      # not a single-set operator
        parse_operator(spec)


def _arith_ns(L, I):
    """Three languages; (0, 0..2) in aa and bb, (0, 3..5) in aa and cc, (0, 6..7) in all three."""
    g = torch.Generator().manual_seed(1)
    masks = {c: torch.rand(L, I, generator=g) < 0.2 for c in ("aa", "bb", "cc")}
    masks["aa"][0, :8] = True
    masks["bb"][0, :3] = True
    masks["bb"][0, 3:6] = False
    masks["cc"][0, 3:8] = True
    masks["cc"][0, :3] = False
    masks["bb"][0, 6:8] = True
    for m in masks.values():
        m[L - 1] = False
    return NeuronSet.from_masks(masks, {"num_layers": L, "width": I, "site": "act", "name_or_path": "tiny"},
                                {"name": "test"})


@pytest.mark.parametrize("spec", ["arith:add", "arith:add*0.5", "arith:mul", "arith:mul*0.5", "arith:mul*2"])
@pytest.mark.parametrize("sources", [["aa"], ["aa", "cc"]])
def test_arithmetic_equals_hand_computation(spec, sources):
    """Source neurons (without the target's) are deactivated, target neurons activated, both from the
    unmodified activation; every other neuron, layer and pad position stays bit-identical; the
    logits equal a dense hand-written hook."""
    from langneurons.intervene import ArithmeticIntervention, parse_arith
    m = tiny_model("llama", dtype=torch.float64, seed=0)
    a = Adapter(m)
    L, I = a.num_layers, a.width
    ns = _arith_ns(L, I)
    stats = make_stats(L, I, langs=("aa", "bb", "cc"))
    iv = ArithmeticIntervention(ns, "bb", sources, spec, stats=stats)
    op = parse_arith(spec)
    A = op.strength
    ids, mask = batch(pad_side="right", lengths=[7, 4, 6])
    real = mask.bool()
    before, after = Capture(), Capture()
    with observe(a, "act", before):
        with intervene(m, iv) as ctl:
            with observe(a, "act", after):
                logits = forward(m, ids, mask)
    assert len(ctl.calls) == 2 and ctl.calls[0][0] == 1 and ctl.calls[1][L - 1] == 0
    tgt = ns.mask("bb")
    owners = [ns.mask(c) for c in sources]
    src = torch.stack(owners).any(0) & ~tgt
    mu = {c: stats.get(c).mean() for c in ("aa", "bb", "cc")}
    # a source neuron of several source languages subtracts the mean of their means
    cnt = torch.stack(owners).double().sum(0)
    mu_src = sum(torch.where(ns.mask(c), mu[c], 0.0) for c in sources) / cnt.clamp_min(1)

    def hand(l, pre):
        """The arithmetic written out, on the selected columns (float64 as the model)."""
        new = pre.clone()
        s, t = src[l], tgt[l]
        if op.kind == "add":
            new[..., s] = pre[..., s] + (mu_src[l][s] * -A)
            new[..., t] = pre[..., t] + (mu["bb"][l][t] * A)
        else:
            new[..., s] = pre[..., s] * max(0.0, 1.0 - A)
            new[..., t] = pre[..., t] * (1.0 + A)
        return new

    for l in range(L):
        pre, post = before[l], after[l]
        assert torch.equal(post[~real], pre[~real])                             # pads untouched
        assert torch.equal(post[real], hand(l, pre)[real])
        untouched = ~(src[l] | tgt[l])
        assert torch.equal(post[..., untouched], pre[..., untouched])
    if sources == ["aa", "cc"]:
        assert bool(src[0, 3:6].all()) and not bool(src[0, :3].any()) and not bool(src[0, 6:8].any())

    def dense(l, t):
        r = real.unsqueeze(-1)
        return torch.where(r, hand(l, t), t)
    with write(a, "act", dense, list(range(L))):
        ref = forward(m, ids, mask)
    assert torch.equal(logits, ref)
    assert not torch.equal(logits, forward(m, ids, mask))


def test_arithmetic_overlap_gets_the_target_value_and_the_target_writes_last():
    """A neuron of both the source and the target gets the target's value computed from its
    unmodified activation (not source-then-target); the parts are source first, target last, and
    touch disjoint neurons; intervene() composes them with other interventions in list order."""
    from langneurons.intervene import ArithmeticIntervention
    m = tiny_model("llama", dtype=torch.float64, seed=0)
    a = Adapter(m)
    L, I = a.num_layers, a.width
    ns = _arith_ns(L, I)
    stats = make_stats(L, I, langs=("aa", "bb", "cc"))
    iv = ArithmeticIntervention(ns, "bb", ["aa"], "arith:add*2", stats=stats)
    src_part, tgt_part = iv.parts
    assert src_part.languages == ["aa"] and src_part.exclude == ["bb"] and tgt_part.languages == ["bb"]
    assert src_part.operator == "add:mean*-2.0" and tgt_part.operator == "add:mean*2.0"
    assert not bool((src_part.selection() & tgt_part.selection()).any())
    both = ns.mask("aa")[0] & ns.mask("bb")[0]
    assert bool(both[:3].all())
    ids, _ = batch()
    before, after = Capture(), Capture()
    with observe(a, "act", before):
        with intervene(m, iv):
            with observe(a, "act", after):
                forward(m, ids)
    mb, ma = stats.get("bb").mean()[0], stats.get("aa").mean()[0]
    pre, post = before[0], after[0]
    assert torch.equal(post[..., both], pre[..., both] + mb[both] * 2.0)
    assert not torch.allclose(post[..., both], pre[..., both] - ma[both] * 2.0 + mb[both] * 2.0)
    # the source language alone would have written these neurons too
    with observe(a, "act", before):
        with intervene(m, Intervention(ns, ["aa"], "add:mean*-2.0", stats=stats)):
            with observe(a, "act", after):
                forward(m, ids)
    assert torch.equal(after[0][..., both], before[0][..., both] - ma[both] * 2.0)
    # composed in list order with other interventions: a later scale multiplies the target value
    with observe(a, "act", before):
        with intervene(m, [iv, Intervention(ns, ["bb"], "scale:3")]) as ctl:
            with observe(a, "act", after):
                forward(m, ids)
    assert len(ctl.calls) == 3
    tb = ns.mask("bb")[0]
    assert torch.equal(after[0][..., tb], (before[0][..., tb] + mb[tb] * 2.0) * 3)
    assert iv.describe() == "arith:add*2[aa->bb]@act/all" and src_part.describe() == "add:mean*-2.0[aa-bb]@act/all"
    # the source part records its exclusion and rebuilds to the same intervention
    d = json.loads(json.dumps(src_part.to_dict()))
    assert d["exclude"] == ["bb"] and Intervention.from_dict(d, neurons=ns, stats=stats).to_dict() == d
    assert "exclude" not in tgt_part.to_dict()
    # for_source narrows the sources; mul needs no statistics, add does
    assert iv.for_source("cc").sources == ["cc"] and iv.for_source("cc").parts[0].exclude == ["bb"]
    assert ArithmeticIntervention(ns, "bb", ["aa", "cc"], "arith:mul").parts[0].operator == "scale:0.0"
    with pytest.raises(UserError, match="needs activation statistics"):
        ArithmeticIntervention(ns, "bb", ["aa"], "arith:add")
    with pytest.raises(UserError, match="also a source"):
        ArithmeticIntervention(ns, "bb", ["aa", "bb"], "arith:mul")
    with pytest.raises(UserError, match="unknown language 'xx'"):
        ArithmeticIntervention(ns, "xx", ["aa"], "arith:mul")
    with pytest.raises(UserError, match="stacked rows"):
        from langneurons.intervene import intervene_rows
        with intervene_rows(m, [iv]):
            pass


def test_arithmetic_generation_with_cache_equals_without():
    from langneurons.intervene import ArithmeticIntervention
    m = tiny_model("llama", dtype=torch.float64, seed=0)
    a = Adapter(m)
    ns = _arith_ns(a.num_layers, a.width)
    stats = make_stats(a.num_layers, a.width, langs=("aa", "bb", "cc"))
    ids, mask = batch(B=3, T=6, pad_side="left", lengths=[6, 2, 4])
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    base = m.generate(ids, use_cache=True, **kw)
    changed = 0
    for spec in ("arith:add*3", "arith:mul*4"):
        with intervene(m, ArithmeticIntervention(ns, "bb", ["aa", "cc"], spec, stats=stats)):
            g1 = m.generate(ids, use_cache=True, **kw)
            g2 = m.generate(ids, use_cache=False, **kw)
        assert torch.equal(g1, g2)
        changed += not torch.equal(g1, base)
    assert changed >= 1 and "generate" not in vars(m)
