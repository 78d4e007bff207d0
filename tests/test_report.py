"""The HTML report: self-contained (inline CSS, base64 images, no scripts or network) and complete."""

from __future__ import annotations

import base64
import json
import re

import pytest
import torch

from langneurons.cli import main
from langneurons.report import render_report




def _task_result():
    rows = [{"lang": "zh", "setting": "none", "neurons_lang": None, "n": 40, "metrics": {"acc": 0.575, "acc_norm": 0.5}},
            {"lang": "zh", "setting": "self", "neurons_lang": "zh", "n": 40, "metrics": {"acc": 0.425, "acc_norm": 0.45}},
            {"lang": "it", "setting": "none", "neurons_lang": None, "n": 40, "metrics": {"acc": 0.6125, "acc_norm": 0.6}},
            {"lang": "it", "setting": "self", "neurons_lang": "it", "n": 40, "metrics": {"acc": 0.55, "acc_norm": 0.5}}]
    return {"format": "langneurons.task.v1", "task": "xcopa", "description": "XCOPA accuracy",
            "model": {"name_or_path": "tiny-demo"}, "split": "test", "limit": 40, "shots": 0,
            "metrics": ["acc", "acc_norm"], "fraction_metrics": ["acc", "acc_norm"], "languages": ["zh", "it"],
            "intervention": {"operator": "zero", "site": "act", "positions": "all", "neurons": "lape.json"},
            "rows": rows}


@pytest.fixture()
def run_dir(tmp_path):
    from langneurons.neuronset import NeuronSet
    from langneurons.plots import plot_heatmap
    d = tmp_path / "run"
    (d / "neurons").mkdir(parents=True)
    (d / "stats.json").write_text(json.dumps({
        "format": "langneurons.stats.v1", "model": {"name_or_path": "tiny-demo", "model_type": "llama",
                                                   "num_layers": 4, "width": 384, "site": "act"},
        "unit": "window", "window": 64, "dtype": "float32",
        "languages": {"en": {"n_tokens": 7104, "n_windows": 111, "source": "en.txt"},
                      "zh": {"n_tokens": 6528, "n_windows": 102, "source": "zh.txt"}}}))
    masks = {"en": torch.zeros(4, 384, dtype=torch.bool), "zh": torch.zeros(4, 384, dtype=torch.bool)}
    masks["en"][0, :3] = True
    masks["en"][3, :5] = True
    masks["zh"][2, 10:17] = True
    NeuronSet.from_masks(masks, {"num_layers": 4, "width": 384, "site": "act", "name_or_path": "tiny-demo"},
                         {"name": "lape", "params": {"top_rate": 0.01}}).save(d / "neurons" / "lape.json")
    ppl = {"format": "langneurons.ppl.v1", "rows": ["baseline", "en", "zh"], "columns": ["en", "zh"],
           "languages": {"rows": ["en", "zh"], "columns": ["en", "zh"]},
           "ppl": [[12.3456, 20.5], [30.25, 21.0], [13.0, 45.75]],
           "delta_ppl": [[0.0, 0.0], [17.9044, 0.5], [0.6544, 25.25]],
           "settings": {"operator": "zero", "neurons": "neurons/lape.json", "neuron_method": "lape", "site": "act",
                        "window": 64}}
    (d / "ppl.json").write_text(json.dumps(ppl))
    plot_heatmap(ppl["delta_ppl"], ppl["rows"], ppl["columns"], d / "ppl.png")
    (d / "steer.json").write_text(json.dumps({
        "format": "langneurons.steer.v1", "languages": ["en", "zh"],
        "operators": {"set:p_max": {"lss": [[None, 0.9375], [0.8125, None]],
                                    "lss_by_target": {"en": 0.8125, "zh": 0.9375}, "lss_mean": 0.875}},
        "best": {"en": {"operator": "set:p_max", "value": 0.8125}, "zh": {"operator": "set:p_max", "value": 0.9375}}}))
    (d / "eval").mkdir()
    (d / "eval" / "xcopa.json").write_text(json.dumps(_task_result()))
    plot_heatmap([[1.0, 2.0]], ["a"], ["x", "y"], d / "eval" / "extra.png")
    (d / "broken.json").write_text("{not json")
    (d / "model").mkdir()
    (d / "model" / "config.json").write_text(json.dumps({"vocab_size": 4096, "model_type": "llama"}))
    (d / "model" / "tokenizer.json").write_text("{}")
    (d / "model" / "extra_model_file.json").write_text(json.dumps({"secret_marker_value": 1}))
    return d


def test_report_is_self_contained_and_complete(run_dir):
    path = render_report(run_dir)
    assert path == run_dir / "report.html"
    page = path.read_text(encoding="utf-8")
    # self-contained: no external references of any kind
    assert re.findall(r'(?:src|href)\s*=\s*["\'](?!data:)', page) == []
    assert "http" not in page.replace("http-equiv", "")
    assert "<script" not in page and "<link" not in page and "url(" not in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3  # ppl.png, the layer plot of the neuron set, eval/extra.png
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in images)
    # stats
    assert "7104" in page and "6528" in page and "tiny-demo" in page
    # neuron set: per-layer counts and total
    assert re.search(r"<th class=\"l\">en</th><td>8</td><td>3</td><td>0</td><td>0</td><td>5</td>", page)
    assert re.search(r"<th class=\"l\">zh</th><td>7</td><td>0</td><td>0</td><td>7</td><td>0</td>", page)
    # perplexity tables
    for v in ("12.346", "45.750", "17.904", "25.250"):
        assert f"<td>{v}</td>" in page
    # steering
    assert "<td>0.938</td>" in page and "<td>0.812</td>" in page and "set:p_max" in page
    # task table in percent, with the setting rows
    for v in ("57.50", "42.50", "61.25", "55.00"):
        assert f"<td>{v}</td>" in page
    assert "zh (n=40)" in page and ">self<" in page
    # the results paragraph first, then what the run holds
    results = page[page.index("<h2>Results</h2>"):page.index("What the run holds")]
    assert "Language Steering Shift on cloze items" in results and "set:p_max 0.88" in results
    assert "Deactivating" not in results       # this ppl.json predates the dominance record: no claim made
    found = page[page.index("What the run holds"):page.index("Activation statistics")]
    assert "2 languages (13632 tokens) at site act of 4 x 384 neurons" in found
    assert "lape selected 7-8 neurons per language for 2 languages" in found
    # unreadable files are listed, model directories skipped
    assert "broken.json" in page
    assert "secret_marker_value" not in page and "extra_model_file" not in page and "vocab_size" not in page


def test_results_paragraph_states_findings_with_intervals(run_dir):
    """The headline numbers of a demo-like run (model quality, deactivation vs random, steering vs
    unsteered) appear in the results paragraph with their 95% intervals and comparisons; the model's
    recipe is a table, not raw JSON."""
    from langneurons.report import run_results
    (run_dir / "model" / "langneurons_train.json").write_text(json.dumps({
        "format": "langneurons.tiny.v1", "languages": {"en": "en.txt", "zh": "zh.txt"},
        "config": {"steps": 400, "vocab_size": 4096, "hidden_size": 128, "lr": 0.003, "extra": {}},
        "train_seconds": 191.2, "loss_first": 8.4, "loss_last_50": 3.9,
        "heldout": {"window": 64, "ppl": {"en": 41.5, "zh": 63.4}, "ppl_ci95": {"en": [38.0, 45.5], "zh": [57.0, 70.0]},
                    "windows": {"en": 20, "zh": 18}, "lid_share": {"en": 0.9, "zh": 0.8},
                    "lid_share_ci95": {"en": [0.8, 1.0], "zh": [0.65, 0.9]}, "generations": {"en": 32, "zh": 32},
                    "lid_share_mean": 0.85, "lid_share_mean_ci95": [0.77, 0.92],
                    "examples": {"en": [{"prompt": "The coffee", "continuation": " was cold."}]}}}))
    ppl = json.loads((run_dir / "ppl.json").read_text())
    ppl.update({"diagonal_dominance": {"row_count": 2, "column_count": 2, "languages": 2, "row_count_ci95": [1, 2]},
                "vs_random": {"en": {"delta_nll": 0.5, "random_delta_nll": 0.01, "separated": True},
                              "zh": {"delta_nll": 0.7, "random_delta_nll": 0.03, "separated": True}},
                "headline": {"row_dominance": {"count": 2, "of": 2, "ci95": [1, 2]},
                             "own_above_random": {"count": 2, "separated": 2, "of": 2}},
                "settings": {**ppl["settings"], "neuron_method": "lape"},
                "sweep": {"operators": ["zero", "set:p10"],
                          "own": {"zero": {"value": 0.6, "ci95": [0.5, 0.7]}, "set:p10": {"value": 0.3, "ci95": [0.2, 0.4]}},
                          "other": {"zero": {"value": 0.1, "ci95": [0.0, 0.2]}, "set:p10": {"value": 0.2, "ci95": [0.1, 0.3]}},
                          "selectivity": {"zero": {"value": 0.5, "ci95": [0.4, 0.6]},
                                          "set:p10": {"value": 0.1, "ci95": [0.0, 0.2]}},
                          "row_dominance": {"zero": {"count": 2, "of": 2}, "set:p10": {"count": 1, "of": 2}}}})
    (run_dir / "ppl.json").write_text(json.dumps(ppl))
    steer = json.loads((run_dir / "steer.json").read_text())
    steer["operators"]["set:p_max"].update({
        "lss_mean_ci95": [0.8, 0.94],
        "generation": {"share": {"en": 0.5, "zh": 0.3}, "share_mean": 0.4, "share_mean_ci95": [0.31, 0.49],
                       "baseline_share_mean": 0.1, "baseline_share_mean_ci95": [0.08, 0.12], "ratio": 4.0,
                       "separated": True, "n": 32,
                       "pairs": {"zh": [{"prompt": "-", "unsteered": "The cat", "steered": "我们在山上",
                                         "unsteered_label": "en", "steered_label": "zh"}]}}})
    (run_dir / "steer.json").write_text(json.dumps(steer))
    sentences = run_results(run_dir)
    text = " ".join(sentences)
    assert "0.85 [0.77, 0.92]" in text and "from 41.5 (en) to 63.4 (zh)" in text
    assert "for 2 of 2 languages (95% CI 1-2)" in text
    assert "random neuron sets of the same size per layer for 2 of 2, with non-overlapping 95% intervals for 2" in text
    assert "set:p_max 0.40 [0.31, 0.49] (4.0x, separated)" in text and "against 0.10 [0.08, 0.12] unsteered" in text
    assert "set:p_max 0.88 [0.80, 0.94]" in text
    assert "zero 0.500 [0.400, 0.600], set:p10 0.100 [0.000, 0.200]; zero deactivated most selectively" in text
    assert str(run_dir) not in text
    page = render_report(run_dir).read_text(encoding="utf-8")
    results = page[page.index("<h2>Results</h2>"):page.index("What the run holds")]
    assert "0.40 [0.31, 0.49]" in results and "95% bootstrap intervals" in results
    assert "deactivation-value sweep" in page and ">1/2</td>" in page
    # the model's recipe as a table, held-out quality with intervals, steered vs unsteered side by side
    assert '<th class="l">vocab_size</th><td>4096</td>' in page and "{&quot;" not in page
    assert "41.5 [38.0, 45.5]" in page and "0.90 [0.80, 1.00]" in page and "was cold." in page
    assert "我们在山上" in page and "The cat" in page


def test_report_command_and_errors(run_dir, tmp_path, capsys):
    out = tmp_path / "elsewhere.html"
    assert main(["report", str(run_dir), "--out", str(out), "--title", "My run"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert "<title>My run</title>" in out.read_text()
    rc = main(["report", str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "does not exist" in err


def test_report_of_empty_dir_and_of_eval_output(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "Nothing to show" in render_report(empty).read_text()
    # the report of a report directory does not include the previous report
    d = tmp_path / "r"
    d.mkdir()
    (d / "xcopa.json").write_text(json.dumps(_task_result()))
    first = render_report(d).read_text()
    second = render_report(d).read_text()
    assert first == second


# ------------------------------------------------------------------------------------------ every kind
def test_every_kind_has_a_section_and_nothing_is_left_over(tmp_path):
    from artifact_docs import write_run_dir
    from langneurons import artifacts
    run = tmp_path / "run"
    paths = write_run_dir(run)
    page = render_report(run).read_text(encoding="utf-8")
    assert "Other files" not in page and 'class="err"' not in page and "could not render" not in page
    for kind in paths:
        assert f"<h2>{artifacts.KINDS[kind].title}</h2>" in page, kind
    # the scoreboard in the results paragraph, best steering method first
    assert "mean target share of steered generations was diffmean 0.91 [0.84, 0.97], lape:set:p_max 0.69" in page
    # paths are relative to the run directory, never absolute from inside it
    assert str(tmp_path) not in page and str(run.resolve()) not in page
    assert "<code>neurons/lape.json</code>" in page               # ppl settings recorded an absolute path
    assert "ft/eval.json" in page and "exp/runs/ln-source/seed0" in page
    # fine-tuning: mean ± sd per condition and language, difference against attn, runs, evaluations
    assert "<td class=\"l\">65.0 ± 3.0</td>" in page and "<td class=\"l\">+5.0 (p=0.041)</td>" in page
    assert "<td>0.750</td>" in page and "<td>0.250</td>" in page        # run scores en, fr
    assert "<td>0.700</td>" in page and "<td>1234</td>" in page         # eval.json, run record
    # bridge: probes, ranking (with its PNG and a per-layer plot), selection, spectrum, BLI, MRC
    assert "<td>30.0</td>" in page and "<td>33.3</td>" in page          # translation accuracies (%)
    assert "bridge/ranking-de-zh.png" in page and "per-layer scores: bridge/ranking-de-zh.json" in page
    assert "Figures" not in page                                          # every PNG shown with its artifact
    assert "top-prob neuron overlap" in page and "Jaccard" in page
    assert "<td>80.0</td>" in page and "<td>62.5</td>" in page and "<td>37.5</td>" in page
    # the tiny-train record inside the model directory, and the unfinished-run files
    assert "<td>3.250</td>" in page and "0123abcd" in page


def test_malformed_known_kinds_are_listed_with_the_reason_and_unknown_files_go_to_other(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    (d / "ppl.json").write_text(json.dumps({"format": "langneurons.ppl.v1", "rows": [], "columns": []}))
    (d / "ranking-a-b.json").write_text(json.dumps({"format": "langneurons.bridge.ranking.v1", "src": "a",
                                                     "trg": "b", "ranking": [{"bridge": "c", "score": "high"}]}))
    (d / "mine.json").write_text(json.dumps({"format": "langneurons.nothing.v1"}))
    (d / "notes.json").write_text(json.dumps({"hello": 1}))
    page = render_report(d).read_text(encoding="utf-8")
    ppl = page[page.index("Perplexity under deactivation"):]
    assert "ppl.json: this langneurons.ppl.v1 file lacks &#x27;ppl&#x27; (list)" in ppl
    ranking = page[page.index("Bridge rankings"):page.index("Other files")]
    assert '<td class="l">high</td>' in ranking and "(no plot: could not convert" in ranking   # shown as is
    other = page[page.index("Other files"):]
    assert "mine.json" in other and "notes.json" in other and "ppl.json" not in other


def test_layer_plots_have_integer_ticks(tmp_path, monkeypatch):
    from langneurons import plots
    from langneurons.neuronset import NeuronSet
    figures = []
    real = plots._save_png
    monkeypatch.setattr(plots, "_save_png", lambda fig, path: (figures.append(fig), real(fig, path))[1])
    masks = {"en": torch.zeros(3, 8, dtype=torch.bool)}
    masks["en"][1, :2] = True
    ns = NeuronSet.from_masks(masks, {"num_layers": 3, "width": 8, "site": "act"}, {"name": "hand"})
    plots.plot_layer_distribution(ns, tmp_path / "a.png")
    plots.plot_layer_lines({"x": ([1, 2, 3], [0.5, None, 0.25]), "y": ([1, 2], [0.1, 0.2])}, tmp_path / "b.png")
    assert len(figures) == 2
    for fig in figures:
        fig.canvas.draw()
        ticks = [t for t in fig.axes[0].get_xticks() if fig.axes[0].get_xlim()[0] <= t <= fig.axes[0].get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
