"""The demo experiment (the paper's Table 1 layout), simulated in one process on the world.

N clients each hold M private requests. Rows: the unedited model, Global-Edit (one party edits
all N*M), CollabEdit, and the destructive baselines (TIES, Task-Arithmetic, Simple-Average) merged
from the clients' local deltas. CounterFact-form requests give NS/PS/ES/Score, zsRE-form requests
NA/PA/EA/Score. Fidelity: max over layers of ||Delta_collab - Delta_global|| / ||Delta_global||
for each editor/protocol pair.

Target vectors z depend only on a request and the base model (and batched = one at a time), so
the simulation optimises them once per request set and hands each party its own slice.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

from collabedit.collab.protocol import (
    Client,
    apply_deltas,
    client_update,
    layer_sync_round,
    merge_updates,
    relative_gap,
)
from collabedit.editors.memit import MemitConfig, edit
from collabedit.editors.memit.compute import context_templates, optimise_z
from collabedit.editors.memit.editor import restore
from collabedit.evaluate.metrics import evaluate_requests
from collabedit.models import arch
from collabedit.requests import EditRequest
from collabedit.stats import layer_stats
from collabedit.world.edit_requests import world_requests
from collabedit.world.store import WorldBundle

METHOD_ROWS = ("unedited", "global", "collabedit", "ties", "task-arithmetic", "simple-average")
CF_KEYS = ("ES", "PS", "NS", "Score")
ZSRE_KEYS = ("EA", "PA", "NA", "zsRE_Score")

Log = Callable[[str], None]


def _clients(requests: list[EditRequest], n: int) -> list[Client]:
    m = len(requests) // n
    return [Client(f"client-{i}", requests[i * m : (i + 1) * m]) for i in range(n)]


def _fidelity(model, tok, clients, requests, zs, z_all, cfg, covs, lam_c, log: Log) -> dict:
    """Merge fidelity of each editor/protocol pair, measured on a float64 copy of the model so
    that it shows the method's error, not float32 rounding."""
    log("[fidelity] frozen, one-shot and layer-sync against Global-Edit (float64)")
    m64 = copy.deepcopy(model).double()
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
        merged = merge_updates(updates, lam_c, "collabedit")
        fid["frozen" if editor == "memit-frozen" else "one-shot"] = relative_gap(merged, reference)
    fid["layer-sync"] = relative_gap(layer_sync_round(m64, tok, clients, cfg, covs, zs), reference)
    log("[fidelity] " + ", ".join(f"{k} {v:.2e}" for k, v in fid.items()))
    return fid


def run_demo(
    bundle: WorldBundle,
    n_clients: int = 10,
    edits_per_client: int = 50,
    cfg: MemitConfig | None = None,
    seed: int = 0,
    ties_top_k: float = 0.2,
    merge_lam: float = 1.0,
    fidelity: bool = True,
    log: Log = print,
) -> dict:
    from collabedit.editors import preset

    cfg = cfg or preset("world")
    model, tok = bundle.model, bundle.tokenizer
    layers = arch.check_layers(model, cfg.layers or arch.default_layers(model))
    n = n_clients * edits_per_client
    start = time.perf_counter()
    stats = layer_stats(model, tok, layers, cfg.mom2_dataset, cfg.mom2_n_samples)
    covs = {layer: s.mom2 for layer, s in stats.items()}
    lam_c = {layer: cfg.mom2_update_weight * c for layer, c in covs.items()}
    templates = context_templates(model, tok, cfg)
    base = {layer: arch.read_weight(model, layer) for layer in layers}
    methods: dict[str, dict] = {row: {} for row in METHOD_ROWS}
    fid: dict[str, float] = {}
    for form, keys in (("counterfact", CF_KEYS), ("zsre", ZSRE_KEYS)):
        requests = world_requests(bundle.world, n, seed=seed, form=form)
        clients = _clients(requests, n_clients)
        log(f"[{form}] optimising target vectors for {n} requests")
        z_all = optimise_z(model, tok, requests, layers[-1], templates, cfg)
        zs = [
            z_all.select(range(i * edits_per_client, (i + 1) * edits_per_client))
            for i in range(n_clients)
        ]

        def score(row: str, keys=keys, requests=requests, form=form) -> None:
            m = evaluate_requests(model, tok, requests)
            methods[row] |= {k: m[k] for k in keys}
            log(f"[{form}] {row}: " + ", ".join(f"{k} {m[k]:.1f}" for k in keys))

        score("unedited")
        log(f"[{form}] global edit and {n_clients} client updates (memit-frozen)")
        glob = edit(model, tok, requests, cfg, covs, frozen=True, apply=False, z=z_all)
        global_deltas = {e.layer: e.delta for e in glob.layers}
        updates = [
            client_update(model, tok, c, cfg, covs, "memit-frozen", z=z)
            for c, z in zip(clients, zs, strict=True)
        ]
        results = {"global": global_deltas}
        results["collabedit"] = merge_updates(updates, lam_c, "collabedit")
        results["ties"] = merge_updates(updates, lam_c, "ties", top_k=ties_top_k, lam=merge_lam)
        results["task-arithmetic"] = merge_updates(updates, lam_c, "task-arithmetic", lam=merge_lam)
        results["simple-average"] = merge_updates(updates, lam_c, "simple-average")
        for row, deltas in results.items():
            apply_deltas(model, deltas)
            score(row)
            restore(model, base)
        if form == "counterfact" and fidelity:
            fid = _fidelity(model, tok, clients, requests, zs, z_all, cfg, covs, lam_c, log)
    return {
        "methods": methods,
        "fidelity": fid,
        "config": {
            "clients": n_clients,
            "edits_per_client": edits_per_client,
            "seed": seed,
            "layers": list(layers),
            "lambda": cfg.mom2_update_weight,
            "ties_top_k": ties_top_k,
            "merge_lam": merge_lam,
            "model": str(bundle.path),
            "seconds": round(time.perf_counter() - start, 1),
        },
    }
