"""One round of collaborative editing, in process: clients edit, the server merges.

Protocols:
* `one-shot`: each client runs its editor on its own copy of the base model (all layers) and
  sends one ClientUpdate. With `memit-frozen` the CollabEdit merge equals Global-Edit exactly;
  with sequential `memit` a client's later-layer keys only see its own earlier writes, so the
  merge is close to, not equal to, sequential Global-Edit.
* `layer-sync`: the server merges layer by layer; before each layer every client reads its keys
  and residuals on the merged model so far. This reproduces sequential Global-Edit exactly, at
  the price of one exchange per edited layer.

The server side (`merge_updates`) sees only ClientUpdates and does plain tensor math.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from collabedit.collab.merge import LayerInputs, merge_layer, solve_from_sums
from collabedit.collab.update import ClientUpdate
from collabedit.editors import EDITORS
from collabedit.editors.memit import MemitConfig, edit
from collabedit.editors.memit.compute import ZResult, context_templates, optimise_z
from collabedit.editors.memit.editor import MemitSession
from collabedit.models import arch
from collabedit.requests import EditRequest

PROTOCOLS = ("one-shot", "layer-sync")


@dataclass
class Client:
    client_id: str
    requests: list[EditRequest]


def client_update(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    client: Client,
    cfg: MemitConfig,
    covariances: dict[int, torch.Tensor],
    editor: str = "memit-frozen",
    round: int = 0,
    z: ZResult | None = None,
    form: Literal["full", "factor", "auto"] = "full",
) -> ClientUpdate:
    """A client's one-shot contribution: P_i, S_i per layer (or their factors F_i, G_i with
    `form`, see collab/transport.py) and its local delta Delta_i (for the baselines). The model
    is left exactly as it was."""
    layers = arch.check_layers(model, cfg.layers or arch.default_layers(model))
    base_fp = arch.fingerprint(model, layers)
    result = edit(
        model,
        tokenizer,
        client.requests,
        cfg,
        covariances,
        frozen=EDITORS[editor],
        apply=False,
        z=z,
    )
    return ClientUpdate.from_keys_residuals(
        {e.layer: e.keys for e in result.layers},
        {e.layer: e.residuals for e in result.layers},
        deltas={e.layer: e.delta for e in result.layers},
        base_fingerprint=base_fp,
        client_id=client.client_id,
        round=round,
        modules={e.layer: e.module for e in result.layers},
        editor=editor,
        form=form,
    )


@dataclass
class OverlapCheck:
    """Which requests the model already satisfies (their residual is below the threshold): a
    client skips them rather than pushing the same fact into the model again."""

    keep: list[EditRequest]
    skipped: list[EditRequest]
    residuals: dict[int, float]  # case_id -> ||z - z0|| / ||z0||
    z_keep: ZResult


def check_overlap(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    cfg: MemitConfig,
    threshold: float,
) -> OverlapCheck:
    layers = arch.check_layers(model, cfg.layers or arch.default_layers(model))
    templates = context_templates(model, tokenizer, cfg)
    z = optimise_z(model, tokenizer, requests, layers[-1], templates, cfg)
    res = z.relative_residuals.tolist()
    keep = [i for i, r in enumerate(res) if r >= threshold]
    return OverlapCheck(
        keep=[requests[i] for i in keep],
        skipped=[r for i, r in enumerate(requests) if res[i] < threshold],
        residuals={r.case_id: res[i] for i, r in enumerate(requests)},
        z_keep=z.select(keep),
    )


def merge_updates(
    updates: Sequence[ClientUpdate],
    weighted_covs: dict[int, torch.Tensor],
    method: str = "collabedit",
    **params,
) -> dict[int, torch.Tensor]:
    """Merged delta per layer from the clients' updates (lambda C per layer given)."""
    if not updates:
        raise ValueError("no updates to merge")
    layers = sorted(updates[0].layers)
    merged = {}
    for layer in layers:
        lus = [u.layers[layer] for u in updates]
        inputs = LayerInputs(
            P=[lu.P for lu in lus] if all(lu.P is not None for lu in lus) else None,
            S=[lu.S for lu in lus] if all(lu.S is not None for lu in lus) else None,
            deltas=[lu.delta for lu in lus] if all(lu.delta is not None for lu in lus) else None,
            weighted_cov=weighted_covs[layer],
        )
        merged[layer] = merge_layer(method, inputs, **params)
    return merged


def layer_sync_round(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    clients: Sequence[Client],
    cfg: MemitConfig,
    covariances: dict[int, torch.Tensor],
    zs: Sequence[ZResult | None] | None = None,
) -> dict[int, torch.Tensor]:
    """Layer-synchronous CollabEdit; writes each merged layer into `model` and returns the
    merged deltas. Only the per-layer sums of P and S cross from clients to server."""
    zs = zs or [None] * len(clients)
    sessions = [
        MemitSession(model, tokenizer, c.requests, cfg, z=z)
        for c, z in zip(clients, zs, strict=True)
    ]
    layers = sessions[0].layers
    merged: dict[int, torch.Tensor] = {}
    for layer in layers:
        sum_p, sum_s = 0, 0
        for s in sessions:  # each client, on the merged model so far
            K = s.keys([layer])[layer]
            R = s.targets() * s.share(layer)
            sum_p = sum_p + R.T @ K
            sum_s = sum_s + K.T @ K
        merged[layer] = solve_from_sums(sum_p, sum_s, cfg.mom2_update_weight * covariances[layer])
        arch.add_to_weight(model, layer, merged[layer])
    return merged


def apply_deltas(model: PreTrainedModel, deltas: dict[int, torch.Tensor]) -> None:
    for layer, delta in deltas.items():
        arch.add_to_weight(model, layer, delta)


def relative_gap(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> float:
    """max over layers of ||a - b|| / ||b|| (the demo's fidelity number)."""
    return max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm()) for k in b)
