"""benchmarks/gpu.py --tiny: every section measures positive throughput and finite, positive ratios."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from conftest import REPO


def _numbers(d, key_test, prefix=""):
    """(path, value) of every entry of the nested dict ``d`` whose key passes ``key_test``."""
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _numbers(v, key_test, path + ".")
        elif key_test(k):
            yield path, v


def test_gpu_benchmark_tiny(tmp_path):
    out = tmp_path / "tiny.json"
    src = str(REPO / "src")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--tiny", "--threads", "1",
                        "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["config"]["device"] == "cpu" and res["config"]["dtype"] == "float32"

    # 1. bare forward at every batch size; the best one is among them
    fwd = res["forward"]
    assert [int(b) for b in fwd["by_batch"]] == [2, 4]
    assert str(fwd["best_batch"]) in fwd["by_batch"]
    # 2. collect: the bare forward and both variants, ratios against the bare forward
    var = res["collect"]["variants"]
    assert {"bare forward", "counts+moments", "sketch, every token", "sampled sketch"} <= set(var)
    assert var["bare forward"]["ratio"] == 1.0
    # 3. generation, plain and intervened
    gen = res["generation"]
    assert {"plain", "intervened", "ratio", "ratio_median"} <= set(gen) and gen["neurons"] >= 2
    # 4. projection
    assert res["projection"]["tokens"] == 1e8
    assert math.isclose(res["projection"]["hours"], 1e8 / var["sampled sketch"]["tokens_per_s"] / 3600)

    rates = list(_numbers(res, lambda k: k.startswith("tokens_per_s")))
    for section in ("forward.", "collect.", "generation.", "projection."):
        assert any(p.startswith(section) for p, _ in rates), section
    for path, v in rates:
        assert isinstance(v, float) and math.isfinite(v) and v > 0, (path, v)
    ratios = list(_numbers(res, lambda k: k.startswith("ratio")))
    assert len(ratios) == 2 * (len(var) + 1)
    for path, v in ratios:
        assert math.isfinite(v) and v > 0, (path, v)
    for path, v in _numbers(res["projection"], lambda k: k.startswith("hours")):
        assert math.isfinite(v) and v > 0, (path, v)
