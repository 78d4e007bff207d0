"""Numbers every model-running command produces on the demo fixtures, pinned to 1e-6.

The values in ``runtime_regression.json`` were recorded before the commands were moved onto the
one runtime (:mod:`langneurons.runtime`); the commands must still produce them. Regenerate (only
on purpose, with the reason in the commit message) with::

    python tests/test_runtime_regression.py tests/runtime_regression.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from langneurons.cli import main

HERE = Path(__file__).resolve().parent
EXPECTED = HERE / "runtime_regression.json"
TASKS = {"xcopa": ("xcopa", ["zh"]), "xnli": ("xnli", ["en", "zh"]), "xwinograd": ("xwinograd", ["en", "zh"]),
         "xquad": ("xquad", ["en", "zh"]), "flores": ("flores200/devtest", ["fr", "zh"])}


def _flat(value, path=""):
    """``[(path, leaf)]`` of a JSON value, numbers as floats."""
    if isinstance(value, dict):
        return [x for k in sorted(value) for x in _flat(value[k], f"{path}.{k}")]
    if isinstance(value, list):
        return [x for i, v in enumerate(value) for x in _flat(v, f"{path}[{i}]")]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(path, float(value))]
    return [(path, value)]


def measure(model: Path, stats: Path, shared: Path, tmp: Path) -> dict:
    from langneurons.identify import select
    from langneurons.stats import ActivationStats
    from langneurons.steer import ClozeItem, save_cloze_jsonl
    ns = select("lape", ActivationStats.load(stats), top_rate=0.03)
    ns.save(tmp / "ns.json")
    common = ["--model", str(model), "--device", "cpu"]
    out: dict = {}

    args = ["ppl", *common, "--neurons", str(tmp / "ns.json"), "--out", str(tmp / "ppl"), "--window", "32",
            "--max-tokens", "256", "--batch-size", "16", "--no-cache", "--quiet", "--random-seeds", "0",
            "--rows", "en,fr,zh"]
    for c in ("en", "fr", "zh"):
        args += ["--lang", f"{c}={model / 'heldout' / (c + '.txt')}"]
    assert main(args) == 0
    rec = json.loads((tmp / "ppl" / "ppl.json").read_text())
    out["ppl.mean_nll"] = rec["mean_nll"]

    items = [ClozeItem(str(i), {"en": f"one, two, {a},", "fr": f"un, deux, {b},", "zh": f"一、二、{c}、"},
                       {"en": "four", "fr": "quatre", "zh": "四"}, {"zh": ""})
             for i, (a, b, c) in enumerate([("three", "trois", "三"), ("five", "cinq", "五"), ("six", "six", "六")])]
    save_cloze_jsonl(items, tmp / "c.jsonl")
    assert main(["steer", *common, "--neurons", str(tmp / "ns.json"), "--stats", str(stats), "--cloze",
                 str(tmp / "c.jsonl"), "--languages", "en,fr,zh", "--operator", "scale:4,zero", "--generation",
                 "--samples", "2", "--max-new-tokens", "6", "--out", str(tmp / "steer"), "--quiet"]) == 0
    rec = json.loads((tmp / "steer" / "steer.json").read_text())
    for op, r in rec["operators"].items():
        out[f"steer.{op}.lss"] = r["lss"]
        out[f"steer.{op}.mean_shift"] = r["mean_shift"]
        out[f"steer.{op}.share"] = r["generation"]["share"]
        out[f"steer.{op}.baseline_share"] = r["generation"]["baseline_share"]

    for task, (sub, langs) in TASKS.items():
        d = tmp / f"eval-{task}"
        assert main(["eval", task, *common, "--languages", ",".join(langs), "--data", str(shared / sub), "--limit", "6",
                     "--batch-size", "4", "--out", str(d), "--quiet", "--neurons", str(tmp / "ns.json"),
                     "--operator", "zero", "--setting", "none,self"]) == 0
        rec = json.loads((d / f"{task}.json").read_text())
        out[f"eval.{task}"] = [{"lang": r["lang"], "setting": r["setting"], "n": r["n"], "metrics": r["metrics"],
                                "predictions": [x["prediction"] for x in r.get("samples", [])]} for r in rec["rows"]]

    d = tmp / "bridge"
    assert main(["bridge", "probe", *common, "--muse-dir", str(shared / "muse"), "--pair", "de-zh", "--limit", "6",
                 "--filter", "all", "--batch-size", "4", "--out", str(d)]) == 0
    from langneurons.bridge.probe import ProbeSet
    ps = ProbeSet.load(d, "de", "zh")
    out["bridge.probe.mean_by_layer"] = ps.acts.double().mean(dim=(1, 2)).tolist()
    out["bridge.probe.abs_sum"] = float(ps.acts.double().abs().sum())
    out["bridge.probe.first_probe_mean"] = float(ps.acts[..., 0].double().mean())
    return out


@pytest.fixture(scope="module")
def measured(demo_model, demo_stats, shared_data, tmp_path_factory):
    return measure(demo_model, demo_stats, shared_data, tmp_path_factory.mktemp("regression"))


@pytest.mark.parametrize("key", sorted(json.loads(EXPECTED.read_text())) if EXPECTED.is_file() else [])
def test_numbers_equal_the_recorded_ones(measured, key):
    expected = json.loads(EXPECTED.read_text())[key]
    assert key in measured
    got, want = _flat(measured[key]), _flat(expected)
    assert [p for p, _ in got] == [p for p, _ in want]
    # LSS mean shifts are means of differences of float32 log-likelihood sums (about -20 each): the one
    # log-likelihood pass adds a batch's token log-probabilities in another order than steer's old copy
    # did, which moves them by float32 rounding (measured 2.2e-6 at most); every other number is equal.
    tol = 1e-5 if key.endswith(".mean_shift") else 1e-6
    for (path, g), (_, w) in zip(got, want):
        assert g == (pytest.approx(w, abs=tol, rel=1e-6) if isinstance(w, float) else w), path


if __name__ == "__main__":  # record the values (see the module docstring)
    import tempfile
    import torch
    sys.path.insert(0, str(HERE))
    import conftest
    torch.set_num_threads(1)
    model = conftest._train({p.stem: [p] for p in sorted(conftest.DEMO_CORPUS.glob("*.txt"))}, "demo", steps=400)
    stats = conftest._collect(model, {p.stem: [p] for p in sorted(conftest.DEMO_CORPUS.glob("*.txt"))}, "demo-stats")
    with tempfile.TemporaryDirectory() as tmp:
        values = measure(model, stats, conftest.SHARED_DATA, Path(tmp))
    Path(sys.argv[1]).write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
