"""MALMEN against MEMIT on the same world requests: quality, seconds per request, peak memory.

    python benchmarks/malmen_vs_memit.py --n 200 --massive 1000 --json results/malmen_vs_memit.json

Each row is one Global-Edit in a fresh process (so its peak RSS is its own), on requests about the
world's held-out subjects (the shipped hypernetwork never saw them), zsRE form then CounterFact
form, with each editor's world preset; the covariance statistics MEMIT needs are cached before
timing (both editors are timed without their one-off costs: MEMIT's statistics, MALMEN's
training). `--massive N` adds a MALMEN edit of N requests: every held-out subject edited on
several relations (the world has 200 held-out subjects, so N > 200 means several facts per
subject, which MEMIT's batches refuse).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def run_child(editor: str, n: int, form: str, massive: bool) -> dict:
    argv = [sys.executable, __file__, "--child", editor, "--n", str(n), "--form", form]
    if massive:
        argv.append("--child-massive")
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(editor: str, n: int, form: str, massive: bool) -> None:
    import torch

    from collabedit.bench.lab import CF_KEYS, ZSRE_KEYS, Lab
    from collabedit.editors import closed_form_edit
    from collabedit.world.edit_requests import subject_split, training_requests, world_requests
    from collabedit.world.store import load_world

    torch.set_num_threads(2)
    bundle = load_world()
    lab = Lab.open(bundle, editor=editor)  # the regulariser (MEMIT: statistics) before timing
    # the same requests for every editor: the subjects the shipped hypernetwork never saw
    held = subject_split(bundle.world, "held-out")
    if set(held) & editor_seen(lab):
        raise SystemExit(f"{editor}'s learned parts have seen held-out subjects")
    if massive:
        per = -(-n // len(held))
        reqs = training_requests(bundle.world, held, per, seed=11)[:n]
    else:
        reqs = world_requests(bundle.world, n, seed=0, form=form, subjects=held)  # type: ignore[arg-type]
    start = time.perf_counter()
    session = lab.session(reqs)
    result = closed_form_edit(session, lab.setup.regulariser, apply=True)
    seconds = time.perf_counter() - start
    keys = ZSRE_KEYS if form == "zsre" else CF_KEYS
    scores = {} if massive else lab.score(reqs, keys)
    if massive:
        from collabedit.evaluate.scoring import score_targets

        hits = score_targets(
            bundle.model, bundle.tokenizer, [(r.rewrite_prompt, r.target_new) for r in reqs]
        )
        scores = {"EA": 100.0 * sum(h.token_accuracy for h in hits) / len(hits)}
    row = {
        "editor": editor,
        "n": len(reqs),
        "form": "mixed (several relations per subject)" if massive else form,
        "seconds": round(seconds, 2),
        "seconds_per_request": round(seconds / len(reqs), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "delta_norm": {e.layer: round(float(e.delta.norm()), 1) for e in result.layers},
        "timings": {k: round(v, 2) for k, v in result.timings.items()},
    } | {k: round(v, 1) for k, v in scores.items()}
    print(json.dumps(row))


def editor_seen(lab) -> frozenset[str]:
    return lab.setup.editor.trained_subjects(lab.cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--form", default="zsre", help=argparse.SUPPRESS)
    ap.add_argument("--massive", type=int, help="also a MALMEN edit of this many requests")
    ap.add_argument("--child-massive", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--editors", nargs="+", default=["malmen", "memit-frozen"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.n, args.form, args.child_massive)
        return
    rows = []
    for form in ("zsre", "counterfact"):
        for editor in args.editors:
            rows.append(run_child(editor, args.n, form, False))
            print(json.dumps(rows[-1]), flush=True)
    if args.massive:
        rows.append(run_child("malmen", args.massive, "zsre", True))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
