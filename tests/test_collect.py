"""``langneurons collect``: packing, sentence mode, resume after kill -9, torchrun, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from langneurons.arch import Adapter
from langneurons.cli import main
from langneurons.collect import Batch, Collector
from langneurons.runtime import pad_rows
from langneurons.corpus import Packing, cut_windows, select_windows
from langneurons.stats import ActivationStats, LanguageStats
from langneurons.testing import tiny_model

from conftest import DEMO_CORPUS

PY = sys.executable


def _run_in_process(args):
    assert main(list(args)) == 0


def _run_cli(args, env=None, check=True):
    """A separate process (only for what needs one: SIGKILL, torchrun)."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    r = subprocess.run([PY, "-m", "langneurons", *args], capture_output=True, text=True, env=e)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}: {r.stderr[-2000:]}")
    return r


def _collect_args(model, out, *extra, langs=("en", "zh", "ru")):
    args = ["collect", "--model", str(model), "--out", str(out), "--window", "32", "--batch-size", "4",
            "--max-tokens", "2048", "--quiet", "--no-cache", "--sketch-bins", "16"]
    for c in langs:
        args += ["--lang", f"{c}={DEMO_CORPUS / (c + '.txt')}"]
    return args + list(extra)


def _tensors(d: Path, code: str) -> dict:
    from safetensors.torch import load_file
    return load_file(str(d / f"{code}.safetensors"))


# ------------------------------------------------------------------ packing
def test_windows_start_with_bos_and_cover_the_stream():
    stream = np.arange(100, 200, dtype=np.uint32)
    w = cut_windows(stream, Packing(window=10, bos="window"), bos_id=1)
    assert w.shape == (11, 10) and w.dtype == np.uint32
    assert (w[:, 0] == 1).all() and w[0, 1:].tolist() == list(range(100, 109))
    w2 = cut_windows(stream, Packing(window=10, bos="none"), bos_id=1)
    assert w2.shape == (10, 10) and w2[-1, -1] == 199


def test_uint32_keeps_vocabularies_above_65535():
    stream = np.array([70000, 131071, 5, 6], dtype=np.uint32)
    w = cut_windows(stream, Packing(window=2, bos="none"), bos_id=None)
    assert w[0].tolist() == [70000, 131071]


def test_window_selection_is_seeded():
    a = select_windows(1000, 64, 64 * 50, seed=3)
    assert len(a) == 50 and np.array_equal(a, select_windows(1000, 64, 64 * 50, seed=3))
    assert not np.array_equal(a, select_windows(1000, 64, 64 * 50, seed=4))
    assert np.array_equal(select_windows(10, 64, None, seed=0), np.arange(10))


# ------------------------------------------------------------------ sentence mode
def _sentence_stats(model, sents, batch_size, side, S=6):
    a = Adapter(model)
    ls = LanguageStats(a.num_layers, a.width, sketch_bins=0, sentences=S)
    c = Collector(model, a, "act", torch.device("cpu"))
    c.stats = ls
    for i in range(0, len(sents), batch_size):
        ids, mask = pad_rows(sents[i:i + batch_size], 0, side)
        c.run_batch(Batch(ids, mask, first_sentence=i))
    return ls


# BLOOM, Falcon and Gemma-2 (eager attention) turn fully masked left-pad rows into NaN that leaks into
# real positions; collect always pads on the right, so they are checked on the right only.
@pytest.mark.parametrize("model_type,sides", [("llama", "rl"), ("gpt2", "rl"), ("opt", "rl"), ("phi3", "rl"),
                                              ("gemma2", "r"), ("bloom", "r"), ("falcon", "r")])
def test_sentence_mode_independent_of_padding_side_and_batch_size(model_type, sides):
    model = tiny_model(model_type, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    sents = [[1] + torch.randint(3, 97, (int(n),), generator=g).tolist()
             for n in torch.randint(2, 15, (9,), generator=g)]
    ref = _sentence_stats(model, sents, 1, "right")
    assert int(ref.n_tokens) == sum(map(len, sents))
    cases = [(bs, side) for bs, side in ((4, "right"), (9, "right"), (4, "left"), (9, "left")) if side[0] in sides]
    for bs, side in cases:
        got = _sentence_stats(model, sents, bs, side)
        assert torch.equal(got.count_pos, ref.count_pos), (bs, side)
        assert int(got.n_tokens) == int(ref.n_tokens)
        assert torch.allclose(got.sum, ref.sum, rtol=1e-6, atol=1e-6)  # per-batch float32 partial sums
        assert torch.allclose(got.sentence_mean, ref.sentence_mean, rtol=1e-6, atol=1e-8)
    # per-sentence mean of sentence 0 equals a direct unpadded pass
    direct = _sentence_stats(model, sents[:1], 1, "right", S=1)
    assert torch.allclose(ref.sentence_mean[0], direct.sentence_mean[0], atol=1e-6)


def test_sentence_unit_cli_records_patch_values(demo_model, tmp_path):
    out = tmp_path / "sent"
    _run_in_process(["collect", "--model", str(demo_model), "--out", str(out), "--unit", "sentence", "--sentences", "20",
              "--max-tokens", "3000", "--batch-size", "8", "--quiet", "--no-cache",
              "--lang", f"fr={DEMO_CORPUS / 'fr.txt'}"])
    st = ActivationStats.load(out)
    fr = st.get("fr")
    assert st.meta["unit"] == "sentence" and st.meta["languages"]["fr"]["n_sentence_means"] == 20
    p_max, p_median = fr.sentence_patch_values()
    assert torch.equal(p_max, fr.sentence_mean[:20].max(0).values)
    assert "p_max" in _tensors(out, "fr")


# ------------------------------------------------------------------ CLI, resume, torchrun
def test_collect_writes_the_documented_layout(demo_model, tmp_path):
    out = tmp_path / "stats"
    _run_in_process(_collect_args(demo_model, out))
    meta = json.loads((out / "stats.json").read_text())
    assert meta["model"]["num_layers"] == 4 and meta["model"]["site"] == "act"
    assert set(meta["languages"]) == {"en", "zh", "ru"}
    for c in ("en", "zh", "ru"):
        t = _tensors(out, c)
        assert t["count_pos"].dtype == torch.int64 and t["sum"].dtype == torch.float64
        assert int(t["n_tokens"]) == meta["languages"][c]["n_tokens"] == 2048
        # a small corpus is sketched in full: no sampling, no sampling error
        assert meta["languages"][c]["sketch"] == {"rate": 1.0, "sampled_tokens": 2048, "error_bound_pp": 0.0}
        assert "sketch_zeros" not in t
    assert meta["sketch"]["rate"] == "auto" and meta["sketch"]["error_pp"] == 0.3
    assert meta["sketch"]["sample_target"] > 10**5
    assert not (out / ".partial").exists()


def test_killed_and_resumed_run_equals_an_uninterrupted_one(demo_model, tmp_path):
    """With a sampled sketch (rate 0.3): the resumed run samples exactly the positions of the first."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    langs = ("en", "zh")
    _run_in_process(_collect_args(demo_model, ref, "--sketch-rate", "0.3", langs=langs))
    # 2048 tokens / (4 x 32) = 16 batches per language: killed in the middle of zh, after en finished
    r = _run_cli(_collect_args(demo_model, run, "--checkpoint-every", "1e9", "--sketch-rate", "0.3", langs=langs),
                 env={"LANGNEURONS_FAULT_AFTER_BATCHES": "21"}, check=False)
    assert r.returncode == -9  # killed by SIGKILL mid-language
    assert (run / ".partial").is_dir() and (run / "en.safetensors").is_file()
    assert not (run / "zh.safetensors").exists()
    assert list(json.loads((run / "stats.json").read_text())["languages"]) == ["en"]
    _run_in_process(_collect_args(demo_model, run, "--sketch-rate", "0.3", langs=langs))
    for c in langs:
        a, b = _tensors(ref, c), _tensors(run, c)
        assert abs(int(a["sketch_tokens"]) - 0.3 * 2048) < 5 * (0.21 * 2048) ** 0.5   # Bernoulli(0.3) positions
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (c, k)
    # a rerun of a finished command changes nothing
    before = (run / "en.safetensors").stat().st_mtime_ns
    _run_in_process(_collect_args(demo_model, run, "--sketch-rate", "0.3", langs=langs))
    assert (run / "en.safetensors").stat().st_mtime_ns == before


def test_torchrun_two_processes_equal_one(demo_model, tmp_path):
    """With a sampled sketch: each batch's sample depends on (seed, batch), not on the rank."""
    one, two = tmp_path / "one", tmp_path / "two"
    _run_in_process(_collect_args(demo_model, one, "--sketch-rate", "0.25", langs=("en", "ja")))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                        "-m", "langneurons", *_collect_args(demo_model, two, "--sketch-rate", "0.25",
                                                            langs=("en", "ja"))],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for c in ("en", "ja"):
        a, b = _tensors(one, c), _tensors(two, c)
        for k in ("n_tokens", "count_pos", "count_neg", "hist", "edges", "vmin", "vmax", "sketch_tokens",
                  "sketch_zeros"):
            assert torch.equal(a[k], b[k]), (c, k)
        for k in ("sum", "sumsq"):
            assert torch.allclose(a[k], b[k], rtol=1e-9, atol=1e-9), (c, k)
    meta = json.loads((two / "stats.json").read_text())
    assert meta["languages"]["en"]["sketch"]["rate"] == 0.25 and meta["sketch"]["rate"] == 0.25


# ------------------------------------------------------------------ bad input
def _one_line_error(capsys, args):
    capsys.readouterr()  # drop what earlier in-process runs printed
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("langneurons: error:"), err
    return err[0]


def test_bad_input_is_one_line_exit_2(demo_model, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    short = tmp_path / "short.txt"
    short.write_text("Hello there.\n")
    base = ["collect", "--model", str(demo_model), "--quiet", "--no-cache"]
    msg = _one_line_error(capsys, base + ["--out", str(tmp_path / "o1"), "--lang", f"en={tmp_path / 'nope.txt'}"])
    assert "does not exist" in msg
    msg = _one_line_error(capsys, base + ["--out", str(tmp_path / "o2"), "--lang", f"en={empty}"])
    assert "empty" in msg
    msg = _one_line_error(capsys, base + ["--out", str(tmp_path / "o3"), "--lang", f"en={short}", "--window", "512"])
    assert "fewer than one window" in msg
    msg = _one_line_error(capsys, base + ["--out", str(tmp_path / "o4"), "--lang", f"en={short}", "--site", "post"])
    assert "unknown site" in msg
    msg = _one_line_error(capsys, base + ["--out", str(tmp_path / "o5"), "--lang", f"{short}"])
    assert "CODE=SOURCE" in msg
    for d in ("o1", "o2", "o3", "o4", "o5"):
        assert not (tmp_path / d / "stats.json").exists()


def test_out_with_statistics_of_another_model_is_refused(demo_model, tmp_path, capsys):
    out = tmp_path / "stats"
    _run_in_process(_collect_args(demo_model, out, langs=("en",)))
    before = (out / "en.safetensors").read_bytes()
    other = tmp_path / "other"
    shutil.copytree(demo_model, other)
    m = tiny_model("llama")  # same tokenizer, other weights and shape
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(other)
    cfg.num_hidden_layers = 2
    AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    msg = _one_line_error(capsys, _collect_args(other, out, langs=("en",)))
    assert "another model" in msg
    assert (out / "en.safetensors").read_bytes() == before
    # same model, same language, other corpus: refused too
    msg = _one_line_error(capsys, _collect_args(demo_model, out, langs=("en",))[:-2]
                          + ["--lang", f"en={DEMO_CORPUS / 'fr.txt'}"])
    assert "another corpus" in msg
    del m


def test_moe_model_is_refused_on_the_command_line(demo_model, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM
    moe = tmp_path / "moe"
    shutil.copytree(demo_model, moe, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "mixtral", vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)).save_pretrained(moe)
    msg = _one_line_error(capsys, _collect_args(moe, tmp_path / "o", langs=("en",)))
    assert "mixture-of-experts" in msg


def test_corrupted_statistics_file_on_load(demo_model, tmp_path, capsys):
    out = tmp_path / "stats"
    _run_in_process(_collect_args(demo_model, out, langs=("en",)))
    p = out / "en.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    from langneurons.errors import UserError
    with pytest.raises(UserError, match="corrupt"):
        ActivationStats.load(out).get("en")


def test_sketch_calibrated_on_windows_spread_over_the_corpus():
    """The first batch of a corpus can be unlike the rest (here: windows of 8 frequent tokens only).
    Edges calibrated on windows spread over the whole selection keep every neuron's P10/P50/P90
    within 0.5 percentile points of the exact quantiles of all the activations counted; edges
    fitted to the first batch alone do not."""
    from langneurons.collect import calibration_batches, calibration_rows
    from langneurons.hooks import observe
    torch.manual_seed(0)
    model = tiny_model("llama")
    ad = Adapter(model)
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(3, model.config.vocab_size, (96, 32), generator=g)
    windows[:8] = torch.randint(3, 11, (8, 32), generator=g)     # the first batch: a narrow vocabulary
    batches_np = [w.numpy() for w in windows.split(8)]

    def run(calibrate: bool):
        c = Collector(model, ad, "act", torch.device("cpu"))
        c.stats = LanguageStats(ad.num_layers, ad.width, sketch_bins=64)
        if calibrate:
            c.calibrate(calibration_batches(batches_np, 8, lambda i, items: Batch(torch.from_numpy(items), None)),
                        rows_per_batch=calibration_rows(batches_np, 8), seed=0)
        acts = [[] for _ in range(ad.num_layers)]
        for b in batches_np:
            with observe(ad, "act", lambda l, t: acts[l].append(t.reshape(-1, ad.width).float().clone())):
                c.run_batch(Batch(torch.from_numpy(b), None))
        worst = 0.0
        for p in (0.1, 0.5, 0.9):
            q = c.stats.quantile(p).float()
            for l in range(ad.num_layers):
                X = torch.cat(acts[l])
                below, at_most = (X < q[l]).double().mean(0), (X <= q[l]).double().mean(0)
                worst = max(worst, float(((below - p).clamp_min(0) + (p - at_most).clamp_min(0)).max()) * 100)
        return worst
    assert run(calibrate=True) <= 0.5
    assert run(calibrate=False) > 2.0            # first-batch edges: what the spread calibration avoids


def test_calibration_in_layer_groups_equals_one_pass(monkeypatch):
    """Deep or wide models are calibrated a few layers per pass (bounded memory): same edges."""
    import langneurons.collect as C
    model = tiny_model("llama")
    ad = Adapter(model)
    g = torch.Generator().manual_seed(3)
    batches_np = [w.numpy() for w in torch.randint(3, model.config.vocab_size, (40, 16), generator=g).split(8)]

    def edges():
        c = Collector(model, ad, "act", torch.device("cpu"))
        c.stats = LanguageStats(ad.num_layers, ad.width, sketch_bins=16)
        c.calibrate(C.calibration_batches(batches_np, 8, lambda i, items: Batch(torch.from_numpy(items), None)),
                    rows_per_batch=50, seed=0)
        return c.stats.edges.clone()
    one = edges()
    monkeypatch.setattr(C, "CALIBRATION_MEMORY", 1)          # one layer per pass
    assert torch.equal(edges(), one)
