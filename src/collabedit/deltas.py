"""Per-layer weight deltas as a safetensors file: what `collabedit edit --delta` writes.

The metadata names the base model (fingerprint of the edited layers), so a delta is never added
to a model it was not computed for.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PreTrainedModel

from collabedit import io
from collabedit.linalg import check_finite
from collabedit.models import arch

DELTA_FORMAT = 1


def save_deltas(
    path: Path,
    model_before_fingerprint: str,
    deltas: dict[int, torch.Tensor],
    modules: dict[int, str],
    info: dict,
) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "collabedit-delta",
        "format_version": str(DELTA_FORMAT),
        "base_fingerprint": model_before_fingerprint,
        "layers": json.dumps(sorted(deltas)),
        "modules": json.dumps({str(k): v for k, v in modules.items()}),
        "info": json.dumps(info),
    }
    tensors = {f"layer.{layer}.delta": d.float().contiguous() for layer, d in deltas.items()}
    io.write_safetensors(path, tensors, meta)


def load_deltas(path: Path) -> tuple[dict[int, torch.Tensor], dict]:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "collabedit-delta":
            raise ValueError(f"{path}: not a collabedit delta file")
        layers = json.loads(meta["layers"])
        deltas = {}
        for layer in layers:
            key = f"layer.{layer}.delta"
            if key not in f.keys():
                raise ValueError(f"{path}: missing tensor {key!r}")
            deltas[layer] = f.get_tensor(key)
    for layer, d in deltas.items():
        check_finite(d, f"{path}: layer {layer} delta")
    return deltas, meta


def apply_deltas(model: PreTrainedModel, path: Path) -> None:
    """Add a delta file to `model`; checks fingerprint and shapes before touching a weight."""
    deltas, meta = load_deltas(path)
    layers = sorted(deltas)
    arch.check_layers(model, layers)
    fp = arch.fingerprint(model, layers)
    if fp != meta["base_fingerprint"]:
        raise ValueError(
            f"{path}: computed for base model {meta['base_fingerprint']}, but this model is {fp}"
        )
    for layer in layers:
        if tuple(deltas[layer].shape) != tuple(arch.read_weight(model, layer).shape):
            raise ValueError(f"{path}: layer {layer} delta has shape {tuple(deltas[layer].shape)}")
    for layer in layers:
        arch.add_to_weight(model, layer, deltas[layer])
