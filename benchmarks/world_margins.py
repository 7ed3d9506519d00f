"""How surely a world knows its facts: on N CounterFact-form requests (the labs' draw: distinct
subjects, `--seed`), the true object's first-token log-probability at the rewrite prompt minus
the best other token's (the fact's margin) and minus target_new's (what CounterFact's metrics
compare), with p(true) and the share of prompts whose top token is the true object.

    python benchmarks/world_margins.py --world src/collabedit/world/default --n 200 \
        --json results/margins.json

Narrow margins are what an LLM has (GPT-2 XL's unedited CounterFact NS is in the 70s); the
recipe's `fact_noise` narrows a world's. docs/realistic-world.md (session 20) has the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from collabedit.bench.lab import Lab
from collabedit.io import write_json
from collabedit.world.store import load_world


def first_token(tok, text: str) -> int:
    return tok(" " + text, add_special_tokens=False)["input_ids"][0]


def margins(world: str, n: int, seed: int) -> dict:
    lab = Lab.open(load_world(world))
    lead, vs_new, p_true = [], [], []
    with torch.no_grad():
        for r in lab.requests(n, seed=seed):
            ids = lab.tok(r.rewrite_prompt, return_tensors="pt")["input_ids"]
            lp = torch.log_softmax(lab.model(input_ids=ids).logits[0, -1].double(), -1)
            true, new = first_token(lab.tok, r.target_true), first_token(lab.tok, r.target_new)
            others = lp.clone()
            others[true] = -float("inf")
            lead.append(float(lp[true] - others.max()))
            vs_new.append(float(lp[true] - lp[new]))
            p_true.append(float(lp[true].exp()))
    return {
        "world": world,
        "n": n,
        "seed": seed,
        "lead_median": statistics.median(lead),
        "lead_p10": statistics.quantiles(lead, n=10)[0],
        "lead_min": min(lead),
        "vs_new_median": statistics.median(vs_new),
        "vs_new_p10": statistics.quantiles(vs_new, n=10)[0],
        "p_true_median": statistics.median(p_true),
        "top1": sum(x > 0 for x in lead) / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = margins(args.world, args.n, args.seed)
    print(json.dumps(out, indent=1))
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
