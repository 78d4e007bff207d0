"""``langneurons eval``: downstream tasks with and without neuron interventions."""

from __future__ import annotations

from pathlib import Path

HELP = "evaluate a downstream task per language, with and without neuron interventions"

EPILOG = """\
TASK: xnli, xcopa, xwinograd, sib200, xquad, flores, mcq, belebele, include.

--data: a directory in the task's own layout (xnli: xnli_test_LANG.tsv; xcopa: {val,test}.LANG.jsonl;
xquad: xquad.LANG.json; xwinograd: dataset.tsv; flores: FLORES_CODE.devtest; sib200: FLORES_CODE/test.tsv;
mcq: LANG.jsonl), a file (a {lang} placeholder is filled in), or hf:DATASET[:CONFIG[:SPLIT]] (default: the
task's usual HF dataset). --setting none (baseline), self (the task language's neurons), cross (every other
language's neurons), or a comma-separated list; with --neurons the default is none,self.

Writes OUT/TASK.json (per-language rows, all settings) and OUT/TASK.md (tables). Every finished
(language, setting) row is checkpointed in OUT/.partial: after an interruption, rerun the same command
and only the missing rows are evaluated.

examples:
  langneurons eval xcopa --model Qwen/Qwen2.5-7B --languages zh,id,sw --data data/xcopa --out runs/eval
  langneurons eval xnli --model M --languages en,zh --data data/xnli --limit 500 \\
      --neurons runs/lape.json --stats runs/stats --operator set:p_max --setting none,self,cross --out runs/eval
  langneurons eval flores --model M --languages fr,zh --data data/flores200/devtest --shots 1 --option bleu_tokenize=auto \\
      --out runs/eval
"""


def register(sub) -> None:
    import argparse
    p = sub.add_parser("eval", help=HELP, description=HELP, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", metavar="TASK", help="task name (see below)")
    from .options import add_languages, add_model_options, add_operator, add_out
    add_model_options(p, batch_size=8)
    add_languages(p, "language codes [the task's languages]", old=("--langs",))
    p.add_argument("--data", default=None, help="DIR, FILE or hf:DATASET[:CONFIG[:SPLIT]] [the task's HF dataset]")
    p.add_argument("--split", default=None, help="test, validation, devtest ... [the task's default]")
    p.add_argument("--limit", type=int, default=None, help="score only the first N documents per language")
    p.add_argument("--shots", type=int, default=0, help="few-shot demonstrations per prompt [0]")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation tasks: new-token cap [task default]")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="task option, e.g. qa_metric=token (xquad), strip=last (xcopa), bleu_tokenize=13a (flores)")
    p.add_argument("--neurons", type=Path, default=None, help="neuron-set JSON for interventions")
    p.add_argument("--stats", type=Path, default=None, help="activation statistics DIR (operators set:STAT, add:STAT)")
    add_operator(p, None, "zero, set:p_max, set:mean, scale:A, add:STAT[*A], set:CONST ...")
    p.add_argument("--setting", default=None, help="none, self, cross or a comma list [none; none,self with --neurons]")
    p.add_argument("--site", default="act", help="intervention site: act (default), pre, product")
    p.add_argument("--positions", default="all", help="intervened positions: all (default), prompt, generated, last")
    add_out(p, "output directory")
    p.add_argument("--quiet", action="store_true", help="no per-run log lines")
    p.set_defaults(func=run)


def _options(items: list[str]) -> dict:
    from ..errors import UserError
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--option {item!r} is not KEY=VALUE; write e.g. --option qa_metric=token")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def check_outputs(args) -> str:
    """Refuse a bad --out before any model or data is read; return the command's key."""
    from ..outputs import check_dir, command_key
    from ..tasks import get_task
    name = get_task(args.task).name
    key = command_key(args)
    check_dir(args.out, inputs=[("model directory", args.model), ("--data", args.data),
                                ("neuron-set file", args.neurons), ("statistics directory", args.stats)],
              writes=[f"{name}.json", f"{name}.md"], key=key, overwrite=args.overwrite, what="the task results")
    return key


def run(args) -> int:
    from ..tasks.runner import EvalConfig, markdown, parse_settings, run_eval
    from .options import split_languages
    key = check_outputs(args)
    langs = split_languages(args.languages) or None
    cfg = EvalConfig(task=args.task, model=args.model, out=args.out, langs=langs, data=args.data, split=args.split,
                     limit=args.limit, shots=args.shots, batch_size=args.batch_size,
                     max_new_tokens=args.max_new_tokens, options=_options(args.option), neurons=args.neurons,
                     stats=args.stats, operator=args.operator,
                     settings=parse_settings(args.setting, args.neurons is not None), site=args.site,
                     positions=args.positions, device=args.device, dtype=args.dtype, device_map=args.device_map,
                     trust_remote_code=args.trust_remote_code, arch=args.arch, progress=not args.quiet,
                     command_key=key)
    result = run_eval(cfg)
    from ..runtime import dist_info
    if dist_info()[0] == 0:
        print(markdown(result))
    return 0
