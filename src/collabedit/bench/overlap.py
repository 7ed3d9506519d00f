"""Figure 3 of the paper: the residual of a request shrinks each time it is edited again.

The same requests are merged round after round; before each round every client computes its
target vectors on the current global model and reports the relative residual ||z - z_0|| / ||z_0||
of each request. Requests already known to the model have (near) zero residual: that is the
overlap signal clients use to skip them.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from pydantic import Field

from collabedit.bench.common import BenchConfig, save_figure
from collabedit.bench.lab import Lab, Log
from collabedit.collab.protocol import apply_deltas


class OverlapConfig(BenchConfig):
    edits: int = Field(100, ge=1)
    repeats: int = Field(5, ge=1)
    clients: int = Field(5, ge=1)
    threshold: float = Field(0.05, ge=0, description="relative residual flagged as overlap")


def run(lab: Lab, cfg: OverlapConfig, log: Log) -> dict:
    requests = lab.requests(cfg.edits, seed=cfg.seed, form=cfg.form)
    lab.reset()
    rows = []
    for r in range(cfg.repeats + 1):
        session = lab.session(requests)
        res = session.relative_residuals()
        row = {
            "times_edited_before": r,
            "residual_mean": float(res.mean()),
            "residual_median": float(res.median()),
            "residual_max": float(res.max()),
            "flagged_share": float((res < cfg.threshold).double().mean()),
            **lab.score(requests, cfg.keys),
        }
        rows.append(row)
        log(
            f"[overlap] edited {r} times: mean residual {row['residual_mean']:.3f}, "
            f"flagged {100 * row['flagged_share']:.0f}%"
        )
        if r < cfg.repeats:
            updates = lab.client_updates(session, min(cfg.clients, len(requests)), round=r)
            apply_deltas(lab.model, lab.merge(updates, "collabedit"))
    lab.reset()
    return {"rows": rows}


def plot(result: dict, cfg: OverlapConfig, path) -> None:
    rows = result["rows"]
    x = [r["times_edited_before"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["residual_mean"] for r in rows], "-o", label="mean")
    ax.plot(x, [r["residual_median"] for r in rows], "--s", label="median")
    ax.plot(x, [r["residual_max"] for r in rows], ":^", label="max")
    ax.axhline(cfg.threshold, color="gray", lw=0.8, label=f"overlap threshold {cfg.threshold}")
    ax.set_xlabel("times the same requests were already merged")
    ax.set_ylabel("relative residual ||z - z0|| / ||z0||")
    ax.set_title("Residual vs repeated edits (paper Fig. 3)")
    ax.legend(fontsize=8)
    save_figure(fig, path)
