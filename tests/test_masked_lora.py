"""Neuron-masked LoRA: masked entries stay exactly zero, merges touch only the selected rows/columns,
adapters round-trip through PeftModel.from_pretrained, and options that break the mask are refused."""

from __future__ import annotations

import json
import pytest
import torch

from langneurons.arch import Adapter
from langneurons.cli import main
from langneurons.errors import UserError
from langneurons.finetune import LoraSpec, apply_lora, attention_targets, load_adapter, save_adapter
from langneurons.finetune.heads import SequenceClassifier, pool
from langneurons.finetune.masked_lora import MASK_FILE, check_lora_options
from langneurons.neuronset import NeuronSet
from langneurons.testing import tiny_model



pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


# (model type, MLP modules to mask)
LAYOUTS = [("llama", ("gate", "up", "down")), ("phi3", ("gate", "up", "down")), ("gpt2", ("gate", "down")),
           ("llama", ("gate",)), ("phi3", ("up",))]


def _neurons(model, seed=0, rate=0.15, empty_layer=None) -> NeuronSet:
    ad = Adapter(model)
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(ad.num_layers, ad.width, generator=g) < rate
    m[:, 0] = True                     # at least one neuron per layer
    if empty_layer is not None:
        m[empty_layer] = False
    return NeuronSet.from_masks({"en": m, "fr": ~m}, {"num_layers": ad.num_layers, "width": ad.width, "site": "act"},
                                {"name": "hand"})


def _train(peft_model, mask, steps=25, lr=5e-2, attach=True):
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1, betas=(0.95, 0.999))
    if attach and mask is not None:
        mask.attach(opt)
    g = torch.Generator().manual_seed(1)
    peft_model.train()
    for _ in range(steps):
        x = torch.randint(3, 97, (4, 12), generator=g)
        loss = peft_model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
    peft_model.eval()
    return peft_model


def _down_cols(adapter: Adapter, model, layer: int) -> torch.Tensor:
    """W_down as [hidden, I] (column j = neuron j) whatever the layout."""
    w = adapter.layers[layer].down.weight
    return w.t() if adapter.spec.gate_layout == "conv1d" else w


def _mlp_rows(adapter: Adapter, layer: int, role: str) -> torch.Tensor:
    w, _ = adapter.gate_rows(layer) if role == "gate" else adapter.up_rows(layer)
    return w


@pytest.mark.parametrize("model_type,roles,attach", [(*lr, True) for lr in LAYOUTS] + [("llama", ("gate", "up", "down"), False)])
def test_masked_entries_stay_exactly_zero(model_type, roles, attach):
    """AdamW (weight decay 0.1, lr 5e-2, clipping) for 25 steps; ``attach=False`` relies on the gradient
    hooks alone (no re-masking after the step)."""
    model = tiny_model(model_type)
    ns = _neurons(model)
    peft_model, mask = apply_lora(model, LoraSpec(r=4, alpha=8, neurons=ns, neuron_languages=("en",), mlp_roles=roles))
    before = [p.detach().clone() for p, _ in mask.entries]
    _train(peft_model, mask, attach=attach)
    assert mask.max_masked() == 0.0
    for (p, m), b in zip(mask.entries, before):
        masked = p.detach()[(m == 0).expand_as(p)]
        assert torch.equal(masked, torch.zeros_like(masked))
        kept = p.detach()[(m == 1).expand_as(p)]
        assert kept.abs().max() > 0                  # the kept entries did train
        assert not torch.equal(p.detach(), b)


def test_masked_gradient_is_zero_after_backward():
    model = tiny_model("llama")
    ns = _neurons(model)
    peft_model, mask = apply_lora(model, LoraSpec(r=4, alpha=8, neurons=ns, neuron_languages=("en",),
                                                  mlp_roles=("gate", "down")))
    # make B non-zero so that A (down) receives gradient
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    mask.apply_()
    x = torch.randint(3, 97, (2, 9))
    peft_model(input_ids=x, labels=x).loss.backward()
    for p, m in mask.entries:
        assert p.grad is not None
        assert torch.equal(p.grad * (1 - m), torch.zeros_like(p.grad))
        assert (p.grad * m).abs().sum() > 0


@pytest.mark.parametrize("model_type,roles", LAYOUTS)
def test_merge_changes_only_selected_rows_and_columns(model_type, roles):
    model = tiny_model(model_type)
    ad = Adapter(model)
    ns = _neurons(model, empty_layer=1)
    sel = ns.mask("en")
    base = tiny_model(model_type)
    bad = Adapter(base)
    peft_model, mask = apply_lora(model, LoraSpec(r=4, alpha=8, neurons=ns, neuron_languages=("en",), mlp_roles=roles,
                                                  attn_roles=()))
    _train(peft_model, mask)
    merged = peft_model.merge_and_unload()
    mad = Adapter(merged)
    for l in range(ad.num_layers):
        keep = sel[l]
        for role in ("gate", "up"):
            if role == "up" and not ad.gated:
                continue
            new, old = _mlp_rows(mad, l, role), _mlp_rows(bad, l, role)
            assert torch.equal(new[~keep], old[~keep]), (role, l)
            if role in roles and keep.any():
                assert not torch.equal(new[keep], old[keep]), (role, l)
            else:
                assert torch.equal(new, old)
        new, old = _down_cols(mad, merged, l), _down_cols(bad, base, l)
        assert torch.equal(new[:, ~keep], old[:, ~keep])
        if "down" in roles and keep.any():
            assert not torch.equal(new[:, keep], old[:, keep])
        else:
            assert torch.equal(new, old)
    # everything else (attention, norms, embeddings) is untouched
    mp = dict(merged.named_parameters())
    for n, p in base.named_parameters():
        if ".mlp." not in n:
            assert torch.equal(mp[n], p), n


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_save_load_round_trip(tmp_path, model_type):
    from peft import PeftModel
    model = tiny_model(model_type)
    ns = _neurons(model)
    roles = ("gate", "down")
    peft_model, mask = apply_lora(model, LoraSpec(r=4, alpha=8, neurons=ns, neuron_languages=("en",), mlp_roles=roles))
    _train(peft_model, mask, steps=5)
    x = torch.randint(3, 97, (2, 10))
    with torch.no_grad():
        want = peft_model(input_ids=x).logits
    save_adapter(peft_model, tmp_path, mask)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    doc = json.loads((tmp_path / MASK_FILE).read_text())
    assert doc["languages"] == ["en"] and doc["mlp_modules"] == list(roles)
    assert NeuronSet.from_dict(doc["neurons"]).mask("en").equal(ns.mask("en"))
    # plain PEFT loading
    plain = PeftModel.from_pretrained(tiny_model(model_type), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=x).logits, want)
    # our loader re-applies the mask (and keeps it when trained further)
    ours, m2 = load_adapter(tiny_model(model_type), tmp_path, is_trainable=True)
    with torch.no_grad():
        assert torch.equal(ours(input_ids=x).logits, want)
    assert m2 is not None and len(m2.entries) == len(mask.entries)
    _train(ours, m2, steps=5)
    assert m2.max_masked() == 0.0


def test_unmasked_model_matches_base_before_training():
    model = tiny_model("llama")
    x = torch.randint(3, 97, (2, 10))
    with torch.no_grad():
        want = model(input_ids=x).logits
    ns = _neurons(model)
    peft_model, _ = apply_lora(model, LoraSpec(neurons=ns, neuron_languages=("en", "fr"), mlp_roles=("gate", "up", "down")))
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=x).logits, want, atol=1e-6)


def test_layers_without_neurons_get_no_mlp_adapter():
    model = tiny_model("llama")
    ns = _neurons(model, empty_layer=0)
    peft_model, mask = apply_lora(model, LoraSpec(neurons=ns, neuron_languages=("en",), mlp_roles=("gate",),
                                                  attn_roles=()))
    assert [t.name for t in mask.targets] == ["model.layers.1.mlp.gate_proj"]
    names = [n for n, _ in peft_model.named_parameters() if "lora_A" in n]
    assert len(names) == 1 and "layers.1.mlp.gate_proj" in names[0]


@pytest.mark.parametrize("kwargs,needle", [
    (dict(use_dora=True), "DoRA"),
    (dict(init_lora_weights="pissa"), "pissa"),
    (dict(init_lora_weights="olora"), "olora"),
    (dict(init_lora_weights=False), "False"),
    (dict(bias="all"), "bias"),
    (dict(bias="lora_only"), "bias"),
    (dict(lora_bias=True), "lora_bias"),
])
def test_refused_options(kwargs, needle):
    model = tiny_model("llama")
    ns = _neurons(model)
    with pytest.raises(UserError, match=needle):
        apply_lora(model, LoraSpec(neurons=ns, neuron_languages=("en",), **kwargs))
    with pytest.raises(UserError):
        check_lora_options(**{k: v for k, v in kwargs.items()})


def test_accepted_options_keep_the_mask():
    # rslora only rescales; gaussian init keeps B at zero (PEFT initialises only A from a Gaussian)
    for kw in (dict(use_rslora=True), dict(init_lora_weights="gaussian")):
        model = tiny_model("llama")
        ns = _neurons(model)
        peft_model, mask = apply_lora(model, LoraSpec(neurons=ns, neuron_languages=("en",), mlp_roles=("gate", "up"),
                                                      **kw))
        _train(peft_model, mask, steps=5)
        assert mask.max_masked() == 0.0


def test_refusal_on_the_command_line(tmp_path, capsys):
    train = tmp_path / "train.tsv"
    train.write_text("index_id\tcategory\ttext\n1\tsports\tA goal.\n")
    ns = _neurons(tiny_model("llama"))
    ns.save(tmp_path / "ns.json")
    for extra in (["--use-dora"], ["--init-lora-weights", "pissa"], ["--bias", "all"], ["--lora-bias"]):
        rc = main(["finetune", "train", "--model", str(tmp_path / "nomodel"), "--task", "sib200", "--train", str(train),
                   "--out", str(tmp_path / "out"), "--neurons", str(tmp_path / "ns.json"), "--languages", "en",
                   *extra])
        err = capsys.readouterr().err.strip()
        assert rc == 2
        assert err.startswith("langneurons: error:") and "\n" not in err
        assert not (tmp_path / "out").exists()


def test_unknown_modules_and_languages_are_user_errors():
    model = tiny_model("gpt2")
    ns = _neurons(model)
    with pytest.raises(UserError, match="no up projection"):
        apply_lora(model, LoraSpec(neurons=ns, neuron_languages=("en",), mlp_roles=("up",)))
    with pytest.raises(UserError, match="no language"):
        apply_lora(tiny_model("llama"), LoraSpec(neurons=_neurons(tiny_model("llama")), neuron_languages=("xx",)))


@pytest.mark.parametrize("model_type,roles,expected", [
    ("llama", ("q", "k", "v", "o"), ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]),
    ("llama", ("q", "v"), ["self_attn.q_proj", "self_attn.v_proj"]),
    ("phi3", ("q", "k", "v", "o"), ["self_attn.qkv_proj", "self_attn.o_proj"]),
    ("gpt2", ("q", "k", "v", "o"), ["attn.c_attn", "attn.c_proj"]),
    ("gpt_neox", ("o",), ["attention.dense"]),
    ("opt", ("q", "k", "v", "o"), ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"]),
])
def test_attention_targets(model_type, roles, expected):
    model = tiny_model(model_type)
    names = attention_targets(model, roles)
    n_layers = Adapter(model).num_layers
    assert len(names) == n_layers * len(expected)
    for suffix in expected:
        assert sum(n.endswith(suffix) for n in names) == n_layers
    assert not any(".mlp." in n for n in names)


def test_last_token_pooling_is_padding_side_independent():
    from langneurons.finetune.data import pad_batch
    model = tiny_model("llama")
    torch.manual_seed(0)
    clf = SequenceClassifier(model, 3)
    seqs = [[1, 5, 6, 7, 8, 9, 10], [1, 11, 12], [1, 13, 14, 15, 16]]
    with torch.no_grad():
        right = pad_batch(seqs, 0, "right")
        left = pad_batch(seqs, 0, "left")
        a = clf(right["input_ids"], right["attention_mask"])
        b = clf(left["input_ids"], left["attention_mask"])
        single = torch.cat([clf(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(a, single, atol=1e-5)
    # [M25]'s pad-position pooling depends on the padding (it reads a pad position under right padding)
    clf.pooling = "last-position"
    with torch.no_grad():
        c = clf(right["input_ids"], right["attention_mask"])
    assert not torch.allclose(c[1], single[1], atol=1e-4)


def test_pool_by_hand():
    h = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    assert pool(h, mask, "last-token").flatten().tolist() == [1.0, 7.0]
    assert pool(h, mask, "m25").flatten().tolist() == [3.0, 7.0]
    assert pool(h, mask, "mean").flatten().tolist() == [0.5, 6.0]


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_interventions_reach_a_masked_model(model_type):
    """A test-time intervention on a PEFT-wrapped model, through the adapter resolved before wrapping
    (PEFT's LoRA wrapper hides the Conv1D orientation of GPT-2's MLP from a fresh Adapter)."""
    iv_mod = pytest.importorskip("langneurons.intervene")
    model = tiny_model(model_type)
    adapter = Adapter(model)
    ns = _neurons(model)
    peft_model, mask = apply_lora(model, LoraSpec(r=4, alpha=8, neurons=ns, neuron_languages=("en",),
                                                  mlp_roles=("gate", "down")))
    _train(peft_model, mask, steps=3)
    x = torch.randint(3, 97, (2, 8))
    iv = iv_mod.Intervention(neurons=ns, languages=["en"], operator="zero")
    inner = peft_model.get_base_model()
    with torch.no_grad():
        plain = inner(input_ids=x).logits
        with iv_mod.intervene(inner, iv, adapter=adapter) as ctl:
            zeroed = inner(input_ids=x).logits
    assert all(c == 1 for c in ctl.calls[0])
    assert not torch.allclose(plain, zeroed)
    assert adapter.width == Adapter(tiny_model(model_type)).width
