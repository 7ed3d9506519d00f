"""Table 5 of the paper: do edits of early rounds survive later rounds?

Each round, clients edit new requests on the current global model and the server merges with
CollabEdit. With an immutable covariance (lambda C_0) later rounds may overwrite earlier edits; the
dynamic covariance lambda C_0 + beta1 * sum of earlier rounds' S (K K^T) protects the keys already
written. Reported: the first round's edits after every round, and all edits at the end, against a
single Global-Edit of everything as the reference.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from pydantic import Field

from collabedit.bench.common import BenchConfig, save_figure
from collabedit.bench.lab import Lab, Log
from collabedit.collab.protocol import apply_deltas
from collabedit.world.edit_requests import world_requests


class ForgettingConfig(BenchConfig):
    rounds: int = Field(5, ge=2)
    edits_per_round: int = Field(40, ge=1)
    clients: int = Field(5, ge=1)
    beta1: float = Field(1.0, gt=0, description="weight of earlier rounds' S in the dynamic C")


def _rounds(lab: Lab, cfg: ForgettingConfig, beta1: float, chunks, log: Log) -> list[dict]:
    lab.reset()
    sum_s: dict = {}
    rows = []
    for t, requests in enumerate(chunks):
        session = lab.session(requests)  # on the global model of this round
        updates = lab.client_updates(session, min(cfg.clients, len(requests)), round=t)
        deltas = lab.merge(updates, "collabedit", lab.weighted(sum_s, beta1))
        apply_deltas(lab.model, deltas)
        for layer in lab.layers:
            s = sum(u.layers[layer].S.double() for u in updates)
            sum_s[layer] = sum_s[layer] + s if layer in sum_s else s
        first = lab.score(chunks[0], cfg.keys)
        so_far = lab.score([r for c in chunks[: t + 1] for r in c], cfg.keys)
        rows.append({"round": t + 1, "first_round": first, "all_so_far": so_far})
        log(
            f"[forgetting] beta1={beta1:g} round {t + 1}: first-round edits "
            f"{cfg.score_key} {first[cfg.score_key]:.1f}, all so far {so_far[cfg.score_key]:.1f}"
        )
    lab.reset()
    return rows


def run(lab: Lab, cfg: ForgettingConfig, log: Log) -> dict:
    n = cfg.rounds * cfg.edits_per_round
    requests = world_requests(lab.bundle.world, n, seed=cfg.seed, form=cfg.form)
    chunks = [requests[i : i + cfg.edits_per_round] for i in range(0, n, cfg.edits_per_round)]
    result = {
        "immutable": _rounds(lab, cfg, 0.0, chunks, log),
        "dynamic": _rounds(lab, cfg, cfg.beta1, chunks, log),
    }
    log("[forgetting] reference: one Global-Edit of all requests")
    result["global_all_at_once"] = lab.compare(requests, 1, ["global"], cfg.keys)["global"]
    return result


def plot(result: dict, cfg: ForgettingConfig, path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    key = cfg.score_key
    for mode, style in (("immutable", "--s"), ("dynamic", "-o")):
        rows = result[mode]
        ax.plot(
            [r["round"] for r in rows],
            [r["first_round"][key] for r in rows],
            style,
            label=f"round-1 edits, {mode} C",
        )
        ax.plot(
            [r["round"] for r in rows],
            [r["all_so_far"][key] for r in rows],
            style,
            alpha=0.4,
            label=f"all edits so far, {mode} C",
        )
    ax.axhline(
        result["global_all_at_once"][key], color="gray", lw=0.8, label="Global-Edit of all, at once"
    )
    ax.set_ylim(0, 101)
    ax.set_xticks([r["round"] for r in result["immutable"]])
    ax.set_xlabel(f"round ({cfg.edits_per_round} new edits per round)")
    ax.set_ylabel(key)
    ax.set_title("Forgetting across rounds (paper Table 5)")
    ax.legend(fontsize=7)
    save_figure(fig, path)
