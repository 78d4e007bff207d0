"""``langneurons finetune``: task fine-tuning with attention LoRA plus neuron-masked MLP LoRA.

Subcommands: ``train`` (fine-tune; resumable), ``eval`` (evaluate a finished run, optionally under a
test-time intervention), ``experiment`` (train on one language, evaluate zero-shot on the others,
compare attention-only, language-neuron and matched random-neuron LoRA over seeds).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..artifacts import FINETUNE_EVAL_FORMAT
from ..errors import UserError

HELP = "fine-tune on a task with attention LoRA + neuron-masked MLP LoRA; evaluate zero-shot across languages"

TRAIN_EPILOG = """\
tasks and data:
  sib200  SIB-200 topic classification: TSV index_id, category, text (labels.txt beside it)
  nli     XNLI/MNLI pairs: TSV premise, hypothesis (or hypo), label (0/1/2 or names)
  qa      SQuAD-format JSON (SQuAD, XQuAD): prompt "Context: ...\\nQuestion: ...\\nAnswer:"

OUT receives a standard PEFT adapter (adapter_config.json, adapter_model.safetensors; it loads with
PeftModel.from_pretrained), langneurons_mask.json (the neuron set and modules the MLP LoRA was masked
to), classifier_head.safetensors (classification tasks) and langneurons_finetune.json. Rerun the
same command after an interruption to resume from OUT/checkpoint.pt.

presets ([M25]): m25-xnli  r 8, alpha 16, lr 1e-5, 1 epoch on 25% of the data, batch 8, q,k,v,o
                 m25-xquad r 64, alpha 128, lr 5e-5, 10 epochs on the first 80%, batch 8, q,k,v
both with AdamW betas (0.95, 0.999), weight decay 0.1, 1% warm-up then linear decay, grad clip 10
(the defaults). Options given explicitly override the preset.

examples:
  langneurons finetune train --model M --task nli --train mnli.tsv --preset m25-xnli --out runs/xnli-attn
  langneurons finetune train --model M --task nli --train mnli.tsv --preset m25-xnli --out runs/xnli-hi \\
      --neurons lape.json --languages hi --mlp-modules gate --eval hi=xnli_test_hi.tsv
"""

EXPERIMENT_EPILOG = """\
conditions: attn, ln-source, ln-target, ln-both, rand-source, rand-target, rand-both (default: all),
plus attn+OP for each --operator OP (the attn model with a test-time intervention on the target
language's neurons, values from --stats). Writes OUT/results.json, OUT/table.md, OUT/plot.png; runs are
kept under OUT/runs and a rerun skips finished ones.

example:
  langneurons finetune experiment --model M --task sib200 --train sib200/eng_Latn/train.tsv \\
      --eval en=sib200/eng_Latn/test.tsv --eval fr=sib200/fra_Latn/test.tsv --neurons lape.json \\
      --seeds 0,1,2 --out runs/xling --lr 2e-3 --max-steps 100
"""


def _add_common_training(p, with_task: bool = True) -> None:
    p.add_argument("--model", required=True, help="HF model id or local directory")
    if with_task:
        p.add_argument("--task", required=True, choices=("sib200", "nli", "qa"), help="task (see below)")
    p.add_argument("--train", required=True, help="training data file")
    g = p.add_argument_group("LoRA")
    g.add_argument("--preset", default=None, help="m25-xnli | m25-xquad ([M25] hyper-parameters)")
    g.add_argument("--lora-r", dest="r", type=int, default=None, help="LoRA rank [8]")
    g.add_argument("--lora-alpha", dest="alpha", type=float, default=None, help="LoRA alpha [16]")
    g.add_argument("--lora-dropout", dest="dropout", type=float, default=None, help="LoRA dropout [0]")
    g.add_argument("--use-rslora", action="store_true", default=None, help="scale alpha/sqrt(r) (rank-stabilised)")
    g.add_argument("--use-dora", action="store_true", default=None, help="DoRA (refused with --neurons)")
    g.add_argument("--init-lora-weights", default=None,
                   help="PEFT init_lora_weights: true (default) or gaussian; others are refused with --neurons")
    g.add_argument("--bias", default=None, choices=("none", "all", "lora_only"), help="PEFT bias [none]")
    g.add_argument("--lora-bias", action="store_true", default=None, help="PEFT lora_bias (refused with --neurons)")
    g.add_argument("--attn-modules", default=None, help="attention projections: subset of q,k,v,o or none [q,k,v,o]")
    g.add_argument("--attn-targets", default=None, help="explicit PEFT target module names instead of --attn-modules")
    g.add_argument("--mlp-modules", default=None, help="MLP modules of the masked LoRA: subset of gate,up,down [gate]")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=None, help="learning rate [1e-4]")
    g.add_argument("--head-lr", type=float, default=None, help="learning rate of the classification head [--lr]")
    g.add_argument("--epochs", type=float, default=None, help="epochs (may be fractional) [1]")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--data-fraction", type=float, default=None, help="fraction of the training data [1]")
    g.add_argument("--data-select", default=None, choices=("random", "first"), help="how to take the fraction [random]")
    g.add_argument("--batch-size", type=int, default=None, help="effective batch (examples per step) [8]")
    g.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step [1]")
    g.add_argument("--max-length", type=int, default=None, help="tokens per example [256]")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay [0.1]")
    g.add_argument("--warmup-ratio", type=float, default=None, help="warm-up fraction of the steps [0.01]")
    g.add_argument("--grad-clip", type=float, default=None, help="gradient norm clip [10]")
    g.add_argument("--pooling", default=None, help="classification pooling: last-token (default), "
                                                   "last-position (alias m25: [M25]'s pad position), mean")
    g.add_argument("--qa-loss", default=None, help="qa: answer (loss on answer tokens, default) or full (alias m25)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto [auto]")
    g.add_argument("--dtype", default=None, help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    g.add_argument("--arch", default=None, metavar="SPEC",
                   help="module paths for a layout the adapter table does not know (as for collect) "
                        "[read back from --neurons when collect was given one]")
    g.add_argument("--threads", type=int, default=None, help="CPU threads")
    g.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints [200]")
    g.add_argument("--eval-batch-size", type=int, default=None, help="evaluation batch [16]")
    g.add_argument("--eval-max-examples", type=int, default=None, help="cap per evaluation set")
    g.add_argument("--max-new-tokens", type=int, default=None, help="qa: answer tokens generated [32]")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


_TRAIN_KEYS = ("r", "alpha", "dropout", "use_rslora", "use_dora", "init_lora_weights", "bias", "lora_bias",
               "attn_modules", "attn_targets", "mlp_modules", "lr", "head_lr", "epochs", "max_steps", "data_fraction",
               "data_select", "batch_size", "grad_accum", "max_length", "weight_decay", "warmup_ratio", "grad_clip",
               "pooling", "qa_loss", "device", "dtype", "arch", "threads", "checkpoint_every", "eval_batch_size",
               "eval_max_examples", "max_new_tokens")


def _lang_paths(items, option: str) -> list[tuple[str, str]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise UserError(f"{option} {item!r} is not LANG=PATH; write e.g. {option} fr=test.fr.tsv")
        code, path = item.split("=", 1)
        code, path = code.strip(), path.strip()
        if not code or not path:
            raise UserError(f"{option} {item!r} is not LANG=PATH")
        if not Path(path).is_file():
            raise UserError(f"{option} {code}: file {path} does not exist")
        out.append((code, path))
    codes = [c for c, _ in out]
    if len(set(codes)) != len(codes):
        raise UserError(f"{option} names a language twice: {codes}")
    return out


def register(sub) -> None:
    from .options import add_languages, add_operator, add_overwrite
    p = sub.add_parser("finetune", help=HELP, description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_subparsers(dest="finetune_cmd", metavar="{train,eval,experiment}", parser_class=type(p))
    s.required = True

    t = s.add_parser("train", help="fine-tune a model on a task (resumable)", epilog=TRAIN_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common_training(t)
    t.add_argument("--out", required=True, type=Path, help="output directory")
    t.add_argument("--neurons", default=None, help="neuron-set JSON: adds an MLP LoRA masked to these neurons")
    add_languages(t, "languages of --neurons whose neurons may change", old=("--neuron-langs",))
    t.add_argument("--eval", action="append", default=[], metavar="LANG=PATH",
                   help="evaluate on this file after training (repeatable)")
    t.add_argument("--seed", type=int, default=None, help="seed of init, data order and subset [0]")
    t.set_defaults(func=run_train)

    e = s.add_parser("eval", help="evaluate a finished run on task files, optionally under an intervention",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--run", required=True, type=Path, help="output directory of 'finetune train'")
    e.add_argument("--data", action="append", required=True, metavar="LANG=PATH", help="evaluation file (repeatable)")
    e.add_argument("--out", type=Path, default=None, help="write the metrics JSON here [stdout]")
    add_overwrite(e, "replace an existing --out file (refused without it)")
    add_operator(e, None, "test-time intervention operator (e.g. zero, set:mean, set:p90) on the evaluated "
                          "language's neurons of --neurons, values from --stats", old=("--intervene",))
    e.add_argument("--neurons", default=None, help="neuron set for --operator")
    e.add_argument("--stats", default=None, help="activation statistics for --operator")
    e.add_argument("--device", default="auto")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-examples", type=int, default=None)
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--max-length", type=int, default=None, help="tokens per example [the run's --max-length]")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=run_eval)

    x = s.add_parser("experiment", help="train on one language, evaluate zero-shot on the others, over seeds",
                     epilog=EXPERIMENT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common_training(x)
    x.add_argument("--eval", action="append", required=True, metavar="LANG=PATH",
                   help="test file per language, LANG as in the neuron set (repeatable; include the source)")
    x.add_argument("--neurons", required=True, help="neuron-set JSON (e.g. from 'langneurons identify lape')")
    x.add_argument("--source", default="en", help="training language [en]")
    x.add_argument("--seeds", default="0,1,2", help="comma-separated seeds [0,1,2]")
    x.add_argument("--conditions", default=None, help="subset of attn,ln-source,ln-target,ln-both,rand-source,"
                                                      "rand-target,rand-both [all]")
    add_operator(x, None, "test-time operators on the attn model, e.g. set:mean,zero", old=("--interventions",))
    x.add_argument("--stats", default=None, help="activation statistics for --operator")
    x.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples [2000]")
    x.add_argument("--eval-max-length", type=int, default=None, help="tokens per test example [--max-length]")
    x.add_argument("--workers", type=int, default=1,
                   help="training processes side by side, each with --threads torch threads (default 1) [1]")
    x.add_argument("--out", required=True, type=Path, help="output directory")
    x.set_defaults(func=run_experiment)


def _explicit(args) -> dict:
    return {k: getattr(args, k, None) for k in _TRAIN_KEYS}


def _check_run_dir(args, data=()) -> None:
    """Refuse a bad --out of train/experiment before any model or data is read (a rerun of the same
    command resumes in OUT; a run of other settings there is refused once the model is loaded)."""
    from ..outputs import check_dir
    inputs = [("model directory", args.model), ("training data", args.train),
              ("neuron-set file", getattr(args, "neurons", None)), ("statistics", getattr(args, "stats", None))]
    for item in data:
        if "=" in str(item):
            code, path = str(item).split("=", 1)
            inputs.append((f"evaluation file of {code.strip()}", path.strip()))
    check_dir(args.out, inputs=inputs, what="the fine-tuning run")


def run_train(args) -> int:
    from ..finetune.train import FinetuneConfig, evaluate_sets, summary, train
    from ..atomic import atomic_write_text
    _check_run_dir(args, args.eval)
    evals = _lang_paths(args.eval, "--eval")
    cfg = FinetuneConfig.build(preset=args.preset, model=args.model, task=args.task, train=args.train, out=args.out,
                               neurons=args.neurons, neuron_langs=args.languages, seed=args.seed, eval=evals,
                               progress=not args.quiet, **_explicit(args))
    if not Path(cfg.train).is_file():
        raise UserError(f"--train {cfg.train} does not exist; give the training data file")
    tm = train(cfg)
    rec = tm.record
    print(f"trained {rec['steps']} steps in {rec['seconds']} s: loss {rec['loss_first']} -> {rec['loss_last']:.4f}",
          file=sys.stderr)
    if evals:
        res = evaluate_sets(tm, evals, batch_size=cfg.eval_batch_size, max_examples=cfg.eval_max_examples,
                            max_new_tokens=cfg.max_new_tokens, progress=cfg.progress)
        doc = {"format": FINETUNE_EVAL_FORMAT,
               "run": str(cfg.out), "metrics": summary(res), "scores": {c: r["correct"] for c, r in res.items()}}
        atomic_write_text(Path(cfg.out) / "eval.json", json.dumps(doc, indent=1))
        for lang, m in summary(res).items():
            key = "accuracy" if "accuracy" in m else "f1"
            print(f"{lang}\t{key}\t{m[key]:.4f}", file=sys.stderr)
    print(str(cfg.out))
    return 0


def run_eval(args) -> int:
    from ..finetune.train import evaluate_sets, load_finetuned, summary
    from ..atomic import atomic_write_text
    if args.out is not None:
        from ..outputs import check_file
        inputs = [("run directory", args.run), ("neuron-set file", args.neurons), ("statistics", args.stats)]
        inputs += [(f"evaluation file of {i.split('=', 1)[0].strip()}", i.split("=", 1)[1].strip())
                   for i in args.data if "=" in i]
        check_file(args.out, inputs=inputs, overwrite=args.overwrite, what="the metrics", shared=[args.run])
        _check_not_run_file(args.out, args.run)
    sets = _lang_paths(args.data, "--data")
    tm = load_finetuned(args.run, device=args.device, progress=not args.quiet)
    context_for = None
    if args.operator:
        if not args.neurons or not args.stats:
            raise UserError("--operator needs --neurons FILE and --stats DIR")
        from ..intervene import Intervention
        from ..neuronset import NeuronSet
        from ..stats import ActivationStats
        ns = NeuronSet.load(args.neurons)
        stats = ActivationStats.load(args.stats)

        def intervention_for(lang):
            iv = Intervention(neurons=ns, languages=[lang], operator=args.operator, stats=stats, site=ns.site)
            return tm.intervention(iv)
        context_for = intervention_for
    res = evaluate_sets(tm, sets, batch_size=args.batch_size, max_examples=args.max_examples,
                        max_new_tokens=args.max_new_tokens, context_for=context_for, progress=not args.quiet,
                        max_length=args.max_length)
    doc = {"format": FINETUNE_EVAL_FORMAT,
           "run": str(args.run), "intervention": args.operator, "metrics": summary(res),
           "scores": {c: r["correct"] for c, r in res.items()}}
    text = json.dumps(doc, indent=1)
    if args.out:
        atomic_write_text(args.out, text)
    for lang, m in summary(res).items():
        key = "accuracy" if "accuracy" in m else "f1"
        print(f"{lang}\t{key}\t{m[key]:.4f}", file=sys.stderr)
    if not args.out:
        print(text)
    return 0


def _check_not_run_file(out: Path, run: Path) -> None:
    """Inside the run directory --out may be a new file or an earlier evaluation, never a file of the run."""
    from ..outputs import inside
    if not Path(out).exists() or not inside(out, run):
        return
    try:
        fmt = json.loads(Path(out).read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt != FINETUNE_EVAL_FORMAT:
        raise UserError(f"--out {out} is a file of the run directory {run} that evaluation reads; "
                        "write the metrics to a new file")


def run_experiment(args) -> int:
    from ..finetune.experiment import CONDITIONS, ExperimentConfig, run_experiment as run_exp
    _check_run_dir(args, args.eval)
    evals = dict(_lang_paths(args.eval, "--eval"))
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r} must be comma-separated integers, e.g. 0,1,2") from None
    conditions = [c.strip() for c in args.conditions.split(",")] if args.conditions else list(CONDITIONS)
    ops = [o.strip() for o in args.operator.split(",") if o.strip()] if args.operator else []
    opts = {k: v for k, v in _explicit(args).items() if v is not None and k not in ("mlp_modules", "eval_batch_size",
                                                                                    "eval_max_examples")}
    if args.preset:
        from ..finetune.train import PRESETS
        if args.preset not in PRESETS:
            raise UserError(f"unknown --preset {args.preset!r}; use one of {', '.join(PRESETS)}")
        opts = {**{k: v for k, v in PRESETS[args.preset].items() if k != "mlp_modules"}, **opts}
    cfg = ExperimentConfig(model=args.model, train=args.train, eval=evals, neurons=args.neurons, out=args.out,
                           task=args.task, source=args.source, seeds=seeds, conditions=conditions, interventions=ops,
                           stats=args.stats, mlp_modules=args.mlp_modules or "gate", bootstrap=args.bootstrap,
                           eval_max_examples=args.eval_max_examples, eval_batch_size=args.eval_batch_size or 64,
                           eval_max_length=args.eval_max_length,
                           progress=not args.quiet, train_options=opts)
    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    res = run_exp(cfg, workers=args.workers, threads_per_worker=args.threads or 1)
    print((Path(args.out) / "table.md").read_text(encoding="utf-8"))
    print(f"{res['seconds']} s", file=sys.stderr)
    return 0
