"""Server state across rounds, in one safetensors file written atomically.

What persists: the round number, the fingerprint of the current global model's edited layers
(the base of the next round), the whole-model fingerprint of the round-0 model (under which the
editor's regulariser A0 = lambda C_0 is cached), the editor, the accumulated sum of S over merged
rounds (for the dynamic regulariser A_t = A0 + beta1 sum_{tau<t} S_tau that protects earlier
edits), and a ledger of which client's how-many edits were merged in which round. A round
interrupted before the state write leaves the previous state intact, so it can simply be run
again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from safetensors import safe_open

from collabedit import io

STATE_FILE = "server_state.safetensors"
LOCK_FILE = ".lock"


class StateBusyError(RuntimeError):
    """Another process holds the state folder (a merge is running)."""


class StaleStateError(RuntimeError):
    """The state on disk is no longer the one this round started from."""


@contextlib.contextmanager
def state_lock(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the state folder exclusively for one round; a second holder fails at once with
    StateBusyError (never waits). The lock dies with the process, so a crash leaves none."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateBusyError(
                f"{folder}: another merge is running on this state folder (it holds "
                f"{folder / LOCK_FILE}); wait for it, then run this round again"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


class LedgerEntry(BaseModel):
    round: int
    client_id: str
    n_edits: int
    update_sha256: str
    merged_at: float
    # hash of the tensors alone: a payload merged once is refused under any other label
    payload_sha256: str = ""
    # who delivered it, as the transport authenticated it (a Flower node id); "" = not known
    sender: str = ""


class ServerState(BaseModel):
    round: int = 0
    base_fingerprint: str
    layers: list[int]
    shapes: dict[int, tuple[int, int]]
    method: str = "collabedit"
    editor: str = Field("", description="the editor every update must come from ('' = any)")
    origin_fingerprint: str | None = Field(
        None, description="whole-model fingerprint of the round-0 model (A0's cache key)"
    )
    # states written before A0 carried lambda recorded it here; unused since
    beta0: float | None = Field(None, description="lambda of older states (informational)")
    beta1: float = Field(0.0, ge=0, description="weight of earlier rounds' S (0: immutable A0)")
    ledger: list[LedgerEntry] = Field(default_factory=list)

    def merged(self, client_id: str, round: int) -> bool:
        return any(e.client_id == client_id and e.round == round for e in self.ledger)

    def merged_payload(self, digest: str) -> LedgerEntry | None:
        return next((e for e in self.ledger if e.payload_sha256 == digest), None)

    def sender_of(self, client_id: str) -> str:
        """The authenticated sender a client id is bound to ("" = none yet)."""
        return next((e.sender for e in self.ledger if e.client_id == client_id and e.sender), "")


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_state(
    folder: str | os.PathLike[str],
    state: ServerState,
    sum_s: dict[int, torch.Tensor],
    expect_round: int | None = None,
) -> Path:
    """Write the state atomically. `expect_round`: the round the state on disk must still be
    at (None: no state yet, or unchecked) — a compare-and-swap, so a round merged by someone
    else meanwhile is never overwritten."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if expect_round is not None:
        on_disk = load_state(folder)[0].round if (folder / STATE_FILE).is_file() else 0
        if on_disk != expect_round:
            raise StaleStateError(
                f"{folder}: the state is at round {on_disk}, this merge started from round "
                f"{expect_round}; nothing was written"
            )
    tensors = {f"layer.{k}.sum_S": v.double().contiguous() for k, v in sum_s.items()}
    if not tensors:  # safetensors needs at least one tensor
        tensors = {"empty": torch.zeros(1)}
    meta = {"state": state.model_dump_json(), "saved_at": repr(time.time())}
    return io.write_safetensors(folder / STATE_FILE, tensors, meta)


def load_state(folder: str | os.PathLike[str]) -> tuple[ServerState, dict[int, torch.Tensor]]:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no server state (start a federation with "
            "`collabedit server merge --state DIR`)"
        )
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        state = ServerState(**json.loads(meta["state"]))
        sums = {int(k.split(".")[1]): f.get_tensor(k) for k in f.keys() if k.endswith(".sum_S")}
    return state, sums
