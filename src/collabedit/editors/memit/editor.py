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

    @property
    def unmet(self) -> torch.Tensor:
        """Per request, ||Delta k - r|| / ||r||: the share of its residual that this layer's
        update does not deliver at the request's own key. lambda C always keeps some back; it
        grows sharply when the edited keys, together with the keys C protects, no longer fit in
        the layer's key width (measured on the world in docs/benchmarks.md)."""
        miss = self.keys @ self.delta.T - self.residuals
        return miss.norm(dim=1) / self.residuals.norm(dim=1).clamp_min(1e-12)


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


class MemitSession:
    """One party's MEMIT work for its requests, in the pieces the protocols need.

    The target vectors z are optimised once, on the model as it is when the session starts (the
    base model). Keys and residuals of a layer are read on the model as it is when asked: the
    unedited base (`memit-frozen`), the party's own partly edited copy (`memit`, one-shot), or
    the merged global model (layer-synchronous collaboration).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        cfg: MemitConfig,
        progress: Progress = None,
        z: ZResult | None = None,
    ) -> None:
        """`z`: target vectors already optimised for exactly these requests on this base model
        (a simulation reuses them across parties; z depends only on the request and the base)."""
        self.layers = arch.check_layers(model, cfg.layers or arch.default_layers(model))
        validate_requests(tokenizer, requests, cfg.kl_prompt)
        self.model, self.tokenizer, self.requests, self.cfg = model, tokenizer, requests, cfg
        t0 = time.perf_counter()
        self.templates = context_templates(model, tokenizer, cfg)
        if z is not None and z.z.shape[0] != len(requests):
            raise ValueError(f"{z.z.shape[0]} target vectors for {len(requests)} requests")
        self.z = z or optimise_z(
            model, tokenizer, requests, self.layers[-1], self.templates, cfg, progress
        )
        self.timings = {"z": time.perf_counter() - t0, "keys": 0.0}

    def keys(self, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """(n, d_in) keys per layer, read on the model's current weights."""
        t0 = time.perf_counter()
        out = compute_keys(
            self.model, self.tokenizer, self.requests, layers, self.templates, self.cfg.batch_rows
        )
        self.timings["keys"] += time.perf_counter() - t0
        return out

    def targets(self) -> torch.Tensor:
        """(n, d) how far each z still is from the last edited layer's current output."""
        t0 = time.perf_counter()
        cur = current_outputs(
            self.model, self.tokenizer, self.requests, self.layers[-1], self.cfg.batch_rows
        )
        self.timings["keys"] += time.perf_counter() - t0
        return self.z.z - cur

    def share(self, layer: int) -> float:
        """MEMIT spreads the remaining residual evenly over the layers not yet written."""
        return 1.0 / (len(self.layers) - self.layers.index(layer))


def edit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    cfg: MemitConfig,
    covariances: dict[int, torch.Tensor],
    frozen: bool = False,
    apply: bool = True,
    progress: Progress = None,
    z: ZResult | None = None,
) -> EditResult:
    """Edit `requests` into `model` (in place when `apply`). covariances[layer] = E[k k^T]."""
    layers = arch.check_layers(model, cfg.layers or arch.default_layers(model))
    missing = [layer for layer in layers if layer not in covariances]
    if missing:
        raise ValueError(f"no covariance statistics for layer(s) {missing}")
    t0 = time.perf_counter()
    session = MemitSession(model, tokenizer, requests, cfg, progress, z)
    originals = {layer: arch.read_weight(model, layer) for layer in layers}
    edits: list[LayerEdit] = []
    solve = 0.0
    try:
        if frozen:
            keys, targets = session.keys(layers), session.targets()
        for layer in layers:
            if not frozen:
                # read on the model edited so far (earlier layers already written)
                keys, targets = session.keys([layer]), session.targets()
            resid = targets * session.share(layer)
            t1 = time.perf_counter()
            delta = memit_update(keys[layer].T, resid.T, covariances[layer], cfg.mom2_update_weight)
            solve += time.perf_counter() - t1
            edits.append(
                LayerEdit(layer, arch.mlp_out_name(model, layer), keys[layer], resid, delta)
            )
            if not frozen:
                arch.add_to_weight(model, layer, delta)
        if frozen and apply:
            for e in edits:
                arch.add_to_weight(model, e.layer, e.delta)
        if not apply:
            restore(model, originals)
    except BaseException:
        restore(model, originals)
        raise
    timings = session.timings | {"solve": solve, "total": time.perf_counter() - t0}
    return EditResult("memit-frozen" if frozen else "memit", edits, session.z, timings)


@torch.no_grad()
def restore(model: PreTrainedModel, originals: dict[int, torch.Tensor]) -> None:
    for layer, w in originals.items():
        arch.write_weight(model, layer, w)
