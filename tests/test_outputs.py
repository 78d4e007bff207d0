"""Safe outputs (langneurons.outputs): every command refuses, before any work, an output that is an
input, lies inside an input directory, replaces an existing result without --overwrite, is a device
or a system path, or has no usable parent. Each refusal: exit 2, one stderr line, no traceback, every
input byte-identical and nothing created."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from langneurons.cli import build_parser, main
from langneurons.outputs import KEY_FIELD, check_dir, command_key
from langneurons.errors import UserError
from langneurons.stats import STATS_FORMAT, LanguageStats

NO_MODEL = "model"       # an empty directory: loading it fails fast, and the output check comes first


def _stats_dir(d: Path) -> Path:
    """A small window-unit statistics directory, hand-made (no model)."""
    d.mkdir(parents=True)
    L, I = 2, 8
    meta = {"format": STATS_FORMAT, "model": {"name_or_path": "hand", "model_type": "llama", "num_layers": L,
                                              "width": I, "site": "act"},
            "unit": "window", "window": 64, "languages": {}}
    for k, code in enumerate(["en", "fr", "zh"]):
        ls = LanguageStats(L, I, sketch_bins=0)
        ls.add_tokens(100)
        ls.count_pos += 5
        ls.count_pos[1, k] = 90
        ls.save(d / f"{code}.safetensors")
        meta["languages"][code] = {"n_tokens": 100}
    (d / "stats.json").write_text(json.dumps(meta))
    return d


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A working directory with stats/, ns.json (a neuron set), old.json (an existing result),
    file.json (a plain file), corpus.txt, run/ (a run directory) and model/ (an empty model directory)."""
    monkeypatch.chdir(tmp_path)
    _stats_dir(tmp_path / "stats")
    assert main(["identify", "lape", "--stats", "stats", "--out", "ns.json", "--top-rate", "0.2"]) == 0
    (tmp_path / "old.json").write_text('{"keep": true}\n')
    (tmp_path / "file.json").write_text("not a directory\n")
    (tmp_path / "corpus.txt").write_text("one line of text\n")
    (tmp_path / "run").mkdir()
    (tmp_path / NO_MODEL).mkdir()
    (tmp_path / "run" / "ppl.json").write_text('{"format": "x"}\n')
    return tmp_path


def _snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if stat.S_ISREG(st.st_mode):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p.relative_to(root))] = stat.S_IFMT(st.st_mode)
    return out


NS_ARGS = ["--neurons", "ns.json"]
PPL = ["ppl", "--model", NO_MODEL, *NS_ARGS, "--stats", "stats", "--lang", "en=corpus.txt"]
STEER = ["steer", "--model", NO_MODEL, *NS_ARGS, "--stats", "stats", "--cloze", "corpus.txt"]
EVAL = ["eval", "xcopa", "--model", NO_MODEL, "--data", "stats", *NS_ARGS, "--stats", "stats"]
LAPE = ["identify", "lape", "--stats", "stats"]
RANDOM = ["identify", "random", "--of", "ns.json"]
IMPORT = ["neurons", "import", "ns.json"]
REPORT = ["report", "run"]
FT_EVAL = ["finetune", "eval", "--run", "run", "--data", "en=corpus.txt"]
PLOT = ["neurons", "plot", "ns.json"]
COLLECT = ["collect", "--model", NO_MODEL, "--lang", "en=corpus.txt"]
SPECTRUM = ["bridge", "spectrum", "--stats", "stats"]

# (name, argv, the --out value, words the error line must hold)
CASES = [
    # identify
    ("identify: out is the stats' stats.json", LAPE, "stats/stats.json", ["inside the input statistics directory"]),
    ("identify: out is a language's file", LAPE, "stats/en.safetensors", ["inside the input statistics"]),
    ("identify: out is new, inside stats", LAPE, "stats/new.json", ["inside the input statistics directory"]),
    ("identify: out is the stats dir", LAPE, "stats", ["is a directory"]),
    ("identify random: out is --of", RANDOM, "ns.json", ["is the input neuron-set file"]),
    ("identify: existing out", LAPE, "old.json", ["exists", "--overwrite"]),
    ("identify: /dev/full", LAPE, "/dev/full", ["is a device"]),
    ("identify: /dev/null", LAPE, "/dev/null", ["is a device"]),
    ("identify: /proc/nope/x.json", LAPE, "/proc/nope/x.json", ["under /proc"]),
    ("identify: parent is a file", LAPE, "file.json/x.json", ["file.json is a file"]),
    ("identify: grandparent is a file", LAPE, "file.json/a/x.json", ["file.json is a file"]),
    ("identify: FIFO", LAPE, "fifo", ["FIFO"]),
    # neurons import / plot
    ("import: out is the source", IMPORT, "ns.json", ["is the input file"]),
    ("import: existing out", IMPORT, "old.json", ["exists", "--overwrite"]),
    ("import: /dev/full", IMPORT, "/dev/full", ["is a device"]),
    ("import: /proc/nope/x.json", IMPORT, "/proc/nope/x.json", ["under /proc"]),
    ("import: parent is a file", IMPORT, "file.json/x.json", ["file.json is a file"]),
    ("plot: out is the set", PLOT, "ns.json", ["is the input neuron-set file"]),
    ("plot: /proc", PLOT, "/proc/nope", ["under /proc"]),
    # ppl (a directory output; the model is never loaded)
    ("ppl: out is the stats dir", PPL, "stats", ["is the input statistics directory"]),
    ("ppl: out inside the stats dir", PPL, "stats/ppl", ["inside the input statistics directory"]),
    ("ppl: out is the neuron set", PPL, "ns.json", ["is the input neuron-set file"]),
    ("ppl: out is the corpus", PPL, "corpus.txt", ["is the input --lang en corpus"]),
    ("ppl: /dev/full", PPL, "/dev/full", ["is a device"]),
    ("ppl: /proc/nope/x.json", PPL, "/proc/nope/x.json", ["under /proc"]),
    ("ppl: parent is a file", PPL, "file.json/x", ["file.json is a file"]),
    ("ppl: another run's ppl.json", PPL, "run", ["already holds ppl.json", "--overwrite"]),
    # steer (scoring mode)
    ("steer: out inside stats", STEER, "stats/steer", ["inside the input statistics directory"]),
    ("steer: out is the cloze file", STEER, "corpus.txt", ["is the input cloze file"]),
    ("steer: /dev/full", STEER, "/dev/full", ["is a device"]),
    ("steer: /proc/nope/x.json", STEER, "/proc/nope/x.json", ["under /proc"]),
    ("steer: parent is a file", STEER, "file.json/x", ["file.json is a file"]),
    # eval
    ("eval: out is the data dir", EVAL, "stats", ["is the input"]),
    ("eval: out inside the data dir", EVAL, "stats/eval", ["inside the input"]),
    ("eval: out is the neuron set", EVAL, "ns.json", ["is the input neuron-set file"]),
    ("eval: /dev/full", EVAL, "/dev/full", ["is a device"]),
    ("eval: /proc/nope/x.json", EVAL, "/proc/nope/x.json", ["under /proc"]),
    ("eval: parent is a file", EVAL, "file.json/x", ["file.json is a file"]),
    # report
    ("report: out is a file the report reads", REPORT, "run/ppl.json", ["exists", "--overwrite"]),
    ("report: out is the run dir", REPORT, "run", ["is a directory"]),
    ("report: existing out", REPORT, "old.json", ["exists", "--overwrite"]),
    ("report: /dev/full", REPORT, "/dev/full", ["is a device"]),
    ("report: /proc/nope/x.html", REPORT, "/proc/nope/x.html", ["under /proc"]),
    ("report: parent is a file", REPORT, "file.json/r.html", ["file.json is a file"]),
    # finetune eval, collect, bridge spectrum
    ("finetune eval: out is the data", FT_EVAL, "corpus.txt", ["is the input evaluation file of en"]),
    ("finetune eval: existing out", FT_EVAL, "old.json", ["exists", "--overwrite"]),
    ("finetune eval: /dev/full", FT_EVAL, "/dev/full", ["is a device"]),
    ("collect: out is the corpus", COLLECT, "corpus.txt", ["is the input --lang en corpus"]),
    ("collect: /proc", COLLECT, "/proc/nope", ["under /proc"]),
    ("spectrum: out inside stats", SPECTRUM, "stats/sp", ["inside the input statistics directory"]),
]


@pytest.mark.parametrize("name,argv,out,words", CASES, ids=[c[0] for c in CASES])
def test_refused_before_any_work_and_nothing_changes(name, argv, out, words, ws, capsys):
    if out == "fifo":
        os.mkfifo(ws / "fifo")
    capsys.readouterr()
    before = _snapshot(ws)
    devices = {d: os.stat(d).st_rdev for d in ("/dev/full", "/dev/null")}
    rc = main([*argv, "--out", out])
    err = capsys.readouterr().err
    assert rc == 2, (name, err)
    assert err.startswith("langneurons: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "cannot load" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert _snapshot(ws) == before                      # inputs byte-identical, nothing created
    for d, rdev in devices.items():                     # the devices are still devices
        st = os.stat(d)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == rdev


@pytest.mark.parametrize("argv,out", [(LAPE, "old.json"), (IMPORT, "old.json"), (RANDOM, "old.json")])
def test_overwrite_replaces_an_existing_file(argv, out, ws):
    assert main([*argv, "--out", out, "--overwrite"]) == 0
    assert json.loads((ws / out).read_text())["format"] == "langneurons.neuronset.v1"


def test_new_file_in_new_directories_is_written(ws):
    assert main([*LAPE, "--out", "sets/a/b/lape.json"]) == 0
    assert (ws / "sets" / "a" / "b" / "lape.json").is_file()


def test_random_seeds_refuses_any_existing_seed_file(ws, capsys):
    (ws / "r-seed1.json").write_text("{}")
    assert main([*RANDOM, "--seeds", "0,1", "--out", "r.json"]) == 2
    assert "r-seed1.json exists" in capsys.readouterr().err
    assert not (ws / "r-seed0.json").exists()


def test_report_may_replace_its_own_html_with_overwrite(ws, capsys):
    assert main([*REPORT]) == 0
    assert main([*REPORT]) == 2 and "report.html exists" in capsys.readouterr().err
    assert main([*REPORT, "--overwrite"]) == 0
    assert main([*REPORT, "--out", "run/ppl.json", "--overwrite"]) == 2
    assert "that the report reads" in capsys.readouterr().err


def _ppl_key(out: str, *extra) -> str:
    args = build_parser().parse_args([*PPL, "--out", out, *extra])
    return command_key(args)


def test_same_command_may_rerun_over_its_own_result_and_another_needs_overwrite(ws, capsys):
    """ppl.json recording this command's key: the same command passes the output check (and then
    fails on the missing model); another command is refused; --overwrite lets it through."""
    (ws / "res").mkdir()
    (ws / "res" / "ppl.json").write_text(json.dumps({KEY_FIELD: _ppl_key("res")}))
    (ws / "res" / "ppl.png").write_bytes(b"png")
    capsys.readouterr()
    assert main([*PPL, "--out", "res"]) == 2
    assert "cannot load" in capsys.readouterr().err         # passed the output check; failed on the model
    assert main([*PPL, "--out", "res", "--quiet", "--batch-size", "3"]) == 2   # speed options: same command
    assert "cannot load" in capsys.readouterr().err
    assert main([*PPL, "--out", "res", "--operator", "set:mean"]) == 2
    assert "already holds ppl.json" in capsys.readouterr().err
    assert main([*PPL, "--out", "res", "--operator", "set:mean", "--overwrite"]) == 2
    assert "cannot load" in capsys.readouterr().err


def test_check_dir_companions_without_a_keyed_result_need_overwrite(tmp_path):
    (tmp_path / "ppl.png").write_bytes(b"png")
    with pytest.raises(UserError, match="already holds ppl.png"):
        check_dir(tmp_path, writes=["ppl.json", "ppl.png"], key="k")
    check_dir(tmp_path, writes=["ppl.json", "ppl.png"], key="k", overwrite=True)


def test_shared_directory_may_hold_the_output_but_not_over_an_input(tmp_path):
    probes = tmp_path / "bridge"
    probes.mkdir()
    (probes / "probes-de-zh.json").write_text("{}")
    check_dir(probes, inputs=[("probe file", probes / "probes-de-zh.json")], shared=[probes],
              writes=["selection.json"], key="k")
    (probes / "language_neurons.json").write_text("{}")
    with pytest.raises(UserError, match="is the input neuron-set file"):
        check_dir(probes, inputs=[("neuron-set file", probes / "language_neurons.json")], shared=[probes],
                  writes=["language_neurons.json"], key="k", overwrite=True)


def test_symlinked_output_into_the_stats_dir_is_refused(ws, capsys):
    (ws / "link").symlink_to(ws / "stats")
    before = _snapshot(ws / "stats")
    assert main([*LAPE, "--out", "link/stats.json"]) == 2
    assert "inside the input statistics directory" in capsys.readouterr().err
    assert _snapshot(ws / "stats") == before
