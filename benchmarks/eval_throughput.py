"""Evaluation throughput on the shipped world: scored prompts per second.

python benchmarks/eval_throughput.py --n 500 --json results/eval_throughput.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from collabedit.evaluate.metrics import evaluate_requests
from collabedit.world.edit_requests import world_requests
from collabedit.world.store import load_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="requests per form")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    bundle = load_world()
    results = {"n_requests": args.n, "torch_threads": torch.get_num_threads(), "forms": {}}
    for form in ("counterfact", "zsre"):
        reqs = world_requests(bundle.world, args.n, seed=0, form=form)
        scored = 0

        def count(k: int) -> None:
            nonlocal scored
            scored += k

        start = time.perf_counter()
        metrics = evaluate_requests(bundle.model, bundle.tokenizer, reqs, progress=count)
        seconds = time.perf_counter() - start
        results["forms"][form] = {
            "prompts_scored": scored,
            "seconds": round(seconds, 3),
            "prompts_per_s": round(scored / seconds, 1),
            "requests_per_s": round(args.n / seconds, 1),
            "metrics": {k: v for k, v in metrics.items() if k != "n_requests"},
        }
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
