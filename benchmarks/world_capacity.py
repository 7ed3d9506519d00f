"""How many edits a world's edited layers hold: MEMIT's Global-Edit efficacy, relation specificity
and update size against the number of edits, for editors, lambdas and edited layers.

    python benchmarks/world_capacity.py --world results/world17/world-1200l --n 100 500 1000 \
        --run memit:60:1,2,3 --run memit-frozen:60:1,2,3 --json results/world_capacity.json

Each `--run EDITOR:LAMBDA:LAYERS` is measured at every `--n` on the same requests (CounterFact
form, distinct subjects, `--seed`), from z optimised once per size at the world preset's z layer
(the last of the preset's layers; every run's layers must end there so that z is shared). LAMBDA
is the weight of C at every layer, optionally followed by LAYER=WEIGHT for layers that have their
own (`memit:200,2=60000:1,2,3`); a run without them weighs every layer alike. Reports
ES / PS / NS / Score / RS, ||Delta||_F / ||W||_F per layer, the output change on the corpus and
the share of ||Delta||^2 in the 1% least-used key directions (bench/world_check.py), and seconds
per run. docs/realistic-world.md (session 6)
has the numbers on world-1200l.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def parse_run(text: str) -> tuple[str, float, dict[int, float], list[int]]:
    editor, lam, layers = text.split(":")
    base, *own = lam.split(",")
    by_layer = {int(k): float(v) for k, v in (item.split("=") for item in own)}
    return editor, float(base), by_layer, [int(x) for x in layers.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, default=None, help="world folder (default: shipped)")
    ap.add_argument("--n", type=int, nargs="+", default=[100])
    ap.add_argument("--run", action="append", type=parse_run, help="EDITOR:LAMBDA:LAYERS")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from collabedit.bench.lab import Lab
    from collabedit.bench.world_check import score_global_edit
    from collabedit.world.store import load_world

    bundle = load_world(args.world)
    base = Lab.open(bundle, editor="memit")
    cfg0 = base.cfg
    runs = args.run or [
        ("memit", cfg0.mom2_update_weight, cfg0.mom2_update_weight_by_layer, base.layers)
    ]
    rows = []
    for n in args.n:
        requests = base.requests(n, seed=args.seed)
        t0 = time.perf_counter()
        z_session = base.session(requests)
        z_seconds = round(time.perf_counter() - t0, 1)
        print(f"[{n} edits] z: {z_seconds} s", flush=True)
        for editor, lam, by_layer, layers in runs:
            cfg = cfg0.model_copy(
                update={
                    "mom2_update_weight": lam,
                    "mom2_update_weight_by_layer": by_layer,
                    "layers": layers,
                }
            )
            lab = Lab.open(bundle, cfg=cfg, editor=editor)
            t0 = time.perf_counter()
            session = lab.setup.editor.session(
                lab.model, lab.tok, requests, lab.cfg, reuse=z_session
            )
            measured = score_global_edit(lab, lab.global_deltas(session), requests)
            row = {
                "n": n,
                "editor": editor,
                "lambda": lam,
                "lambda_by_layer": by_layer,
                "layers": layers,
                **measured,
                "z_seconds": z_seconds,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"world": str(bundle.path), "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
