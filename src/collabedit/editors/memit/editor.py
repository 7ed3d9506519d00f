"""The two MEMIT editors: `memit` (published: layers written one after another, keys re-read after
each write) and `memit-frozen` (every layer's keys and residuals from the unedited model, the
variant the CollabEdit authors' code runs; the collaborative merge is exact for it)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from collabedit.editors.memit.compute import (
    Progress,
    ZResult,
    compute_keys,
    context_templates,
    current_outputs,
    optimise_z,
)
from collabedit.editors.memit.config import MemitConfig
from collabedit.linalg import memit_update
from collabedit.models import arch
from collabedit.models.tracing import subject_last_index
from collabedit.requests import EditRequest


@dataclass
class LayerEdit:
    """What one layer's update is made of: Delta = R K^T (lambda C + K K^T)^-1."""

    layer: int
    module: str
    keys: torch.Tensor  # (n, d_in) float64
    residuals: torch.Tensor  # (n, d_out) float64
    delta: torch.Tensor  # (d_out, d_in) float64


@dataclass
class EditResult:
    editor: str
    layers: list[LayerEdit]
    z: ZResult
    timings: dict[str, float] = field(default_factory=dict)


def validate_requests(
    tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], kl_prompt: str
) -> None:
    """Fail before any weight changes when a subject cannot be located in its prompt."""
    if not requests:
        raise ValueError("no requests to edit")
    for req in requests:
        try:
            subject_last_index(tokenizer, req.prompt, req.subject)
            subject_last_index(tokenizer, kl_prompt, req.subject)
        except ValueError as exc:
            raise ValueError(f"request case_id={req.case_id}: {exc}") from None


def edit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    cfg: MemitConfig,
    covariances: dict[int, torch.Tensor],
    frozen: bool = False,
    apply: bool = True,
    progress: Progress = None,
) -> EditResult:
    """Edit `requests` into `model` (in place when `apply`). covariances[layer] = E[k k^T]."""
    layers = arch.check_layers(model, cfg.layers or arch.default_layers(model))
    missing = [layer for layer in layers if layer not in covariances]
    if missing:
        raise ValueError(f"no covariance statistics for layer(s) {missing}")
    validate_requests(tokenizer, requests, cfg.kl_prompt)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    templates = context_templates(model, tokenizer, cfg)
    z_layer = layers[-1]
    z = optimise_z(model, tokenizer, requests, z_layer, templates, cfg, progress)
    timings["z"] = time.perf_counter() - t0
    originals = {layer: arch.read_weight(model, layer) for layer in layers}
    edits: list[LayerEdit] = []
    try:
        if frozen:
            t1 = time.perf_counter()
            keys = compute_keys(model, tokenizer, requests, layers, templates, cfg.batch_rows)
            targets = z.z - current_outputs(model, tokenizer, requests, z_layer, cfg.batch_rows)
            timings["keys"] = time.perf_counter() - t1
        for i, layer in enumerate(layers):
            t1 = time.perf_counter()
            if not frozen:
                keys = compute_keys(model, tokenizer, requests, [layer], templates, cfg.batch_rows)
                targets = z.z - current_outputs(model, tokenizer, requests, z_layer, cfg.batch_rows)
            timings["keys"] = timings.get("keys", 0.0) + time.perf_counter() - t1
            t2 = time.perf_counter()
            resid = targets / (len(layers) - i)
            delta = memit_update(keys[layer].T, resid.T, covariances[layer], cfg.mom2_update_weight)
            timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t2
            edits.append(
                LayerEdit(layer, arch.mlp_out_name(model, layer), keys[layer], resid, delta)
            )
            if not frozen:
                # later layers' keys and residuals are read on the model edited so far
                arch.add_to_weight(model, layer, delta)
        if frozen and apply:
            for e in edits:
                arch.add_to_weight(model, e.layer, e.delta)
        if not apply:
            restore(model, originals)
    except BaseException:
        restore(model, originals)
        raise
    timings["total"] = time.perf_counter() - t0
    return EditResult("memit-frozen" if frozen else "memit", edits, z, timings)


@torch.no_grad()
def restore(model: PreTrainedModel, originals: dict[int, torch.Tensor]) -> None:
    for layer, w in originals.items():
        arch.write_weight(model, layer, w)
