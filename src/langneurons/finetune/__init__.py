"""Fine-tuning with neuron-masked LoRA (METHODS.md section 5).

- :mod:`.masked_lora`: LoRA on attention plus an MLP LoRA whose update is non-zero only for a
  neuron set (PEFT adapters with the neuron index saved beside them).
- :mod:`.data`: task data (SIB-200 topics, XNLI/MNLI pairs, SQuAD/XQuAD question answering).
- :mod:`.heads`: the sequence-classification head (last real token pooling) and the QA loss.
- :mod:`.train`: the training loop (presets, checkpoints, resume) and evaluation.
- :mod:`.experiment`: train on English, evaluate zero-shot on other languages, compare conditions.
"""

from .masked_lora import (MASK_FILE, LoraSpec, MaskTarget, NeuronMask, apply_lora, attention_targets,
                          check_lora_options, check_peft_config, load_adapter, mlp_mask_targets, neuron_mask_of,
                          save_adapter)

__all__ = ["MASK_FILE", "LoraSpec", "MaskTarget", "NeuronMask", "apply_lora", "attention_targets",
           "check_lora_options", "check_peft_config", "load_adapter", "mlp_mask_targets", "neuron_mask_of",
           "save_adapter"]
