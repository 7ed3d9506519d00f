"""Peak resident memory of one whole edit (statistics, z, keys, solve), each in a fresh process.

    python benchmarks/edit_memory.py --world results/world-2000-w3072 --n 2000 --z-steps 2 \
        --json results/edit_memory.json

z is optimised chunk by chunk (at most `batch_rows` rows per forward/backward), and every
request is in the batch at the first step; later steps only drop converged requests. So the
peak is reached within the first steps, and a short `--z-steps` budget measures the peak of the
full edit in minutes instead of hours. Run several budgets (e.g. `--z-steps 2 20 200`) on a
small count to check that on this machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def peak_edit(
    n: int,
    world: Path | None,
    z_steps: int | None = None,
    seed: int = 1,
    z_memory_mb: float | None = None,
) -> dict:
    """Edit n world requests in a fresh process; its peak RSS and timings."""
    argv = [sys.executable, __file__, "--child", "--n", str(n), "--seed", str(seed)]
    if z_memory_mb is not None:
        argv += ["--z-memory-mb", str(z_memory_mb)]
    if world is not None:
        argv += ["--world", str(world)]
    if z_steps is not None:
        argv += ["--z-steps", str(z_steps)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(
    n: int, world: Path | None, z_steps: int | None, seed: int, z_memory_mb: float | None
) -> None:
    from collabedit.editors import apply_edits
    from collabedit.editors.memit import preset
    from collabedit.world.edit_requests import world_requests
    from collabedit.world.store import load_world

    bundle = load_world(world)
    cfg = preset("world")
    if z_steps is not None:
        cfg = cfg.model_copy(update={"v_num_grad_steps": z_steps})
    if z_memory_mb is not None:
        cfg = cfg.model_copy(update={"z_memory_mb": z_memory_mb})
    reqs = world_requests(bundle.world, n, seed=seed)
    start = time.perf_counter()
    res = apply_edits(bundle.model, bundle.tokenizer, reqs, editor="memit", config=cfg)
    row = {
        "n_requests": len(reqs),
        "z_steps_budget": cfg.v_num_grad_steps,
        "z_memory_mb": cfg.z_memory_mb,
        "seconds": round(time.perf_counter() - start, 1),
        "timings": {k: round(v, 2) for k, v in res.timings.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[2000])
    parser.add_argument(
        "--z-steps", type=int, nargs="+", default=None, help="z step budgets (default: preset's)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--z-memory-mb", type=float, nargs="+", default=None, help="z memory budgets (MB)"
    )
    parser.add_argument("--world", type=Path, default=None, help="world folder (default: shipped)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        budget = (args.z_memory_mb or [None])[0]
        _child(args.n[0], args.world, (args.z_steps or [None])[0], args.seed, budget)
        return
    rows = []
    for n in args.n:
        for steps in args.z_steps or [None]:
            for budget in args.z_memory_mb or [None]:
                row = peak_edit(n, args.world, steps, args.seed, budget)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"world": str(args.world or "shipped"), "seed": args.seed, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
