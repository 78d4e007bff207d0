"""Which ``tiny-train`` recipe learns the embedded demo corpus best in a fixed training time?

The demo trains on about 350 sentences per language (10 languages, 7 scripts) on a 2-core CPU and
must finish, set-up included, in under five minutes, so training gets about three of them. Each
recipe below is ``TinyConfig`` overrides; its number of steps is chosen so that it trains for
``--seconds`` (measured on a short probe run first), and the held-out evaluation that every
``tiny-train`` ends with (:func:`langneurons.tiny.evaluate_heldout`: held-out perplexity per
language and the language-ID share of sampled continuations of held-out line prefixes, each with a
95% bootstrap interval) scores it. Results are appended to ``OUT/results.jsonl``, one line per
recipe; rerunning skips recipes already there.

Measured on 2026-12-05 (``--steps 400 --threads 1``; bits per byte of the held-out lines, LID share
of continuations): default 2.342 / 0.73 [0.68, 0.78] (0.56 s/step); vocab 2048 2.417 / 0.69 (0.37
s/step); vocab 1024 2.482 / 0.70 (0.30 s/step); lr 6e-3 2.381 / 0.72; lr 1e-2 2.482 / 0.71. The
demo corpus (~350 sentences per language) is the limit: train loss 3.9 against a held-out ~4.9
nats, and more steps overfit; the default stayed. Vocabularies of 1k/2k also steered worse in the
full demo (set:p_max 1.6x and 1.2x the unsteered share against 2.2x). The other recipes below were
not run to the end.

Run (nothing else running; it is a timing experiment):
    python experiments/demo_recipe.py [--out .cache/experiments/demo_recipe] [--seconds 180] [RECIPE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: name -> TinyConfig overrides (the shipped default first)
RECIPES = {
    "default": {},
    "vocab2k": {"vocab_size": 2048},
    "vocab1k": {"vocab_size": 1024},
    "vocab1k-wd0.1": {"vocab_size": 1024, "weight_decay": 0.1},
    "lr1e-2": {"lr": 1e-2},
    "lr6e-3": {"lr": 6e-3},
    "vocab2k-lr6e-3": {"vocab_size": 2048, "lr": 6e-3},
    "ctx64x4-lr6e-3": {"context": 64, "batch_per_language": 4, "lr": 6e-3},
    "wide192-3l-lr6e-3": {"hidden_size": 192, "intermediate_size": 512, "num_layers": 3, "lr": 6e-3},
    "narrow96-lr1e-2": {"hidden_size": 96, "intermediate_size": 288, "lr": 1e-2},
    "bpl1-lr6e-3": {"batch_per_language": 1, "lr": 6e-3},
}


def sources():
    from langneurons.corpus import parse_lang_args
    from langneurons.demo import corpus_dir, demo_languages
    return parse_lang_args([f"{c}={corpus_dir() / (c + '.txt')}" for c in demo_languages()])


def seconds_per_step(cfg, srcs, tmp: Path, probe_steps: int = 12) -> float:
    """Wall time of one optimiser step, from a short run (its first steps excluded as warm-up)."""
    from langneurons.tiny import train_tiny
    a = dataclasses.replace(cfg, steps=4, warmup=1)
    b = dataclasses.replace(cfg, steps=4 + probe_steps, warmup=1)
    t = []
    for c in (a, b):
        shutil.rmtree(tmp, ignore_errors=True)
        t.append(train_tiny(srcs, tmp, c, progress=False, evaluate=False)["train_seconds"])
    shutil.rmtree(tmp, ignore_errors=True)
    return max(1e-3, (t[1] - t[0]) / probe_steps)


def bits_per_byte(model_dir: Path) -> dict:
    """Held-out bits per UTF-8 byte per language (each held-out line scored alone, after BOS, with its
    EOS): comparable across vocabularies, unlike per-token perplexity."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from langneurons.runtime import Session
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    session = Session(model, tok, batch_size=1)
    out = {}
    for f in sorted((model_dir / "heldout").glob("*.txt")):
        nll = nbytes = 0.0
        for line in f.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            ids = tok(line)["input_ids"] + [tok.eos_token_id]
            with torch.no_grad():
                s, _ = session.token_nll(torch.tensor([ids]))
            nll += float(s[0])
            nbytes += len(line.encode("utf-8")) + 1
        out[f.stem] = round(nll / math.log(2) / nbytes, 4)
    return out


def run_recipe(name: str, overrides: dict, out: Path, seconds: float, steps=None, threads: int = 2) -> dict:
    from langneurons.tiny import TinyConfig, train_tiny
    srcs = sources()
    cfg = dataclasses.replace(TinyConfig(threads=threads), **overrides)
    sps = seconds_per_step(cfg, srcs, out / f".probe-{name}")
    n = int(steps or max(50, seconds / sps))
    cfg = dataclasses.replace(cfg, steps=n, warmup=min(cfg.warmup, max(1, n // 10)))
    model_dir = out / name
    shutil.rmtree(model_dir, ignore_errors=True)
    rec = train_tiny(srcs, model_dir, cfg, progress=False)
    h = rec["heldout"]
    ppl = h["ppl"]
    geo = math.exp(sum(math.log(v) for v in ppl.values()) / len(ppl))
    bpb = bits_per_byte(model_dir)
    return {"recipe": name, "overrides": overrides, "bits_per_byte_mean": round(sum(bpb.values()) / len(bpb), 4),
            "bits_per_byte": bpb, "steps": n, "seconds_per_step": round(sps, 4),
            "train_seconds": rec["train_seconds"], "loss_last_50": round(rec["loss_last_50"], 4),
            "heldout_ppl_geomean": round(geo, 3), "heldout_ppl": ppl,
            "lid_share_mean": h.get("lid_share_mean"), "lid_share_mean_ci95": h.get("lid_share_mean_ci95"),
            "lid_share": h.get("lid_share")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipes", nargs="*", help=f"recipes to run (default all: {', '.join(RECIPES)})")
    ap.add_argument("--out", type=Path, default=REPO / ".cache" / "experiments" / "demo_recipe")
    ap.add_argument("--seconds", type=float, default=180.0, help="training time per recipe [180]")
    ap.add_argument("--steps", type=int, default=None, help="fixed steps instead of --seconds")
    ap.add_argument("--threads", type=int, default=2, help="torch threads [2]")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    res_path = args.out / "results.jsonl"
    done = set()
    if res_path.exists():
        done = {json.loads(x)["recipe"] for x in res_path.read_text().splitlines() if x.strip()}
    for name in args.recipes or list(RECIPES):
        if name not in RECIPES:
            print(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}", file=sys.stderr)
            return 2
        if name in done:
            continue
        r = run_recipe(name, RECIPES[name], args.out, args.seconds, args.steps, args.threads)
        with res_path.open("a") as f:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{name:22s} steps {r['steps']:4d} ({r['seconds_per_step']:.3f} s/step, {r['train_seconds']} s) "
              f"loss {r['loss_last_50']:.3f} held-out bits/byte {r['bits_per_byte_mean']:.3f} "
              f"LID share {r['lid_share_mean']} {r['lid_share_mean_ci95']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
