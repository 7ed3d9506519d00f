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

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from safetensors import safe_open

from collabedit import io

STATE_FILE = "server_state.safetensors"


class LedgerEntry(BaseModel):
    round: int
    client_id: str
    n_edits: int
    update_sha256: str
    merged_at: float


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


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_state(
    folder: str | os.PathLike[str], state: ServerState, sum_s: dict[int, torch.Tensor]
) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
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
