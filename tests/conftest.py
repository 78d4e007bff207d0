"""Shared fixtures: real data location, and tiny trained models cached across test runs.

Trained models and their statistics are cached under ``$LANGNEURONS_TEST_CACHE`` (default
``<repo>/.cache/tests``), keyed by ``TRAINER_VERSION``/``COLLECT_VERSION``, the corpus and the
settings, so only the first run of a fresh checkout pays for training (about a minute each on two
cores). Bump those versions when a change alters what training or collection produce.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from langneurons.testing import SHARED8_TEXT

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LANGNEURONS_SHARED_DATA", REPO.parent / "shared" / "data"))
CACHE = Path(os.environ.get("LANGNEURONS_TEST_CACHE", REPO / ".cache" / "tests"))
DEMO_CORPUS = REPO / "src" / "langneurons" / "data" / "demo_corpus"

#: Eight languages of ../shared/data in five scripts (see langneurons.testing.SHARED8_TEXT)
SHARED_TEXT = SHARED8_TEXT

# The test models are tiny: one thread is as fast as several and does not stall when the machine is
# shared (spinning intra-op threads on an oversubscribed CPU cost more than they save).
torch.set_num_threads(1)


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"needs {p} (the shared test data beside the repository; "
                    "set LANGNEURONS_SHARED_DATA to its location)")
    return p


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared test data at {SHARED_DATA} (set LANGNEURONS_SHARED_DATA)")
    return SHARED_DATA


def _key(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Path) and p.is_file():
            h.update(p.read_bytes())
        else:
            h.update(str(p).encode())
    return h.hexdigest()[:12]


def _build(target: Path, build) -> Path:
    """Build into a temporary sibling, then rename: a killed run never leaves a half cache entry."""
    if (target / ".complete").is_file():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    (tmp / ".complete").write_text("ok")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def _train(lang_files: dict[str, list[Path]], name: str, steps: int) -> Path:
    from langneurons.corpus import LanguageSource
    from langneurons.tiny import TinyConfig, train_tiny
    import langneurons.tiny as tiny_mod
    files = [f for fs in lang_files.values() for f in fs]
    cfg = TinyConfig(steps=steps, seed=0)
    key = _key(tiny_mod.TRAINER_VERSION, repr(cfg), *files, *lang_files)
    target = CACHE / f"{name}-{key}"

    def build(tmp: Path):
        sources = [LanguageSource(c, ",".join(map(str, fs)), [str(f) for f in fs]) for c, fs in lang_files.items()]
        # training is the one step of the suite that gains from a second thread
        train_tiny(sources, tmp, dataclasses.replace(cfg, threads=min(2, os.cpu_count() or 1)), progress=False)
    return _build(target, build)


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """A tiny Llama trained on the embedded demo corpus (10 languages, always available)."""
    langs = {p.stem: [p] for p in sorted(DEMO_CORPUS.glob("*.txt"))}
    return _train(langs, "demo", steps=400)


@pytest.fixture(scope="session")
def shared_model(shared_data) -> Path:
    """A tiny Llama trained on 8 languages of ../shared/data text (5 scripts)."""
    langs = {c: [shared_data / f for f in fs] for c, fs in SHARED_TEXT.items()}
    return _train(langs, "shared8", steps=600)


def _collect(model_dir: Path, lang_files: dict[str, list[Path]], name: str, **kw) -> Path:
    from langneurons.collect import CollectConfig, collect
    from langneurons.corpus import LanguageSource
    import langneurons.collect as collect_mod
    import langneurons.stats as stats_mod
    settings = dict(window=64, max_tokens=16384, batch_size=16, sketch_bins=64, **kw)
    key = _key(model_dir, collect_mod.COLLECT_VERSION, stats_mod.STATS_FORMAT, repr(sorted(settings.items())),
               *[f for fs in lang_files.values() for f in fs])
    target = CACHE / f"{name}-{key}"

    def build(tmp: Path):
        sources = [LanguageSource(c, ",".join(map(str, fs)), [str(f) for f in fs]) for c, fs in lang_files.items()]
        collect(CollectConfig(model=str(model_dir), languages=sources, out=tmp, device="cpu", progress=False,
                              cache_dir=None, **settings))
    return _build(target, build)


@pytest.fixture(scope="session")
def demo_stats(demo_model) -> Path:
    """Window statistics (site act) of ``demo_model`` on its held-out text plus its corpus."""
    langs = {p.stem: [p] for p in sorted(DEMO_CORPUS.glob("*.txt"))}
    return _collect(demo_model, langs, "demo-stats")


@pytest.fixture(scope="session")
def shared_stats(shared_model, shared_data) -> Path:
    """Window statistics (site act) of ``shared_model`` on the FLORES devtest of its 8 languages."""
    langs = {c: [shared_data / fs[0]] for c, fs in SHARED_TEXT.items()}
    return _collect(shared_model, langs, "shared8-stats")
