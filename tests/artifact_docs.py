"""Small realistic documents of every artifact kind, and a run directory holding one of each.

Shared by test_artifacts.py and test_report.py. Cheap real writers are used where there are some
(neuron sets, interventions, bridge probes and ``bridge select``, the spectrum writer); the rest
are hand-made in the shape their writers produce.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from langneurons import artifacts as A

MODEL = {"name_or_path": "tiny-demo", "model_type": "llama", "num_layers": 4, "width": 24, "site": "act"}
LANGS = ["de", "zh", "en", "fr"]


def _task():
    rows = [{"lang": "zh", "setting": "none", "neurons_lang": None, "n": 40, "metrics": {"acc": 0.575}},
            {"lang": "zh", "setting": "self", "neurons_lang": "zh", "n": 40, "metrics": {"acc": 0.425}}]
    return {"format": A.TASK_FORMAT, "task": "xcopa", "description": "XCOPA accuracy",
            "model": {"name_or_path": "tiny-demo"}, "split": "test", "limit": 40, "shots": 0, "metrics": ["acc"],
            "fraction_metrics": ["acc"], "languages": ["zh"], "rows": rows}


def _compare():
    """A two-method, two-target scoreboard in the shape ``langneurons compare`` writes."""
    def row(method, kind, target, share, units, params):
        r = {"method": method, "target": target, "kind": kind}
        for k, v in (("share", share), ("share_delta", share - 0.25), ("fluency_nll", 5.5), ("fluency_delta", 0.25),
                     ("steer_own_dnll", -0.125), ("steer_other_dnll", 0.0625), ("deact_own_dnll", 0.5),
                     ("deact_other_dnll", 0.03125), ("deact_selectivity", 0.46875)):
            r[k], r[k + "_ci95"] = v, [v - 0.0625, v + 0.0625]
        r["deact_own_vs_random"] = 0.375 if kind == "neurons" else None
        r["deact_own_vs_random_ci95"] = [0.3125, 0.4375] if kind == "neurons" else None
        r["budget_units"], r["budget_params"] = units, params
        return r
    rows = [row("lape:set:p_max", "neurons", "en", 0.625, 12, 12), row("lape:set:p_max", "neurons", "zh", 0.75, 9, 9),
            row("diffmean", "diffmean", "en", 0.875, 1, 16), row("diffmean", "diffmean", "zh", 0.9375, 1, 16)]
    summary = {}
    for m in ("lape:set:p_max", "diffmean"):
        mine = [r for r in rows if r["method"] == m]
        summary[m] = {}
        for k, v in mine[0].items():
            if k in ("method", "target", "kind") or k.endswith("_ci95"):
                continue
            vals = [r[k] for r in mine]
            summary[m][k] = None if None in vals else sum(vals) / len(vals)
            if k + "_ci95" in mine[0]:
                summary[m][k + "_ci95"] = (None if summary[m][k] is None else
                                           [summary[m][k] - 0.0625, summary[m][k] + 0.0625])
    return {"format": A.COMPARE_FORMAT, "methods": ["lape:set:p_max", "diffmean"], "targets": ["en", "zh"],
            "metrics": {"share": "target share of generations", "deact_own_dnll": "own-language ΔNLL"},
            "rows": rows, "summary": summary, "skipped": {"arith:add": "language arithmetic is not available"},
            "baseline": {"share": {"en": 0.5, "zh": 0.125}, "share_ci95": {"en": [0.375, 0.625], "zh": [0.0, 0.25]},
                         "fluency_nll": 5.25, "fluency_nll_ci95": [5.0, 5.5]},
            "details": {"lape:set:p_max": {"kind": "neurons", "neurons": "lape", "operator": "set:p_max"},
                        "diffmean": {"kind": "diffmean", "layer": 2, "alpha": 4.0}},
            "settings": {"model": "tiny-demo", "direction_layer": 2, "alpha": 4.0, "generations_per_target": 16}}


def _cell(mean, sd, diff=None):
    c = {"mean": mean, "sd": sd, "per_seed": [mean - sd, mean + sd], "n": 20}
    if diff is not None:
        c["vs_attn"] = {"diff": diff, "ci95": [diff - 0.05, diff + 0.05], "p": 0.0412, "n": 20, "seeds": 2}
    return c


def hand_made(run_dir: Path) -> dict[str, dict]:
    """One document per kind that has no cheap real writer (JSON kinds only)."""
    ft = str(run_dir / "ft")          # absolute paths inside the run directory, as the commands record them
    bli_conds = {"baseline": {"bridge": None, "accuracy": 0.4, "n_correct": 2, "n": 5, "records": []},
                 "en": {"bridge": "en", "accuracy": 0.8, "n_correct": 4, "n": 5, "records": []}}
    return {
        "stats": {"format": A.STATS_FORMAT, "model": MODEL, "unit": "window", "window": 64, "dtype": "float32",
                  "languages": {"en": {"n_tokens": 7104, "n_windows": 111, "source": str(run_dir / "en.txt")},
                                "zh": {"n_tokens": 6528, "n_windows": 102, "source": "zh.txt"}}},
        "collect.checkpoint": {"format": A.COLLECT_CHECKPOINT_FORMAT, "key": "0123abcd", "next_batch": 3},
        "directions": {"format": A.DIRECTIONS_FORMAT, "site": "residual", "num_layers": 4, "hidden_size": 16,
                       "model": {"name_or_path": "tiny-demo", "model_type": "llama", "fingerprint": "f" * 16,
                                 "num_layers": 4, "hidden_size": 16},
                       "window": 64, "languages": ["en", "zh"], "token_counts": {"en": 640, "zh": 576},
                       "sources": {"en": "en.txt", "zh": "zh.txt"}},
        "directions.checkpoint": {"format": A.DIRECTIONS_CHECKPOINT_FORMAT, "key": "4567cdef", "next_batch": 2},
        "heads": {"format": A.HEADS_FORMAT, "site": "attn_out", "num_layers": 4, "num_heads": 4, "head_dim": 4,
                  "model": {"name_or_path": "tiny-demo", "model_type": "llama", "fingerprint": "f" * 16,
                            "num_layers": 4, "num_heads": 4, "head_dim": 4},
                  "window": 64, "languages": ["en", "zh"], "token_counts": {"en": 640, "zh": 576},
                  "sources": {"en": "en.txt", "zh": "zh.txt"},
                  "histogram": {"kind": "log2", "bins_per_octave": 4, "min_exp": -20, "max_exp": 20}},
        "heads.checkpoint": {"format": A.HEADS_CHECKPOINT_FORMAT, "key": "89abcdef", "next_batch": 1},
        "headset": {"format": A.HEADSET_FORMAT, "model": {"name_or_path": "tiny-demo", "model_type": "llama",
                                                          "num_layers": 4, "num_heads": 4, "head_dim": 4},
                    "method": {"name": "lape", "params": {"top_rate": 0.25}, "languages": ["en", "zh"]},
                    "heads": {"en": [[0, 1], [3, 2]], "zh": [[2, 0]]}},
        "ppl": {"format": A.PPL_FORMAT, "rows": ["baseline", "en", "zh"], "columns": ["en", "zh"],
                "languages": {"rows": ["en", "zh"], "columns": ["en", "zh"]},
                "ppl": [[12.3456, 20.5], [30.25, 21.0], [13.0, 45.75]],
                "delta_ppl": [[0.0, 0.0], [17.9044, 0.5], [0.6544, 25.25]],
                "settings": {"operator": "zero", "neurons": str(run_dir / "neurons" / "lape.json"),
                             "neuron_method": "lape", "site": "act", "window": 64}},
        "ppl.partial": {"format": A.PPL_PARTIAL_FORMAT, "key": "k", "columns": {"en": {"nll": [1.0]}}},
        "steer": {"format": A.STEER_FORMAT, "languages": ["en", "zh"],
                  "operators": {"set:p_max": {"lss": [[None, 0.9375], [0.8125, None]],
                                              "lss_by_target": {"en": 0.8125, "zh": 0.9375}, "lss_mean": 0.875}}},
        "compare": _compare(),
        "task": _task(),
        "task.partial": {"format": A.TASK_PARTIAL_FORMAT, "key": "k", "rows": {"zh|none": _task()["rows"][0]}},
        "tiny": {"format": A.TINY_FORMAT, "languages": {"en": "en.txt", "zh": "zh.txt"},
                 "config": {"steps": 40, "seed": 0, "num_layers": 4}, "train_seconds": 3.5, "loss_first": 5.5,
                 "loss_last_50": 3.25, "loss_curve": [5.5, 4.0, 3.25]},
        "masked_lora": {"format": A.MASK_FORMAT, "languages": ["en"], "mlp_modules": ["gate"], "neurons": None,
                        "targets": {"layers.0.mlp.gate_proj": {"roles": ["gate"], "layer": 0, "kind": "rows",
                                                               "size": 24, "keep": [1, 5, 7]}}, "note": "rows"},
        "finetune.run": {"format": A.FINETUNE_RUN_FORMAT, "version": "0.1.0", "fingerprint": "f" * 16,
                         "complete": True, "task": "sib200",
                         "config": {"model": str(run_dir / "model"), "neuron_langs": "en", "out": ft},
                         "label_names": ["a", "b"], "train_examples": 80, "steps": 20, "seconds": 4.25,
                         "loss_first": 2.0, "loss_last": 0.75, "trainable_parameters": 1234, "masked": True},
        "finetune.eval": {"format": A.FINETUNE_EVAL_FORMAT, "run": ft,
                          "metrics": {"en": {"n": 10, "accuracy": 0.7}, "fr": {"n": 10, "accuracy": 0.55}},
                          "scores": {"en": [1] * 7 + [0] * 3, "fr": [1] * 5 + [0] * 5}},
        "finetune.run_scores": {"format": A.FINETUNE_RUN_SCORES_FORMAT,
                                "run": {"name": "ln-source", "condition": "ln-source", "target": None, "seed": 0,
                                        "langs": ["en"], "random": False, "eval": ["en", "fr"]},
                                "scores": {"en": [1, 1, 0, 1], "fr": [0, 1, 0, 0]},
                                "metrics": {"en": {"n": 4, "accuracy": 0.75}, "fr": {"n": 4, "accuracy": 0.25}},
                                "train_seconds": 1.5, "loss_last": 0.625},
        "finetune.experiment": {"format": A.FINETUNE_EXPERIMENT_FORMAT, "task": "sib200", "source": "en",
                                "languages": ["en", "fr"], "seeds": [0, 1], "conditions": ["attn", "ln-source"],
                                "model": "tiny-demo", "neurons": "neurons/lape.json", "mlp_modules": "gate",
                                "table": {"attn": {"en": _cell(0.6, 0.02), "fr": _cell(0.45, 0.01)},
                                          "ln-source": {"en": _cell(0.65, 0.03, 0.05),
                                                        "fr": _cell(0.4375, 0.02, -0.0125)}},
                                "ln_vs_random": {}, "verdict": {}, "scores": {}},
        "bridge.probe_summary": {"format": A.PROBE_SUMMARY_FORMAT, "model": "tiny-demo", "filter": "all",
                                 "split": "test", "limit": 10,
                                 "pairs": {"de-zh": {"n_candidates": 10, "n_correct": 3,
                                                     "translation_accuracy": 0.3, "n_probes": 6}}},
        "bridge.bli": {"format": A.BLI_FORMAT, "src": "de", "trg": "zh", "n_words": 5, "conditions": bli_conds,
                       "selected": "en", "names": {}, "model": "tiny-demo", "split": "test"},
        "bridge.bli_summary": {"format": A.BLI_SUMMARY_FORMAT, "model": "tiny-demo",
                               "pairs": {"de-zh": {"n_words": 5, "accuracy": {"baseline": 0.4, "en": 0.8},
                                                   "selected": "en", "selected_accuracy": 0.8}}},
        "bridge.mrc": {"format": A.MRC_FORMAT, "src": "zh", "n_items": 8, "model": "tiny-demo",
                       "conditions": {"baseline": {"bridge": None, "accuracy": 0.375, "n_correct": 3, "n": 8},
                                      "en": {"bridge": "en", "accuracy": 0.625, "n_correct": 5, "n": 8}}},
    }


def checkpoint_doc() -> dict:
    return {"format": A.FINETUNE_CHECKPOINT_FORMAT, "fingerprint": "f" * 16, "step": 10,
            "trainable": {"w": torch.zeros(2)}, "optimizer": {}, "losses": [1.0, 0.5]}


def _masks(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {c: torch.rand(MODEL["num_layers"], MODEL["width"], generator=g) < 0.25 for c in LANGS}


def write_run_dir(run_dir: Path) -> dict[str, Path]:
    """A run directory with one artifact of every JSON kind; returns ``{kind: path}``."""
    from langneurons.bridge.probe import ProbeSet
    from langneurons.bridge.spectrum import compute_spectrum, save_spectrum
    from langneurons.cli import main
    from langneurons.intervene import Intervention
    from langneurons.neuronset import NeuronSet

    run_dir.mkdir(parents=True, exist_ok=True)
    where = {"stats": "stats/stats.json", "collect.checkpoint": "unfinished/en.rank0.json",
             "directions": "directions/directions.json",
             "directions.checkpoint": "unfinished/directions.en.rank0.json",
             "heads": "heads/heads.json", "heads.checkpoint": "unfinished/heads.en.rank0.json",
             "headset": "heads/lape.json",
             "ppl": "ppl/ppl.json", "ppl.partial": "unfinished/ppl.json", "steer": "steer/steer.json",
             "compare": "compare/compare.json",
             "task": "eval/xcopa.json", "task.partial": "unfinished/xcopa.json", "tiny": "model/langneurons_train.json",
             "masked_lora": "ft/langneurons_mask.json", "finetune.run": "ft/langneurons_finetune.json",
             "finetune.eval": "ft/eval.json", "finetune.run_scores": "exp/runs/ln-source/seed0/eval_scores.json",
             "finetune.experiment": "exp/results.json", "bridge.probe_summary": "bridge/probe_summary.json",
             "bridge.bli": "bridge/bli-de-zh.json", "bridge.bli_summary": "bridge/bli_summary.json",
             "bridge.mrc": "bridge/mrc-zh.json"}
    paths = {}
    for kind, doc in hand_made(run_dir).items():
        p = run_dir / where[kind]
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(doc, ensure_ascii=False))
        paths[kind] = p
    model = run_dir / "model"           # a model directory: only its training record is read
    (model / "config.json").write_text(json.dumps({"vocab_size": 97, "model_type": "llama"}))
    (model / "tokenizer.json").write_text("{}")

    masks = _masks()
    ns = NeuronSet.from_masks(masks, dict(MODEL), {"name": "top-prob", "params": {"top_rate": 0.25}})
    (run_dir / "neurons").mkdir()
    ns.save(run_dir / "neurons" / "lape.json")
    paths["neuronset"] = run_dir / "neurons" / "lape.json"
    iv = Intervention(neurons=NeuronSet.load(paths["neuronset"]), languages=["zh"], operator="zero")
    (run_dir / "neurons" / "zero-zh.json").write_text(json.dumps(iv.to_dict()))
    paths["intervention"] = run_dir / "neurons" / "zero-zh.json"

    g = torch.Generator().manual_seed(1)
    bridge = run_dir / "bridge"
    ps = ProbeSet(torch.randn(MODEL["num_layers"], MODEL["width"], 12, generator=g),
                  {"src": "de", "trg": "zh", "filter": "all", "site": "act", "n_candidates": 12, "n_correct": 4,
                   "translation_accuracy": 4 / 12}, [{"word": f"w{i}", "prompt": f"p{i}"} for i in range(12)])
    paths["bridge.probes"] = ps.save(bridge)[1]
    assert main(["bridge", "select", "--probes", str(bridge), "--pair", "de-zh", "--neurons",
                 str(paths["neuronset"]), "--candidates", "en,fr", "--layers", "1-3", "--out", str(bridge)]) == 0
    paths["bridge.ranking"] = bridge / "ranking-de-zh.json"
    paths["bridge.selection"] = bridge / "selection.json"

    probs = {c: torch.rand(MODEL["num_layers"], MODEL["width"], generator=g, dtype=torch.float64) for c in LANGS}
    save_spectrum(compute_spectrum(probs, masks), run_dir / "spectrum", plots=False)
    paths["bridge.spectrum"] = run_dir / "spectrum" / "spectrum.json"
    return paths
