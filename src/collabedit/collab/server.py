"""The server's round: validate updates, merge, write the global model, advance the state.

Bad updates are rejected one by one (the round goes on with the others); an update already in
the ledger for this round is refused, so no request is ever merged twice.

For CollabEdit the server needs only sum P and sum S, so it adds each accepted update into running
sums as it is read and keeps none of them: memory does not grow with the number of clients
(at GPT-2 XL sizes one client's S is 1.6 GB over five layers).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import PreTrainedModel

from collabedit.collab.merge import METHODS, LayerInputs, merge_layer, running_sum
from collabedit.collab.protocol import apply_deltas, merge_updates
from collabedit.collab.state import (
    STATE_FILE,
    LedgerEntry,
    ServerState,
    file_sha256,
    load_state,
)
from collabedit.collab.update import ClientUpdate, Expectation, UpdateError, load_update
from collabedit.models import arch


@dataclass
class RoundOutcome:
    state: ServerState
    sum_s: dict[int, torch.Tensor]
    deltas: dict[int, torch.Tensor]
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)


def initial_state(
    model: PreTrainedModel, layers: list[int], method: str, beta0: float, beta1: float
) -> ServerState:
    shapes = {layer: tuple(arch.read_weight(model, layer).shape) for layer in layers}
    return ServerState(
        base_fingerprint=arch.fingerprint(model, layers),
        layers=layers,
        shapes=shapes,
        method=method,
        beta0=beta0,
        beta1=beta1,
    )


def open_state(
    folder: str | os.PathLike[str] | None,
    model: PreTrainedModel,
    layers: list[int],
    method: str,
    beta0: float,
    beta1: float,
) -> tuple[ServerState, dict[int, torch.Tensor]]:
    """The saved state, or a fresh round-0 state for `model` when the folder has none."""
    if folder is not None and (Path(folder) / STATE_FILE).is_file():
        return load_state(folder)
    return initial_state(model, layers, method, beta0, beta1), {}


NOISE_FLOOR_KEY = "noise_floor"


def merge_round(
    model: PreTrainedModel,
    update_paths: list[str | os.PathLike[str]],
    state: ServerState,
    sum_s: dict[int, torch.Tensor],
    covariances: dict[int, torch.Tensor],
    method: str = "collabedit",
    **params,
) -> RoundOutcome:
    """Merge one round into `model` (in place). The caller writes the model, then the state."""
    fp = arch.fingerprint(model, state.layers)
    if fp != state.base_fingerprint:
        raise ValueError(
            f"the server's model ({fp}) is not the global model of round "
            f"{state.round} ({state.base_fingerprint})"
        )
    needs = tuple(n for n in METHODS[method].needs if n in ("P", "S", "deltas"))
    expect = Expectation(
        state.base_fingerprint,
        state.shapes,
        needs=tuple("delta" if n == "deltas" else n for n in needs),
        round=state.round,
    )
    accepted: list[tuple[str, ClientUpdate]] = []
    rejected: dict[str, str] = {}
    seen: set[str] = set()
    streaming = set(needs) <= {"P", "S"}
    round_p: dict[int, torch.Tensor] = {}
    round_s: dict[int, torch.Tensor] = {}
    for path in update_paths:
        try:
            update = load_update(path, expect)
        except UpdateError as exc:
            rejected[str(path)] = str(exc)
            continue
        if state.merged(update.client_id, update.round) or update.client_id in seen:
            rejected[str(path)] = (
                f"{path}: client {update.client_id} already merged in round {update.round}"
            )
            continue
        seen.add(update.client_id)
        if streaming:
            for layer in state.layers:
                p, s = update.layers[layer].p_and_s()
                _add(round_p, layer, p)
                _add(round_s, layer, s)
            update = replace(update, layers={})
        accepted.append((str(path), update))
    if not accepted:
        raise ValueError("no valid update to merge; rejected: " + "; ".join(rejected.values()))
    # a securely aggregated sum says how noisy it is, so merging the saved file again later
    # solves with the same floor as the round that produced it
    noise = max(float(u.extra.get(NOISE_FLOOR_KEY, 0.0)) for _, u in accepted)
    if noise > 0 and method == "collabedit":
        params["floor"] = max(noise, float(params.get("floor", 0.0)))
    weighted = {
        layer: state.beta0 * covariances[layer].double()
        + state.beta1 * sum_s.get(layer, torch.zeros_like(covariances[layer])).double()
        for layer in state.layers
    }
    if streaming:
        deltas = {
            layer: merge_layer(
                method,
                LayerInputs(P=[round_p[layer]], S=[round_s[layer]], weighted_cov=weighted[layer]),
                **params,
            )
            for layer in state.layers
        }
    else:
        deltas = merge_updates([u for _, u in accepted], weighted, method, **params)
        if all(u.layers[layer].S is not None for _, u in accepted for layer in state.layers):
            round_s = {
                layer: running_sum([u.layers[layer].S for _, u in accepted])
                for layer in state.layers
            }
    apply_deltas(model, deltas)
    # earlier rounds' keys, for the dynamic covariance of the next round
    new_sum = dict(sum_s)
    for layer, merged_s in round_s.items():
        new_sum[layer] = sum_s[layer] + merged_s if layer in sum_s else merged_s
    now = time.time()
    ledger = state.ledger + [
        LedgerEntry(
            round=state.round,
            client_id=u.client_id,
            n_edits=u.n_edits,
            update_sha256=file_sha256(p),
            merged_at=now,
        )
        for p, u in accepted
    ]
    new_state = state.model_copy(
        update={
            "round": state.round + 1,
            "base_fingerprint": arch.fingerprint(model, state.layers),
            "ledger": ledger,
        }
    )
    return RoundOutcome(new_state, new_sum, deltas, [p for p, _ in accepted], rejected)


def _add(sums: dict[int, torch.Tensor], layer: int, value: torch.Tensor) -> None:
    if layer in sums:
        sums[layer].add_(value.double())
    else:
        sums[layer] = value.double().clone()
