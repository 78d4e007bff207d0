"""The one runtime: every command that runs a model loads, tokenises, pads and runs it here.

Loading (:func:`open_session`)
    ``AutoModelForCausalLM`` and ``AutoTokenizer`` from one set of options (:class:`ModelOptions`:
    ``--model``, ``--arch``, ``--dtype``, ``--device``, ``--device-map``, ``--trust-remote-code``).
    An architecture spec given to ``collect`` with ``--arch`` is recorded in ``stats.json`` and in the
    neuron sets made from it; a command that reads one of those picks it up (:func:`recorded_arch`),
    so ``--arch`` is given once. An explicit ``--arch`` wins.

Padding policy (one behaviour, every pass)
    * pad id: the tokenizer's pad token, else its EOS, else 0 (:func:`pad_id`); pad positions are
      always masked, so the choice never changes a result;
    * BOS: a text is encoded without special tokens and BOS is prepended when the tokenizer adds
      one by default (Llama-style yes, GPT-2-style no); an empty prompt becomes ``[BOS]`` (or EOS);
    * scoring passes pad on the RIGHT (every row's continuation starts at its own prompt length),
      generation pads on the LEFT (new tokens line up at the right edge);
    * every padded forward pass gets the attention mask and position ids counted over real tokens
      (:func:`forward_kwargs`), so padding is invisible to rotary and learned positions.

Passes (methods of :class:`Session`)
    * :meth:`~Session.token_nll`: summed next-token NLL and token count of packed windows;
    * :meth:`~Session.loglikelihood`: ``sum_k log p(y_k | context, y_<k)`` of (context, continuation)
      pairs, tokenised as lm-evaluation-harness does (trailing context whitespace moves to the
      continuation; the continuation is the concatenation's tokens after the context's);
    * :meth:`~Session.next_token_logprobs` and :meth:`~Session.choose`: log-probabilities of given
      next tokens (answer letters, :meth:`~Session.letter_ids`) after each prompt, and their argmax;
    * :meth:`~Session.generate`: greedy or sampled continuations through ``model.generate``, cut at
      stop strings;
    * :meth:`~Session.mean_activations`: the mean activation at a site over each prompt's tokens.

    Requests are batched longest first (``batch_size`` sequences per pass) and returned in input
    order; sampled generation keeps input order, with batch ``k`` seeded by ``seed + k * batch_size``,
    so the same draws happen whatever else runs.

Shape contract
    Hooks at a neuron site see ``[B, T, I]`` on every architecture: OPT runs its MLP on flattened
    ``[B*T, I]`` tokens, which :mod:`langneurons.hooks` views back as ``[B, T, I]`` (and returns a
    written tensor in the module's own shape).

Interventions
    ``with session.intervened(iv): ...`` applies one intervention (or a list) to every pass inside;
    ``session.intervened_rows(rows)`` gives one intervention per sequence (the perplexity matrix).

Data parallel
    Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE > 1``) every pass splits its batches
    over the ranks (rank ``r`` takes batches ``r, r + W, ...``) and gathers the results, so each
    rank returns what one process returns, exactly: a batch holds the same sequences whatever the
    world size. Commands write files on rank 0 only (:attr:`Session.is_main`).
"""

from .loading import (DTYPES, ModelOptions, load_model, model_fingerprint, open_session, quiet_transformers,
                      recorded_arch, resolve_device, resolve_dtype)
from .parallel import dist_info, gather, init_distributed, rank_device
from .session import LETTERS, Session, forward_kwargs, model_max_length, pad_id, pad_rows

__all__ = ["DTYPES", "LETTERS", "ModelOptions", "Session", "dist_info", "forward_kwargs", "gather",
           "init_distributed", "load_model", "model_fingerprint", "model_max_length", "open_session", "pad_id",
           "pad_rows", "quiet_transformers", "rank_device", "recorded_arch", "resolve_device", "resolve_dtype"]
