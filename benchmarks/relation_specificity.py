"""Relation specificity (RippleEdits' term, our metric RS): after an edit of one relation of a
subject, how many of that subject's other relations keep their answers. The papers' metrics do
not see it (their neighbourhood prompts ask about other subjects); issue 17 measured MEMIT keeping
36% on the world.

    python benchmarks/relation_specificity.py --n 200 --json results/relation_specificity.json

Per editor (world presets): Global-Edit of `n` zsRE-form requests on the world's held-out subjects
(the shipped MALMEN hypernetwork never saw them), then RS, the top-1 token accuracy of the true
object on one question for each of the edited subject's other relations (the requests' relation
prompts), against the same on the unedited model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--editors", nargs="+", default=["malmen", "memit-frozen"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from collabedit.bench.lab import ZSRE_KEYS, Lab
    from collabedit.editors import closed_form_edit
    from collabedit.world.edit_requests import subject_split, world_requests
    from collabedit.world.store import load_world

    bundle = load_world()
    held = subject_split(bundle.world, "held-out")
    reqs = world_requests(bundle.world, args.n, seed=0, form="zsre", subjects=held)
    rows = []
    for editor in args.editors:
        lab = Lab.open(bundle, editor=editor)
        if set(held) & lab.setup.editor.trained_subjects(lab.cfg):
            raise SystemExit(f"{editor}'s learned parts have seen held-out subjects")
        if not rows:
            rows.append({"editor": "unedited"} | _rounded(lab.score(reqs, ZSRE_KEYS)))
            print(json.dumps(rows[-1]), flush=True)
        start = time.perf_counter()
        closed_form_edit(lab.session(reqs), lab.setup.regulariser, apply=True)
        seconds = time.perf_counter() - start
        row = {"editor": editor, "n": len(reqs), "seconds": round(seconds, 1)}
        row |= _rounded(lab.score(reqs, ZSRE_KEYS))
        lab.reset()
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


def _rounded(metrics: dict) -> dict:
    return {k: round(v, 1) for k, v in metrics.items()}


if __name__ == "__main__":
    main()
