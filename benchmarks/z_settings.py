"""Issue 14 item 4: what the world preset's z optimisation costs, and which settings reach the
same edit quality in fewer steps.

For each setting (v_num_grad_steps, v_lr, early_stop_loss, clamp_norm_factor): one Global-Edit of
N world requests (the world preset otherwise), its wall time, the optimiser steps the requests
actually took (early stopping), their final losses, and ES/PS/NS/Score of the edit. The first
setting is the preset's, the reference every other row is compared with in the same run.

    OMP_NUM_THREADS=1 python benchmarks/z_settings.py --n 100 --json results/z_settings.json
"""

from __future__ import annotations

import argparse
import json
import time

from collabedit.bench.lab import CF_KEYS, Lab
from collabedit.io import write_json
from collabedit.world.edit_requests import world_requests
from collabedit.world.store import load_world

SETTINGS = [  # steps, lr, early stop, clamp
    (200, 5.0, 5e-2, 4.0),
    (60, 5.0, 5e-2, 4.0),
    (60, 10.0, 5e-2, 4.0),
    (40, 20.0, 5e-2, 4.0),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="requests edited at once")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settings", type=json.loads, default=SETTINGS,
                    help="JSON list of [steps, lr, early_stop_loss, clamp_norm_factor]")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    bundle = load_world()
    requests = world_requests(bundle.world, args.n, seed=args.seed)
    base = Lab.open(bundle)
    rows = []
    for steps, lr, stop, clamp in args.settings:
        cfg = base.cfg.model_copy(
            update={"v_num_grad_steps": steps, "v_lr": lr, "early_stop_loss": stop,
                    "clamp_norm_factor": clamp}
        )
        lab = Lab.open(bundle, cfg)
        start = time.perf_counter()
        session = lab.session(requests)
        z_seconds = time.perf_counter() - start
        z = session.z  # MEMIT's target vectors: the steps each request took, its last loss
        scores = lab.compare(requests, 1, ["global"], CF_KEYS, session=session)["global"]
        row = {
            "steps": steps, "lr": lr, "early_stop_loss": stop, "clamp": clamp, "n": args.n,
            "z_seconds": round(z_seconds, 1),
            "mean_steps": round(float(z.steps_taken.double().mean()), 1),
            "max_steps": int(z.steps_taken.max()),
            "stopped_early": round(float((z.steps_taken < steps).double().mean()), 3),
            "final_loss_median": round(float(z.final_loss.median()), 4),
            "final_loss_above_0.5": round(float((z.final_loss > 0.5).double().mean()), 3),
            **{k: round(v, 2) for k, v in scores.items()},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        write_json(args.json, {"rows": rows, "note": "first row = the world preset"})


if __name__ == "__main__":
    main()
