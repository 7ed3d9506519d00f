"""Edit throughput: batched z (all requests per step) vs one request at a time, same run.

    python benchmarks/memit_speed.py --n 500 --json results/memit_speed.json
Also: statistics tokens/s and the peak resident memory of an edit of --peak-n requests.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from edit_memory import peak_edit  # benchmarks/ is on sys.path when run as a script

from collabedit.editors import preset
from collabedit.editors.memit.compute import (
    compute_keys,
    context_templates,
    current_outputs,
    optimise_z,
)
from collabedit.linalg import memit_update
from collabedit.stats import collect_stats, iter_corpus
from collabedit.world.edit_requests import world_requests
from collabedit.world.store import load_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--peak-n", type=int, default=2000)
    parser.add_argument("--stats-texts", type=int, default=20000)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--world", type=Path, default=None, help="world folder (default: shipped)")
    args = parser.parse_args()

    b = load_world(args.world)
    cfg = preset("world")
    layers = cfg.layers
    reqs = world_requests(b.world, args.n, seed=0)
    templates = context_templates(b.model, b.tokenizer, cfg)

    start = time.perf_counter()
    corpus = iter_corpus("world", args.stats_texts, world_dir=b.path)
    stats = collect_stats(b.model, b.tokenizer, corpus, layers)
    stats_s = time.perf_counter() - start
    tokens = next(iter(stats.values())).count

    start = time.perf_counter()
    batched = optimise_z(b.model, b.tokenizer, reqs, layers[-1], templates, cfg)
    z_batched = time.perf_counter() - start
    start = time.perf_counter()
    single = torch.cat(
        [optimise_z(b.model, b.tokenizer, [r], layers[-1], templates, cfg).z for r in reqs]
    )
    z_single = time.perf_counter() - start
    start = time.perf_counter()
    keys = compute_keys(b.model, b.tokenizer, reqs, layers, templates)
    cur = current_outputs(b.model, b.tokenizer, reqs, layers[-1])
    for i, layer in enumerate(layers):
        memit_update(
            keys[layer].T,
            ((batched.z - cur) / (len(layers) - i)).T,
            stats[layer].mom2,
            cfg.mom2_update_weight,
        )
    rest = time.perf_counter() - start
    rel = ((batched.z - single).norm(dim=1) / single.norm(dim=1)).max().item()
    result = {
        "n_requests": args.n,
        "torch_threads": torch.get_num_threads(),
        "z_batched_s": round(z_batched, 2),
        "z_one_at_a_time_s": round(z_single, 2),
        "keys_and_solve_s": round(rest, 2),
        "requests_per_s_batched": round(args.n / (z_batched + rest), 2),
        "requests_per_s_one_at_a_time": round(args.n / (z_single + rest), 2),
        "speedup": round((z_single + rest) / (z_batched + rest), 2),
        "max_rel_diff_z": rel,
        "stats_tokens": tokens,
        "stats_tokens_per_s": round(tokens / stats_s, 1),
        "this_process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if args.peak_n:
        result["peak_edit"] = peak_edit(args.peak_n, args.world)  # its row names n_requests
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
