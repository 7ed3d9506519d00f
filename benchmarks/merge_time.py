"""Server merge time against the number of clients: CollabEdit needs one solve per layer however
many clients there are; only the running sums of P and S grow with them.

OMP_NUM_THREADS=2 python benchmarks/merge_time.py --json results/merge_time.json

Each client's update holds P (d_out x d_in) and S (d_in x d_in) per layer, built from random keys
and residuals (no model). To keep memory flat, the clients of one measurement share one update's
tensors (the sums still read every client's copy). Reported per client count: the time of
`merge_updates` (sums + solve), its two parts, and the time to read and validate one update file
(what the server pays per client as updates arrive, before the merge).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from collabedit.collab.merge import running_sum, solve_from_sums
from collabedit.collab.protocol import merge_updates
from collabedit.collab.update import ClientUpdate, Expectation, load_update

# the shipped world's edited MLP (1024 -> 128, one layer) and GPT-2 medium's (4096 -> 1024)
SIZES = {"world": (1024, 128, 1), "gpt2-medium": (4096, 1024, 1)}


def _update(d_in: int, d_out: int, layers: int, n: int, gen: torch.Generator) -> ClientUpdate:
    keys = {la: torch.randn(n, d_in, generator=gen, dtype=torch.float64) for la in range(layers)}
    res = {la: torch.randn(n, d_out, generator=gen, dtype=torch.float64) for la in range(layers)}
    return ClientUpdate.from_keys_residuals(
        keys, res, base_fingerprint="bench", client_id="c0", round=0
    )


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(name: str, clients: list[int], edits: int, repeats: int, seed: int) -> dict:
    d_in, d_out, layers = SIZES[name]
    gen = torch.Generator().manual_seed(seed)
    one = _update(d_in, d_out, layers, edits, gen)
    # a well-conditioned lambda C, so every size solves by plain Cholesky
    a = torch.randn(d_in, 4 * d_in, generator=gen, dtype=torch.float64)
    weighted = {la: a @ a.T / (4 * d_in) * 100.0 for la in range(layers)}
    rows = []
    for n in clients:
        updates = [one] * n
        total = _best(lambda u=updates: merge_updates(u, weighted, "collabedit"), repeats)
        sums = _best(
            lambda u=updates: [
                (running_sum([x.layers[la].P for x in u]), running_sum([x.layers[la].S for x in u]))
                for la in range(layers)
            ],
            repeats,
        )
        sum_p = {la: running_sum([x.layers[la].P for x in updates]) for la in range(layers)}
        sum_s = {la: running_sum([x.layers[la].S for x in updates]) for la in range(layers)}
        solve = _best(
            lambda sp=sum_p, ss=sum_s: [
                solve_from_sums(sp[la], ss[la], weighted[la]) for la in range(layers)
            ],
            repeats,
        )
        rows.append({"clients": n, "merge_s": total, "sums_s": sums, "solve_s": solve})
        print(json.dumps({"size": name, **rows[-1]}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "u.safetensors"
        one.save(path)
        expect = Expectation("bench", {la: (d_out, d_in) for la in range(layers)}, round=0)
        load = _best(lambda: load_update(path, expect), repeats)
    base = rows[0]["merge_s"]
    return {
        "size": name,
        "d_in": d_in,
        "d_out": d_out,
        "layers": layers,
        "edits_per_client": edits,
        "rows": rows,
        "ratio_max_clients_vs_first": rows[-1]["merge_s"] / base,
        "load_and_validate_one_update_s": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--edits", type=int, default=20, help="edits per client")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = [measure(s, args.clients, args.edits, args.repeats, args.seed) for s in args.sizes]
    payload = {"threads": torch.get_num_threads(), "results": results}
    print(json.dumps({r["size"]: r["ratio_max_clients_vs_first"] for r in results}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
