"""Tiny random-weight models of every supported architecture, for tests and benchmarks.

``tiny_model("llama")`` builds a 2-layer model with hidden size 32 and an MLP width of 64 (GPT-2,
BLOOM and Falcon derive the width as 4 x hidden = 128) from a config, offline, seeded.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 97

#: Eight languages of the shared data (paths relative to it) in five scripts (Latin, Han, Cyrillic,
#: Arabic, Devanagari): the FLORES-200 devtest file plus the NTREX-128 file of each. The text of the
#: tiny 8-language models of the tests and experiments.
SHARED8_TEXT: dict[str, list[str]] = {
    "en": ["flores200/devtest/eng_Latn.devtest", "text/ntrex128/newstest2019-ref.eng-US.txt"],
    "fr": ["flores200/devtest/fra_Latn.devtest", "text/ntrex128/newstest2019-ref.fra.txt"],
    "es": ["flores200/devtest/spa_Latn.devtest", "text/ntrex128/newstest2019-ref.spa.txt"],
    "de": ["flores200/devtest/deu_Latn.devtest", "text/ntrex128/newstest2019-ref.deu.txt"],
    "zh": ["flores200/devtest/zho_Hans.devtest", "text/ntrex128/newstest2019-ref.zho-CN.txt"],
    "ru": ["flores200/devtest/rus_Cyrl.devtest", "text/ntrex128/newstest2019-ref.rus.txt"],
    "ar": ["flores200/devtest/arb_Arab.devtest", "text/ntrex128/newstest2019-ref.arb.txt"],
    "hi": ["flores200/devtest/hin_Deva.devtest", "text/ntrex128/newstest2019-ref.hin.txt"],
}

#: Config overrides per model type that make a small, valid model.
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "qwen3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8),
    "gemma": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8),
    "gemma2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8),
    "gemma3_text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8),
    "olmo2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "stablelm": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2),
    "phi3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "phi": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "gpt2": dict(n_embd=32, n_inner=64, n_layer=2, n_head=4),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4),
    "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=32),
    "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
}

SPECIAL_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_config(model_type: str, **overrides):
    kw = dict(vocab_size=VOCAB, max_position_embeddings=128, **SPECIAL_IDS)
    kw.update(TINY_CONFIGS[model_type])
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A seeded random-weight causal LM of ``model_type`` in eval mode."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config)
    # Random init leaves some biases and norms at trivial values; jitter every parameter so that
    # brute-force checks exercise biases and sign patterns.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.to(dtype).eval()
