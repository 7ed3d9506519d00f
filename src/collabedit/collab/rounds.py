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

from collabedit.collab.bounds import BoundError, UpdateBounds, check_layer
from collabedit.collab.merge import LayerInputs, get_method, merge_layer, running_sum
from collabedit.collab.mitigations import Mitigation, protect
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
from collabedit.collab.update import (
    ClientUpdate,
    Expectation,
    UpdateError,
    load_update,
    payload_sha256,
)
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
    mitigation: Mitigation | None = None,
) -> ClientRound:
    """A client's contribution to one round; the model is left exactly as it was.

    `mitigation`: cover keys and noise applied to the update before it leaves the client
    (collab/mitigations.py); they trade edit quality for privacy (docs/privacy.md).

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
        n_edits=len(session.requests),
    )
    if mitigation is not None and mitigation.active:
        update = protect(
            update,
            mitigation,
            setup.model,
            setup.tokenizer,
            setup.regulariser,
            {e.layer: e.keys for e in result.layers},
            {e.layer: e.residuals for e in result.layers},
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
    bounds: UpdateBounds | None = None,
    senders: dict[str, str] | None = None,
) -> RoundOutcome:
    """Merge one round into `model` (in place). The caller writes the model, then the state.

    Each update is checked alone — schema, fingerprint, round, shapes, finiteness, then `bounds`
    (when given; see collab/bounds.py), then the ledger: a client id merged this round, a payload
    already merged under any label, or a client id bound to another authenticated sender
    (`senders`: path -> who delivered it, e.g. a Flower node id) — and a failing one is rejected
    with its reason while the others merge. Nothing a client file says changes how the server
    solves: method parameters come from `params` alone."""
    m = get_method(method)
    params = dict(params or {})
    m.config(**params)  # bad parameters fail before any update is read
    fp = arch.fingerprint(model, state.layers)
    if fp != state.base_fingerprint:
        raise ValueError(
            f"the server's model ({fp}) is not the global model of round "
            f"{state.round} ({state.base_fingerprint})"
        )
    # with bounds, P and S are required whatever the method merges: they are what the bounds
    # and the delta's normal equations are checked by (honest clients always send them)
    needs = tuple(dict.fromkeys((*m.client_sends, "P", "S"))) if bounds else m.client_sends
    expect = Expectation(state.base_fingerprint, state.shapes, needs=needs, round=state.round)
    accepted: list[tuple[str, ClientUpdate, str]] = []
    rejected: dict[str, str] = {}
    seen_ids: set[str] = set()
    seen_payloads: dict[str, str] = {}
    round_p: dict[int, torch.Tensor] = {}
    round_s: dict[int, torch.Tensor] = {}
    for path in update_paths:
        key = str(path)
        try:
            update = load_update(path, expect)
            if bounds is not None:
                _check_bounds(update, bounds, regulariser, state.layers)
        except (UpdateError, BoundError) as exc:
            rejected[key] = str(exc) if key in str(exc) else f"{path}: {exc}"
            continue
        digest = payload_sha256(update)
        sender = (senders or {}).get(key, "")
        bound_to = state.sender_of(update.client_id)
        earlier = state.merged_payload(digest)
        if state.merged(update.client_id, update.round) or update.client_id in seen_ids:
            reason = f"client {update.client_id} already merged in round {update.round}"
        elif earlier is not None:
            reason = (
                f"the same tensors were merged in round {earlier.round} as "
                f"{earlier.client_id}'s update"
            )
        elif digest in seen_payloads:
            reason = f"the same tensors as {seen_payloads[digest]} in this round"
        elif sender and bound_to and bound_to != sender:
            reason = f"client id {update.client_id} belongs to another sender ({bound_to})"
        else:
            reason = ""
        if reason:
            rejected[key] = f"{path}: {reason}"
            continue
        seen_ids.add(update.client_id)
        seen_payloads[digest] = key
        if m.streams:
            for layer in state.layers:
                p, s = update.layers[layer].p_and_s()
                _add(round_p, layer, p)
                _add(round_s, layer, s)
            update = replace(update, layers={})
        accepted.append((key, update, digest))
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
        updates = [u for _, u, _ in accepted]
        deltas = merge_updates(updates, weighted, method, **params)
        if all(u.layers[layer].S is not None for u in updates for layer in state.layers):
            round_s = {
                layer: running_sum([u.layers[layer].S for u in updates]) for layer in state.layers
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
            payload_sha256=digest,
            sender=(senders or {}).get(p, ""),
        )
        for p, u, digest in accepted
    ]
    new_state = state.model_copy(
        update={
            "round": state.round + 1,
            "base_fingerprint": arch.fingerprint(model, state.layers),
            "ledger": ledger,
        }
    )
    return RoundOutcome(new_state, new_sum, deltas, [p for p, _, _ in accepted], rejected)


def _check_bounds(
    update: ClientUpdate,
    bounds: UpdateBounds,
    regulariser: dict[int, torch.Tensor],
    layers: Sequence[int],
) -> None:
    for layer in layers:
        lu = update.layers[layer]
        P, S = lu.p_and_s()
        check_layer(layer, update.key_rows, P, S, bounds, lu.delta, regulariser.get(layer))


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
    overwrite: bool = False,
) -> None:
    """Write the merged model (with its folder's extra files; into a temporary folder, verified,
    then renamed into place), then the state — last, and only if the state on disk is still the
    round this merge started from — so a crash or a refusal at any point leaves the previous
    model and state usable and the round can be run again."""
    if out_dir is not None:
        save_model(
            setup.model,
            setup.tokenizer,
            out_dir,
            setup.source,
            overwrite=overwrite,
            verify=arch.weight_names(setup.model, setup.layers),
        )
    if state_dir is not None:
        save_state(state_dir, outcome.state, outcome.sum_s, expect_round=outcome.state.round - 1)
