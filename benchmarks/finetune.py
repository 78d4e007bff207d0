"""Benchmark: one neuron-masked LoRA training step against one plain PEFT LoRA step.

Setting: a random-weight Llama (8 layers, hidden 512, MLP width 1408, 8 heads, vocabulary 32000),
a batch of 8 x 128 random tokens, causal-LM loss, torch limited to 2 threads (``--threads``). Both
models get LoRA rank 8 on the same modules: attention q, k, v, o and MLP gate, up, down of every
layer. The masked model restricts the MLP LoRA to a random 5 % of the neurons of each layer (so every
layer is adapted); the plain model is ``peft.get_peft_model`` with the same target modules.

A step is: forward, backward, ``clip_grad_norm_(10)``, ``AdamW(lr 1e-4, betas (0.95, 0.999), weight
decay 0.1).step()`` and ``zero_grad``; the masked step adds its gradient hooks and the re-masking
after the optimizer step (``NeuronMask.attach``). Steps alternate between the two models (A B A B ...)
after warm-up steps, so drifts in machine load hit both alike. The figure is the ratio of the best
(minimum) step times, as ``timeit`` recommends: on a shared machine interference only ever adds
time, so the minimum is the least noisy estimate of a step's cost; the ratio of medians is printed
too. Gate: best-of ratio <= 1.15 (exit status 1 otherwise), and the masked entries are exactly zero
after the steps.

Run:  python benchmarks/finetune.py [--steps 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore", category=FutureWarning)


def build(seed: int = 0, vocab: int = 32000):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def masked(model, rank: int):
    from langneurons.arch import Adapter
    from langneurons.finetune import LoraSpec, apply_lora
    from langneurons.neuronset import NeuronSet
    ad = Adapter(model)
    g = torch.Generator().manual_seed(1)
    m = torch.rand(ad.num_layers, ad.width, generator=g) < 0.05
    ns = NeuronSet.from_masks({"en": m}, {"num_layers": ad.num_layers, "width": ad.width, "site": "act"},
                              {"name": "bench"})
    pm, mask = apply_lora(model, LoraSpec(r=rank, alpha=2 * rank, neurons=ns, neuron_languages=("en",),
                                          mlp_roles=("gate", "up", "down")))
    return pm, mask


def plain(model, rank: int, targets: list[str]):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))


def make_step(pm, mask=None):
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.95, 0.999), weight_decay=0.1)
    if mask is not None:
        mask.attach(opt)
    pm.train()

    def step(x):
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, params


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per model [8]")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model [2]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    m_model = build(0)
    pm_masked, mask = masked(m_model, args.rank)
    targets = sorted(pm_masked.peft_config["default"].target_modules)    # PEFT may shorten the names
    pm_plain = plain(build(0), args.rank, targets)
    n_modules = sum(1 for _, m in pm_masked.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    assert n_modules == sum(1 for _, m in pm_plain.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    n_masked = sum(p.numel() for p in pm_masked.parameters() if p.requires_grad)
    n_plain = sum(p.numel() for p in pm_plain.parameters() if p.requires_grad)
    assert n_masked == n_plain, (n_masked, n_plain)
    step_m, _ = make_step(pm_masked, mask)
    step_p, _ = make_step(pm_plain)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 32000, (args.batch, args.tokens), generator=g)
    for _ in range(args.warmup):
        step_p(x)
        step_m(x)
    tm, tp = [], []
    for i in range(args.steps):
        for name in (("plain", "masked") if i % 2 == 0 else ("masked", "plain")):
            t0 = time.perf_counter()
            (step_p if name == "plain" else step_m)(x)
            (tp if name == "plain" else tm).append(time.perf_counter() - t0)
    med_m, med_p = statistics.median(tm), statistics.median(tp)
    ratio = min(tm) / min(tp)
    print(f"model: Llama 8 layers, hidden 512, MLP 1408, vocab 32000; batch {args.batch} x {args.tokens} tokens; "
          f"{torch.get_num_threads()} threads; LoRA r={args.rank} on q,k,v,o,gate,up,down "
          f"({n_modules} modules, {n_plain} trainable parameters each)")
    print(f"plain PEFT LoRA step : best {min(tp):.3f} s  median {med_p:.3f} s  ({args.steps} steps)")
    print(f"masked LoRA step     : best {min(tm):.3f} s  median {med_m:.3f} s  ({args.steps} steps)")
    print(f"ratio masked / plain : {ratio:.3f} (best of {args.steps})  {med_m / med_p:.3f} (medians)  gate <= 1.15")
    # the mask's own work per step, timed alone: gradient hooks (one multiply per masked factor) and
    # the re-masking after the optimizer step
    grads = [torch.randn_like(p) for p, _ in mask.entries]
    t0 = time.perf_counter()
    for _ in range(20):
        for g, (p, m) in zip(grads, mask.entries):
            g * m
        mask.apply_()
    extra = (time.perf_counter() - t0) / 20
    print(f"mask maintenance alone: {1e3 * extra:.2f} ms per step ({100 * extra / min(tp):.3f} % of a plain step)")
    ok = ratio <= 1.15
    worst = mask.max_masked()
    print(f"largest masked entry after training: {worst}")
    ok = ok and worst == 0.0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
