"""`collabedit federate simulate`: a whole federation on Flower's simulation engine (Ray), in one
command, checked against the same merge done in process.

N clients each get M requests of the world (one private JSONL file and one state folder each),
the ServerApp and ClientApps run under `flwr.simulation.run_simulation`, and afterwards the
federated global model is compared with the same client and server rounds run here on the same
requests with the same configuration ("max_rel_diff_vs_inprocess").
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from collabedit.federation.config import ClientSettings, ServerSettings, quiet_flower_env
from collabedit.federation.engine import ledger_members, party_setup

Log = Callable[[str], None]


def write_client_files(
    model: str,
    n_clients: int,
    edits_per_client: int,
    work: Path,
    seed: int = 0,
    exclude: frozenset[str] = frozenset(),
) -> tuple[dict[int, dict], list]:
    """Private request files of the world's requests, split evenly; node configs per partition.
    `exclude`: subjects not to draw (those the editor has learned from)."""
    from collabedit.bench.lab import split_evenly
    from collabedit.models.loading import resolve_model_path
    from collabedit.world.edit_requests import world_requests
    from collabedit.world.store import load_world

    world = load_world(resolve_model_path(model)).world
    subjects = [s for s in world.subjects if s not in exclude]
    n = n_clients * edits_per_client
    requests = world_requests(world, n, seed=seed, form="counterfact", subjects=subjects)
    node_configs = {}
    for i, idx in enumerate(split_evenly(len(requests), n_clients)):
        path = work / "clients" / f"client-{i}" / "requests.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(requests[j].model_dump_json() + "\n" for j in idx))
        node_configs[i] = {
            "requests": str(path),
            "state": str(path.parent / "state"),
            "client-id": f"client-{i}",
        }
    return node_configs, requests


def inprocess_updates(settings: ServerSettings, client_requests: list[list]) -> list:
    """The clients' full-form updates (P, S and the local delta) of round 0, computed in this
    process by the same client round the ClientApp runs."""
    from collabedit.collab.rounds import RoundInfo, client_round
    from collabedit.models import arch

    setup = federation_setup(settings, "client")
    info = RoundInfo(0, arch.fingerprint(setup.model, setup.layers), tuple(setup.layers))
    threshold = ClientSettings.model_fields["overlap_threshold"].default
    return [
        client_round(setup, reqs, f"client-{i}", info, overlap_threshold=threshold).update
        for i, reqs in enumerate(client_requests)
    ]


def inprocess_rounds(
    settings: ServerSettings,
    client_requests: list[list],
    work: Path,
    per_round: int = 0,
    params: dict | None = None,
) -> list[dict]:
    """The global edited-layer weights after each round of a federation of these clients, run
    in this process with the same client and server rounds the Flower apps run (updates go
    through files as they do there; clients merged in client-id order, as the server does).
    `per_round`: requests a client sends per round (0: all it has), as ClientSettings."""
    from collabedit.collab.merge import get_method
    from collabedit.collab.rounds import RoundInfo, client_round, initial_state, server_round
    from collabedit.models import arch

    server, client = federation_setup(settings, "server"), federation_setup(settings, "client")
    state, sums = initial_state(server, settings.method, settings.beta1), {}
    threshold = ClientSettings.model_fields["overlap_threshold"].default
    send_delta = "delta" in get_method(settings.method).client_sends
    ids = sorted((f"client-{i}", list(reqs)) for i, reqs in enumerate(client_requests))
    out = []
    while any(reqs for _, reqs in ids):
        info = RoundInfo.from_state(state)
        arch.restore(client.model, arch.snapshot(server.model, server.layers))
        paths = []
        for cid, reqs in ids:
            take = reqs[:per_round] if per_round else list(reqs)
            if not take:
                continue
            cr = client_round(client, take, cid, info, threshold, settings.transport, send_delta)
            path = Path(work) / f"round-{state.round}" / f"{cid}.safetensors"
            cr.update.save(path)
            paths.append(path)
            del reqs[: len(take)]
        outcome = server_round(
            server.model,
            paths,
            state,
            sums,
            server.regulariser,
            settings.method,
            params,
            bounds=server.update_bounds(),
        )
        state, sums = outcome.state, outcome.sum_s
        out.append(arch.snapshot(server.model, server.layers))
    server.reset()
    client.reset()
    return out


def inprocess_reference(
    settings: ServerSettings,
    client_requests: list[list],
    updates: list | None = None,
    floor: float = 0.0,
) -> dict:
    """Global edited-layer weights after one round of these clients, in process (full P and S,
    whatever transport the federation uses; clients in the order given, as the server merges
    them in client-id order). `floor`: the noise floor a secure-aggregation server solved with."""
    from collabedit.collab.protocol import apply_deltas, merge_updates
    from collabedit.models import arch

    setup = federation_setup(settings, "server")
    if updates is None:
        updates = inprocess_updates(settings, client_requests)
    params = {"floor": floor} if floor else {}
    deltas = merge_updates(updates, setup.regulariser, settings.method, **params)
    apply_deltas(setup.model, deltas)
    out = arch.snapshot(setup.model, setup.layers)
    setup.reset()
    return out


def federation_setup(settings: ServerSettings, role: str = "server"):
    """The party_setup a federation with these settings uses (cached per process)."""
    return party_setup(
        settings.model,
        settings.editor,
        settings.layer_list(),
        settings.preset,
        settings.mom2_samples,
        role=role,
        editor_config=settings.editor_config_dict(),
    )


def rel_diff(fed: dict, ref: dict, base: dict) -> float:
    """max over layers ||(W_fed - W0) - (W_ref - W0)|| / ||W_ref - W0||."""
    out = 0.0
    for layer, w in ref.items():
        d_ref = w.double() - base[layer].double()
        d_fed = fed[layer].double() - base[layer].double()
        out = max(out, float((d_fed - d_ref).norm() / d_ref.norm()))
    return out


def simulate(
    n_clients: int,
    edits_per_client: int,
    work: Path,
    settings: ServerSettings | None = None,
    seed: int = 0,
    evaluate: bool = True,
    node_overrides: dict[int, dict] | None = None,
    compare: bool = True,
    log: Log = print,
) -> dict:
    quiet_flower_env()
    from safetensors.torch import load_file

    from collabedit.federation.client_app import make_client_app
    from collabedit.federation.server_app import make_server_app

    start = time.perf_counter()
    work = Path(work)
    settings = settings or ServerSettings()
    settings = settings.model_copy(
        update={
            "state_dir": str(work / "server"),
            "min_clients": min(settings.min_clients, n_clients),
        }
    )
    log(f"[simulate] {n_clients} clients x {edits_per_client} requests; statistics")
    setup = federation_setup(settings, "server")  # warms the statistics cache for the clients too
    seen = setup.editor.trained_subjects(setup.cfg)
    node_configs, requests = write_client_files(
        settings.model, n_clients, edits_per_client, work, seed, exclude=seen
    )
    for i, extra in (node_overrides or {}).items():
        node_configs[i] |= extra
    lm, tok, cfg, base = setup.model, setup.tokenizer, setup.cfg, setup.base_weights
    from flwr.simulation import run_simulation

    log("[simulate] running the federation on Flower's simulation engine")
    t0 = time.perf_counter()
    run_simulation(
        server_app=make_server_app(settings),
        client_app=make_client_app(node_configs),
        num_supernodes=n_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False, "log_to_driver": False},
        },
    )
    federation_seconds = time.perf_counter() - t0
    summary = json.loads((work / "server" / "summary.json").read_text())
    final_round = summary["round"]
    fed = {}
    if final_round > 0:
        saved = load_file(str(work / "server" / "global" / f"round-{final_round}.safetensors"))
        fed = {layer: saved[f"layer.{layer}.weight"] for layer in cfg.layers}
    result: dict = {
        "status": summary["status"],
        "rounds": summary["reports"],
        "ledger": summary["ledger"],
    }
    merged_round0 = [
        c for e in summary["ledger"] if e["round"] == 0 for c in ledger_members(e["client_id"])
    ]
    one_round = final_round == 1 and len(merged_round0) == n_clients
    if compare and one_round:
        split = [
            [requests[j] for j in range(len(requests)) if j in idx]
            for idx in _split(len(requests), n_clients)
        ]
        updates = inprocess_updates(settings, split)
        ref = inprocess_reference(settings, split, updates)
        result["max_rel_diff_vs_inprocess"] = rel_diff(fed, ref, base)
        floor = summary["reports"][0].get("info", {}).get("noise_floor", 0.0)
        if floor:  # secure aggregation: the same exact sums, solved above the same noise floor
            ref = inprocess_reference(settings, split, updates, floor=floor)
            result["max_rel_diff_vs_inprocess_same_floor"] = rel_diff(fed, ref, base)
    else:
        result["max_rel_diff_vs_inprocess"] = None
    if settings.secure_aggregation and final_round > 0:
        result["secagg_sum_rel_error"] = secagg_sum_error(work, node_configs)
    if evaluate and fed:
        from collabedit.bench.lab import CF_KEYS
        from collabedit.evaluate.metrics import evaluate_requests
        from collabedit.models import arch

        arch.restore(lm, base)
        m0 = evaluate_requests(lm, tok, requests)
        arch.restore(lm, fed)
        m1 = evaluate_requests(lm, tok, requests)
        arch.restore(lm, base)
        result["methods"] = {
            "unedited": {k: m0[k] for k in CF_KEYS},
            "federated-collabedit": {k: m1[k] for k in CF_KEYS},
        }
    round_seconds = [r["seconds"] for r in summary["reports"]]
    result["config"] = {
        "clients": n_clients,
        "edits_per_client": edits_per_client,
        "seed": seed,
        "layers": list(cfg.layers),
        "editor": settings.editor,
        "editor_config": cfg.model_dump(),
        "settings": settings.to_run_config(),
        "seconds": round(time.perf_counter() - start, 1),
        "federation_seconds": round(federation_seconds, 1),
        "round_seconds": round_seconds,
    }
    return result


def secagg_sum_error(work: Path, node_configs: dict[int, dict]) -> dict:
    """max over layers of ||sum received - true sum|| / ||true sum|| for P and S in round 0: the
    server's securely aggregated sums against the clients' own updates (which only a simulation
    can see together)."""
    from collabedit.collab.update import load_update

    agg = load_update(work / "server" / "incoming" / "round-0" / "secagg-sum.safetensors")
    mine = [
        load_update(Path(nc["state"]) / "outbox" / "round-0-secagg.safetensors")
        for nc in node_configs.values()
        if (Path(nc["state"]) / "outbox" / "round-0-secagg.safetensors").is_file()
    ]
    out = {"P": 0.0, "S": 0.0, "clients": len(mine)}
    for layer, lu in agg.layers.items():
        for kind in ("P", "S"):
            true = sum(getattr(u.layers[layer], kind).double() for u in mine)
            err = float((getattr(lu, kind).double() - true).norm() / true.norm())
            out[kind] = max(out[kind], err)
    return out


def _split(n: int, parts: int):
    from collabedit.bench.lab import split_evenly

    return [set(r) for r in split_evenly(n, parts)]
