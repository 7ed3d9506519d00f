"""Causal trace of the shipped world model: which layers' MLPs carry facts at the subject?

python benchmarks/causal_trace.py --facts 200 --json results/trace.json --plot results/trace.png
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from collabedit.evaluate.trace import average_trace  # noqa: E402
from collabedit.world.store import load_world  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=200)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--world", type=Path, default=None, help="world folder (default: shipped)")
    args = parser.parse_args()
    b = load_world(args.world)
    rng = random.Random(0)
    facts = []
    for subject in rng.sample(b.world.subjects, args.facts):
        rel = rng.choice(b.world.relations)
        facts.append((rng.choice(rel.statements), subject, b.world.facts[subject][rel.id]))
    result = average_trace(b.model, b.tokenizer, facts, args.samples)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        layers = list(range(len(result["mlp"])))
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([i - 0.2 for i in layers], result["hidden"], width=0.4, label="hidden state")
        ax.bar([i + 0.2 for i in layers], result["mlp"], width=0.4, label="MLP output")
        ax.set_xlabel("layer (restored at the subject's last token)")
        ax.set_ylabel("indirect effect on p(true object)")
        ax.set_title(f"Causal trace, world model, {result['n_facts']} facts")
        ax.legend()
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
