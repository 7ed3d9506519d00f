"""One collaboration round, written once: the client's side and the server's side.

Every entry point — the CLI (`client edit`, `server merge`), the Flower ClientApp and ServerApp,
the in-process experiments and the demo — calls these functions, so a round behaves the same
wherever it runs.

Client: check that its model is this round's global model (fingerprint, layers, editor), make the
editor's session for its requests, drop the requests the model already knows (overlap: their
relative residual is below a threshold), edit locally without changing the model, and build the
update (P_i = R_i K_i^T and S_i = K_i K_i^T per layer, or their factors; the local delta only when
the merge method needs it).

Server: validate each update (a bad one is rejected alone, the round goes on with the others),
refuse one already in the ledger, add the accepted ones into running sums (methods that need only
sums keep no update in memory: at GPT-2 XL sizes one client's S is 1.6 GB over five layers), solve
with A_t = A0 + beta1 * sum of earlier rounds' S (the dynamic covariance; beta1 = 0 keeps A0),
apply the merged deltas and return the next state. The caller saves the model, then the state
(`commit_round`), so a crash before the state write simply re-runs the round.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedModel

from collabedit.collab.merge import LayerInputs, get_method, merge_layer, running_sum
from collabedit.collab.protocol import apply_deltas, merge_updates
from collabedit.collab.setup import EditingSetup
from collabedit.collab.state import (
    STATE_FILE,
    LedgerEntry,
    ServerState,
    file_sha256,
    load_state,
    save_state,
)
from collabedit.collab.update import ClientUpdate, Expectation, UpdateError, load_update
from collabedit.editors import EditSession, Progress, closed_form_edit
from collabedit.models import arch
from collabedit.models.loading import save_model
from collabedit.requests import EditRequest

# ---------------------------------------------------------------------------------------------
# client


@dataclass(frozen=True)
class RoundInfo:
    """What a client must know of a round; all of it public."""

    round: int
    base_fingerprint: str  # the edited layers of this round's global model
    layers: tuple[int, ...]
    editor: str = ""  # "" = any
    origin_fingerprint: str | None = None  # whole-model fingerprint of the round-0 model

    @classmethod
    def from_state(cls, state: ServerState) -> RoundInfo:
        return cls(
            state.round,
            state.base_fingerprint,
            tuple(state.layers),
            state.editor,
            state.origin_fingerprint,
        )


class NothingToEdit(ValueError):
    """Every request is already known to the model: there is nothing to send."""


@dataclass
class ClientRound:
    update: ClientUpdate
    edited: list[EditRequest]
    skipped: list[EditRequest] = field(default_factory=list)
    residuals: dict = field(default_factory=dict)  # case_id -> relative residual


def check_round(setup: EditingSetup, info: RoundInfo) -> None:
    """The client's model and editor are the ones this round expects; ValueError otherwise."""
    if list(info.layers) != setup.layers:
        raise ValueError(f"the server edits layers {list(info.layers)}, not {setup.layers}")
    if info.editor and info.editor != setup.editor.name:
        raise ValueError(f"the federation edits with {info.editor!r}, not {setup.editor.name!r}")
    fp = arch.fingerprint(setup.model, setup.layers)
    if fp != info.base_fingerprint:
        raise ValueError(
            f"the model is not the global model of round {info.round} (its edited layers have "
            f"fingerprint {fp}, the round's is {info.base_fingerprint})"
        )


def client_round(
    setup: EditingSetup,
    requests: Sequence[EditRequest],
    client_id: str,
    info: RoundInfo | None = None,
    overlap_threshold: float = 0.0,
    form: Literal["full", "factor", "auto"] = "full",
    send_delta: bool = True,
    session: EditSession | None = None,
    progress: Progress = None,
) -> ClientRound:
    """A client's contribution to one round; the model is left exactly as it was.

    `session`: the editor's session for exactly these requests, when the caller already made
    one (experiments reuse target vectors across clients). Raises NothingToEdit when the
    overlap check leaves no request, ValueError for a model or request that does not fit."""
    if info is not None:
        check_round(setup, info)
    round_no = info.round if info is not None else 0
    if session is None:
        session = setup.session(requests, progress)
    elif len(session.requests) != len(requests):
        raise ValueError(f"a session of {len(session.requests)} requests for {len(requests)}")
    residuals: dict = {}
    skipped: list[EditRequest] = []
    if overlap_threshold > 0:
        res = session.relative_residuals().tolist()
        residuals = {r.case_id: res[i] for i, r in enumerate(session.requests)}
        keep = [i for i, v in enumerate(res) if v >= overlap_threshold]
        skipped = [r for i, r in enumerate(session.requests) if res[i] < overlap_threshold]
        if not keep:
            raise NothingToEdit("every request is already known to the model: nothing to send")
        if skipped:
            session = session.select(keep)
    result = closed_form_edit(session, setup.regulariser, apply=False)
    update = ClientUpdate.from_keys_residuals(
        {e.layer: e.keys for e in result.layers},
        {e.layer: e.residuals for e in result.layers},
        deltas={e.layer: e.delta for e in result.layers} if send_delta else None,
        base_fingerprint=arch.fingerprint(setup.model, setup.layers),
        client_id=client_id,
        round=round_no,
        modules={e.layer: e.module for e in result.layers},
        editor=setup.editor.name,
        form=form,
    )
    return ClientRound(update, list(session.requests), skipped, residuals)


# ---------------------------------------------------------------------------------------------
# server


@dataclass
class RoundOutcome:
    state: ServerState
    sum_s: dict[int, torch.Tensor]
    deltas: dict[int, torch.Tensor]
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)


def initial_state(
    setup: EditingSetup, method: str, beta1: float, layers: Sequence[int] | None = None
) -> ServerState:
    layers = list(layers or setup.layers)
    shapes = {layer: tuple(arch.read_weight(setup.model, layer).shape) for layer in layers}
    return ServerState(
        base_fingerprint=arch.fingerprint(setup.model, layers),
        layers=layers,
        shapes=shapes,
        method=method,
        beta1=beta1,
        editor=setup.editor.name,
        origin_fingerprint=setup.origin_fingerprint,
    )


def open_state(
    folder: str | os.PathLike[str] | None, setup: EditingSetup, method: str, beta1: float
) -> tuple[ServerState, dict[int, torch.Tensor]]:
    """The saved state, or a fresh round-0 state for the setup's model when the folder has
    none. A saved state must be for the same layers and editor."""
    if folder is not None and (Path(folder) / STATE_FILE).is_file():
        state, sums = load_state(folder)
        if state.layers != setup.layers:
            raise ValueError(
                f"{folder}: the federation edits layers {state.layers}, not {setup.layers}"
            )
        if state.editor and state.editor != setup.editor.name:
            raise ValueError(
                f"{folder}: the federation edits with {state.editor!r}, not {setup.editor.name!r}"
            )
        return state, sums
    return initial_state(setup, method, beta1), {}


def origin_of(folder: str | os.PathLike[str] | None) -> str | None:
    """The round-0 model's fingerprint recorded in a state folder (None without a state)."""
    if folder is not None and (Path(folder) / STATE_FILE).is_file():
        return load_state(folder)[0].origin_fingerprint
    return None


def server_round(
    model: PreTrainedModel,
    update_paths: Sequence[str | os.PathLike[str]],
    state: ServerState,
    sum_s: dict[int, torch.Tensor],
    regulariser: dict[int, torch.Tensor],
    method: str = "collabedit",
    params: dict | None = None,
) -> RoundOutcome:
    """Merge one round into `model` (in place). The caller writes the model, then the state."""
    m = get_method(method)
    params = dict(params or {})
    m.config(**params)  # bad parameters fail before any update is read
    fp = arch.fingerprint(model, state.layers)
    if fp != state.base_fingerprint:
        raise ValueError(
            f"the server's model ({fp}) is not the global model of round "
            f"{state.round} ({state.base_fingerprint})"
        )
    expect = Expectation(
        state.base_fingerprint, state.shapes, needs=m.client_sends, round=state.round
    )
    accepted: list[tuple[str, ClientUpdate]] = []
    rejected: dict[str, str] = {}
    seen: set[str] = set()
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
        if m.streams:
            for layer in state.layers:
                p, s = update.layers[layer].p_and_s()
                _add(round_p, layer, p)
                _add(round_s, layer, s)
            update = replace(update, layers={})
        accepted.append((str(path), update))
    if not accepted:
        raise ValueError("no valid update to merge; rejected: " + "; ".join(rejected.values()))
    weighted = {
        layer: regulariser[layer].double()
        + state.beta1 * sum_s.get(layer, torch.zeros_like(regulariser[layer])).double()
        for layer in state.layers
    }
    if m.streams:
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


def commit_round(
    setup: EditingSetup,
    outcome: RoundOutcome,
    out_dir: str | os.PathLike[str] | None,
    state_dir: str | os.PathLike[str] | None,
) -> None:
    """Write the merged model (with its folder's extra files), then the state — last, so a
    crash in between leaves the previous state and the round can be run again."""
    if out_dir is not None:
        save_model(setup.model, setup.tokenizer, out_dir, setup.source)
    if state_dir is not None:
        save_state(state_dir, outcome.state, outcome.sum_s)
