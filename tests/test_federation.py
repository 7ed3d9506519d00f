"""Federation rounds without Flower's processes: the engine the Flower apps run, with faults.

Clients and server talk through `ServerEngine` / `ClientWorker` exactly as the apps do (the apps
only move these objects in Flower records); the network is replaced by direct calls, so the
fault cases are deterministic and fast. The Flower runs are in test_federation_flower.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from collabedit.collab.update import load_update
from collabedit.federation.config import ClientSettings, ServerSettings
from collabedit.federation.engine import (
    ClientWorker,
    Reply,
    ServerEngine,
    corrupt,
)
from collabedit.federation.simulation import (
    write_client_files,
)

# The first shipped world (small and quick) unless a developer points the tests at another
# world folder.
MODEL = os.environ.get("COLLABEDIT_FED_TEST_MODEL", "world-v1")
SAMPLES = 500  # texts for C: small and the same on both sides of every comparison
# a short z optimisation: these tests check the rounds' bookkeeping, not edit quality
QUICK_Z = json.dumps({"v_num_grad_steps": 20})


def settings(tmp: Path, **kw) -> ServerSettings:
    base = dict(
        model=MODEL,
        mom2_samples=SAMPLES,
        state_dir=str(tmp / "server"),
        min_clients=1,
        editor_config=QUICK_Z,
    )
    return ServerSettings(**(base | kw))


def clients(tmp: Path, n=3, m=4, extra=None):
    extra = extra or {}
    node_configs, requests = write_client_files(MODEL, n, m, tmp, seed=1)
    return [
        ClientWorker(ClientSettings.from_node_config(node_configs[i] | extra.get(i, {})))
        for i in range(n)
    ], requests


def exchange(engine: ServerEngine, workers, absent=(), forge=None):
    """One round: broadcast, each present worker answers as client_app.handle_plain does."""
    b = engine.broadcast()
    replies = []
    for node, w in enumerate(workers):
        cid = w.settings.client_id
        if node in absent:
            replies.append(Reply(node, "missing", detail="no reply"))
            continue
        try:
            kind, update, info = w.handle(b)
        except Exception as exc:  # noqa: BLE001 - as the ClientApp does
            replies.append(Reply(node, "error", client_id=cid, detail=type(exc).__name__))
            continue
        if kind == "idle":
            replies.append(Reply(node, "idle", client_id=cid))
            continue
        blob, sha = w.update_bytes(update, b.round)
        w.record_submission(b.round, info["case_ids"], sha)
        replies.append(Reply(node, "update", blob, cid))
    extra = forge(workers) if forge else []
    return engine.finish_round(replies + extra), replies


def assert_ledger_exact(engine: ServerEngine, workers, requests_per_client: int) -> None:
    """Every client merged exactly once with all its requests; its state agrees (after it saw
    the ledger, as it does with the next broadcast)."""
    ledger = engine.state.ledger
    for w in workers:
        w.reconcile(engine.broadcast().ledger, engine.state.round)
        entries = [e for e in ledger if e.client_id == w.settings.client_id]
        assert len(entries) == 1, (w.settings.client_id, ledger)
        assert entries[0].n_edits == requests_per_client
        st = json.loads(w.state_path.read_text())
        assert st["submitted"] is None
        mine = [
            json.loads(x)["case_id"] for x in Path(w.settings.requests).read_text().splitlines()
        ]
        assert sorted(st["done"]) == sorted(str(c) for c in mine)
        assert st["done"] == {str(c): entries[0].round for c in mine}


def test_abort_policy_merges_nothing_then_the_retry_merges_everyone(tmp_path):
    workers, requests = clients(tmp_path, m=2, extra={1: {"test-fail-rounds": "0"}})
    engine = ServerEngine(settings(tmp_path, fault_policy="abort", min_clients=3))
    w0 = engine.weights()
    report, _ = exchange(engine, workers)
    assert report.status == "aborted" and "client-1" in report.failed
    assert engine.state.round == 0 and not engine.state.ledger
    assert not (tmp_path / "server" / "server_state.safetensors").exists()
    assert all(torch.equal(w0[k], v) for k, v in engine.weights().items())  # nothing merged
    workers[1].settings.test_fail_rounds = ""
    report, replies = exchange(engine, workers)  # the retried round
    assert report.status == "merged", report
    assert sorted(report.merged) == ["client-0", "client-1", "client-2"]
    assert_ledger_exact(engine, workers, 2)
    assert any(not torch.equal(w0[k], v) for k, v in engine.weights().items())
    # (federated == in-process is checked through Flower in test_federation_flower.py)
    # what the server received holds no request text
    blob = b"".join(r.blob for r in replies if r.blob)
    assert len(blob) > 0
    for r in requests:
        for text in (r.subject, r.target_new, r.target_true, r.prompt.format(r.subject)):
            assert text.encode() not in blob


def test_quorum_bad_updates_missing_client_and_server_restart(tmp_path):
    workers, requests = clients(tmp_path, m=2, extra={1: {"test-bad-update": "nan"}})
    s = settings(tmp_path, fault_policy="quorum", min_clients=1, transport="full")
    engine = ServerEngine(s)

    # round 0: client 0 good, client 1 sends NaN, client 2 is gone; plus updates forged from
    # client 0's genuine one: wrong fingerprint, wrong shape, S not symmetric
    def forge(workers):
        out = []
        genuine = Path(workers[0].settings.state) / "outbox" / "round-0.safetensors"
        for i, bad in enumerate(("fingerprint", "shape", "asymmetric")):
            u = load_update(genuine)
            u.client_id = f"mallory-{bad}"
            corrupt(u, bad)
            path = tmp_path / f"forged-{bad}.safetensors"
            u.save(path)
            out.append(Reply(100 + i, "update", path.read_bytes(), u.client_id))
        return out

    report, _ = exchange(engine, workers, absent={2}, forge=forge)
    assert report.status == "merged", report
    assert report.merged == ["client-0"]
    reasons = " | ".join(report.rejected.values())
    assert len(report.rejected) == 4, reasons
    for needle in ("non-finite", "base model", "shape", "not symmetric"):
        assert needle in reasons, (needle, reasons)
    assert "node-2" in report.failed  # a silent node is known by its node id only
    assert engine.state.round == 1
    # the server process dies; a new one resumes from the state folder
    fingerprint = engine.state.base_fingerprint
    del engine
    engine = ServerEngine(s)
    assert engine.state.round == 1 and engine.state.base_fingerprint == fingerprint
    # round 1: client 1 fixed its update, client 2 is back; client 0 has nothing pending
    workers[1].settings.test_bad_update = ""
    report, _ = exchange(engine, workers)
    assert report.status == "merged", report
    assert sorted(report.merged) == ["client-1", "client-2"]
    assert report.idle == ["client-0"]
    # round 2: nothing pending anywhere
    report, _ = exchange(engine, workers)
    assert report.status == "idle"
    assert engine.state.round == 2
    assert_ledger_exact(engine, workers, 2)
    assert [e.round for e in engine.state.ledger] == [0, 1, 1]


def test_quorum_not_reached_and_interrupted_merge_reruns(tmp_path, monkeypatch):
    workers, _ = clients(tmp_path, n=2, m=1)
    s = settings(tmp_path, fault_policy="quorum", min_clients=2)
    engine = ServerEngine(s)
    report, _ = exchange(engine, workers, absent={1})
    assert report.status == "aborted" and "quorum" in report.reason
    assert engine.state.round == 0
    # the server dies after writing the next global layers but before its state: the state
    # still says round 0, so the round runs again and nothing is merged twice
    from collabedit.collab import state as state_mod

    def crash(*a, **k):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(state_mod, "save_state", crash)
    with pytest.raises(KeyboardInterrupt):
        exchange(engine, workers)
    monkeypatch.undo()
    engine = ServerEngine(s)
    assert engine.state.round == 0 and not engine.state.ledger
    report, _ = exchange(engine, workers)
    assert report.status == "merged" and sorted(report.merged) == ["client-0", "client-1"]
    assert_ledger_exact(engine, workers, 1)


def test_federate_init_writes_an_app_flower_accepts(tmp_path):
    from flwr.cli.config_utils import load_and_validate
    from typer.testing import CliRunner

    from collabedit.federation.cli import federate_app

    out = CliRunner().invoke(
        federate_app, ["init", str(tmp_path / "app"), "--min-clients", "3", "--transport", "factor"]
    )
    assert out.exit_code == 0, out.output
    config, warnings = load_and_validate(tmp_path / "app" / "pyproject.toml", check_module=True)
    assert warnings == []
    flwr_app = config["tool"]["flwr"]["app"]
    assert flwr_app["components"]["serverapp"] == "collabedit.federation.server_app:app"
    settings = ServerSettings.from_run_config(flwr_app["config"])
    assert settings.min_clients == 3 and settings.transport == "factor"
    again = CliRunner().invoke(federate_app, ["init", str(tmp_path / "app")])
    assert again.exit_code == 2  # never overwrites silently


def test_core_package_does_not_import_flower():
    import subprocess
    import sys

    code = (
        "import sys, collabedit.cli, collabedit.collab.rounds, collabedit.federation.engine\n"
        "bad = [m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')]\n"
        "assert not bad, bad[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_secagg_client_fails_loudly_instead_of_clipping(tmp_path):
    import numpy as np

    from collabedit.federation.secagg import _SecAggClient, quantization_range

    workers, _ = clients(tmp_path, n=1, m=2)
    engine = ServerEngine(settings(tmp_path))
    b = engine.broadcast()
    layers = sorted(b.weights)
    config = {
        "round": b.round,
        "base-fingerprint": b.base_fingerprint,
        "ledger": json.dumps(b.ledger),
        "settings": json.dumps(b.settings),
        "layers": json.dumps(layers),
        "bound-p": 1e-3,
        "bound-s": 1e-3,
    }
    params = [b.weights[k].double().numpy() for k in layers]
    client = _SecAggClient(workers[0].settings)
    with pytest.raises(ValueError, match="exceeds the public bound"):
        client.fit(params, config)
    # bounds above the largest value: every number lies in SecAgg+'s clipping range [-1, 1]
    out, weight, metrics = client.fit(params, config | {"bound-p": 1e9, "bound-s": 1e9})
    assert weight == 1 and metrics["n-edits"] == 2 and metrics["client-id"] == "client-0"
    assert all(np.abs(a).max() <= 1 for a in out) and any(np.abs(a).max() > 0 for a in out)
    # the modular sum of n quantised values never wraps around 2^32
    for n in (2, 3, 10, 1000):
        assert n * quantization_range(n) < 2**32 and quantization_range(n) < 2**31


def test_secagg_noise_floor_bounds_the_quantisation_noise_of_sum_s():
    """The floor the server solves with must cover what SecAgg+'s quantisation does to sum S
    (Flower's own quantiser, as the clients use it), without being needlessly loose."""
    import numpy as np
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from collabedit.federation.secagg import noise_floor, quantization_range

    rng = np.random.default_rng(0)
    d, n = 256, 3
    q = quantization_range(n)
    keys = [rng.standard_normal((d, 8)) for _ in range(n)]
    s_clients = [k @ k.T for k in keys]
    bound = max(np.abs(s).max() for s in s_clients) * 1.001
    np.random.seed(0)  # Flower's stochastic rounding draws from numpy's global generator
    noise = sum(
        dequantize(quantize([s / bound], 1.0, q), 1.0, q)[0] * bound - s for s in s_clients
    )
    noise = (noise + noise.T) / 2  # the server symmetrises the sum
    spectral = np.linalg.norm(noise, 2)
    floor = noise_floor(bound, n, q, d)
    assert spectral < floor < 40 * spectral
