"""Figure 6 of the paper: Score against the number of clients, for a fixed total of edits."""

from __future__ import annotations

import matplotlib.pyplot as plt
from pydantic import Field

from collabedit.bench.common import BenchConfig, method_lines, save_figure
from collabedit.bench.lab import Lab, Log, merge_methods


class ClientsConfig(BenchConfig):
    edits: int = Field(200, ge=1)
    client_counts: list[int] = Field(default_factory=lambda: [1, 2, 5, 10, 25, 50])
    methods: list[str] = Field(default_factory=lambda: ["global", *merge_methods()])


def run(lab: Lab, cfg: ClientsConfig, log: Log) -> dict:
    requests = lab.requests(cfg.edits, seed=cfg.seed, form=cfg.form)
    session = lab.session(requests)  # its targets do not depend on who holds the requests
    rows = []
    for n in cfg.client_counts:
        log(f"[clients] {cfg.edits} edits over {n} clients")
        scores = lab.compare(requests, n, cfg.methods, cfg.keys, session=session, log=log)
        rows += [{"clients": n, "method": m, **s} for m, s in scores.items()]
    return {"rows": rows}


def plot(result: dict, cfg: ClientsConfig, path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    method_lines(ax, result["rows"], "clients", cfg.score_key)
    ax.set_xlabel(f"number of clients ({cfg.edits} edits in all)")
    ax.set_title("Score vs number of clients (paper Fig. 6)")
    save_figure(fig, path)
