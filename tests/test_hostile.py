"""Hostile input across every subcommand, table-driven (one table of cases drives the test).

Each case: exit 2, exactly one stderr line ``langneurons: error: ...`` naming the problem, no
traceback, every input byte-identical afterwards and no output created. Interruption (SIGINT,
``kill -9``) of the long commands is covered at the end: the rerun resumes or restarts cleanly and no
half-written artifact is ever read.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from langneurons.cli import main

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ the world
@pytest.fixture(scope="module")
def world(demo_model, demo_stats, tmp_path_factory):
    """Inputs shared by the cases: good ones (the demo model, its statistics, a neuron set) and bad ones."""
    from langneurons.identify import select
    from langneurons.neuronset import NeuronSet
    from langneurons.stats import ActivationStats
    d = tmp_path_factory.mktemp("hostile")
    select("lape", ActivationStats.load(demo_stats), top_rate=0.03).save(d / "ns.json")
    NeuronSet({"en": [[0, 1]], "zh": [[1, 2]]}, {"num_layers": 2, "width": 7, "site": "act"},
              {"name": "x"}).save(d / "other_model.json")
    (d / "empty.txt").write_text("")
    (d / "garbage.json").write_bytes(b"\x00\xffnot json{{{")
    (d / "garbage.jsonl").write_text("{not json\n")
    (d / "text.txt").write_text("Hello world.\nAnother line of text.\n")
    (d / "dir").mkdir()
    (d / "garbage_stats").mkdir()
    (d / "garbage_stats" / "stats.json").write_text("{]")
    trunc = d / "truncated_stats"
    trunc.mkdir()
    for f in Path(demo_stats).iterdir():
        if f.is_file():
            data = f.read_bytes()
            (trunc / f.name).write_bytes(data[: len(data) // 3] if f.suffix == ".safetensors" else data)
    (d / "mrc.jsonl").write_text('{"passage": "p", "question": "q"}\n')
    (d / "nli.tsv").write_text("premise\thypothesis\nonly two columns\tno label\n")
    return {"d": d, "model": str(demo_model), "stats": str(demo_stats), "ns": str(d / "ns.json")}


def _cases():
    """``(name, argv builder, fragment of the expected message)``; ``w`` is the world above, ``o`` an
    output path that must not appear."""
    M = ["--device", "cpu"]
    return [
        # collect
        ("collect-missing-corpus", lambda w, o: ["collect", "--model", w["model"], *M, "--lang",
                                                 f"en={w['d'] / 'nope.txt'}", "--out", o], "nope.txt"),
        ("collect-empty-corpus", lambda w, o: ["collect", "--model", w["model"], *M, "--lang",
                                               f"en={w['d'] / 'empty.txt'}", "--out", o], "empty"),
        ("collect-lang-not-code-source", lambda w, o: ["collect", "--model", w["model"], "--lang", "en",
                                                       "--out", o], "--lang"),
        ("collect-window-1", lambda w, o: ["collect", "--model", w["model"], *M, "--lang",
                                           f"en={w['d'] / 'text.txt'}", "--window", "1", "--out", o], "--window"),
        ("collect-missing-model", lambda w, o: ["collect", "--model", str(w["d"] / "no-model"), *M, "--lang",
                                                f"en={w['d'] / 'text.txt'}", "--out", o], "no-model"),
        ("collect-bad-arch", lambda w, o: ["collect", "--model", w["model"], *M, "--arch", "layers", "--lang",
                                           f"en={w['d'] / 'text.txt'}", "--out", o], "--arch"),
        ("collect-bad-dtype", lambda w, o: ["collect", "--model", w["model"], "--dtype", "int3", "--lang",
                                            f"en={w['d'] / 'text.txt'}", "--out", o], "--dtype"),
        # identify
        ("identify-missing-stats", lambda w, o: ["identify", "lape", "--stats", str(w["d"] / "nostats"),
                                                 "--out", o + ".json"], "nostats"),
        ("identify-garbage-stats", lambda w, o: ["identify", "lape", "--stats", str(w["d"] / "garbage_stats"),
                                                 "--out", o + ".json"], "garbage_stats"),
        ("identify-truncated-stats", lambda w, o: ["identify", "lape", "--stats", str(w["d"] / "truncated_stats"),
                                                   "--out", o + ".json"], "truncated_stats"),
        ("identify-unknown-language", lambda w, o: ["identify", "lape", "--stats", w["stats"], "--languages", "xx",
                                                    "--out", o + ".json"], "xx"),
        ("identify-top-rate-2", lambda w, o: ["identify", "lape", "--stats", w["stats"], "--top-rate", "2",
                                              "--out", o + ".json"], "top"),
        # neurons
        ("neurons-show-garbage", lambda w, o: ["neurons", "show", str(w["d"] / "garbage.json")], "garbage.json"),
        ("neurons-show-empty", lambda w, o: ["neurons", "show", str(w["d"] / "empty.txt")], "empty.txt"),
        ("neurons-compare-missing", lambda w, o: ["neurons", "compare", w["ns"], str(w["d"] / "nope.json")],
         "nope.json"),
        ("neurons-import-garbage", lambda w, o: ["neurons", "import", str(w["d"] / "garbage.json"), "--out",
                                                 o + ".json"], "garbage.json"),
        ("neurons-plot-garbage", lambda w, o: ["neurons", "plot", str(w["d"] / "garbage.json"), "--out", o],
         "garbage.json"),
        # ppl
        ("ppl-other-model-neurons", lambda w, o: ["ppl", "--model", w["model"], *M, "--neurons",
                                                  str(w["d"] / "other_model.json"), "--lang",
                                                  f"en={w['d'] / 'text.txt'}", "--window", "8", "--out", o],
         "other_model.json"),
        ("ppl-unknown-row", lambda w, o: ["ppl", "--model", w["model"], *M, "--neurons", w["ns"], "--rows", "xx",
                                          "--lang", f"en={w['d'] / 'text.txt'}", "--out", o], "xx"),
        ("ppl-bad-operator", lambda w, o: ["ppl", "--model", w["model"], *M, "--neurons", w["ns"], "--operator",
                                           "set:", "--lang", f"en={w['d'] / 'text.txt'}", "--out", o], "set:"),
        ("ppl-window-0", lambda w, o: ["ppl", "--model", w["model"], *M, "--neurons", w["ns"], "--window", "0",
                                       "--lang", f"en={w['d'] / 'text.txt'}", "--out", o], "--window"),
        ("ppl-garbage-neurons", lambda w, o: ["ppl", "--model", w["model"], *M, "--neurons",
                                              str(w["d"] / "garbage.json"), "--lang", f"en={w['d'] / 'text.txt'}",
                                              "--out", o], "garbage.json"),
        # steer
        ("steer-unknown-target", lambda w, o: ["steer", "--model", w["model"], *M, "--neurons", w["ns"],
                                               "--target", "xx", "--operator", "zero", "--prompt", "x"], "xx"),
        ("steer-other-model", lambda w, o: ["steer", "--model", w["model"], *M, "--neurons",
                                            str(w["d"] / "other_model.json"), "--target", "zh", "--operator",
                                            "zero", "--prompt", "x"], "other_model.json"),
        ("steer-zero-tokens", lambda w, o: ["steer", "--model", w["model"], *M, "--neurons", w["ns"], "--target",
                                            "zh", "--operator", "zero", "--prompt", "x", "--max-new-tokens", "0"],
         "--max-new-tokens"),
        ("steer-garbage-cloze", lambda w, o: ["steer", "--model", w["model"], *M, "--neurons", w["ns"], "--cloze",
                                              str(w["d"] / "garbage.jsonl"), "--languages", "en,zh", "--operator",
                                              "zero", "--out", o], "garbage.jsonl"),
        ("steer-alpha-not-number", lambda w, o: ["steer", "--model", w["model"], *M, "--neurons", w["ns"],
                                                 "--target", "zh", "--operator", "scale:abc", "--prompt", "x"],
         "scale:abc"),
        # compare
        ("compare-unknown-method", lambda w, o: ["compare", "--model", w["model"], *M, "--languages", "en,zh",
                                                 "--held-out", f"en={w['d'] / 'text.txt'}", "--held-out",
                                                 f"zh={w['d'] / 'text.txt'}", "--neurons", f"lape={w['ns']}",
                                                 "--methods", "lape:nonsense", "--out", o], "lape:nonsense"),
        ("compare-other-model-neurons", lambda w, o: ["compare", "--model", w["model"], *M, "--languages", "en,zh",
                                                      "--held-out", f"en={w['d'] / 'text.txt'}", "--held-out",
                                                      f"zh={w['d'] / 'text.txt'}", "--neurons",
                                                      f"x={w['d'] / 'other_model.json'}", "--out", o],
         "other_model.json"),
        ("compare-alpha-not-number", lambda w, o: ["compare", "--model", w["model"], *M, "--languages", "en,zh",
                                                   "--held-out", f"en={w['d'] / 'text.txt'}", "--held-out",
                                                   f"zh={w['d'] / 'text.txt'}", "--neurons", f"lape={w['ns']}",
                                                   "--alpha", "abc", "--out", o], "--alpha"),
        # eval
        ("eval-unknown-task", lambda w, o: ["eval", "nosuchtask", "--model", w["model"], *M, "--out", o],
         "nosuchtask"),
        ("eval-garbage-data", lambda w, o: ["eval", "xcopa", "--model", w["model"], *M, "--languages", "zh",
                                            "--data", str(w["d"] / "garbage.jsonl"), "--out", o], "garbage.jsonl"),
        ("eval-negative-limit", lambda w, o: ["eval", "xcopa", "--model", w["model"], *M, "--languages", "zh",
                                              "--data", str(w["d"] / "dir"), "--limit", "-1", "--out", o], "--limit"),
        ("eval-other-model-neurons", lambda w, o: ["eval", "xcopa", "--model", w["model"], *M, "--languages", "zh",
                                                   "--data", str(w["d"] / "dir"), "--neurons",
                                                   str(w["d"] / "other_model.json"), "--operator", "zero",
                                                   "--out", o], ""),
        # finetune
        ("finetune-train-missing-data", lambda w, o: ["finetune", "train", "--model", w["model"], "--task", "nli",
                                                      "--train", str(w["d"] / "nope.tsv"), "--out", o], "nope.tsv"),
        ("finetune-train-bad-tsv", lambda w, o: ["finetune", "train", "--model", w["model"], "--task", "nli",
                                                 "--train", str(w["d"] / "nli.tsv"), "--out", o, "--device", "cpu"],
         "nli.tsv"),
        ("finetune-eval-missing-run", lambda w, o: ["finetune", "eval", "--run", str(w["d"] / "norun"), "--data",
                                                    f"en={w['d'] / 'nli.tsv'}"], "norun"),
        ("finetune-experiment-missing-eval", lambda w, o: ["finetune", "experiment", "--model", w["model"],
                                                           "--task", "nli", "--train", str(w["d"] / "nli.tsv"),
                                                           "--eval", f"fr={w['d'] / 'nope.tsv'}", "--neurons",
                                                           w["ns"], "--out", o], "nope.tsv"),
        # bridge
        ("bridge-probe-bad-pair", lambda w, o: ["bridge", "probe", "--model", w["model"], *M, "--pair", "de",
                                                "--muse-dir", str(w["d"]), "--out", o], "de"),
        ("bridge-probe-missing-dict", lambda w, o: ["bridge", "probe", "--model", w["model"], *M, "--pair", "de-zh",
                                                    "--dict", str(w["d"] / "nope.txt"), "--out", o], "nope.txt"),
        ("bridge-select-missing-probes", lambda w, o: ["bridge", "select", "--stats", w["stats"], "--probes",
                                                       str(w["d"] / "noprobes"), "--pair", "de-zh", "--out", o],
         "noprobes"),
        ("bridge-mrc-bad-records", lambda w, o: ["bridge", "mrc", "--model", w["model"], *M, "--data",
                                                 str(w["d"] / "mrc.jsonl"), "--lang", "en", "--out", o], "mrc.jsonl"),
        ("bridge-spectrum-missing-stats", lambda w, o: ["bridge", "spectrum", "--stats", str(w["d"] / "nostats"),
                                                        "--out", o], "nostats"),
        # directions
        ("directions-missing-corpus", lambda w, o: ["directions", "collect", "--model", w["model"], *M, "--lang",
                                                    f"en={w['d'] / 'nope.txt'}", "--out", o], "nope.txt"),
        ("directions-window-1", lambda w, o: ["directions", "collect", "--model", w["model"], *M, "--lang",
                                              f"en={w['d'] / 'text.txt'}", "--window", "1", "--out", o], "--window"),
        ("directions-show-missing", lambda w, o: ["directions", "show", str(w["d"] / "nodirs")], "nodirs"),
        ("directions-show-stats-dir", lambda w, o: ["directions", "show", w["stats"]], "directions.json"),
        # heads
        ("heads-missing-corpus", lambda w, o: ["heads", "collect", "--model", w["model"], *M, "--lang",
                                               f"en={w['d'] / 'nope.txt'}", "--out", o], "nope.txt"),
        ("heads-window-1", lambda w, o: ["heads", "collect", "--model", w["model"], *M, "--lang",
                                         f"en={w['d'] / 'text.txt'}", "--window", "1", "--out", o], "--window"),
        ("heads-show-stats-dir", lambda w, o: ["heads", "show", w["stats"]], "heads.json"),
        ("heads-identify-unknown-method", lambda w, o: ["heads", "identify", "--stats", w["stats"], "--method",
                                                        "best", "--out", o], "'best'"),
        ("heads-ablate-neuron-set", lambda w, o: ["heads", "ablate", "--model", w["model"], *M, "--heads", w["ns"],
                                                  "--lang", f"en={w['d'] / 'text.txt'}"], "headset"),
        ("heads-ablate-bad-operator", lambda w, o: ["heads", "ablate", "--model", w["model"], *M, "--heads", w["ns"],
                                                    "--operator", "add:1", "--lang", f"en={w['d'] / 'text.txt'}"],
         "zero or scale:A"),
        # report, demo, tiny-train
        ("report-missing-dir", lambda w, o: ["report", str(w["d"] / "norun")], "norun"),
        ("report-of-a-file", lambda w, o: ["report", str(w["d"] / "text.txt")], "text.txt"),
        ("demo-bad-lang", lambda w, o: ["demo", "--out", o, "--lang", "en"], "--lang"),
        ("tiny-train-missing-corpus", lambda w, o: ["tiny-train", "--lang", f"en={w['d'] / 'nope.txt'}",
                                                    "--out", o], "nope.txt"),
        ("tiny-train-zero-steps", lambda w, o: ["tiny-train", "--lang", f"en={w['d'] / 'text.txt'}", "--steps", "0",
                                                "--out", o], "--steps"),
    ]


CASES = _cases()


def _hashes(root: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name,argv,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(name, argv, fragment, world, tmp_path, capsys):
    out = tmp_path / "out"
    before = {k: _hashes(Path(world[k])) if Path(world[k]).is_dir() else None for k in ("d", "stats")}
    try:
        rc = main(argv(world, str(out)))
    except SystemExit as e:          # argparse's own errors (also one line, exit 2)
        rc = e.code
    cap = capsys.readouterr()
    err = [ln for ln in cap.err.strip().splitlines() if not ln.startswith("langneurons: note:")]
    assert rc == 2, (name, cap.err[-2000:])
    assert len(err) == 1 and "error:" in err[0], (name, cap.err[-2000:])
    assert "Traceback" not in cap.err
    assert fragment in err[0], (name, err[0])
    assert not out.exists() and not Path(str(out) + ".json").exists(), name
    for k, h in before.items():
        assert _hashes(Path(world[k])) == h, (name, k)


def test_the_table_covers_every_subcommand():
    from langneurons.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    covered = {c[0].split("-")[0] for c in CASES} | {"tiny"}
    top = set(sub.choices) - {"tiny-train"}
    assert top <= covered | {"tiny-train"}, top - covered


# ------------------------------------------------------------------------------------------ interruption
def _run_and_interrupt(argv: list[str], cwd: Path, sig: int, when: Path, timeout: float = 300) -> int:
    """Start ``langneurons ARGV``, send ``sig`` as soon as ``when`` exists (a first checkpoint), return
    the exit status."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    p = subprocess.Popen([sys.executable, "-m", "langneurons", *argv], cwd=cwd, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while p.poll() is None and not when.exists() and time.time() - t0 < timeout:
        time.sleep(0.05)
    if p.poll() is None:
        p.send_signal(sig)
    return p.wait(timeout=timeout)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "kill-9"])
def test_interrupted_ppl_resumes_to_the_uninterrupted_result(sig, world, demo_model, tmp_path):
    w = world
    held = [a for c in ("en", "fr", "zh") for a in ("--lang", f"{c}={demo_model / 'heldout' / (c + '.txt')}")]
    ppl = ["ppl", "--model", w["model"], "--device", "cpu", "--neurons", w["ns"], *held, "--window", "32",
           "--max-tokens", "1024", "--random-seeds", "0", "--batch-size", "8", "--no-cache", "--quiet"]
    full, part = tmp_path / "ppl-full", tmp_path / "ppl-part"
    assert main([*ppl, "--out", str(full)]) == 0
    rc = _run_and_interrupt([*ppl, "--out", str(part)], tmp_path, sig, when=part / ".partial" / "ppl.json")
    assert rc != 0 and not (part / "ppl.json").exists()             # stopped midway, no half-written result
    assert main([*ppl, "--out", str(part)]) == 0
    a = json.loads((full / "ppl.json").read_text())
    b = json.loads((part / "ppl.json").read_text())
    assert b["work"]["resumed_columns"] and a["mean_nll"] == b["mean_nll"] and a["rows"] == b["rows"]


def test_killed_eval_resumes_to_the_uninterrupted_result(world, tmp_path, shared_data):
    w = world
    ev = ["eval", "xnli", "--model", w["model"], "--device", "cpu", "--languages", "en,fr,de",
          "--data", str(shared_data / "xnli"), "--limit", "12", "--batch-size", "4", "--quiet"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main([*ev, "--out", str(full)]) == 0
    rc = _run_and_interrupt([*ev, "--out", str(part)], tmp_path, signal.SIGKILL, when=part / ".partial" / "xnli.json")
    assert rc != 0 and not (part / "xnli.json").exists()
    assert main([*ev, "--out", str(part)]) == 0
    a = json.loads((full / "xnli.json").read_text())
    b = json.loads((part / "xnli.json").read_text())
    assert [r["metrics"] for r in a["rows"]] == [r["metrics"] for r in b["rows"]]


@pytest.mark.parametrize("cmd", ["steer", "bridge-probe"])
def test_killed_steer_and_probe_restart_cleanly(cmd, world, demo_model, tmp_path, shared_data):
    w = world
    if cmd == "steer":
        argv = ["steer", "--model", w["model"], "--device", "cpu", "--neurons", w["ns"], "--stats", w["stats"],
                "--muse", str(shared_data / "muse" / "full"), "--languages", "en,fr,zh", "--items", "20",
                "--operator", "zero,scale:2", "--out"]
        product = "steer.json"
    else:
        argv = ["bridge", "probe", "--model", w["model"], "--device", "cpu", "--muse-dir", str(shared_data / "muse"),
                "--pair", "de-zh", "--pair", "fr-ru", "--limit", "30", "--filter", "all", "--out"]
        product = "probe_summary.json"
    out = tmp_path / "o"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    p = subprocess.Popen([sys.executable, "-m", "langneurons", *argv, str(out)], cwd=tmp_path, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(6)
    p.kill()
    p.wait()
    assert not (out / product).exists() or json.loads((out / product).read_text())   # never half-written
    assert main([*argv, str(out), *(["--quiet"] if cmd == "steer" else [])]) == 0
    doc = json.loads((out / product).read_text())
    assert doc["format"].startswith("langneurons.")
