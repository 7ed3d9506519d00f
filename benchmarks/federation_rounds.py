"""Round time of the Flower federation (simulation and loopback deployment), SecAgg+ error and
overhead, bytes the server receives per round.

OMP_NUM_THREADS=1 python benchmarks/federation_rounds.py --json results/federation_rounds.json

Every configuration runs the same N clients x M world requests for one round and is compared with
the same merge done in process ("max_rel_diff_vs_inprocess", on the merged delta). For SecAgg+ the
error of the securely aggregated sums themselves is reported too (the delta's error also depends
on how well-conditioned lambda C + sum S is; its condition number is reported).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from collabedit.federation.config import ServerSettings, quiet_flower_env
from collabedit.federation.simulation import (
    federation_setup,
    inprocess_reference,
    rel_diff,
    secagg_sum_error,
    simulate,
    write_client_files,
)


def condition_number(settings: ServerSettings, state: Path) -> float:
    """cond(lambda C + sum S) of round 0 at the first edited layer, from the server's files."""
    from collabedit.collab.update import load_update

    setup = federation_setup(settings)
    incoming = sorted((state / "incoming" / "round-0").glob("*.safetensors"))
    layer = setup.layers[0]
    total = setup.regulariser[layer].double()
    for p in incoming:
        total = total + load_update(p).layers[layer].S.double()
    ev = torch.linalg.eigvalsh(total)
    return float(ev[-1] / ev[0].clamp_min(1e-300))


def run_simulation(name: str, settings: ServerSettings, clients: int, edits: int, seed: int):
    with tempfile.TemporaryDirectory(prefix=f"fedbench-{name}-") as tmp:
        t0 = time.perf_counter()
        r = simulate(clients, edits, Path(tmp), settings, seed=seed)
        wall = time.perf_counter() - t0
        (report,) = r["rounds"]
        out = {
            "mode": "simulation",
            "status": r["status"],
            "round_seconds": report["seconds"],
            "federation_seconds": r["config"]["federation_seconds"],
            "wall_seconds": round(wall, 1),
            "bytes_received": report["bytes_received"],
            "max_rel_diff_vs_inprocess": r["max_rel_diff_vs_inprocess"],
            "cond_lambdaC_plus_S": condition_number(settings, Path(tmp) / "server"),
        }
        out["metrics"] = r.get("methods")
        if "secagg_sum_rel_error" in r:
            out["secagg_sum_rel_error"] = r["secagg_sum_rel_error"]
            out["secagg_bounds"] = report["info"].get("secagg_bounds")
            out["noise_floor"] = report["info"].get("noise_floor")
            out["max_rel_diff_vs_inprocess_same_floor"] = r.get(
                "max_rel_diff_vs_inprocess_same_floor"
            )
        print(name, json.dumps(out), flush=True)
        return out


def run_deployment(name: str, settings: ServerSettings, clients: int, edits: int, seed: int):
    from safetensors.torch import load_file

    from collabedit.federation.loopback import LoopbackDeployment
    from collabedit.federation.scaffold import write_app

    with tempfile.TemporaryDirectory(prefix=f"fedbench-{name}-") as tmp:
        work = Path(tmp)
        node_configs, requests = write_client_files(settings.model, clients, edits, work, seed)
        state = work / "server"
        s = settings.model_copy(update={"state_dir": str(state), "min_clients": clients})
        app = work / "app"
        write_app(app, s)
        with LoopbackDeployment(work, node_configs) as d:
            t0 = time.perf_counter()
            run_id = d.run(app)
            summary = d.wait_summary(state / "summary.json", 900, run_id)
            wall = time.perf_counter() - t0
        (report,) = summary["reports"]
        out = {
            "mode": "deployment",
            "status": summary["status"],
            "round_seconds": report["seconds"],
            "wall_seconds": round(wall, 1),
            "bytes_received": report["bytes_received"],
        }
        setup = federation_setup(s)
        cfg, base = setup.cfg, setup.base_weights
        saved = load_file(str(state / "global" / "round-1.safetensors"))
        fed = {layer: saved[f"layer.{layer}.weight"] for layer in cfg.layers}
        per = [requests[i * edits : (i + 1) * edits] for i in range(clients)]
        out["max_rel_diff_vs_inprocess"] = rel_diff(fed, inprocess_reference(s, per), base)
        if s.secure_aggregation:
            out["secagg_sum_rel_error"] = secagg_sum_error(work, node_configs)
            floor = report.get("info", {}).get("noise_floor", 0.0)
            out["noise_floor"] = floor
            ref = inprocess_reference(s, per, floor=floor)
            out["max_rel_diff_vs_inprocess_same_floor"] = rel_diff(fed, ref, base)
        print(name, json.dumps(out), flush=True)
        return out


def run_inprocess(name: str, settings: ServerSettings, clients: int, edits: int, seed: int):
    """The same round without Flower: the clients' updates one after another, then the merge."""
    with tempfile.TemporaryDirectory(prefix=f"fedbench-{name}-") as tmp:
        _, requests = write_client_files(settings.model, clients, edits, Path(tmp), seed)
        per = [requests[i * edits : (i + 1) * edits] for i in range(clients)]
        t0 = time.perf_counter()
        inprocess_reference(settings, per)
        out = {"mode": "in-process", "round_seconds": round(time.perf_counter() - t0, 3)}
        print(name, json.dumps(out), flush=True)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="world")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--edits", type=int, default=4)
    ap.add_argument("--mom2-samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated subset of the configurations")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    quiet_flower_env()
    base = ServerSettings(
        model=args.model, mom2_samples=args.mom2_samples, min_clients=args.clients
    )
    federation_setup(base)  # statistics once, cached for all
    configs = {
        "inprocess": (run_inprocess, base),
        "sim-full": (run_simulation, base),
        "sim-factor": (run_simulation, base.model_copy(update={"transport": "factor"})),
        "sim-secagg": (run_simulation, base.model_copy(update={"secure_aggregation": True})),
        "deploy-full": (run_deployment, base),
        "deploy-secagg": (run_deployment, base.model_copy(update={"secure_aggregation": True})),
    }
    only = [x for x in args.only.split(",") if x]
    results = {}
    for name, (fn, settings) in configs.items():
        if only and name not in only:
            continue
        results[name] = fn(name, settings, args.clients, args.edits, args.seed)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    cfg = federation_setup(base).cfg
    payload = {
        "results": results,
        "config": {
            "model": args.model,
            "clients": args.clients,
            "edits_per_client": args.edits,
            "mom2_samples": args.mom2_samples,
            "layers": list(cfg.layers),
            "lambda": cfg.mom2_update_weight,
            "commit": commit,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
        },
    }
    print(json.dumps(payload, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
