"""Relation specificity (RippleEdits' term): after an edit of one relation of a subject, how many of
that subject's other relations keep their answers. No metric of the papers sees it (their
neighbourhood prompts ask about other subjects); issue 17 measured MEMIT keeping 36% on the world.

    python benchmarks/relation_specificity.py --n 200 --json results/relation_specificity.json

Per editor (world presets): Global-Edit of `n` zsRE-form requests on the world's held-out subjects
(the shipped MALMEN hypernetwork never saw them), then the top-1 token accuracy of the true object
on each edited subject's other relations' questions (both phrasings), against the same on the
unedited model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def specificity_pairs(world, requests) -> list[tuple[str, str]]:
    pairs = []
    for r in requests:
        for rel in world.relations:
            if rel.id == r.relation_id:
                continue
            pairs += [(q.format(r.subject), world.facts[r.subject][rel.id]) for q in rel.questions]
    return pairs


def kept(model, tokenizer, pairs) -> float:
    from collabedit.evaluate.scoring import score_targets

    scores = score_targets(model, tokenizer, pairs)
    return 100.0 * sum(s.token_accuracy for s in scores) / len(scores)


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
    pairs = specificity_pairs(bundle.world, reqs)
    rows = [{"editor": "unedited", "RS": round(kept(bundle.model, bundle.tokenizer, pairs), 1)}]
    print(json.dumps(rows[-1]), flush=True)
    for editor in args.editors:
        lab = Lab.open(bundle, editor=editor)
        if set(held) & lab.setup.editor.trained_subjects(lab.cfg):
            raise SystemExit(f"{editor}'s learned parts have seen held-out subjects")
        start = time.perf_counter()
        closed_form_edit(lab.session(reqs), lab.setup.regulariser, apply=True)
        seconds = time.perf_counter() - start
        row = {
            "editor": editor,
            "n": len(reqs),
            "prompts": len(pairs),
            "seconds": round(seconds, 1),
        }
        row |= {"RS": round(kept(bundle.model, bundle.tokenizer, pairs), 1)}
        row |= {k: round(v, 1) for k, v in lab.score(reqs, ZSRE_KEYS).items()}
        lab.reset()
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
