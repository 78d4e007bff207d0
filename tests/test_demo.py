"""`langneurons demo`: every step runs, every artifact lands in OUT, the report has every section,
and a rerun skips finished steps. The cached ``demo_model`` (same corpus, same 400 steps as the
demo's default) stands in for the demo's own training step, which the demo then skips as done."""

from __future__ import annotations

import json
import re
import shutil

import pytest

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
    assert ppl["random_control"]["seeds"] == [0, 1, 2] and ppl["headline"]["own_above_random"]["of"] == 10
    # the demo ends with the report's results paragraph, intervals included
    assert "[demo] Deactivating a language's neurons" in err and "(95% CI" in err
    assert "[demo] Steering toward each target language" in err and "unsteered" in err

    # tiny-train's held-out perplexity is the ppl command's baseline row on the same windows
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from langneurons.tiny import evaluate_heldout
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    h = evaluate_heldout(model, tok, out / "model" / "heldout", ppl["columns"], prompts_per_language=2, samples=1)
    for c, v in zip(ppl["columns"], ppl["ppl"][ppl["rows"].index("baseline")]):
        assert h["ppl"][c] == pytest.approx(v, rel=1e-3), c
        assert h["windows"][c] == ppl["windows"][c]

    # rerun: everything is skipped, the report is rebuilt only when removed
    (out / "report.html").unlink()
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("already done") == 11 and "[demo] report: langneurons report" in err
    assert (out / "report.html").is_file()


def test_tiny_train_reports_heldout_quality(tmp_path, capsys):
    """tiny-train ends with a held-out evaluation (perplexity per language, language-ID share of
    continuations of held-out prefixes), each number inside its 95% interval, printed and recorded."""
    from langneurons.demo import corpus_dir
    langs = ["en", "ru", "zh"]
    out = tmp_path / "m"
    argv = ["tiny-train", *[a for c in langs for a in ("--lang", f"{c}={corpus_dir() / (c + '.txt')}")],
            "--out", str(out), "--steps", "3", "--vocab-size", "400", "--hidden-size", "32",
            "--intermediate-size", "64", "--layers", "1", "--context", "32", "--quiet"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "held-out perplexity (95% CI over windows): en " in err
    assert "language-ID share of continuations of held-out prefixes (95% CI): en " in err
    h = json.loads((out / "langneurons_train.json").read_text(encoding="utf-8"))["heldout"]
    assert sorted(h["ppl"]) == langs == sorted(h["lid_share"])
    for c in langs:
        lo, hi = h["ppl_ci95"][c]
        assert lo <= h["ppl"][c] <= hi and h["windows"][c] >= 1
        lo, hi = h["lid_share_ci95"][c]
        assert 0.0 <= lo <= h["lid_share"][c] <= hi <= 1.0
        assert h["generations"][c] == 2 * min(16, len((out / "heldout" / f"{c}.txt").read_text().splitlines()))
        assert h["examples"][c] and all(e["prompt"] for e in h["examples"][c])
    lo, hi = h["lid_share_mean_ci95"]
    assert lo <= h["lid_share_mean"] <= hi
