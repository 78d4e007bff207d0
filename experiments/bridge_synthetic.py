"""Chained-prompt BLI on a tiny model that can translate: does a bridge language help when the
direct pair was never seen, and what does the prompt's last token do?

The tiny models of the other experiments learn from monolingual text and translate no word, so
their BLI accuracy is 0 with and without a bridge. This experiment checks the BridgeX-ICL machinery
(``langneurons.bridge.icl.run_bli``: the chained prompt, the bridge word generated first, exact match
over unique source words) on a model that has memorised word translations.

Data: triples (de, en, zh) of the German and Chinese translations of the same English word (first
translation in the MUSE ``en-de`` and ``en-zh`` dictionaries). A tiny Llama is trained
(``tiny-train``) on lines in the BLI prompt format, each 4 times:

* every triple: ``Deutsch:"d"→English:"e"`` and ``English:"e"→中文:"z"``;
* the *train* half only: ``Deutsch:"d"→English:"e"→中文:"z"`` (the chained pattern);
* no ``Deutsch:"d"→中文:...`` line for a *test* word.

BLI de->zh on both halves, without a bridge, through ``en`` and through ``fr`` (a language the model
never saw: a control), with plain prompts and with ``token_healing``. The model's BPE merges ``:"``
into one token, so a prompt ending in ``中文:`` stops inside a token the model always saw whole;
healing takes that last token back and constrains the first generated token to start with ``:``.

Time: about 2 minutes on 2 cores.

Run:  python experiments/bridge_synthetic.py [--out .cache/experiments/bridge_synthetic] [--words 400]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LANGNEURONS_SHARED_DATA", REPO.parent / "shared" / "data"))
ARROW = "→"


def first_translations(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isalpha() and parts[0] != parts[1]:
            out.setdefault(parts[0], parts[1])
    return out


def triples(n: int, seed: int) -> list[tuple[str, str, str]]:
    """Up to ``n`` (de, en, zh) triples with distinct German words."""
    de = first_translations(SHARED / "muse" / "full" / "en-de.txt")
    zh = first_translations(SHARED / "muse" / "full" / "en-zh.txt")
    common = sorted(w for w in de if w in zh and de[w].isalpha() and len(w) >= 3)
    random.Random(seed).shuffle(common)
    out, seen = [], set()
    for w in common:
        if de[w] not in seen:
            seen.add(de[w])
            out.append((de[w], w, zh[w]))
        if len(out) == n:
            break
    return out


def run(out: Path, words: int = 400, steps: int = 1200, seed: int = 0, quiet: bool = True) -> dict:
    """Build the data, train (or reuse) the model, and return the BLI accuracies."""
    import torch
    from langneurons.bridge.icl import HFGenerator, run_bli
    from langneurons.bridge.names import ENDONYMS
    from langneurons.cli import main as cli
    from langneurons.runtime import Session, load_model
    D, E, Z = ENDONYMS["de"], ENDONYMS["en"], ENDONYMS["zh"]
    tri = triples(words, seed)
    train, test = tri[:len(tri) // 2], tri[len(tri) // 2:]
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files = {"de": [f'{D}:"{d}"{ARROW}{E}:"{e}"' for d, e, _ in tri],
             "zh": [f'{E}:"{e}"{ARROW}{Z}:"{z}"' for _, e, z in tri],
             "en": [f'{D}:"{d}"{ARROW}{E}:"{e}"{ARROW}{Z}:"{z}"' for d, e, z in train]}
    for code, lines in files.items():
        lines = lines * 4
        rng.shuffle(lines)
        (data / f"{code}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    model_dir = out / "model"
    if not (model_dir / "langneurons_train.json").is_file():
        rc = cli(["tiny-train", *[a for c in files for a in ("--lang", f"{c}={data / (c + '.txt')}")],
                  "--out", str(model_dir), "--steps", str(steps), "--seed", str(seed),
                  "--threads", str(min(2, os.cpu_count() or 1)), *(["--quiet"] if quiet else [])])
        if rc:
            raise SystemExit(rc)
    model, tok = load_model(str(model_dir), torch.device("cpu"), torch.float32)
    names = {"de": D, "en": E, "zh": Z, "fr": ENDONYMS["fr"]}
    report = {"words": {"train": len(train), "test": len(test)}, "merged_colon_quote": len(tok(':"',
              add_special_tokens=False)["input_ids"]) == 1}
    for healing in (False, True):
        gen = HFGenerator(Session(model, tok, batch_size=32), max_new_tokens=10, token_healing=healing)
        for split, items in (("train", train), ("test", test)):
            res = run_bli(gen, [(d, z) for d, _, z in items], "de", "zh", [None, "en", "fr"], names)
            rec = res["conditions"]["en"]["records"]
            report[f"{'healed' if healing else 'plain'}/{split}"] = {
                **{k: v["accuracy"] for k, v in res["conditions"].items()},
                "en_bridge_word_right": sum(r["bridge_word"] == e for r, (_, e, _) in zip(rec, items)) / len(items),
                "example": {k: rec[0][k] for k in ("prompt", "output", "references")}}
    (out / "bli.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / ".cache" / "experiments" / "bridge_synthetic")
    ap.add_argument("--words", type=int, default=400, help="triples; half train, half test [400]")
    ap.add_argument("--steps", type=int, default=1200, help="tiny-train steps [1200]")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not (SHARED / "muse" / "full" / "en-zh.txt").is_file():
        print(f"bridge_synthetic: needs {SHARED / 'muse'} (set LANGNEURONS_SHARED_DATA)", file=sys.stderr)
        return 2
    import torch
    torch.set_num_threads(2)
    r = run(args.out, args.words, args.steps, args.seed, quiet=False)
    print(f"':\"' is one token: {r['merged_colon_quote']}; words: {r['words']}")
    for key, v in r.items():
        if "/" in key:
            print(f"{key:12s} baseline {v['baseline']:.3f}  via en {v['en']:.3f}  via fr {v['fr']:.3f}  "
                  f"(en bridge word right {v['en_bridge_word_right']:.3f})  e.g. {v['example']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
