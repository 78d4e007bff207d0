"""Train a tiny multilingual Llama and its byte-level BPE tokenizer on a CPU, in minutes.

The result is a standard HuggingFace directory (``config.json``, ``model.safetensors``, tokenizer
files) that ``AutoModelForCausalLM`` and ``AutoTokenizer`` load offline, plus
``langneurons_train.json`` (languages, settings, loss curve). Training samples the same number of
windows from every language in each batch, so small languages are not drowned out. Seeded:
the same command gives the same weights on the same machine.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .corpus import LanguageSource, iter_documents
from .errors import UserError
from .artifacts import TINY_FORMAT
from .atomic import atomic_write_text

#: Bump when a change alters what the same command trains (caches of trained models key on it).
TRAINER_VERSION = 1

#: The held-out evaluation at the end of training (:func:`evaluate_heldout`): perplexity windows of
#: ``EVAL_WINDOW`` tokens (as ``ppl --window``), ``EVAL_PROMPTS`` line prefixes per language with
#: ``EVAL_SAMPLES`` sampled continuations of ``EVAL_NEW_TOKENS`` tokens each.
EVAL_WINDOW, EVAL_PROMPTS, EVAL_SAMPLES, EVAL_NEW_TOKENS = 64, 16, 2, 24

SPECIAL = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}


@dataclass
class TinyConfig:
    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    context: int = 128
    steps: int = 600
    batch_per_language: int = 2
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    seed: int = 0
    threads: Optional[int] = None
    holdout: float = 0.05       # last fraction of each language's documents, kept out of training
    extra: dict = field(default_factory=dict)


def train_tokenizer(docs_per_lang: dict[str, list[str]], vocab_size: int):
    """A byte-level BPE tokenizer (``PreTrainedTokenizerFast``) that adds BOS to every sequence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=[SPECIAL["pad"], SPECIAL["bos"], SPECIAL["eos"], SPECIAL["unk"]],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def corpus():
        for docs in docs_per_lang.values():
            yield from docs
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tok.token_to_id(SPECIAL["bos"])
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIAL['bos']} $A",
                                                       pair=f"{SPECIAL['bos']} $A {SPECIAL['bos']} $B",
                                                       special_tokens=[(SPECIAL["bos"], bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
                                   pad_token=SPECIAL["pad"], unk_token=SPECIAL["unk"])
    fast.padding_side = "right"
    return fast


def _split_docs(sources: list[LanguageSource], holdout: float) -> tuple[dict, dict]:
    train, held = {}, {}
    for src in sources:
        docs = list(iter_documents(src.items, code=src.code))
        if len(docs) < 2:
            raise UserError(f"language {src.code}: the corpus {src.spec} has {len(docs)} non-empty line(s); "
                            "tiny-train needs more text")
        k = max(1, int(round(len(docs) * holdout))) if holdout > 0 else 0
        train[src.code] = docs[: len(docs) - k] if k else docs
        held[src.code] = docs[len(docs) - k:] if k else []
    return train, held


def train_tiny(sources: list[LanguageSource], out: Path, cfg: TinyConfig, progress: bool = True,
               evaluate: bool = True) -> dict:
    """Train tokenizer and model; write the HF directory to ``out``; return the training record
    (with ``evaluate``, its ``heldout`` entry is :func:`evaluate_heldout`'s result).

    ``cfg.threads`` sets torch's thread count for the run only; the previous count is restored."""
    before = torch.get_num_threads()
    try:
        return _train_tiny(sources, out, cfg, progress, evaluate)
    finally:
        torch.set_num_threads(before)


def _train_tiny(sources: list[LanguageSource], out: Path, cfg: TinyConfig, progress: bool, evaluate: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from .runtime import quiet_transformers
    quiet_transformers()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "langneurons_train.json").is_file():
        raise UserError(f"--out {out} exists and is not a tiny-train model directory; choose a new directory")
    if cfg.steps < 1 or cfg.context < 8 or cfg.vocab_size < 300:
        raise UserError("tiny-train needs --steps >= 1, --context >= 8 and --vocab-size >= 300")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    train_docs, held_docs = _split_docs(sources, cfg.holdout)
    tok = train_tokenizer(train_docs, cfg.vocab_size)
    streams = {}
    for code, docs in train_docs.items():
        ids = tok(docs, add_special_tokens=False)["input_ids"]
        flat = np.fromiter((t for seq in ids for t in (*seq, tok.eos_token_id)), dtype=np.int64)
        if len(flat) < cfg.context + 1:
            raise UserError(f"language {code} has {len(flat)} training tokens, fewer than one context of "
                            f"{cfg.context}; add text or lower --context")
        streams[code] = flat
    config = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=max(512, cfg.context * 4),
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        progress_ = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_)))

    codes = sorted(streams)
    bos = tok.bos_token_id
    losses = []
    t0 = time.time()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, desc="tiny-train", unit="step", dynamic_ncols=True, mininterval=1.0)
    for step in range(cfg.steps):
        rows = []
        for code in codes:
            s = streams[code]
            starts = rng.integers(0, len(s) - (cfg.context - 1), size=cfg.batch_per_language)
            for st in starts:
                rows.append(np.concatenate([[bos], s[st: st + cfg.context - 1]]))
        x = torch.from_numpy(np.stack(rows))
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    record = {"format": TINY_FORMAT, "languages": {s.code: s.spec for s in sources},
              "config": asdict(cfg), "train_seconds": round(time.time() - t0, 1),
              "loss_first": losses[0], "loss_last_50": float(np.mean(losses[-50:])),
              "loss_curve": [round(v, 4) for v in losses[:: max(1, len(losses) // 100)]]}
    held_dir = out / "heldout"
    held_dir.mkdir(exist_ok=True)
    for code, docs in held_docs.items():
        if docs:
            (held_dir / f"{code}.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    if evaluate:
        record["heldout"] = evaluate_heldout(model, tok, held_dir, sorted(c for c, d in held_docs.items() if d),
                                             seed=cfg.seed)
    atomic_write_text(out / "langneurons_train.json", json.dumps(record, indent=1, ensure_ascii=False))
    return record


def heldout_lines(heldout: dict) -> list[str]:
    """Plain-text lines of :func:`evaluate_heldout`'s result (printed by ``tiny-train`` and the demo)."""
    def ci(v, nd=2):
        return f"[{v[0]:.{nd}f}, {v[1]:.{nd}f}]" if v else ""
    out = []
    ppl, share = heldout.get("ppl") or {}, heldout.get("lid_share") or {}
    if ppl:
        out.append("held-out perplexity (95% CI over windows): " + ", ".join(
            f"{c} {v:.1f} {ci(heldout['ppl_ci95'][c], 1)}" for c, v in ppl.items()))
    if share:
        out.append("language-ID share of continuations of held-out prefixes (95% CI): " + ", ".join(
            f"{c} {v:.2f} {ci(heldout['lid_share_ci95'][c])}" for c, v in share.items())
                   + (f"; mean {heldout['lid_share_mean']:.2f} {ci(heldout.get('lid_share_mean_ci95'))}"
                      if heldout.get("lid_share_mean") is not None else ""))
    elif heldout.get("lid_skipped"):
        out.append(f"language-ID share not measured: {heldout['lid_skipped']}")
    return out


def _prefix(line: str) -> str:
    """The first third of a line's characters (at least 4, whole words where there are spaces)."""
    k = max(4, len(line) // 3)
    cut = line.rfind(" ", 0, k + 1)
    return line[:cut] if cut >= 4 else line[:k]


def evaluate_heldout(model, tokenizer, held_dir: Path, codes: list[str], seed: int = 0,
                     window: int = EVAL_WINDOW, prompts_per_language: int = EVAL_PROMPTS,
                     samples: int = EVAL_SAMPLES) -> dict:
    """Has the model learnt its languages? Two numbers per language, each with a 95% bootstrap interval.

    - ``ppl``: perplexity on the held-out lines, packed into windows of ``window`` tokens
      exactly as ``langneurons ppl`` packs them (so it equals that command's baseline row);
      ``exp(sum NLL / sum tokens)``, interval over windows.
    - ``lid_share``: the share of sampled continuations (temperature 1, ``samples`` per prefix,
      ``EVAL_NEW_TOKENS`` tokens) of the first ``prompts_per_language`` held-out line prefixes (the
      first third of each line) that the offline language identifier (:mod:`langneurons.langid`,
      restricted to the trained languages) assigns to the prefix's language (an empty or
      unclassified continuation counts as a miss); interval over continuations. Skipped, with the reason
      recorded, when the identifier is not installed.

    Both go through the one runtime (:class:`langneurons.runtime.Session`)."""
    from .corpus import LanguageSource
    from .ppl import heldout_windows
    from .runtime import Session
    from .uncertainty import bootstrap, mean_ci

    was_training = model.training
    model.eval()
    session = Session(model, tokenizer, batch_size=16)
    out: dict = {"window": window, "ppl": {}, "ppl_ci95": {}, "windows": {},
                 "lid_share": {}, "lid_share_ci95": {}, "generations": {}, "examples": {}}
    t0 = time.time()
    for code in codes:
        path = held_dir / f"{code}.txt"
        windows = heldout_windows(LanguageSource(code, str(path), [str(path)]), tokenizer, window, None)
        if len(windows) == 0:
            continue
        W = torch.from_numpy(np.asarray(windows, dtype=np.int64))
        nll = []
        for s in range(0, len(W), session.batch_size):
            with torch.no_grad():
                seq_nll, seq_n = session.token_nll(W[s: s + session.batch_size])
            nll += (seq_nll / seq_n.double()).tolist()
        b = bootstrap(np.asarray(nll), seed=seed)   # every window predicts the same number of tokens
        out["ppl"][code] = round(math.exp(b["value"]), 4)
        out["ppl_ci95"][code] = [round(math.exp(v), 4) for v in b["ci95"]]
        out["windows"][code] = len(nll)
    try:
        from .langid import LanguageIdentifier
        idf = LanguageIdentifier(codes) if prompts_per_language > 0 else None
    except UserError as e:
        idf, out["lid_skipped"] = None, str(e)
    if idf is not None:
        prompts, owner = [], []
        for code in codes:
            lines = [ln for ln in (held_dir / f"{code}.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
            for line in lines[: prompts_per_language]:
                prompts += [_prefix(line)] * samples
                owner += [code] * samples
        texts = session.generate(prompts, EVAL_NEW_TOKENS, sample=True, seed=seed)
        hits = {c: [] for c in codes}
        for code, prompt, text in zip(owner, prompts, texts):
            hits[code].append(float(idf.classify(text)[0] == code))
            shown = out["examples"].setdefault(code, [])
            if len(shown) < 2 and prompt not in [e["prompt"] for e in shown]:
                out["examples"][code].append({"prompt": prompt, "continuation": text})
        for code in codes:
            if hits[code]:
                r = mean_ci(hits[code], seed=seed)
                out["lid_share"][code] = round(r["value"], 4)
                out["lid_share_ci95"][code] = [round(v, 4) for v in r["ci95"]]
                out["generations"][code] = len(hits[code])
        allhits = [h for c in codes for h in hits[c]]
        if allhits:
            r = mean_ci(allhits, seed=seed)
            out["lid_share_mean"] = round(r["value"], 4)
            out["lid_share_mean_ci95"] = [round(v, 4) for v in r["ci95"]]
    out["seconds"] = round(time.time() - t0, 1)
    if was_training:
        model.train()
    return out
