"""World edit speed: statistics tokens/s, our edit vs MEMIT's one-request-at-a-time loop, peak RSS.

    OMP_NUM_THREADS=1 python benchmarks/memit_speed.py --n 100 --json results/speed/memit_speed.json

The edit comparison is `memit_reference.compare` (see benchmarks/memit_reference.py, which also
runs the random GPT-2 setup): the reference loop, our batched editor with the full forward at
every z step, and as shipped. Peak resident memory of a whole edit of --peak-n requests is
measured in a fresh process (benchmarks/edit_memory.py).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from edit_memory import peak_edit  # benchmarks/ is on sys.path when run as a script
from memit_reference import compare

from collabedit.editors.memit import preset
from collabedit.stats import collect_stats, iter_corpus
from collabedit.world.edit_requests import world_requests
from collabedit.world.store import load_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--peak-n", type=int, default=0, help="0: skip the peak-RSS run")
    parser.add_argument("--stats-texts", type=int, default=20000)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["reference", "full", "collabedit"],
        choices=["reference", "full", "collabedit"],
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--world", type=Path, default=None, help="world folder (default: shipped)")
    args = parser.parse_args()

    b = load_world(args.world)
    cfg = preset("world")
    start = time.perf_counter()
    texts = iter_corpus("world", args.stats_texts, model_dir=b.path)
    stats = collect_stats(b.model, b.tokenizer, texts, cfg.layers)
    stats_s = time.perf_counter() - start
    tokens = next(iter(stats.values())).count
    cov = {layer: s.mom2 for layer, s in stats.items()}

    reqs = world_requests(b.world, args.n, seed=0)
    row = compare("world-preset", b.model.eval(), b.tokenizer, reqs, cfg, cov, args.methods)
    result = {
        "torch_threads": torch.get_num_threads(),
        "edit": row,
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
