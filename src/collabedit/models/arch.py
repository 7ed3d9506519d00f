"""Where each architecture keeps what MEMIT edits: the MLP output projection y = W k.

The editor works with W as (d_out, d_in). GPT-2 stores its Conv1D weight transposed, (d_in, d_out),
so reading and writing go through `read_weight` / `add_to_weight`, never through `.weight`
directly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    blocks: str  # dotted path of the list of transformer blocks
    mlp_out: str  # dotted path, inside a block, of the edited output projection
    transposed: bool  # weight stored as (d_in, d_out)
    hidden_size_attr: str
    # MEMIT's published layers for the models it was run on; others get a middle range.
    default_layers: dict[str, tuple[int, ...]]
    final_norm: str = "transformer.ln_f"  # dotted path of the norm before the unembedding


ARCHS: tuple[ArchSpec, ...] = (
    ArchSpec(
        "gpt2",
        ("gpt2",),
        "transformer.h",
        "mlp.c_proj",
        True,
        "n_embd",
        {"gpt2-xl": (13, 14, 15, 16, 17)},
    ),
    ArchSpec(
        "gptj",
        ("gptj",),
        "transformer.h",
        "mlp.fc_out",
        False,
        "n_embd",
        {"gpt-j-6b": (3, 4, 5, 6, 7, 8)},
    ),
    # GPT-Neo keeps GPT-2's module names but uses nn.Linear, stored (d_out, d_in).
    ArchSpec("gpt_neo", ("gpt_neo",), "transformer.h", "mlp.c_proj", False, "hidden_size", {}),
    ArchSpec(
        "gpt_neox",
        ("gpt_neox",),
        "gpt_neox.layers",
        "mlp.dense_4h_to_h",
        False,
        "hidden_size",
        {},
        "gpt_neox.final_layer_norm",
    ),
    ArchSpec(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3"),
        "model.layers",
        "mlp.down_proj",
        False,
        "hidden_size",
        {},
        "model.norm",
    ),
)


class UnsupportedModelError(ValueError):
    pass


def arch_of(model: PreTrainedModel) -> ArchSpec:
    model_type = getattr(model.config, "model_type", None)
    for spec in ARCHS:
        if model_type in spec.model_types:
            return spec
    known = sorted(t for s in ARCHS for t in s.model_types)
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported; supported: {', '.join(known)}"
    )


def _get(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def blocks(model: PreTrainedModel) -> nn.ModuleList:
    return _get(model, arch_of(model).blocks)


def n_layers(model: PreTrainedModel) -> int:
    return len(blocks(model))


def check_layers(model: PreTrainedModel, layers: Sequence[int]) -> tuple[int, ...]:
    n = n_layers(model)
    bad = [layer for layer in layers if not 0 <= layer < n]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: the model has layers 0..{n - 1}")
    if not layers:
        raise ValueError("no layers to edit")
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"layers must be increasing and distinct, got {list(layers)}")
    return tuple(layers)


def block(model: PreTrainedModel, layer: int) -> nn.Module:
    return blocks(model)[layer]


def final_norm(model: PreTrainedModel) -> nn.Module:
    """The norm the last block's output passes through before the unembedding."""
    return _get(model, arch_of(model).final_norm)


def mlp_out(model: PreTrainedModel, layer: int) -> nn.Module:
    return _get(block(model, layer), arch_of(model).mlp_out)


def mlp_out_name(model: PreTrainedModel, layer: int) -> str:
    spec = arch_of(model)
    return f"{spec.blocks}.{layer}.{spec.mlp_out}"


def weight_names(model: PreTrainedModel, layers: Sequence[int]) -> list[str]:
    """The state-dict names of the edited weights of `layers`."""
    return [f"{mlp_out_name(model, layer)}.weight" for layer in layers]


def read_weight(model: PreTrainedModel, layer: int) -> torch.Tensor:
    """The edited weight as (d_out, d_in), a detached copy."""
    w = mlp_out(model, layer).weight.detach()
    return (w.T if arch_of(model).transposed else w).clone()


@torch.no_grad()
def add_to_weight(model: PreTrainedModel, layer: int, delta: torch.Tensor) -> None:
    """W += delta, with delta given as (d_out, d_in)."""
    w = mlp_out(model, layer).weight
    d = delta.T if arch_of(model).transposed else delta
    if d.shape != w.shape:
        raise ValueError(
            f"delta shape {tuple(delta.shape)} does not fit layer {layer} "
            f"(weight {tuple(w.shape)}, transposed={arch_of(model).transposed})"
        )
    w.add_(d.to(w.dtype))


@torch.no_grad()
def write_weight(model: PreTrainedModel, layer: int, weight: torch.Tensor) -> None:
    """W = weight exactly (d_out, d_in); used to restore a saved original bit for bit."""
    w = mlp_out(model, layer).weight
    new = weight.T if arch_of(model).transposed else weight
    if new.shape != w.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not fit layer {layer}")
    w.copy_(new.to(w.dtype))


def restore(model: PreTrainedModel, originals: dict[int, torch.Tensor]) -> None:
    """Write saved weights (layer -> (d_out, d_in)) back, bit for bit."""
    for layer, w in originals.items():
        write_weight(model, layer, w)


def snapshot(model: PreTrainedModel, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Copies of the edited weights of `layers`, for `restore`."""
    return {layer: read_weight(model, layer) for layer in layers}


def model_folder(model: PreTrainedModel) -> Path | None:
    """The local folder the model was loaded from (where it may carry statistics or a
    hypernetwork), or None for a hub id or a model built in memory."""
    source = str(getattr(model.config, "_name_or_path", "") or "")
    return Path(source) if source and Path(source).is_dir() else None


def default_layers(model: PreTrainedModel) -> tuple[int, ...]:
    spec = arch_of(model)
    name = str(getattr(model.config, "_name_or_path", "")).rstrip("/").split("/")[-1]
    if name in spec.default_layers:
        return spec.default_layers[name]
    n = n_layers(model)
    # Early-middle layers, as MEMIT's traces find for GPT models: ~10%..35% of depth.
    lo = max(0, round(0.1 * n))
    hi = max(lo, round(0.35 * n) - 1)
    return tuple(range(lo, hi + 1))


def fingerprint(model: PreTrainedModel, layers: Sequence[int] | None = None) -> str:
    """Hash of the config and of weights: of `layers`' edited projections, or with layers=None of
    every parameter.

    Identifies a base model: two parties, or an update and a server, agree on a model iff their
    fingerprints agree. Statistics caches use the all-parameter form, since keys depend on every
    weight below the edited layer.
    """
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    # collabedit_presets: which editor preset suits the model, not part of what it computes
    volatile = (
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "collabedit_presets",
    )
    for key in volatile:
        cfg.pop(key, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    if layers is None:
        tensors = [(name, p.detach()) for name, p in sorted(model.state_dict().items())]
    else:
        tensors = [(mlp_out_name(model, layer), read_weight(model, layer)) for layer in layers]
    for name, t in tensors:
        t = t.float().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:32]
