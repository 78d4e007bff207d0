"""One self-contained HTML page that shows what a run directory holds.

``render_report(run_dir)`` walks ``run_dir`` (sub-directories included; hidden ones skipped, and of
a model directory only its ``langneurons_train.json``), reads every ``*.json`` and sorts it by its
format tag through the artifact registry (:mod:`langneurons.artifacts`): each registered kind has a
section here, rendered in the registry's order (statistics, neuron sets, perplexity, steering, tasks,
fine-tuning, bridge probes, rankings, spectra, BLI and MRC, ...). PNG figures written beside an
artifact are shown in its section; figures the report draws itself have integer layer ticks.

Files with a known tag but content its readers cannot use are listed in their section with the
reason; JSON files with no tag or an unknown one, and files that do not parse, go under "Other
files". Paths inside the run directory are shown relative to it.

Everything is inline: CSS in a ``<style>`` element, images as ``data:image/png;base64`` URIs, no
scripts and no network references, so the file can be mailed or archived alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from .. import artifacts
from ..atomic import atomic_write_text
from ..errors import UserError
from .helpers import _CSS, _RUN_PREFIXES, Context, Item, _ci, _dict, _e, _fmt, _is_num, _mean, img_png

__all__ = ["render_report", "build_html", "results_sentences", "run_results"]

#: JSON files of model, tokenizer or adapter directories, never rendered.
_SKIP_NAMES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "adapter_config.json", "vocab.json", "added_tokens.json",
               "trainer_state.json", "preprocessor_config.json"}
#: The one file read inside a model directory (the tiny-train record).
_MODEL_DIR_FILES = {"langneurons_train.json"}
_MAX_JSON_BYTES = 64 * 1024 * 1024


# ---------------------------------------------------------------------------------------------- the page
def _walk(run_dir: Path) -> tuple[list[Path], list[Path]]:
    jsons, pngs = [], []
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir)
        if any(part.startswith(".") for part in rel.parts):
            continue
        in_model = any((run_dir.joinpath(*rel.parts[:i]) / "config.json").is_file()
                       and (run_dir.joinpath(*rel.parts[:i]) / "tokenizer.json").exists()
                       for i in range(1, len(rel.parts)))
        if in_model:
            if p.name in _MODEL_DIR_FILES and len(rel.parts) > 1 and p.is_file():
                jsons.append(p)
            continue
        if p.is_file() and p.suffix == ".json" and p.name not in _SKIP_NAMES:
            jsons.append(p)
        elif p.is_file() and p.suffix == ".png":
            pngs.append(p)
    return jsons, pngs


def summary_lines(groups: dict, run_dir: Path) -> list[str]:
    """What the run holds (statistics, neuron sets), in one sentence each."""
    out = []
    for it in groups.get("stats", []):
        d = it.doc
        langs = _dict(d.get("languages"))
        toks = [v.get("n_tokens") for v in langs.values() if isinstance(v, dict)]
        m = _dict(d.get("model"))
        out.append(f"{it.rel}: activation statistics of {len(langs)} languages "
                   f"({_fmt(sum(t for t in toks if _is_num(t)), 0)} tokens) at site {m.get('site', '?')} of "
                   f"{m.get('num_layers', '?')} x {m.get('width', '?')} neurons.")
    for it in groups.get("neuronset", []):
        counts = {c: len(v) for c, v in _dict(it.doc.get("neurons")).items() if isinstance(v, list)}
        if counts:
            lo, hi = min(counts.values()), max(counts.values())
            span = f"{lo}" if lo == hi else f"{lo}-{hi}"
            out.append(f"{it.rel}: {_dict(it.doc.get('method')).get('name', '?')} selected {span} "
                       f"neurons per language for {len(counts)} languages.")
    return out


def _count_ci(ci) -> str:
    return f" (95% CI {_fmt(ci[0], 0)}-{_fmt(ci[1], 0)})" if isinstance(ci, list) and len(ci) == 2 else ""


def results_sentences(groups: dict) -> list[str]:
    """The results paragraph: each headline finding with its 95% interval and the comparison it
    rests on (tiny-model quality, the deactivation matrix against random controls, steering against
    the unsteered model, fine-tuning and bridge verdicts)."""
    out = []
    for it in groups.get("tiny", []):
        d = it.doc
        h = _dict(d.get("heldout"))
        share, ppl = h.get("lid_share_mean"), _dict(h.get("ppl"))
        cfg = _dict(d.get("config"))
        text = (f"The model of {it.rel} ({len(_dict(d.get('languages')))} languages, {cfg.get('steps', '?')} steps "
                f"in {_fmt(d.get('train_seconds'), 0)} s)")
        if _is_num(share):
            text += (" continues held-out line prefixes in the prefix's language "
                     f"{_ci(share, h.get('lid_share_mean_ci95'), 2)} of the time (language identifier, sampled "
                     "continuations)")
        if ppl:
            lo, hi = min(ppl, key=ppl.get), max(ppl, key=ppl.get)
            text += (("; its" if _is_num(share) else ": its") + f" held-out perplexity runs from {ppl[lo]:.1f} ({lo}) "
                     f"to {ppl[hi]:.1f} ({hi})")
        if _is_num(share) or ppl:
            out.append(text + ".")
    for it in groups.get("ppl", []):
        d = it.doc
        dom = _dict(d.get("diagonal_dominance"))
        if not dom:
            continue
        st = _dict(d.get("settings"))
        head = _dict(d.get("headline"))
        rd = _dict(head.get("row_dominance"))
        text = (f"Deactivating a language's neurons ({st.get('neuron_method') or 'neuron set'}, operator "
                f"{st.get('operator', '?')}; {it.rel}) raised that language's own NLL more than any other "
                f"language's for {dom.get('row_count', '?')} of {dom.get('languages', '?')} languages"
                + _count_ci(rd.get("ci95") or dom.get("row_count_ci95")))
        vs = _dict(d.get("vs_random"))
        own = _mean(_dict(v).get("delta_nll") for v in vs.values())
        rnd = _mean(_dict(v).get("random_delta_nll") for v in vs.values())
        above = _dict(head.get("own_above_random"))
        if above:
            text += (f"; the own-language damage exceeded that of random neuron sets of the same size per layer "
                     f"for {above.get('count')} of {above.get('of')}, with non-overlapping 95% intervals for "
                     f"{above.get('separated')}")
        if own is not None and rnd is not None:
            text += f" (mean own ΔNLL {own:.3f} nats/token against {rnd:.3f} for the random sets)"
        out.append(text + ".")
        sw = _dict(d.get("sweep"))
        sel = {op: _dict(v) for op, v in _dict(sw.get("selectivity")).items() if _is_num(_dict(v).get("value"))}
        if len(sel) > 1:
            best = max(sel, key=lambda op: sel[op]["value"])
            out.append("Across the deactivation values swept, own-minus-other-language damage (nats/token) was "
                       + ", ".join(f"{op} {_ci(v['value'], v.get('ci95'))}" for op, v in sel.items())
                       + f"; {best} deactivated most selectively.")
    for it in groups.get("steer", []):
        d = it.doc
        ops = _dict(d.get("operators"))
        gen = []
        base = None
        for op, r in ops.items():
            g = _dict(_dict(r).get("generation"))
            if _is_num(g.get("share_mean")):
                ratio = g.get("ratio")
                gen.append(f"{op} {_ci(g['share_mean'], g.get('share_mean_ci95'), 2)}"
                           + (f" ({ratio:.1f}x, {'separated' if g.get('separated') else 'intervals overlap'})"
                              if _is_num(ratio) else ""))
                if base is None and _is_num(g.get("baseline_share_mean")):
                    base = _ci(g["baseline_share_mean"], g.get("baseline_share_mean_ci95"), 2)
        if gen:
            n = next((_dict(_dict(r).get("generation")).get("n") for r in ops.values()), None)
            out.append(f"Steering toward each target language ({it.rel}), the mean share of sampled generations "
                       f"identified as the target was " + ", ".join(gen)
                       + (f", against {base} unsteered" if base else "")
                       + (f" ({n} generations per target)" if n else "") + ".")
        lss = [f"{op} {_ci(_dict(r).get('lss_mean'), _dict(r).get('lss_mean_ci95'), 2)}"
               for op, r in ops.items() if _is_num(_dict(r).get("lss_mean"))]
        if lss:
            out.append("Language Steering Shift on cloze items (share of items whose preference moved toward "
                       "the target; 0.5 would be chance-level movement): " + ", ".join(lss) + ".")
    for it in groups.get("compare", []):
        summ = _dict(it.doc.get("summary"))
        shares = {m: _dict(v) for m, v in summ.items() if _is_num(_dict(v).get("share"))}
        if shares:
            order = sorted(shares, key=lambda m: -shares[m]["share"])
            base = _mean(_dict(_dict(it.doc.get("baseline")).get("share")).values())
            out.append(f"On the scoreboard ({it.rel}; {len(it.doc.get('targets') or [])} targets), the mean target "
                       "share of steered generations was " + ", ".join(
                           f"{m} {_ci(shares[m]['share'], shares[m].get('share_ci95'), 2)}" for m in order)
                       + (f" (unsteered {base:.2f})" if base is not None else "") + "; collateral ΔNLL on the other "
                       "languages under steering: " + ", ".join(
                           f"{m} {_ci(shares[m].get('steer_other_dnll'), shares[m].get('steer_other_dnll_ci95'), 2)}"
                           for m in order if _is_num(shares[m].get("steer_other_dnll"))) + ".")
    for it in groups.get("finetune.experiment", []):
        for kind, v in _dict(it.doc.get("verdict")).items():
            out.append(f"{it.rel}: with {kind}-language masks, language-neuron LoRA "
                       f"{'beats' if _dict(v).get('beats_random') else 'does not beat'} matched random neurons.")
    for it in groups.get("bridge.selection", []):
        sel = [f"{p} via {_dict(v).get('selected')}" for p, v in it.doc["pairs"].items()]
        if sel:
            out.append(f"{it.rel}: selected bridge languages: " + ", ".join(sel) + ".")
    return out


def _prefix_patterns(run_dir: Path) -> tuple:
    spellings = {str(run_dir.resolve()), str(run_dir.absolute())}
    if not run_dir.is_absolute() and str(run_dir) not in (".", ""):
        spellings.add(str(run_dir))
    return tuple(re.compile(r"(?<![\w.\-/])" + re.escape(s.rstrip("/")) + r"(?:/|(?![\w.\-/]))")
                 for s in sorted(spellings, key=len, reverse=True))


def build_html(run_dir: Path, title: Optional[str] = None) -> str:
    """The report page of ``run_dir`` as a string."""
    run_dir = Path(run_dir)
    token = _RUN_PREFIXES.set(_prefix_patterns(run_dir))
    try:
        return _build(run_dir, title)
    finally:
        _RUN_PREFIXES.reset(token)


def _read(run_dir: Path, jsons: list[Path]) -> tuple[dict, dict, list, list]:
    """Every JSON file sorted by kind: ``(groups, malformed, problems, others)``."""
    groups: dict[str, list[Item]] = {k: [] for k in artifacts.kinds()}
    malformed: dict[str, list[str]] = {k: [] for k in artifacts.kinds()}
    problems, others = [], []
    for p in jsons:
        rel = p.relative_to(run_dir).as_posix()
        try:
            if p.stat().st_size > _MAX_JSON_BYTES:
                others.append(f"{rel} (not read: larger than {_MAX_JSON_BYTES >> 20} MiB)")
                continue
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            problems.append(f"{rel}: {e}")
            continue
        kind = artifacts.kind_of(d)
        if kind is None:
            others.append(rel)
            continue
        try:
            groups[kind].append(Item(p, rel, artifacts.validate(d, kind, rel)))
        except UserError as e:
            malformed[kind].append(str(e))
    return groups, malformed, problems, others


def _build(run_dir: Path, title: Optional[str]) -> str:
    jsons, pngs = _walk(run_dir)
    groups, malformed, problems, others = _read(run_dir, jsons)

    ctx = Context(run_dir, pngs)
    name = title or "langneurons report: " + run_dir.resolve().name
    body = [f"<h1>{_e(name)}</h1>", f'<p class="meta">run directory <code>{_e(run_dir.resolve().name)}</code>; '
            "paths below are relative to it</p>"]
    results = results_sentences(groups)
    if results:
        body.append("<h2>Results</h2>")
        body.append('<p class="results">' + " ".join(_e(f) for f in results)
                    + ' <span class="meta">Bracketed ranges are 95% bootstrap intervals.</span></p>')
    findings = summary_lines(groups, run_dir)
    if findings:
        body.append("<h2>What the run holds</h2>")
        body.append("<ul>" + "".join(f"<li>{_e(f)}</li>" for f in findings) + "</ul>")
    shown = False
    for kind in artifacts.kinds():
        items, bad = groups[kind], malformed[kind]
        if not items and not bad:
            continue
        shown = True
        body.append(f"<h2>{_e(artifacts.KINDS[kind].title)}</h2>")
        if items:
            try:
                body.append(artifacts.renderer(kind)(items, ctx))
            except Exception as e:  # noqa: BLE001 - one bad section must not lose the rest of the report
                body.append(f'<p class="err">could not render {_e(", ".join(i.rel for i in items))}: '
                            f"{_e(e.__class__.__name__)}: {_e(e)}</p>")
        if bad:
            body.append("<ul>" + "".join(f'<li class="err">{_e(b)}</li>' for b in bad) + "</ul>")
    rest = [p for p in pngs if p not in ctx.used]
    if rest:
        body.append("<h2>Figures</h2>")
        body += [img_png(p, p.relative_to(run_dir).as_posix()) for p in rest]
    if others or problems:
        body.append("<h2>Other files</h2>")
        if others:
            body.append("<ul>" + "".join(f"<li><code>{_e(o)}</code></li>" for o in others) + "</ul>")
        if problems:
            body.append("<ul>" + "".join(f'<li class="err">{_e(o)}</li>' for o in problems) + "</ul>")
    if not shown and not rest and not others and not problems:
        body.append("<p>Nothing to show: the directory holds no statistics, neuron sets, results or figures.</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_e(name)}</title>\n<style>{_CSS}</style>\n</head>\n"
            "<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def run_results(run_dir) -> list[str]:
    """The results paragraph of ``run_dir`` as sentences (the demo prints them)."""
    run_dir = Path(run_dir)
    token = _RUN_PREFIXES.set(_prefix_patterns(run_dir))
    try:
        groups, _, _, _ = _read(run_dir, _walk(run_dir)[0])
        from .helpers import _relative
        return [_relative(s) for s in results_sentences(groups)]
    finally:
        _RUN_PREFIXES.reset(token)


def render_report(run_dir, out=None, title: Optional[str] = None) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``run_dir/report.html``); return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; give the --out directory of a langneurons run")
    target = Path(out) if out is not None else run_dir / "report.html"
    atomic_write_text(target, build_html(run_dir, title))
    return target
