"""Conflict and overlap detection by keyed hashes, and the resolution policies."""

from __future__ import annotations

from collabedit.collab.conflict import announce, fact_hash, find_clashes, withdrawn
from collabedit.requests import EditRequest

KEY = b"shared-between-clients-only"


def _r(case_id, subject, target, rel="P103", prompt="The mother tongue of {} is"):
    return EditRequest(case_id=case_id, subject=subject, prompt=prompt, target_new=target,
                       relation_id=rel)


def test_conflicts_and_overlaps_are_found_by_hash_only():
    alice = announce("alice", [_r(0, "Ann Bo", "French"), _r(1, "Cy Dee", "Greek")], KEY,
                     requested_at=[10.0, 11.0])
    bob = announce("bob", [_r(0, "ann  bo", "Spanish"), _r(1, "Cy Dee", "Greek"),
                           _r(2, "Ann Bo", "Dutch", rel="P27")], KEY, requested_at=[5.0, 1, 2])
    # nothing readable is published
    assert all("Ann" not in a.fact and "French" not in a.obj for a in alice + bob)
    clashes = {c.kind: c for c in find_clashes(alice + bob)}
    assert set(clashes) == {"conflict", "overlap"}
    conflict = clashes["conflict"]
    assert conflict.winner.client_id == "bob"  # asked first (t=5 < t=10)
    assert withdrawn(clashes.values(), "alice") == {0, 1}  # conflict lost, overlap duplicate
    assert withdrawn(clashes.values(), "bob") == set()
    by_priority = find_clashes(alice + bob, policy="priority", priority={"alice": 2})
    assert withdrawn(by_priority, "alice") == set()
    assert withdrawn(by_priority, "bob") == {0, 1}


def test_another_key_gives_unrelated_hashes():
    r = _r(0, "Ann Bo", "French")
    assert fact_hash(r, KEY) != fact_hash(r, b"other key")
    # same fact through another phrasing of the relation id-less prompt differs only by prompt
    assert fact_hash(_r(0, "Ann Bo", "x", rel=None), KEY) == fact_hash(
        _r(1, " ann bo ", "y", rel=None), KEY)
