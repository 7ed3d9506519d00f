"""Figure 1 of the paper: Score against the number of edits, for Global-Edit, CollabEdit and the
destructive merges, with the edits spread over a fixed number of clients.

The request sets are nested (each count takes the first n of one draw), so the target vectors are
optimised once, for the largest set: a request's z depends only on the request and the model."""

from __future__ import annotations

import matplotlib.pyplot as plt
from pydantic import Field

from collabedit.bench.common import BenchConfig, method_lines, save_figure
from collabedit.bench.lab import Lab, Log, merge_methods


class ScaleConfig(BenchConfig):
    # the shipped world has 400 subjects (one request each): its largest set
    counts: list[int] = Field(default_factory=lambda: [25, 50, 100, 200, 400])
    clients: int = Field(10, ge=1)
    methods: list[str] = Field(default_factory=lambda: ["global", *merge_methods()])


def run(lab: Lab, cfg: ScaleConfig, log: Log) -> dict:
    counts = sorted(cfg.counts)
    drawn = lab.requests(counts[-1], seed=cfg.seed, form=cfg.form)
    log(f"[scale] target vectors of {len(drawn)} requests")
    session = lab.session(drawn)
    rows = []
    for n in counts:
        log(f"[scale] {n} edits over {min(cfg.clients, n)} clients")
        scores = lab.compare(
            drawn[:n],
            min(cfg.clients, n),
            cfg.methods,
            cfg.keys,
            session=session.select(range(n)),
            log=log,
        )
        rows += [{"n": n, "method": m, **s} for m, s in scores.items()]
    return {"rows": rows}


def plot(result: dict, cfg: ScaleConfig, path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    method_lines(ax, result["rows"], "n", cfg.score_key)
    ax.set_xlabel(f"number of edits ({cfg.clients} clients)")
    ax.set_title("Score vs number of edits (paper Fig. 1)")
    save_figure(fig, path)
