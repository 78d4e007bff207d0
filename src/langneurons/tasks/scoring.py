"""Log-likelihood scoring, next-token choice and greedy generation with a causal LM.

The three passes every task is built on:

* :meth:`Scorer.loglikelihood` - summed log-probability of a continuation given a context.
  For a pair with context tokens ``c_1..c_m`` (BOS included when the tokenizer adds one) and
  continuation tokens ``y_1..y_n`` the model reads ``x = c_1..c_m y_1..y_{n-1}`` and

      ll = sum_{k=1..n} log softmax(logits[m - 1 + k - 1])[y_k]              (positions 0-based)

  Batches are RIGHT padded, so the continuation of every row starts at offset ``m`` (its own
  prompt length) whatever the batch holds; the attention mask and position ids (counted over real
  tokens, :func:`langneurons.collect.forward_kwargs`) make padding invisible. Requests are
  processed longest first and returned in input order, so neither the batch size nor the padding
  side changes a score beyond floating-point rounding (tested in float64).
* :meth:`Scorer.next_token_logprobs` - ``log softmax(logits[last prompt position])`` at given
  token ids (A/B/C/D answer letters), one forward pass per prompt.
* :meth:`Scorer.generate` - greedy decoding with LEFT padding (new tokens line up at the right
  edge), stopping per row at EOS or at the first stop string (default a newline).

Tokenisation of a (context, continuation) pair follows lm-evaluation-harness: trailing
whitespace of the context moves to the continuation, the context and the concatenation are
encoded separately (no special tokens), and the continuation tokens are the concatenation's
tokens after the context's length. A BOS token is prepended when the tokenizer adds one by
default (it does for Llama-style tokenizers, not for GPT-2-style ones); an empty context is
replaced by BOS (or EOS) so that the first continuation token has something to condition on.
Contexts longer than the model's window are cut from the left.

Interventions are applied by the caller around these calls (``with intervene(model, iv): ...``);
every forward pass receives its attention mask so that padding positions are never written.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..collect import forward_kwargs

__all__ = ["Scorer", "model_max_length"]


def model_max_length(model, tokenizer=None, default: int = 2048) -> int:
    """The longest input the model takes: ``config.max_position_embeddings`` (or its aliases)."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    m = getattr(tokenizer, "model_max_length", None)
    if isinstance(m, int) and 0 < m < 10**7:
        return m
    return default


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos


class Scorer:
    """A model and its tokenizer, with the padding and batching rules of the task passes.

    Parameters
    ----------
    model, tokenizer: a HF causal LM (eval mode) and its tokenizer.
    batch_size: sequences per forward pass.
    max_length: the model window; default :func:`model_max_length`.
    padding_side: ``"right"`` (default, the rule for scoring). ``"left"`` is accepted so that tests
        can show the scores do not depend on it.
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: Optional[int] = None,
                 padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.max_length = int(max_length or model_max_length(model, tokenizer))
        self.padding_side = padding_side
        self.bos_prefix: list[int] = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        self.eos_id = tokenizer.eos_token_id

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(context_ids, continuation_ids)``; context ids start with BOS when the tokenizer adds one."""
        n_space = len(context) - len(context.rstrip())
        if n_space:
            continuation = context[-n_space:] + continuation
            context = context[:-n_space]
        ctx = self.encode(context)
        whole = self.encode(context + continuation)
        cont = whole[len(ctx):]
        if not cont:  # the concatenation merged across the boundary: encode the continuation alone
            cont = self.encode(continuation)
        ctx = self.bos_prefix + ctx
        if not ctx:
            start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eos_id
            ctx = [int(start if start is not None else self.pad_id)]
        return ctx, cont

    def _pad(self, rows: Sequence[Sequence[int]], side: str, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), fill, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            if not r:
                continue
            t = torch.tensor(list(r), dtype=torch.long)
            if side == "left":
                ids[i, T - len(r):] = t
                mask[i, T - len(r):] = 1
            else:
                ids[i, :len(r)] = t
                mask[i, :len(r)] = 1
        return ids, mask

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dev = self.device
        ids, mask = ids.to(dev), mask.to(dev)
        with torch.no_grad():
            out = self.model(input_ids=ids, **forward_kwargs(self.model, mask), use_cache=False)
        return out.logits

    @staticmethod
    def _lsm_dtype(logits: torch.Tensor) -> torch.dtype:
        return torch.float64 if logits.dtype == torch.float64 else torch.float32

    # ------------------------------------------------------------------ log-likelihood
    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, int]]:
        """``[(sum log p(continuation | context), n_continuation_tokens)]`` for text pairs."""
        return self.loglikelihood_ids([self.encode_pair(c, x) for c, x in pairs])

    def loglikelihood_ids(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, int]]:
        """The same on token ids ``[(context_ids, continuation_ids)]`` (context non-empty)."""
        seqs: list[tuple[list[int], int]] = []  # (full sequence, context length after truncation)
        for ctx, cont in requests:
            ctx, cont = list(ctx), list(cont)
            if not ctx or not cont:
                raise ValueError("loglikelihood requests need a non-empty context and continuation")
            full = ctx + cont
            n_ctx = len(ctx)
            excess = len(full) - 1 - self.max_length
            if excess > 0:  # keep the end: drop context tokens from the left, never the continuation
                if excess > n_ctx - 1:
                    raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model window "
                                     f"of {self.max_length} tokens")
                full, n_ctx = full[excess:], n_ctx - excess
            seqs.append((full, n_ctx))

        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
        out: list[Optional[tuple[float, int]]] = [None] * len(seqs)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            inputs = [seqs[i][0][:-1] for i in idx]
            # label row b, position t = token t+1 of the sequence when it belongs to the continuation
            labels_rows = [[-100] * (seqs[i][1] - 1) + seqs[i][0][seqs[i][1]:] for i in idx]
            ids, mask = self._pad(inputs, self.padding_side, self.pad_id)
            labels, _ = self._pad(labels_rows, self.padding_side, -100)
            logits = self._forward(ids, mask)                                   # [B, T, V]
            labels = labels.to(logits.device)
            sel = labels != -100                                                # [B, T]
            lsm = torch.log_softmax(logits[sel].to(self._lsm_dtype(logits)), dim=-1)  # [N, V]
            tok_lp = lsm.gather(1, labels[sel].unsqueeze(1)).squeeze(1)         # [N]
            row = sel.nonzero()[:, 0]                                           # [N] batch row of each
            sums = torch.zeros(len(idx), dtype=tok_lp.dtype, device=tok_lp.device).index_add_(0, row, tok_lp)
            for b, i in enumerate(idx):
                out[i] = (float(sums[b]), len(seqs[i][0]) - seqs[i][1])
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ next token
    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[int]) -> torch.Tensor:
        """``[N, C]`` float tensor: ``log softmax(logits at the last prompt token)[candidates]``."""
        seqs = []
        for p in prompts:
            ids = self.bos_prefix + self.encode(p)
            if len(ids) > self.max_length:
                ids = ids[len(ids) - self.max_length:]
            seqs.append(ids)
        cand = torch.tensor(list(candidates), dtype=torch.long)
        out = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            ids, mask = self._pad([seqs[i] for i in idx], self.padding_side, self.pad_id)
            logits = self._forward(ids, mask)                                   # [B, T, V]
            T = ids.shape[1]
            lengths = torch.tensor([len(seqs[i]) for i in idx])
            last = (lengths - 1) if self.padding_side == "right" else torch.full_like(lengths, T - 1)
            rows = logits[torch.arange(len(idx), device=logits.device), last.to(logits.device)]  # [B, V]
            lsm = torch.log_softmax(rows.to(self._lsm_dtype(logits)), dim=-1)[:, cand.to(logits.device)]
            for b, i in enumerate(idx):
                out[i] = lsm[b].cpu()
        if not out:
            return torch.zeros((0, len(cand)))
        return torch.stack(out)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64, stop: Sequence[str] = ("\n",)) -> list[str]:
        """Greedy continuations of ``prompts`` (LEFT padded), cut at the first stop string.

        At most ``max_new_tokens`` new tokens (capped at half the model window); prompts longer
        than the rest of the window keep their end.
        """
        from transformers import StoppingCriteria, StoppingCriteriaList

        tok = self.tokenizer
        stops = [s for s in stop if s]

        class _StopStrings(StoppingCriteria):
            def __init__(self, start: int):
                self.start = start

            def __call__(self, input_ids, scores, **kwargs):
                done = [any(s in tok.decode(row[self.start:], skip_special_tokens=True) for s in stops)
                        for row in input_ids.tolist()]
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        max_new_tokens = min(int(max_new_tokens), max(1, self.max_length // 2))  # leave room for the prompt
        budget = self.max_length - max_new_tokens
        seqs = []
        for p in prompts:
            ids = self.bos_prefix + self.encode(p)
            if len(ids) > budget:
                ids = ids[len(ids) - budget:]
            seqs.append(ids)
        out: list[Optional[str]] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        gen_kw = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=self.pad_id)
        if self.eos_id is not None:
            gen_kw["eos_token_id"] = self.eos_id
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            ids, mask = self._pad([seqs[i] for i in idx], "left", self.pad_id)
            T = ids.shape[1]
            crit = StoppingCriteriaList([_StopStrings(T)]) if stops else None
            dev = self.device
            with torch.no_grad():
                gen = self.model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                          stopping_criteria=crit, **gen_kw)
            for b, i in enumerate(idx):
                text = tok.decode(gen[b, T:].tolist(), skip_special_tokens=True)
                cut = len(text)
                for s in stops:
                    k = text.find(s)
                    if k != -1:
                        cut = min(cut, k)
                out[i] = text[:cut].strip()
        return out  # type: ignore[return-value]
