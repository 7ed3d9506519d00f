"""The demo experiment (the paper's Table 1 layout), simulated in one process on the world.

N clients each hold M private requests. Rows: the unedited model, Global-Edit (one party edits
all N*M), CollabEdit, and the destructive baselines (TIES, Task-Arithmetic, Simple-Average) merged
from the clients' local deltas. CounterFact-form requests give NS/PS/ES/Score, zsRE-form requests
NA/PA/EA/Score. Fidelity: max over layers of ||Delta_collab - Delta_global|| / ||Delta_global||
for each editor/protocol pair.
"""

from __future__ import annotations

import copy
import time

from collabedit.bench.lab import CF_KEYS, MERGE_METHODS, ZSRE_KEYS, Lab, Log, split_evenly
from collabedit.collab.protocol import (
    Client,
    client_update,
    layer_sync_round,
    merge_updates,
    relative_gap,
)
from collabedit.editors.memit import MemitConfig, edit
from collabedit.world.edit_requests import world_requests
from collabedit.world.store import WorldBundle

METHOD_ROWS = ("unedited", "global", *MERGE_METHODS)


def _fidelity(lab: Lab, requests, z_all, n_clients: int, log: Log) -> dict:
    """Merge fidelity of each editor/protocol pair, measured on a float64 copy of the model so
    that it shows the method's error, not float32 rounding.

    The pairs differ only when several layers are edited; a one-layer config is measured on the
    layer below it too (z stays at the same, last, layer, so the same target vectors serve)."""
    m64, tok, cfg = copy.deepcopy(lab.model).double(), lab.tok, lab.cfg
    layers = lab.layers if len(lab.layers) > 1 else [max(lab.layers[0] - 1, 0), *lab.layers]
    layers = sorted(set(layers))
    log(f"[fidelity] frozen, one-shot and layer-sync against Global-Edit, layers {layers}")
    cfg = cfg.model_copy(update={"layers": layers})
    covs = lab.covariances(layers)
    parts = split_evenly(len(requests), n_clients)
    clients = [Client(f"client-{i}", [requests[j] for j in idx]) for i, idx in enumerate(parts)]
    zs = [z_all.select(idx) for idx in parts]
    fid = {}
    for editor in ("memit-frozen", "memit"):
        glob = edit(
            m64, tok, requests, cfg, covs, frozen=editor == "memit-frozen", apply=False, z=z_all
        )
        reference = {e.layer: e.delta for e in glob.layers}
        updates = [
            client_update(m64, tok, c, cfg, covs, editor, z=z)
            for c, z in zip(clients, zs, strict=True)
        ]
        merged = merge_updates(updates, lab.weighted_covs(covs=covs), "collabedit")
        fid["frozen" if editor == "memit-frozen" else "one-shot"] = relative_gap(merged, reference)
    fid["layer-sync"] = relative_gap(layer_sync_round(m64, tok, clients, cfg, covs, zs), reference)
    log("[fidelity] " + ", ".join(f"{k} {v:.2e}" for k, v in fid.items()))
    return fid


def run_demo(
    bundle: WorldBundle,
    n_clients: int = 10,
    edits_per_client: int = 10,
    cfg: MemitConfig | None = None,
    seed: int = 0,
    ties_top_k: float = 0.2,
    merge_lam: float = 1.0,
    fidelity: bool = True,
    log: Log = print,
) -> dict:
    start = time.perf_counter()
    lab = Lab.open(bundle, cfg, ties_top_k=ties_top_k, merge_lam=merge_lam)
    n = n_clients * edits_per_client
    methods: dict[str, dict] = {row: {} for row in METHOD_ROWS}
    fid: dict[str, float] = {}
    for form, keys in (("counterfact", CF_KEYS), ("zsre", ZSRE_KEYS)):
        requests = world_requests(bundle.world, n, seed=seed, form=form)
        log(f"[{form}] optimising target vectors for {n} requests")
        z_all = lab.z(requests)
        methods["unedited"] |= lab.score(requests, keys)
        scores = lab.compare(
            requests, n_clients, keys=keys, z=z_all, log=lambda m, f=form: log(f"[{f}] {m}")
        )
        for row, m in scores.items():
            methods[row] |= m
        if form == "counterfact" and fidelity:
            fid = _fidelity(lab, requests, z_all, n_clients, log)
    return {
        "methods": methods,
        "fidelity": fid,
        "config": {
            "clients": n_clients,
            "edits_per_client": edits_per_client,
            "seed": seed,
            "layers": lab.layers,
            "lambda": lab.cfg.mom2_update_weight,
            "ties_top_k": ties_top_k,
            "merge_lam": merge_lam,
            "model": str(bundle.path),
            "seconds": round(time.perf_counter() - start, 1),
        },
    }
