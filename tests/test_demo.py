"""`langneurons demo`: every step runs, every artifact lands in OUT, the report has every section,
and a rerun skips finished steps. The cached ``demo_model`` (same corpus, same 400 steps as the
demo's default) stands in for the demo's own training step, which the demo then skips as done."""

from __future__ import annotations

import json
import re
import shutil

from langneurons.cli import main


def test_demo_end_to_end_and_resume(demo_model, tmp_path, capsys):
    out = tmp_path / "demo"
    shutil.copytree(demo_model, out / "model", ignore=shutil.ignore_patterns(".complete"))
    assert main(["demo", "--out", str(out), "--max-tokens", "4096", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "[demo] train: already done" in err
    for rel in ["stats/stats.json", "neurons/lape.json", "neurons/act_prob_pooled.json", "neurons/act_prob_own.json",
                "neurons/top_prob.json", "neurons/random_lape.json", "ppl/ppl.json", "ppl/ppl.png",
                "stats-sentence/stats.json", "steer/steer.json", "steer/steer.png", "report.html"]:
        assert (out / rel).is_file(), rel
    assert any((out / "plots").glob("*.png"))
    html = (out / "report.html").read_text(encoding="utf-8")
    heads = re.findall(r"<h2[^>]*>([^<]*)", html)
    for section in ("Activation statistics", "Neuron sets", "Perplexity under deactivation", "Steering"):
        assert any(h.startswith(section) for h in heads), heads
    assert re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', html) is None   # nothing fetched: offline page
    # every JSON artifact of the run carries a format tag the registry knows, and none is "Other"
    from langneurons.artifacts import kind_of
    model_dir = out / "model"
    for f in out.rglob("*.json"):
        if model_dir in f.parents or any(p.name.startswith(".") for p in f.relative_to(out).parents):
            continue
        assert kind_of(f) is not None, f
    assert "Other files" not in heads
    assert str(out) not in html                       # paths are shown relative to the run directory
    steer = json.loads((out / "steer" / "steer.json").read_text(encoding="utf-8"))
    assert set(steer["settings"]["operators"]) == {"zero", "set:batch-p10", "set:p_max"}
    ppl = json.loads((out / "ppl" / "ppl.json").read_text(encoding="utf-8"))
    assert len(ppl["columns"]) == 10

    # rerun: everything is skipped, the report is rebuilt only when removed
    (out / "report.html").unlink()
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("already done") == 11 and "[demo] report: langneurons report" in err
    assert (out / "report.html").is_file()
