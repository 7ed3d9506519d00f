"""How a round's pieces combine across layers and clients, in process.

Protocols:
* `one-shot`: each client runs its editor on its own copy of the base model (all layers) and
  sends one ClientUpdate (rounds.client_round). With a frozen editor the CollabEdit merge equals
  Global-Edit exactly; with a sequential one a client's later-layer keys only see its own earlier
  writes, so the merge is close to, not equal to, sequential Global-Edit.
* `layer-sync`: the server merges layer by layer; before each layer every client reads its keys
  and residuals on the merged model so far. This reproduces sequential Global-Edit exactly, at
  the price of one exchange per edited layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from collabedit.collab.merge import LayerInputs, merge_layer, solve_from_sums
from collabedit.collab.update import ClientUpdate
from collabedit.editors import EditSession
from collabedit.models import arch

PROTOCOLS = ("one-shot", "layer-sync")


def merge_updates(
    updates: Sequence[ClientUpdate],
    weighted_covs: dict[int, torch.Tensor],
    method: str = "collabedit",
    **params,
) -> dict[int, torch.Tensor]:
    """Merged delta per layer from the clients' updates (the regulariser A per layer given)."""
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
    sessions: Sequence[EditSession],
    regulariser: dict[int, torch.Tensor],
) -> dict[int, torch.Tensor]:
    """Layer-synchronous CollabEdit over the clients' sessions (all on `model`); writes each
    merged layer into `model` and returns the merged deltas. Only the per-layer sums of P and S
    cross from clients to server."""
    if not sessions:
        raise ValueError("no clients")
    merged: dict[int, torch.Tensor] = {}
    for layer in sessions[0].layers:
        sum_p, sum_s = 0, 0
        for s in sessions:  # each client, on the merged model so far
            inp = s.inputs([layer])[layer]
            K, R = inp.keys.double(), inp.residuals.double()
            sum_p = sum_p + R.T @ K
            sum_s = sum_s + K.T @ K
        merged[layer] = solve_from_sums(sum_p, sum_s, regulariser[layer])
        arch.add_to_weight(model, layer, merged[layer])
    return merged


def apply_deltas(model: PreTrainedModel, deltas: dict[int, torch.Tensor]) -> None:
    for layer, delta in deltas.items():
        arch.add_to_weight(model, layer, delta)


def relative_gap(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> float:
    """max over layers of ||a - b|| / ||b|| (the demo's fidelity number)."""
    return max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm()) for k in b)
