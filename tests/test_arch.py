"""Architecture adapters: every listed model type, table-driven over tiny random models."""

import pytest
import torch
from torch import nn

from langneurons.arch import ADAPTERS, Adapter, autodetect, parse_arch_override
from langneurons.collect import Batch, Collector
from langneurons.errors import UserError
from langneurons.hooks import observe
from langneurons.stats import LanguageStats
from langneurons.testing import TINY_CONFIGS, tiny_model

TYPES = sorted(TINY_CONFIGS)


def test_every_listed_type_has_a_tiny_model():
    assert set(ADAPTERS) == set(TINY_CONFIGS)


def _ids(seed=0, shape=(3, 11)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, shape, generator=g)


@pytest.mark.parametrize("model_type", TYPES)
def test_autodetect_agrees_with_table(model_type):
    model = tiny_model(model_type)
    assert autodetect(model) == ADAPTERS[model_type]
    a = Adapter(model)
    assert a.num_layers == 2 and a.width == (128 if model_type in ("bloom", "falcon") else 64)


@pytest.mark.parametrize("model_type", TYPES)
def test_observing_leaves_logits_bit_identical(model_type):
    model = tiny_model(model_type)
    a = Adapter(model)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        for site in ("pre", "act", "product"):
            with observe(a, site, lambda l, t: t.sum()) as calls:
                out = model(ids).logits
            assert calls == [1] * a.num_layers
            assert torch.equal(ref, out)


def _brute_force_sites(model, adapter, ids):
    """pre, act and product of every layer recomputed from the layer's own weights and its MLP input."""
    inputs = {}
    handles = [adapter.layers[l].gate.register_forward_pre_hook(
        lambda m, args, l=l: inputs.__setitem__(l, args[0].detach())) for l in range(adapter.num_layers)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for l in range(adapter.num_layers):
        x = inputs[l]
        w, b = adapter.gate_rows(l)
        pre = x @ w.t() + (b if b is not None else 0)
        act = adapter.layers[l].act(pre)
        if adapter.gated:
            wu, bu = adapter.up_rows(l)
            product = act * (x @ wu.t() + (bu if bu is not None else 0))
        else:
            product = act
        out[l] = {"pre": pre, "act": act, "product": product}
    return out


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("site", ["pre", "act", "product"])
def test_statistics_equal_brute_force(model_type, site):
    model = tiny_model(model_type, dtype=torch.float64)
    a = Adapter(model)
    ids = _ids(1, (4, 13))
    ref = _brute_force_sites(model, a, ids)
    ls = LanguageStats(a.num_layers, a.width, sketch_bins=16)
    c = Collector(model, a, site, torch.device("cpu"))
    c.stats = ls
    c.run_batch(Batch(ids, None))
    assert int(ls.n_tokens) == ids.numel()
    for l in range(a.num_layers):
        v = ref[l][site].reshape(-1, a.width).float()
        assert torch.equal(ls.count_pos[l], (v > 0).sum(0)), (model_type, site, l)
        assert torch.equal(ls.count_neg[l], (v < 0).sum(0))
        assert torch.allclose(ls.sum[l], ref[l][site].reshape(-1, a.width).sum(0), rtol=1e-5, atol=1e-6)
        assert torch.allclose(ls.sumsq[l], (ref[l][site].reshape(-1, a.width) ** 2).sum(0), rtol=1e-5, atol=1e-6)
        assert int(ls.hist[l].sum()) == ids.numel() * a.width


def test_fused_phi3_rows_belong_to_neuron_j():
    model = tiny_model("phi3")
    a = Adapter(model)
    w, _ = a.gate_rows(0)
    wu, _ = a.up_rows(0)
    full = a.layers[0].gate.weight
    assert torch.equal(w, full[: a.width]) and torch.equal(wu, full[a.width:])


def test_gpt2_conv1d_neuron_is_a_column():
    model = tiny_model("gpt2")
    a = Adapter(model)
    w, _ = a.gate_rows(0)
    assert torch.equal(w[5], a.layers[0].gate.weight[:, 5])


def test_mixture_of_experts_is_refused():
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("mixtral", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UserError, match="mixture-of-experts"):
        Adapter(model)


class _Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"model_type": "opaque", "num_hidden_layers": 2, "hidden_size": 8})()
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))


def test_unrecognisable_architecture_names_the_escape_hatch():
    with pytest.raises(UserError, match="--arch"):
        Adapter(_Opaque())


def test_arch_override_reaches_a_renamed_model():
    model = tiny_model("llama")
    spec = parse_arch_override("layers=layers,gate=mlp.gate_proj,up=mlp.up_proj,act=mlp.act_fn,down=mlp.down_proj")
    a = Adapter(model, spec)
    assert a.source == "override" and a.gated and a.width == 64
    with pytest.raises(UserError, match="no module"):
        Adapter(model, parse_arch_override("layers=layers,gate=mlp.nope,act=mlp.act_fn,down=mlp.down_proj"))
    for bad in ("layers=layers", "layers=x,gate=y,act=z,down=w,colour=red", "nonsense"):
        with pytest.raises(UserError):
            parse_arch_override(bad)
