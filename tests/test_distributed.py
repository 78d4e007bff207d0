"""Data parallel through the runtime: ``torchrun --nproc_per_node 2`` (gloo, CPU) of ``ppl``, ``eval``
and ``steer`` writes what one process writes (counts and greedy outputs exactly, float sums to 1e-9)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from langneurons.cli import main

REPO = Path(__file__).resolve().parents[1]


#: Runs several commands in one torchrun launch (the process group is joined once and reused), so the
#: test pays for one start-up of two interpreters instead of one per command.
WORKER = """
import json, sys
from langneurons.cli import main
for args in json.loads(sys.argv[1]):
    rc = main(args)
    if rc:
        sys.exit(rc)
"""


def _torchrun(commands: list[list[str]], tmp: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    worker = tmp / "dist_worker.py"
    worker.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), json.dumps(commands)]
    r = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def _close(a, b, path=""):
    """Equal structure; floats within 1e-9, everything else equal."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, abs=1e-9, rel=1e-9), path
    else:
        assert a == b, path


@pytest.fixture(scope="module")
def setup(demo_model, demo_stats, tmp_path_factory):
    from langneurons.identify import select
    from langneurons.stats import ActivationStats
    from langneurons.steer import ClozeItem, save_cloze_jsonl
    tmp = tmp_path_factory.mktemp("dist")
    select("lape", ActivationStats.load(demo_stats), top_rate=0.03).save(tmp / "ns.json")
    items = [ClozeItem(str(i), {"en": f"one, two, {a},", "fr": f"un, deux, {b},", "zh": f"一、二、{c}、"},
                       {"en": "four", "fr": "quatre", "zh": "四"}, {"zh": ""})
             for i, (a, b, c) in enumerate([("three", "trois", "三"), ("five", "cinq", "五"), ("six", "six", "六")])]
    save_cloze_jsonl(items, tmp / "c.jsonl")
    return tmp


def _strip_times(doc):
    if isinstance(doc, dict):
        return {k: _strip_times(v) for k, v in doc.items() if k not in ("seconds", "tokens_per_second")}
    if isinstance(doc, list):
        return [_strip_times(v) for v in doc]
    return doc


def test_ppl_steer_eval_under_torchrun_equal_one_process(setup, demo_model, demo_stats, tmp_path):
    tmp = setup
    common = ["--model", str(demo_model), "--device", "cpu"]
    ppl = ["ppl", *common, "--neurons", str(tmp / "ns.json"), "--window", "32", "--max-tokens", "256",
           "--batch-size", "5", "--no-cache", "--quiet", "--random-seeds", "0", "--rows", "en,zh",
           "--lang", f"en={demo_model / 'heldout' / 'en.txt'}", "--lang", f"zh={demo_model / 'heldout' / 'zh.txt'}"]
    steer = ["steer", *common, "--neurons", str(tmp / "ns.json"), "--stats", str(demo_stats), "--cloze",
             str(tmp / "c.jsonl"), "--languages", "en,fr,zh", "--operator", "scale:4", "--generation",
             "--samples", "2", "--max-new-tokens", "5", "--batch-size", "3", "--quiet"]
    ev = ["eval", "xcopa", *common, "--languages", "zh", "--data", str(tmp / "xcopa"), "--batch-size", "2",
          "--quiet", "--neurons", str(tmp / "ns.json"), "--operator", "zero", "--setting", "none,self"]
    (tmp / "xcopa").mkdir(exist_ok=True)
    rec = lambda p, c1, c2, q, l: json.dumps({"premise": p, "choice1": c1, "choice2": c2, "question": q,
                                             "label": l}, ensure_ascii=False) + "\n"
    (tmp / "xcopa" / "test.zh.jsonl").write_text(
        rec("男人打开了水龙头。", "马桶满了。", "水流了出来。", "effect", 1)
        + rec("女孩在麦片中发现了虫子。", "她倒了牛奶。", "她没了胃口。", "effect", 1)
        + rec("我想节约能源。", "我扫了地。", "我关了灯。", "cause", 0), encoding="utf-8")
    runs = (("ppl", ppl, "ppl.json"), ("steer", steer, "steer.json"), ("eval", ev, "xcopa.json"))
    _torchrun([[*args, "--out", str(tmp_path / f"{name}-2")] for name, args, _ in runs], tmp_path)
    for name, args, out_file in runs:
        one, two = tmp_path / f"{name}-1", tmp_path / f"{name}-2"
        assert main([*args, "--out", str(one)]) == 0
        a = json.loads((one / out_file).read_text(encoding="utf-8"))
        b = json.loads((two / out_file).read_text(encoding="utf-8"))
        a, b = _strip_times(a), _strip_times(b)
        if name == "eval":       # the output directory is part of nothing else; the neuron path is the same
            a.pop("seconds", None), b.pop("seconds", None)
        _close(a, b, name)
