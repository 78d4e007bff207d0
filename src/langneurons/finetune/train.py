"""Task fine-tuning with attention LoRA plus optional neuron-masked MLP LoRA; checkpoints and resume.

The loop (one optimizer step per effective batch of ``batch_size`` examples, split into
``grad_accum`` micro-batches):

    loss = sum over micro-batches of  L_sum(micro) / N(batch)

where ``L_sum`` is the summed cross-entropy (classification: one term per example, ``N`` = examples;
QA: one term per label token, ``N`` = label tokens of the whole effective batch), so accumulation does
not change the loss. Then ``clip_grad_norm_(params, grad_clip)``, ``AdamW(lr, betas, weight_decay)``
(decay on matrices, none on biases), and the schedule ``lr_t = lr * t / w`` for ``t < w``,
``lr * (T - t) / (T - w)`` afterwards (``w = ceil(warmup_ratio * T)``: linear warm-up, linear decay to 0).

Defaults follow [M25]: AdamW betas (0.95, 0.999), weight decay 0.1, 1 % warm-up then linear decay,
gradient clipping at 10. ``--preset m25-xnli`` / ``m25-xquad`` add their LoRA ranks, learning rates,
epochs and data fractions (see :data:`PRESETS`); explicit options win over a preset.

Checkpoints: every ``checkpoint_every`` steps ``OUT/checkpoint.pt`` is written atomically (trainable
parameters, head, optimizer, scheduler, RNG state, losses). Rerunning the same command resumes from
it and ends with the same weights as an uninterrupted run (the batch order is a function of the seed,
and the RNG state is restored). A finished run writes ``langneurons_finetune.json`` last; rerunning a
finished command only loads it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .. import __version__
from ..errors import UserError
from ..neuronset import NeuronSet
from ..atomic import atomic_write_text
from ..runtime import pad_id
from . import data as D
from .heads import SequenceClassifier, lm_token_loss, resolve_pooling
from .masked_lora import (ATTN_ROLES, MASK_FILE, MLP_ROLES, LoraSpec, apply_lora, load_adapter, parse_roles,
                          save_adapter)

RECORD = "langneurons_finetune.json"
from ..artifacts import FINETUNE_CHECKPOINT_FORMAT, FINETUNE_RUN_FORMAT as RECORD_FORMAT  # noqa: E402
HEAD_FILE = "classifier_head.safetensors"
CHECKPOINT = "checkpoint.pt"
EVAL_FILE = "eval.json"

#: [M25] hyper-parameters by name. Common to both (and the defaults of this module): AdamW betas
#: (0.95, 0.999), weight decay 0.1, 1 % warm-up then linear decay, gradient clipping at 10.
#: The LoRA dropout of [M25] is not recorded in METHODS.md; 0.05 is PEFT's usual value.
PRESETS: dict[str, dict] = {
    "m25-xnli": dict(r=8, alpha=16.0, lr=1e-5, epochs=1.0, data_fraction=0.25, data_select="random",
                     batch_size=8, attn_modules="q,k,v,o", mlp_modules="gate", dropout=0.05),
    "m25-xquad": dict(r=64, alpha=128.0, lr=5e-5, epochs=10.0, data_fraction=0.8, data_select="first",
                      batch_size=8, attn_modules="q,k,v", mlp_modules="gate", dropout=0.05),
}

#: Fields that do not change the trained weights (excluded from the resume fingerprint).
_NON_TRAINING = {"out", "progress", "eval", "eval_batch_size", "max_new_tokens", "checkpoint_every", "device",
                 "threads", "eval_max_examples"}


class TrainingStopped(Exception):
    """Raised by :func:`train` with ``stop_after``: the run stopped early, its checkpoint is on disk."""

    def __init__(self, step: int):
        super().__init__(f"stopped after {step} steps (checkpoint written); rerun to resume")
        self.step = step


@dataclass
class FinetuneConfig:
    model: str
    task: str
    train: str
    out: Path
    preset: Optional[str] = None
    # LoRA
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: str = "true"
    bias: str = "none"
    lora_bias: bool = False
    attn_modules: str = "q,k,v,o"
    attn_targets: Optional[str] = None
    neurons: Optional[str] = None
    neuron_langs: Optional[str] = None
    mlp_modules: str = "gate"
    # optimisation
    lr: float = 1e-4
    head_lr: Optional[float] = None
    epochs: float = 1.0
    max_steps: Optional[int] = None
    data_fraction: float = 1.0
    data_select: str = "random"
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    weight_decay: float = 0.1
    beta1: float = 0.95
    beta2: float = 0.999
    warmup_ratio: float = 0.01
    grad_clip: float = 10.0
    # task
    pooling: str = "last-token"
    qa_loss: str = "answer"
    # run
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    arch: Optional[str] = None      # --arch module paths; default: the one recorded in --neurons
    threads: Optional[int] = None
    checkpoint_every: int = 200
    progress: bool = True
    eval: list = field(default_factory=list)        # [(lang, path)]
    eval_batch_size: int = 16
    eval_max_examples: Optional[int] = None
    max_new_tokens: int = 32

    @classmethod
    def build(cls, preset: Optional[str] = None, **explicit) -> "FinetuneConfig":
        """Defaults < preset < explicit (``None`` values in ``explicit`` mean 'not given')."""
        values = {}
        if preset is not None:
            if preset not in PRESETS:
                raise UserError(f"unknown --preset {preset!r}; use one of {', '.join(PRESETS)}")
            values.update(PRESETS[preset])
        values.update({k: v for k, v in explicit.items() if v is not None})
        values["preset"] = preset
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise TypeError(f"unknown fine-tuning options {sorted(unknown)}")
        return cls(**values)

    def validate(self) -> None:
        if self.task not in D.TASKS:
            raise UserError(f"unknown --task {self.task!r}; use one of {', '.join(D.TASKS)}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.grad_accum > self.batch_size:
            raise UserError("--batch-size must be >= 1 and --grad-accum between 1 and --batch-size")
        if self.lr <= 0 or (self.head_lr is not None and self.head_lr <= 0):
            raise UserError("--lr (and --head-lr) must be positive")
        if self.epochs <= 0 and not self.max_steps:
            raise UserError("--epochs must be positive (or give --max-steps)")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError("--max-steps must be at least 1")
        if not (0.0 <= self.warmup_ratio < 1.0):
            raise UserError("--warmup-ratio must be in [0, 1)")
        if self.max_length < 8:
            raise UserError("--max-length must be at least 8 tokens")
        if self.checkpoint_every < 1:
            raise UserError("--checkpoint-every must be at least 1 step")
        if (self.neurons is None) != (self.neuron_langs is None):
            raise UserError("--neurons and --languages go together: give the neuron-set file and the "
                            "language(s) whose neurons the MLP LoRA may change")
        resolve_pooling(self.pooling)
        if self.neurons is not None:
            from .masked_lora import neuron_mask_of
            if not Path(self.neurons).is_file():
                raise UserError(f"--neurons {self.neurons} does not exist; give a neuron-set JSON file")
            langs = [s for s in self.neuron_langs.split(",") if s.strip()]
            neuron_mask_of(NeuronSet.load(self.neurons), [s.strip() for s in langs])
        if self.task == "qa" and self.qa_loss not in D.QA_LOSSES:
            raise UserError(f"unknown --qa-loss {self.qa_loss!r}; use answer (default) or full (alias m25)")
        self.lora_spec(check_only=True)

    def lora_spec(self, check_only: bool = False) -> LoraSpec:
        init = self.init_lora_weights
        init_val = {"true": True, "false": False}.get(str(init).lower(), init)
        ns = None
        if self.neurons is not None and not check_only:
            ns = NeuronSet.load(self.neurons)
        spec = LoraSpec(r=self.r, alpha=self.alpha, dropout=self.dropout, use_rslora=self.use_rslora,
                        attn_roles=parse_roles(self.attn_modules, ATTN_ROLES, "--attn-modules"),
                        attn_targets=[s for s in self.attn_targets.split(",") if s] if self.attn_targets else None,
                        neurons=ns, neuron_languages=tuple(s for s in (self.neuron_langs or "").split(",") if s),
                        mlp_roles=parse_roles(self.mlp_modules, MLP_ROLES, "--mlp-modules"),
                        use_dora=self.use_dora, init_lora_weights=init_val, bias=self.bias, lora_bias=self.lora_bias)
        if check_only:
            if self.neurons is not None:
                from .masked_lora import check_lora_options
                if not spec.mlp_roles:
                    raise UserError("--neurons was given but --mlp-modules is none; name gate, up and/or down")
                check_lora_options(use_dora=spec.use_dora, init_lora_weights=spec.init_lora_weights, bias=spec.bias,
                                   lora_bias=spec.lora_bias)
            if spec.r < 1:
                raise UserError(f"--lora-r must be at least 1, got {spec.r}")
        return spec

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        d["eval"] = [list(x) for x in self.eval]
        return d

    def fingerprint(self, neurons_digest: str = "") -> str:
        d = {k: v for k, v in self.to_json().items() if k not in _NON_TRAINING}
        d["neurons_digest"] = neurons_digest
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: Optional[str]) -> str:
    if not path:
        return ""
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else ""


@dataclass
class TaskModel:
    """A fine-tuned model ready for evaluation: the PEFT model, the classifier (classification), the mask."""

    task: str
    peft_model: nn.Module
    tokenizer: object
    mask: object = None
    classifier: Optional[SequenceClassifier] = None
    label_names: Optional[list[str]] = None
    record: dict = field(default_factory=dict)
    config: Optional[FinetuneConfig] = None
    adapter: object = None      # langneurons.arch.Adapter resolved on the base model, before PEFT wrapped it

    def intervention(self, iv) -> Callable:
        """A context-manager factory applying ``iv`` (a ``langneurons.intervene.Intervention``) to this model.

        The architecture adapter was resolved before PEFT replaced modules by LoRA wrappers (whose
        ``weight`` no longer reveals a GPT-2 ``Conv1D`` orientation); the hooked activation modules
        and the base layers inside the wrappers are the same objects, so its hooks still fire.
        """
        from ..intervene import intervene
        return lambda: intervene(self.hf_model, iv, adapter=self.adapter)

    @property
    def hf_model(self) -> nn.Module:
        return self.peft_model.get_base_model()

    def evaluate(self, data, *, batch_size: int = 16, max_length: Optional[int] = None, max_new_tokens: int = 32,
                 context: Optional[Callable] = None, progress: bool = False, desc: str = "eval") -> dict:
        from .evaluate import evaluate_classification, evaluate_qa
        max_length = max_length or (self.config.max_length if self.config else 256)
        if self.task == "qa":
            return evaluate_qa(self.peft_model, self.tokenizer, data, batch_size, max_length, max_new_tokens,
                               context, progress, desc)
        return evaluate_classification(self.classifier, self.tokenizer, data, batch_size, max_length, context,
                                       progress, desc)


# ------------------------------------------------------------------------------------ helpers
def lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    """Multiplier of the base lr at step ``t`` (0-based): linear warm-up to 1, then linear decay to 0."""
    def f(t: int) -> float:
        if warmup > 0 and t < warmup:
            return (t + 1) / warmup
        return max(0.0, (total - t) / max(1, total - warmup))
    return f


def _prepare_out(cfg: FinetuneConfig, fp: str) -> Optional[dict]:
    """Check OUT; return the finished record when the same run already completed there."""
    out = Path(cfg.out)
    rec_path = out / RECORD
    if rec_path.is_file():
        rec = json.loads(rec_path.read_text(encoding="utf-8"))
        if rec.get("fingerprint") != fp:
            raise UserError(f"--out {out} holds a finished fine-tuning run with other settings; "
                            "choose a new --out directory")
        return rec
    ck = out / CHECKPOINT
    if ck.is_file():
        return None
    ours = {"adapter_config.json", "adapter_model.safetensors", "README.md", MASK_FILE, HEAD_FILE, EVAL_FILE,
            "eval_scores.json"}
    if out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".") and p.name not in ours):
        raise UserError(f"--out {out} exists and is not a fine-tuning run directory; choose a new directory")
    return None


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except Exception:       # an older transformers without the switch: only cosmetic
        pass


def _load_base(cfg: FinetuneConfig):
    from ..runtime import load_model, resolve_device, resolve_dtype
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, tok = load_model(cfg.model, device, dtype)
    return model, tok


def _ensure_pad(tok) -> None:
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise UserError("the tokenizer has neither a pad nor an EOS token; give a tokenizer with a pad token")
        tok.pad_token = tok.eos_token


def _trainable(peft_model: nn.Module, classifier: Optional[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    named = [(f"lora.{n}", p) for n, p in peft_model.named_parameters() if p.requires_grad]
    if classifier is not None:
        named += [(f"head.{n}", p) for n, p in classifier.head.named_parameters()]
    return named


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _atomic_dir_files(src: Path, dst: Path) -> None:
    for f in sorted(src.iterdir()):
        os.replace(f, dst / f.name)
    src.rmdir()


# ------------------------------------------------------------------------------------ training
def _adapter(cfg: FinetuneConfig, model):
    """The architecture adapter of the base model: ``--arch``, else the spec recorded in ``--neurons``."""
    from ..arch import Adapter, parse_arch_override
    from ..runtime import recorded_arch
    arch = cfg.arch or recorded_arch(cfg.neurons)
    return Adapter(model, parse_arch_override(arch) if arch else None)


def _build(cfg: FinetuneConfig, model, tok, label_names, adapter=None):
    torch.manual_seed(cfg.seed)
    spec = cfg.lora_spec()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model, mask = apply_lora(model, spec, adapter=adapter)
    classifier = None
    if cfg.task != "qa":
        torch.manual_seed(cfg.seed + 1)
        classifier = SequenceClassifier(peft_model, len(label_names), cfg.pooling)
    return peft_model, mask, classifier


def train(cfg: FinetuneConfig, model: Optional[nn.Module] = None, tokenizer=None,
          stop_after: Optional[int] = None) -> TaskModel:
    """Fine-tune (or resume, or load a finished run) and return the :class:`TaskModel`.

    ``model``/``tokenizer``: an already loaded base model (it is modified in place: PEFT injects its
    layers) and its tokenizer; otherwise ``cfg.model`` is loaded. ``stop_after``: stop after that
    many optimizer steps with only the checkpoint written (simulates an interruption; for tests).
    """
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.progress:
        _quiet_transformers()
    fp = cfg.fingerprint(_file_digest(cfg.neurons))
    done = _prepare_out(cfg, fp)
    if done is not None:
        return load_finetuned(cfg.out, model=model, tokenizer=tokenizer, device=cfg.device, progress=cfg.progress)
    out = Path(cfg.out)

    train_data = D.load_task(cfg.task, cfg.train)
    idx = D.select_fraction(len(train_data), cfg.data_fraction, cfg.data_select, cfg.seed)
    train_data = train_data.subset(idx)
    label_names = getattr(train_data, "label_names", None)

    if model is None:
        model, tokenizer = _load_base(cfg)
    _ensure_pad(tokenizer)
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = _adapter(cfg, model)
    peft_model, mask, classifier = _build(cfg, model, tokenizer, label_names, adapter)
    device = next(model.parameters()).device

    # encode
    if cfg.task == "qa":
        enc = D.encode_qa(tokenizer, train_data, cfg.max_length)
        seqs, labs = D.qa_training_sequences(enc, cfg.qa_loss)
    else:
        seqs = D.encode_classification(tokenizer, train_data, cfg.max_length)
        labs = None
    order = D.batches(len(seqs), cfg.batch_size, cfg.epochs, cfg.seed)
    if cfg.max_steps is not None:
        per_epoch = math.ceil(len(seqs) / cfg.batch_size)
        order = D.batches(len(seqs), cfg.batch_size, cfg.max_steps / per_epoch, cfg.seed)[:cfg.max_steps]
    total = len(order)
    warmup = int(math.ceil(cfg.warmup_ratio * total))

    named = _trainable(peft_model, classifier)
    head_lr = cfg.head_lr or cfg.lr
    groups = [
        {"params": [p for n, p in named if p.dim() >= 2 and not n.startswith("head.")], "weight_decay": cfg.weight_decay,
         "lr": cfg.lr},
        {"params": [p for n, p in named if p.dim() < 2 and not n.startswith("head.")], "weight_decay": 0.0, "lr": cfg.lr},
        {"params": [p for n, p in named if p.dim() >= 2 and n.startswith("head.")], "weight_decay": cfg.weight_decay,
         "lr": head_lr},
        {"params": [p for n, p in named if p.dim() < 2 and n.startswith("head.")], "weight_decay": 0.0, "lr": head_lr},
    ]
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    if mask is not None:
        mask.attach(opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, warmup))

    start, losses, seconds = 0, [], 0.0
    ck_path = out / CHECKPOINT
    if ck_path.is_file():
        state = torch.load(ck_path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != fp:
            raise UserError(f"{ck_path} was written by a run with other settings; use the same options to resume "
                            "or choose a new --out")
        params = dict(named)
        with torch.no_grad():
            for n, t in state["trainable"].items():
                params[n].copy_(t)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start, losses, seconds = state["step"], state["losses"], state.get("seconds", 0.0)
        if mask is not None:
            mask.apply_()

    def checkpoint(step: int) -> None:
        out.mkdir(parents=True, exist_ok=True)
        _save_checkpoint(ck_path, {
            "format": FINETUNE_CHECKPOINT_FORMAT, "fingerprint": fp, "step": step,
            "trainable": {n: p.detach().cpu().clone() for n, p in named},
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
            "losses": losses, "seconds": seconds + (time.time() - t0)})

    peft_model.train()
    if classifier is not None:
        classifier.train()
    pad = pad_id(tokenizer)
    micro = math.ceil(cfg.batch_size / cfg.grad_accum)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=start, desc=f"finetune {cfg.task}", unit="step", dynamic_ncols=True,
                   mininterval=1.0)
    t0 = time.time()
    c0 = time.process_time()
    params_only = [p for _, p in named]
    for step in range(start, total):
        batch = order[step]
        if cfg.task == "qa":
            norm = sum(sum(1 for y in labs[i][1:] if y != -100) for i in batch)
        else:
            norm = len(batch)
        norm = max(1, norm)
        opt.zero_grad(set_to_none=True)
        total_loss = 0.0
        for s in range(0, len(batch), micro):
            part = batch[s:s + micro]
            if cfg.task == "qa":
                b = D.pad_batch([seqs[i] for i in part], pad, "right", [labs[i] for i in part])
                b = {k: v.to(device) for k, v in b.items()}
                loss_sum, _ = lm_token_loss(peft_model, b)
            else:
                b = D.pad_batch([seqs[i] for i in part], pad, "right")
                logits = classifier(b["input_ids"].to(device), b["attention_mask"].to(device))
                y = torch.tensor([train_data.labels[i] for i in part], device=logits.device)
                loss_sum = nn.functional.cross_entropy(logits, y, reduction="sum")
            loss = loss_sum / norm
            loss.backward()
            total_loss += float(loss.detach())
        if cfg.grad_clip and cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params_only, cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(round(total_loss, 5))
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{total_loss:.3f}")
        done_steps = step + 1
        if stop_after is not None and done_steps - start >= stop_after and done_steps < total:
            checkpoint(done_steps)
            if bar is not None:
                bar.close()
            raise TrainingStopped(done_steps)
        if done_steps % cfg.checkpoint_every == 0 and done_steps < total:
            checkpoint(done_steps)
    if bar is not None:
        bar.close()
    seconds += time.time() - t0
    cpu_seconds = time.process_time() - c0
    peft_model.eval()
    if classifier is not None:
        classifier.eval()
    if mask is not None:
        mask.check()

    # final artifacts: adapter + mask + head into a temp dir, moved in; the record last
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".final.tmp{os.getpid()}"
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    save_adapter(peft_model, tmp, mask)
    if classifier is not None:
        from safetensors.torch import save_file
        save_file(classifier.head_state(), str(tmp / HEAD_FILE))
    _atomic_dir_files(tmp, out)
    record = {
        "format": RECORD_FORMAT, "version": __version__, "fingerprint": fp, "complete": True,
        "task": cfg.task, "config": cfg.to_json(), "label_names": label_names,
        "pooling": resolve_pooling(cfg.pooling) if cfg.task != "qa" else None,
        "qa_loss": D.QA_LOSSES.get(cfg.qa_loss) if cfg.task == "qa" else None,
        "train_examples": len(seqs), "steps": total, "warmup_steps": warmup, "seconds": round(seconds, 2),
        "cpu_seconds_last_session": round(cpu_seconds, 2),
        "loss_first": losses[0] if losses else None,
        "loss_last": float(sum(losses[-10:]) / max(1, len(losses[-10:]))) if losses else None,
        "loss_curve": losses[:: max(1, len(losses) // 200)],
        "trainable_parameters": int(sum(p.numel() for p in params_only)),
        "masked": mask is not None,
        "mask_file": MASK_FILE if mask is not None else None,
    }
    atomic_write_text(out / RECORD, json.dumps(record, indent=1))
    if ck_path.is_file():
        ck_path.unlink()
    return TaskModel(cfg.task, peft_model, tokenizer, mask, classifier, label_names, record, cfg, adapter)


def load_finetuned(directory: str | os.PathLike, model: Optional[nn.Module] = None, tokenizer=None,
                   device: str = "auto", dtype: str = "auto", progress: bool = True) -> TaskModel:
    """Load a finished run: base model (from the record, unless given), adapter + mask, head."""
    directory = Path(directory)
    rec_path = directory / RECORD
    if not rec_path.is_file():
        raise UserError(f"{directory} holds no finished fine-tuning run ({RECORD} missing); run "
                        "'langneurons finetune train' first (rerun it to resume)")
    from ..artifacts import load as load_artifact
    rec = load_artifact(rec_path, "finetune.run")     # also reads the older tag langneurons.finetune.v1
    cfgd = dict(rec["config"])
    cfgd["out"] = Path(cfgd["out"])
    cfgd["eval"] = [tuple(x) for x in cfgd.get("eval", [])]
    cfg = FinetuneConfig(**cfgd)
    if model is None:
        if not progress:
            _quiet_transformers()
        c = copy.copy(cfg)
        c.device, c.dtype = device, dtype
        model, tokenizer = _load_base(c)
    _ensure_pad(tokenizer)
    adapter = _adapter(cfg, model)
    peft_model, mask = load_adapter(model, directory)
    peft_model.eval()
    classifier = None
    if rec["task"] != "qa":
        from safetensors.torch import load_file
        classifier = SequenceClassifier(peft_model, len(rec["label_names"]), rec.get("pooling") or "last-token")
        classifier.head.load_state_dict(load_file(str(directory / HEAD_FILE)))
        classifier.eval()
    return TaskModel(rec["task"], peft_model, tokenizer, mask, classifier, rec.get("label_names"), rec, cfg, adapter)


def evaluate_sets(tm: TaskModel, sets: list[tuple[str, str]], *, batch_size: int = 16, max_examples: Optional[int] = None,
                  max_new_tokens: int = 32, context_for: Optional[Callable[[str], Callable]] = None,
                  progress: bool = False, max_length: Optional[int] = None) -> dict:
    """Evaluate on ``[(lang, path)]``; ``context_for(lang)`` gives an intervention context factory."""
    res = {}
    for lang, path in sets:
        data = D.load_task(tm.task, path, tm.label_names if tm.task == "sib200" else None)
        if max_examples is not None and len(data) > max_examples:
            data = data.subset(range(max_examples))
        ctx = context_for(lang) if context_for is not None else None
        res[lang] = tm.evaluate(data, batch_size=batch_size, max_new_tokens=max_new_tokens, context=ctx,
                                progress=progress, desc=f"eval {lang}", max_length=max_length)
        res[lang]["path"] = str(path)
    return res


def summary(results: dict) -> dict:
    """Per-language metrics without the per-example lists."""
    return {lang: {k: v for k, v in r.items() if k not in ("correct", "predictions")} for lang, r in results.items()}
