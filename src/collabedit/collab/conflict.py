"""Knowledge conflict and overlap between clients, found without revealing requests.

Stage 1 (detection), privacy-preserving option: clients share a secret key among themselves (not
with the server) and publish keyed hashes (HMAC-SHA256) of (subject, relation) and of the new
object. Equal fact hashes with different object hashes are a conflict; equal object hashes too are
an overlap (the same edit twice). The server sees only hashes it cannot invert without the key.
Stage 2 (resolution): a declared policy keeps one request per conflict — first come, first served
by request time, or by client priority — and withdraws the others.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from collabedit.requests import EditRequest

Policy = Literal["first-come", "priority"]


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def fact_hash(request: EditRequest, key: bytes) -> str:
    """Keyed hash of what is being edited: the subject and the relation (or, without a relation
    id, the prompt template, which names the relation)."""
    relation = request.relation_id or _norm(request.prompt)
    msg = f"{_norm(request.subject)}\x1f{relation}".encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def object_hash(request: EditRequest, key: bytes) -> str:
    return hmac.new(key, _norm(request.target_new).encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Announcement:
    """What a client publishes per request: hashes, its own position, and when it was asked."""

    client_id: str
    case_id: int
    fact: str
    obj: str
    requested_at: float


def announce(
    client_id: str,
    requests: Iterable[EditRequest],
    key: bytes,
    requested_at: Sequence[float] | None = None,
) -> list[Announcement]:
    requests = list(requests)
    times = list(requested_at) if requested_at is not None else [0.0] * len(requests)
    return [
        Announcement(client_id, r.case_id, fact_hash(r, key), object_hash(r, key), t)
        for r, t in zip(requests, times, strict=True)
    ]


@dataclass(frozen=True)
class Clash:
    fact: str
    kind: Literal["conflict", "overlap"]
    parties: tuple[Announcement, ...]
    winner: Announcement
    losers: tuple[Announcement, ...]


def find_clashes(
    announcements: Iterable[Announcement],
    policy: Policy = "first-come",
    priority: dict[str, int] | None = None,
) -> list[Clash]:
    """Group announcements by fact hash across clients; keep one per group by `policy`
    (priority: higher wins; ties and first-come fall back to request time, then client id)."""
    groups: dict[str, list[Announcement]] = defaultdict(list)
    for a in announcements:
        groups[a.fact].append(a)
    priority = priority or {}
    clashes = []
    for fact, group in groups.items():
        if len(group) < 2:
            continue

        def rank(a: Announcement):
            first = (a.requested_at, a.client_id, a.case_id)
            return ((-priority.get(a.client_id, 0),) if policy == "priority" else ()) + first

        ordered = sorted(group, key=rank)
        kind = "overlap" if len({a.obj for a in group}) == 1 else "conflict"
        clashes.append(Clash(fact, kind, tuple(group), ordered[0], tuple(ordered[1:])))
    return clashes


def withdrawn(clashes: Iterable[Clash], client_id: str) -> set[int]:
    """Case ids this client must withdraw."""
    return {a.case_id for c in clashes for a in c.losers if a.client_id == client_id}
