"""Engine objects <-> Flower records.

A broadcast travels as an ArrayRecord of the global layers' weights plus a ConfigRecord of plain
settings and the ledger (JSON). A client's reply is a ConfigRecord (status, client id, number of
edits; never a request) plus, for an update, the update file's bytes as one uint8 Array: the
server validates exactly the bytes the client wrote (collab.update.load_update), and ArrayRecords
are chunked by Flower, so large models have no message-size limit. ConfigRecords are not chunked:
nothing large goes there.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from collabedit.federation.engine import Broadcast, Reply

WEIGHTS = "weights"
ROUND = "round"
STATUS = "status"
UPDATE = "update"


def broadcast_content(b: Broadcast) -> RecordDict:
    arrays = ArrayRecord(
        {
            f"layer.{k}": Array(v.detach().double().contiguous().numpy())
            for k, v in b.weights.items()
        }
    )
    cfg = ConfigRecord(
        {
            "round": b.round,
            "base-fingerprint": b.base_fingerprint,
            "ledger": json.dumps(b.ledger),
            "settings": json.dumps(b.settings),
        }
    )
    return RecordDict({WEIGHTS: arrays, ROUND: cfg})


def is_broadcast(content: RecordDict) -> bool:
    return ROUND in content.config_records and WEIGHTS in content.array_records


def parse_broadcast(content: RecordDict) -> Broadcast:
    cfg = content.config_records[ROUND]
    weights = {
        int(k.split(".")[1]): torch.from_numpy(np.array(a.numpy()))
        for k, a in content.array_records[WEIGHTS].items()
    }
    return Broadcast(
        round=int(cfg["round"]),
        base_fingerprint=str(cfg["base-fingerprint"]),
        weights=weights,
        ledger=json.loads(str(cfg["ledger"])),
        settings=json.loads(str(cfg["settings"])),
    )


def reply_content(
    kind: str, client_id: str, n_edits: int = 0, blob: bytes | None = None, error: str = ""
) -> RecordDict:
    rd = RecordDict(
        {
            STATUS: ConfigRecord(
                {"kind": kind, "client-id": client_id, "n-edits": int(n_edits), "error": error}
            )
        }
    )
    if blob is not None:
        rd[UPDATE] = ArrayRecord({"file": Array(np.frombuffer(blob, dtype=np.uint8).copy())})
    return rd


def parse_reply(msg: Message) -> Reply:
    node = int(msg.metadata.src_node_id)
    if msg.has_error():
        # the reason may quote a traceback from the client's machine: keep only the code
        return Reply(node, "error", detail=f"Flower error code {msg.error.code}")
    status = msg.content.config_records.get(STATUS)
    if status is None:
        return Reply(node, "error", detail="reply without status")
    kind = str(status["kind"])
    blob = None
    if kind == "update":
        rec = msg.content.array_records.get(UPDATE)
        if rec is None or "file" not in rec:
            return Reply(node, "error", client_id=str(status["client-id"]), detail="no update")
        blob = rec["file"].numpy().astype(np.uint8).tobytes()
    return Reply(node, kind, blob, str(status["client-id"]), str(status.get("error", "")))


def received_summary(msg: Message) -> dict:
    """What the server received in one reply, as JSON-able text (kept for audits and tests)."""
    out = {"src_node_id": int(msg.metadata.src_node_id), "has_error": msg.has_error()}
    if msg.has_error():
        out["error"] = {"code": msg.error.code, "reason": msg.error.reason}
        return out
    out["config_records"] = {k: dict(v) for k, v in msg.content.config_records.items()}
    out["array_records"] = {
        k: {n: [list(a.shape), a.dtype] for n, a in v.items()}
        for k, v in msg.content.array_records.items()
    }
    out["metric_records"] = {k: dict(v) for k, v in msg.content.metric_records.items()}
    return out
