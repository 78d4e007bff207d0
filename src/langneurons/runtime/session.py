"""The runtime session: padding, the passes every command runs, interventions (see
:mod:`langneurons.runtime` for the policy and the shape contract)."""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..errors import UserError
from .parallel import dist_info, gather

#: The answer letters of multiple-choice prompts.
LETTERS = ("A", "B", "C", "D", "E", "F", "G", "H")


def pad_id(tokenizer) -> int:
    """The id written at padded positions: the pad token, else EOS, else 0 (always masked)."""
    for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if t is not None:
            return int(t)
    return 0


def pad_rows(rows: Sequence[Sequence[int]], fill: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` int64 ``[B, T]`` of token rows padded with ``fill`` on ``side``."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    T = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), T), int(fill), dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        if not len(r):
            continue
        t = torch.as_tensor(list(r), dtype=torch.long)
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, sl] = t
        mask[i, sl] = 1
    return ids, mask


def forward_kwargs(model, attention_mask: Optional[torch.Tensor]) -> dict:
    """Keyword arguments of a padded forward pass: the mask, and position ids counted over real tokens.

    Position ids make left padding give the same activations as right padding for rotary and
    learned absolute positions (models that take no ``position_ids``, such as BLOOM, derive
    positions from the mask themselves).
    """
    if attention_mask is None:
        return {}
    kw = {"attention_mask": attention_mask}
    if "position_ids" in inspect.signature(model.forward).parameters:
        kw["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    return kw


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
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos


def _lsm_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


class Session:
    """A loaded model, its tokenizer and architecture adapter, and the passes every command runs.

    Parameters
    ----------
    model, tokenizer: a HF causal LM (eval mode) and its tokenizer (``None`` for passes on token ids).
    arch: an :class:`~langneurons.arch.ArchSpec`, a ``--arch`` string, or ``None`` (the adapter table).
        The adapter is built on first use, so scoring-only passes work on any causal LM.
    batch_size: sequences per forward pass.
    max_length: the model window; default :func:`model_max_length`.
    padding_side: of the scoring passes, ``"right"`` (default); ``"left"`` is accepted so that tests
        can show scores do not depend on it.
    """

    def __init__(self, model, tokenizer, arch=None, batch_size: int = 8, max_length: Optional[int] = None,
                 padding_side: str = "right", adapter=None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.max_length = int(max_length or model_max_length(model, tokenizer))
        self.padding_side = padding_side
        self.bos_prefix: list[int] = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
        self.pad_id = pad_id(tokenizer)
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        if isinstance(arch, str):
            from ..arch import parse_arch_override
            arch = parse_arch_override(arch)
        self.arch = arch
        self._adapter = adapter
        self.rank, self.world = dist_info()

    # ------------------------------------------------------------------ basics
    @property
    def adapter(self):
        """The architecture adapter (:class:`~langneurons.arch.Adapter`), built on first use."""
        if self._adapter is None:
            from ..arch import Adapter
            self._adapter = Adapter(self.model, self.arch)
        return self._adapter

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0)."""
        return self.rank == 0

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def _start_id(self) -> int:
        start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eos_id
        return int(start if start is not None else self.pad_id)

    def prompt_ids(self, text: str) -> list[int]:
        """A prompt as the model reads it: BOS (when the tokenizer adds one) + its tokens, never empty."""
        ids = self.bos_prefix + self.encode(text)
        return ids or [self._start_id()]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(context_ids, continuation_ids)``; context ids start with BOS when the tokenizer adds one."""
        n_space = len(context) - len(context.rstrip())
        if n_space:
            continuation = context[-n_space:] + continuation
            context = context[:-n_space]
        ctx = self.encode(context)
        whole = self.encode(context + continuation)
        cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else []
        if not cont:  # the concatenation merged across the boundary: encode the continuation alone
            cont = self.encode(continuation)
        ctx = self.bos_prefix + ctx
        return (ctx or [self._start_id()]), cont

    def letter_ids(self, letters: Sequence[str] = LETTERS[:4]) -> list[int]:
        """The token ids answer letters get after ``"Answer:"``: the first token of ``" A"`` (skipping a
        leading token that decodes to whitespace only). Two letters sharing a token is a user error."""
        ids = []
        for letter in letters:
            toks = self.encode(" " + letter)
            if len(toks) > 1 and not self.tokenizer.decode(toks[:1]).strip():
                toks = toks[1:]
            ids.append(int(toks[0]))
        if len(set(ids)) != len(ids):
            raise UserError(f"the answer letters {list(letters)} share a first token ({ids}); this tokenizer "
                            "cannot be scored by answer letter")
        return ids

    def forward(self, ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[B, T, V]`` of one padded batch (no gradient, no cache)."""
        dev = self.device
        ids = ids.to(dev)
        mask = mask.to(dev) if mask is not None else None
        with torch.no_grad():
            out = self.model(input_ids=ids, use_cache=False, **forward_kwargs(self.model, mask))
        return out.logits if hasattr(out, "logits") else out[0]

    # ------------------------------------------------------------------ batching
    def _batches(self, n: int, lengths: Optional[Sequence[int]] = None) -> list[list[int]]:
        """Index batches: longest first when ``lengths`` is given, else input order."""
        order = sorted(range(n), key=lambda i: -lengths[i]) if lengths is not None else list(range(n))
        return [order[s:s + self.batch_size] for s in range(0, n, self.batch_size)]

    def map_batches(self, batches: list[list[int]], fn: Callable[[int, list[int]], dict], progress=None) -> dict:
        """``fn(k, batch)`` on this rank's batches; the gathered ``{item: result}`` of every rank."""
        results: dict = {}
        for k, idx in enumerate(batches):
            if k % self.world == self.rank:
                results.update(fn(k, idx))
            if progress is not None:
                progress(len(idx))
        return gather(results)

    # ------------------------------------------------------------------ passes
    def token_nll(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token NLL and predicted-token count per sequence: float64 ``[B]``, int64 ``[B]``.

        Token ``t >= 1`` is predicted from positions ``< t``; it counts iff ``mask[t]`` and
        ``mask[t-1]`` are 1. Log-probabilities in at least float32. One batch, this rank.
        """
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device) if attention_mask is not None else None
        logits = self.forward(input_ids, attention_mask)
        labels = input_ids[:, 1:]
        if attention_mask is not None:
            valid = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
        else:
            valid = torch.ones_like(labels, dtype=torch.bool)
        dt = torch.promote_types(logits.dtype, torch.float32)
        nll = torch.empty(labels.shape[0], dtype=torch.float64, device=labels.device)
        for b in range(labels.shape[0]):  # one row at a time keeps the float32 copy of the logits small
            tok = F.cross_entropy(logits[b, :-1].to(dt), labels[b], reduction="none")
            nll[b] = tok.masked_fill(~valid[b], 0).sum().double()
        return nll, valid.sum(1)

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, int]]:
        """``[(sum log p(continuation | context), n_continuation_tokens)]`` for text pairs."""
        return self.loglikelihood_ids([self.encode_pair(c, x) for c, x in pairs])

    def loglikelihood_ids(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, int]]:
        """The same on token ids ``[(context_ids, continuation_ids)]`` (both non-empty).

        Contexts longer than the window lose tokens on the left, never the continuation.
        """
        seqs: list[tuple[list[int], int]] = []  # (full sequence, context length after truncation)
        for ctx, cont in requests:
            ctx, cont = list(ctx), list(cont)
            if not ctx or not cont:
                raise ValueError("loglikelihood requests need a non-empty context and continuation")
            full, n_ctx = ctx + cont, len(ctx)
            excess = len(full) - 1 - self.max_length
            if excess > 0:
                if excess > n_ctx - 1:
                    raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model window "
                                     f"of {self.max_length} tokens")
                full, n_ctx = full[excess:], n_ctx - excess
            seqs.append((full, n_ctx))

        def run(k: int, idx: list[int]) -> dict:
            inputs = [seqs[i][0][:-1] for i in idx]
            # label of row b, position t = token t+1 of the sequence when it belongs to the continuation
            labels_rows = [[-100] * (seqs[i][1] - 1) + seqs[i][0][seqs[i][1]:] for i in idx]
            ids, mask = pad_rows(inputs, self.pad_id, self.padding_side)
            labels, _ = pad_rows(labels_rows, -100, self.padding_side)
            logits = self.forward(ids, mask)                                    # [B, T, V]
            labels = labels.to(logits.device)
            sel = labels != -100                                                # [B, T]
            lsm = torch.log_softmax(logits[sel].to(_lsm_dtype(logits)), dim=-1)  # [N, V]
            tok_lp = lsm.gather(1, labels[sel].unsqueeze(1)).squeeze(1)         # [N]
            row = sel.nonzero()[:, 0]
            sums = torch.zeros(len(idx), dtype=tok_lp.dtype, device=tok_lp.device).index_add_(0, row, tok_lp)
            return {i: (float(sums[b]), len(seqs[i][0]) - seqs[i][1]) for b, i in enumerate(idx)}

        res = self.map_batches(self._batches(len(seqs), [len(s[0]) for s in seqs]), run)
        return [res[i] for i in range(len(seqs))]

    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[int]) -> torch.Tensor:
        """``[N, C]`` float tensor: ``log softmax(logits at the last prompt token)[candidates]``."""
        seqs = []
        for p in prompts:
            ids = self.prompt_ids(p)
            seqs.append(ids[len(ids) - self.max_length:] if len(ids) > self.max_length else ids)
        cand = torch.tensor(list(candidates), dtype=torch.long)

        def run(k: int, idx: list[int]) -> dict:
            ids, mask = pad_rows([seqs[i] for i in idx], self.pad_id, self.padding_side)
            logits = self.forward(ids, mask)                                    # [B, T, V]
            T = ids.shape[1]
            lengths = torch.tensor([len(seqs[i]) for i in idx])
            last = (lengths - 1) if self.padding_side == "right" else torch.full_like(lengths, T - 1)
            rows = logits[torch.arange(len(idx), device=logits.device), last.to(logits.device)]  # [B, V]
            lsm = torch.log_softmax(rows.to(_lsm_dtype(logits)), dim=-1)[:, cand.to(logits.device)]
            return {i: lsm[b].cpu() for b, i in enumerate(idx)}

        res = self.map_batches(self._batches(len(seqs), [len(s) for s in seqs]), run)
        if not seqs:
            return torch.zeros((0, len(cand)))
        return torch.stack([res[i] for i in range(len(seqs))])

    def choose(self, prompts: Sequence[str], letters: Sequence[str] = LETTERS[:4]) -> list[int]:
        """Multiple choice by next-token argmax over the answer letters (:meth:`letter_ids`)."""
        if not prompts:
            return []
        return self.next_token_logprobs(prompts, self.letter_ids(letters)).argmax(-1).tolist()

    def generate(self, prompts: Union[Sequence[str], None] = None, max_new_tokens: int = 32, *,
                 ids: Optional[Sequence[Sequence[int]]] = None, sample: bool = False, seed: int = 0,
                 stop: Sequence[str] = (), strip: bool = False, logits_processor=None,
                 progress=None) -> list[str]:
        """Continuations (new text only, special tokens skipped) through ``model.generate``.

        ``prompts`` are read as :meth:`prompt_ids` (or give token rows as ``ids``). Greedy by default;
        ``sample=True`` draws from the full distribution (temperature 1), batch ``k`` seeded with
        ``seed + k * batch_size``. Each row stops at EOS, after ``max_new_tokens`` (capped at half the
        window), or once its text holds a ``stop`` string; the text is cut before the first stop
        string (and stripped with ``strip``). ``logits_processor(prompt_len, batch_indices)`` may
        return a list of logits processors for a batch.
        """
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
        tok = self.tokenizer
        stops = [s for s in stop if s]
        rows = [list(r) for r in ids] if ids is not None else [self.prompt_ids(p) for p in prompts]
        if any(not r for r in rows):
            raise UserError("a prompt tokenised to zero tokens; check the tokenizer")
        max_new_tokens = min(int(max_new_tokens), max(1, self.max_length // 2))  # leave room for the prompt
        budget = self.max_length - max_new_tokens
        rows = [r[len(r) - budget:] if len(r) > budget else r for r in rows]

        class _StopStrings(StoppingCriteria):
            def __init__(self, start: int):
                self.start = start

            def __call__(self, input_ids, scores, **kwargs):
                done = [any(s in t for s in stops)
                        for t in tok.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)]
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        kw = dict(max_new_tokens=max_new_tokens, num_beams=1, pad_token_id=self.pad_id)
        if self.eos_id is not None:
            kw["eos_token_id"] = self.eos_id
        if sample:
            kw.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)

        def run(k: int, idx: list[int]) -> dict:
            ids_t, mask = pad_rows([rows[i] for i in idx], self.pad_id, "left")
            T = ids_t.shape[1]
            extra = {}
            if stops:
                extra["stopping_criteria"] = StoppingCriteriaList([_StopStrings(T)])
            procs = logits_processor(T, idx) if logits_processor is not None else None
            if procs:
                extra["logits_processor"] = LogitsProcessorList(procs)
            if sample:
                torch.manual_seed(seed + k * self.batch_size)
            dev = self.device
            with torch.no_grad():
                gen = self.model.generate(input_ids=ids_t.to(dev), attention_mask=mask.to(dev), **kw, **extra)
            out = {}
            for b, i in enumerate(idx):
                text = tok.decode(gen[b, T:].tolist(), skip_special_tokens=True)
                cut = min([text.find(s) for s in stops if s in text], default=len(text))
                out[i] = text[:cut].strip() if strip else text[:cut]
            return out

        batches = self._batches(len(rows), None if sample else [len(r) for r in rows])
        res = self.map_batches(batches, run, progress)
        return [res[i] for i in range(len(rows))]

    def mean_activations(self, prompts: Sequence[str], site: str = "act", include_special: bool = False
                         ) -> torch.Tensor:
        """Mean activation over each prompt's tokens: float32 ``[L, I, N]``.

        Prompts are read as :meth:`prompt_ids`; positions holding special tokens (BOS, ...) are
        averaged too only if ``include_special``. Batches are left-padded; padding never enters a mean.
        """
        from ..hooks import check_fired, observe
        adapter = self.adapter
        L, I = adapter.num_layers, adapter.width
        base = getattr(self.model, "base_model", self.model)
        enc = [self.prompt_ids(p) for p in prompts]
        special = torch.tensor(sorted(set(self.tokenizer.all_special_ids or [])), dtype=torch.long)

        def run(k: int, idx: list[int]) -> dict:
            ids, mask = pad_rows([enc[i] for i in idx], self.pad_id, "left")
            weight = mask.clone().float()                                     # [B, T], 0 on padding
            if not include_special and special.numel():
                weight[torch.isin(ids, special)] = 0.0
            counts = weight.sum(1)
            if bool((counts == 0).any()):
                bad = idx[int((counts == 0).nonzero()[0, 0])]
                raise UserError(f"prompt {bad} ({prompts[bad]!r}) has no non-special tokens to average over")
            w = (weight / counts[:, None]).to(self.device)
            acts = torch.zeros(L, I, len(idx), dtype=torch.float32)

            def fn(layer: int, t: torch.Tensor) -> None:                       # t: [B, T, I]
                acts[layer] = torch.einsum("bti,bt->ib", t.float(), w).cpu()

            with observe(adapter, site, fn) as calls, torch.no_grad():
                base(input_ids=ids.to(self.device), use_cache=False, **forward_kwargs(base, mask.to(self.device)))
            check_fired(calls, list(range(L)))
            return {i: acts[:, :, b].clone() for b, i in enumerate(idx)}

        res = self.map_batches(self._batches(len(enc)), run)
        if not enc:
            return torch.zeros(L, I, 0)
        return torch.stack([res[i] for i in range(len(enc))], dim=2)

    # ------------------------------------------------------------------ interventions
    def intervened(self, interventions):
        """A context applying one intervention, a list of them, or nothing (``None``) to every pass."""
        if interventions is None or (isinstance(interventions, (list, tuple)) and not interventions):
            return contextlib.nullcontext()
        from ..intervene import intervene
        return intervene(self.model, interventions, adapter=self.adapter)

    def intervened_rows(self, rows):
        """Per-sequence interventions (``ctl.assign(row_of)`` before each pass), see ``intervene_rows``."""
        from ..intervene import intervene_rows
        return intervene_rows(self.model, rows, adapter=self.adapter)
