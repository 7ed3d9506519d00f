"""Conditioning of a world layer's keys: singular values of every vocabulary word's key.

    python benchmarks/key_conditioning.py --world results/world-2000-w3072 --json out.json

The world's layers 0-1 attend with one-token windows, so a layer-1 key (the input of the MLP's
output projection) depends on the token alone and the vocabulary's keys are all the keys there
are. How many edits a layer holds is bounded by how many well-conditioned directions they span
(see docs/benchmarks.md), which this prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from collabedit.cli import write_json
from collabedit.models import arch
from collabedit.world.store import load_world


def vocabulary_keys(model: torch.nn.Module, vocab_size: int, layer: int) -> torch.Tensor:
    """(vocab_size, width) keys, each token run through the model alone."""
    keys: list[torch.Tensor] = []
    hook = arch.mlp_out(model, layer).register_forward_pre_hook(
        lambda _module, args: keys.append(args[0][:, 0].double())
    )
    try:
        with torch.no_grad():
            model(torch.arange(vocab_size).unsqueeze(1))
    finally:
        hook.remove()
    return keys[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, default=None, help="world folder (default: shipped)")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    bundle = load_world(args.world)
    arch.check_layers(bundle.model, [args.layer])
    keys = vocabulary_keys(bundle.model, len(bundle.tokenizer), args.layer)
    s = torch.linalg.svdvals(keys)
    result = {
        "world": str(bundle.path),
        "layer": args.layer,
        "vocabulary": keys.shape[0],
        "subjects": len(bundle.world.subjects),
        "other_words": keys.shape[0] - len(bundle.world.subjects),
        "key_width": keys.shape[1],
        "singular_values_above": {
            f"{t:g}": int((s > t * s[0]).sum()) for t in (1e-2, 1e-3, 1e-4, 1e-6)
        },
    }
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
