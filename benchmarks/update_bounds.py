"""Issue 13: how honest world updates sit against the server's sanity bounds (collab/bounds.py).

For updates of N requests built by the one client round on the shipped world: S's most negative
eigenvalue relative to its largest, its rank, trace(S)/n against the probe's largest squared key
norm, ||R||/sqrt(n) against the probe's largest stream norm, the share of P outside span(S), and
the gap between the sent delta and the server's own solve; then `check_layer` must pass.

    OMP_NUM_THREADS=1 python benchmarks/update_bounds.py --n 2 10 --json results/update_bounds.json
"""

from __future__ import annotations

import argparse
import json

import torch

from collabedit.collab.bounds import check_layer
from collabedit.collab.rounds import client_round
from collabedit.collab.setup import EditingSetup
from collabedit.io import write_json
from collabedit.linalg import solve_update
from collabedit.world.edit_requests import world_requests
from collabedit.world.store import load_world


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2, 10])
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    bundle = load_world()
    setup = EditingSetup.open((bundle.model, bundle.tokenizer), "memit-frozen")
    bounds = setup.update_bounds()
    rows = []
    for n in args.n:
        update = client_round(setup, world_requests(bundle.world, n, seed=args.seed), "c").update
        for layer, lu in update.layers.items():
            P, S = lu.p_and_s()
            w, V = torch.linalg.eigh(S)
            keep = w > bounds.rank_rtol * w.max()
            PV = P @ V[:, keep]
            r_norm = float(((PV / w[keep].sqrt()) ** 2).sum()) ** 0.5
            solved = solve_update(P, setup.regulariser[layer].double() + S)
            check_layer(layer, n, P, S, bounds, lu.delta, setup.regulariser[layer])
            row = {
                "n": n,
                "layer": layer,
                "min_eig_over_max": float(w.min() / w.max()),
                "rank": int(keep.sum()),
                "trace_per_key_over_probe_max": float(S.trace()) / n / bounds.key_sq_max[layer],
                "residual_per_sqrt_n_over_stream_max": r_norm / n**0.5 / bounds.stream_max,
                "P_outside_span": float((P - PV @ V[:, keep].T).norm() / P.norm()),
                "delta_gap": float((lu.delta.double() - solved).norm() / solved.norm()),
                "passes": True,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        write_json(args.json, {"rows": rows, "key_slack": bounds.key_slack,
                               "residual_slack": bounds.residual_slack})


if __name__ == "__main__":
    main()
