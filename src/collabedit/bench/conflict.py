"""Tables 6 and 4 of the paper: what a conflicting set does to a merge, and how resolving it helps.

Clients hold plain requests; two of them also hold the two sides of each conflict (the same
subject and relation edited to different new objects). Rows:

* ``without``: the plain requests merged alone (Table 6, left);
* ``with``: plain requests and both sides of every conflict merged together (Table 6, right;
  Table 4, before resolution);
* ``resolved``: stage 1 finds the conflicts by keyed hashes (no request text is shared), the
  policy keeps one side, the other side is withdrawn (the merge is redone without it: CollabEdit's
  sums make withdrawal exact), and in the next round the kept side is edited again with augmented
  context prompts (Table 4, after resolution).

For conflicts, ``kept_wins`` is the share of conflicts whose kept object is more probable than both
the true object and the rival object on the edit prompt.
"""

from __future__ import annotations

import random

import matplotlib.pyplot as plt
import torch
from pydantic import Field

from collabedit.bench.common import BenchConfig, save_figure
from collabedit.bench.lab import Lab, Log
from collabedit.collab.conflict import announce, find_clashes
from collabedit.collab.protocol import apply_deltas
from collabedit.evaluate.scoring import score_targets
from collabedit.world.edit_requests import world_conflict_pairs, world_requests


class ConflictConfig(BenchConfig):
    plain: int = Field(200, ge=1, description="non-conflicting requests")
    pairs: int = Field(50, ge=1, description="conflicts (each two requests)")
    clients: int = Field(4, ge=2)
    policy: str = Field("first-come", pattern="^(first-come|priority)$")
    augment_prefixes: int = Field(30, ge=1, description="context prompts in the re-edit")


def _kept_wins(lab: Lab, kept, rivals) -> float:
    """Share of conflicts where the kept object beats the true and the rival object."""
    texts = [r.rewrite_prompt for r in kept]
    objects = [
        (r.target_new, r.target_true, q.target_new) for r, q in zip(kept, rivals, strict=True)
    ]
    pairs = [(t, o) for t, objs in zip(texts, objects, strict=True) for o in objs]
    scores = score_targets(lab.model, lab.tok, pairs)
    lp = torch.tensor([s.mean_logprob for s in scores]).view(-1, 3)
    return 100.0 * float(((lp[:, 0] > lp[:, 1]) & (lp[:, 0] > lp[:, 2])).double().mean())


def run(lab: Lab, cfg: ConflictConfig, log: Log) -> dict:
    world = lab.bundle.world
    pairs = world_conflict_pairs(world, cfg.pairs, seed=cfg.seed, form=cfg.form)
    taken = {p.first.subject for p in pairs}
    others = [s for s in world.subjects if s not in taken]
    plain = world_requests(world, cfg.plain, seed=cfg.seed + 1, form=cfg.form, subjects=others)
    plain = [r.model_copy(update={"case_id": 2 * cfg.pairs + i}) for i, r in enumerate(plain)]
    n_plain_clients = max(1, cfg.clients - 2)
    plain_parts = [plain[i::n_plain_clients] for i in range(n_plain_clients)]
    side_a, side_b = [p.first for p in pairs], [p.second for p in pairs]

    # Stage 1, before anything is merged: keyed hashes only; who asked first is random per pair.
    rng = random.Random(cfg.seed)
    times = [(rng.random(), rng.random()) for _ in pairs]
    key = b"shared-among-clients-only"
    announcements = announce("client-a", side_a, key, [t[0] for t in times])
    announcements += announce("client-b", side_b, key, [t[1] for t in times])
    for i, part in enumerate(plain_parts):
        announcements += announce(f"client-{i}", part, key)
    clashes = find_clashes(announcements, cfg.policy, priority={"client-a": 1})
    conflicts = [c for c in clashes if c.kind == "conflict"]
    by_id = {r.case_id: r for r in side_a + side_b}
    kept = [by_id[c.winner.case_id] for c in conflicts]
    rivals = [by_id[c.losers[0].case_id] for c in conflicts]
    kept_ids = {r.case_id for r in kept}
    log(f"[conflict] stage 1: {len(conflicts)} conflicts among {len(announcements)} requests")

    # every merge below starts from the base model (lab.reset), so each client's session, and
    # the part of it a client keeps, is computed once
    plain_sessions = [lab.session(part) for part in plain_parts]
    side_sessions = [lab.session(side) for side in (side_a, side_b)]

    def merge(sessions: list) -> None:
        """One CollabEdit round on the current model, one client per session."""
        updates = []
        for session in sessions:
            updates += lab.client_updates(session, 1)
        apply_deltas(lab.model, lab.merge(updates, "collabedit"))

    rows: dict[str, dict] = {}
    lab.reset()
    log("[conflict] plain requests alone")
    merge(plain_sessions)
    rows["without"] = {"plain": lab.score(plain, cfg.keys)}

    lab.reset()
    log("[conflict] plain requests and both sides of every conflict")
    merge([*plain_sessions, *side_sessions])
    own_check = lab.score(side_a + side_b, cfg.keys)[cfg.keys[0]]
    rows["with"] = {
        "plain": lab.score(plain, cfg.keys),
        "kept_wins": _kept_wins(lab, kept, rivals),
        "conflict_requests_failing_own_check": 100.0 - own_check,
    }

    lab.reset()
    log("[conflict] losers withdrawn (merge redone without them)")
    kept_sessions = []
    for side, session in zip((side_a, side_b), side_sessions, strict=True):
        index = [i for i, r in enumerate(side) if r.case_id in kept_ids]
        if index:
            kept_sessions.append(session.select(index))
    merge([*plain_sessions, *kept_sessions])
    rows["withdrawn"] = {
        "plain": lab.score(plain, cfg.keys),
        "kept_wins": _kept_wins(lab, kept, rivals),
    }

    log("[conflict] next round: kept side edited again with augmented context prompts")
    # augmented requests: the editor's context prompts, more of them (an editor without
    # context prompts in its config cannot be augmented this way, and says so)
    re_edit = lab.session(kept, context_template_length_params=[(5, cfg.augment_prefixes)])
    apply_deltas(lab.model, lab.merge(lab.client_updates(re_edit, 1, round=1), "collabedit"))
    rows["resolved"] = {
        "plain": lab.score(plain, cfg.keys),
        "kept_wins": _kept_wins(lab, kept, rivals),
    }
    lab.reset()
    for name, row in rows.items():
        wins = row.get("kept_wins")
        log(
            f"[conflict] {name}: plain {cfg.score_key} {row['plain'][cfg.score_key]:.1f}"
            + (f", kept object wins {wins:.1f}%" if wins is not None else "")
        )
    return {
        "rows": rows,
        "detected_conflicts": len(conflicts),
        "other_clashes": len(clashes) - len(conflicts),
        "pairs": cfg.pairs,
        "plain": cfg.plain,
        "policy": cfg.policy,
    }


def plot(result: dict, cfg: ConflictConfig, path) -> None:
    rows = result["rows"]
    key = cfg.score_key
    names = ["without", "with", "withdrawn", "resolved"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(names))
    ax.bar(
        [x - 0.2 for x in xs],
        [rows[n]["plain"][key] for n in names],
        width=0.4,
        label=f"plain requests, {key}",
    )
    ax.bar(
        [x + 0.2 for x in xs],
        [rows[n].get("kept_wins") or 0 for n in names],
        width=0.4,
        label="conflicts: kept object wins",
    )
    ax.set_xticks(list(xs), names)
    ax.set_ylim(0, 101)
    ax.set_ylabel("percent")
    ax.set_title("Knowledge conflict (paper Tables 6 and 4)")
    ax.legend(fontsize=8)
    save_figure(fig, path)
