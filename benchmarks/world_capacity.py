"""How many edits a world's edited layers hold: MEMIT's Global-Edit efficacy, relation specificity
and update size against the number of edits, for editors, lambdas and edited layers.

    python benchmarks/world_capacity.py --world results/world17/world-1200l --n 100 500 1000 \
        --run memit:60:1,2,3 --run memit-frozen:60:1,2,3 --json results/world_capacity.json

Each `--run EDITOR:LAMBDA:LAYERS` is measured at every `--n` on the same requests (CounterFact
form, distinct subjects, `--seed`), from z optimised once per size at the world preset's z layer
(the last of the preset's layers; every run's layers must end there so that z is shared). Reports
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


def parse_run(text: str) -> tuple[str, float, list[int]]:
    editor, lam, layers = text.split(":")
    return editor, float(lam), [int(x) for x in layers.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, default=None, help="world folder (default: shipped)")
    ap.add_argument("--n", type=int, nargs="+", default=[100])
    ap.add_argument("--run", action="append", type=parse_run, help="EDITOR:LAMBDA:LAYERS")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from collabedit.bench.lab import CF_KEYS, Lab
    from collabedit.bench.world_check import low_variance_share, output_change
    from collabedit.collab.protocol import apply_deltas
    from collabedit.models import arch
    from collabedit.world.store import load_world

    bundle = load_world(args.world)
    base = Lab.open(bundle, editor="memit")
    runs = args.run or [("memit", base.cfg.mom2_update_weight, base.layers)]
    weights = {}
    rows = []
    for n in args.n:
        requests = base.requests(n, seed=args.seed)
        t0 = time.perf_counter()
        z_session = base.session(requests)
        z_seconds = round(time.perf_counter() - t0, 1)
        print(f"[{n} edits] z: {z_seconds} s", flush=True)
        for editor, lam, layers in runs:
            cfg = base.cfg.model_copy(update={"mom2_update_weight": lam, "layers": layers})
            lab = Lab.open(bundle, cfg=cfg, editor=editor)
            t0 = time.perf_counter()
            session = lab.setup.editor.session(
                lab.model, lab.tok, requests, lab.cfg, reuse=z_session
            )
            deltas = lab.global_deltas(session)
            for layer in deltas:
                weights.setdefault(layer, arch.read_weight(lab.model, layer))
            apply_deltas(lab.model, deltas)
            scores = lab.score(requests, CF_KEYS)
            lab.reset()
            row = {
                "n": n,
                "editor": editor,
                "lambda": lam,
                "layers": layers,
                **{k: round(v, 2) for k, v in scores.items()},
                "delta_over_W": {
                    str(la): round(float(d.double().norm() / weights[la].double().norm()), 3)
                    for la, d in deltas.items()
                },
                "output_change": {
                    str(la): round(output_change(d, weights[la], lab.setup.regulariser[la]), 4)
                    for la, d in deltas.items()
                },
                "low_variance_share": {
                    str(la): round(low_variance_share(d, lab.setup.regulariser[la]), 3)
                    for la, d in deltas.items()
                },
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
