"""One round, three entry points: two rounds of a two-layer sequential-MEMIT federation give
the same global model whether run with the CLI (`client edit` + `server merge`), in process, or on
Flower's simulation engine — because all three call the same client and server round. And the
base model's covariance C_0 is collected once: later rounds read it, they do not re-collect it
on the edited model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from collabedit import stats
from collabedit.cli import app
from collabedit.federation.config import ServerSettings
from collabedit.federation.simulation import inprocess_rounds, simulate, write_client_files
from collabedit.models import arch
from collabedit.models.loading import load_model

runner = CliRunner()
WORLD = "world-v1"  # the first shipped world: small and quick
CLIENTS, ROUNDS = 2, 2
LAYERS = [0, 1]
# short z optimisation and a small corpus sample: the test is about equality, not quality
EDITOR_CONFIG = {"v_num_grad_steps": 10, "mom2_n_samples": 2000}


@pytest.fixture()
def one_thread():
    """Flower's Ray actors run with one torch thread; the other paths do too, so float32 sums
    add in the same order everywhere (the comparison is then exact up to float64 rounding)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _deltas(weights: list[dict]) -> list[dict]:
    pairs = zip(weights, weights[1:], strict=False)
    return [{k: b[k].double() - a[k].double() for k in b} for a, b in pairs]


def _gap(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


@pytest.mark.slow
def test_cli_inprocess_and_flower_give_the_same_rounds(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("COLLABEDIT_CACHE", str(tmp_path / "cache"))
    collected = []
    real = stats.collect_stats
    monkeypatch.setattr(
        stats, "collect_stats", lambda *a, **k: collected.append(1) or real(*a, **k)
    )
    monkeypatch.setattr(stats, "_MEMO", {})
    settings = ServerSettings(
        model=WORLD,
        editor="memit",
        layers=",".join(map(str, LAYERS)),
        editor_config=json.dumps(EDITOR_CONFIG),
        rounds=ROUNDS,
        min_clients=CLIENTS,
    )
    node_configs, requests = write_client_files(WORLD, CLIENTS, ROUNDS, tmp_path / "fed", seed=5)
    per_client = [requests[i * ROUNDS : (i + 1) * ROUNDS] for i in range(CLIENTS)]

    # 1. the CLI, one process per command as a user would run it (here: CliRunner)
    hparams = tmp_path / "h.yaml"
    hparams.write_text("layers: [0, 1]\nv_num_grad_steps: 10\nmom2_n_samples: 2000\n")
    common = ["--editor", "memit", "--hparams", str(hparams)]
    model = WORLD
    state = tmp_path / "cli" / "state"
    cli_weights = [arch.snapshot(load_model(WORLD)[0], LAYERS)]
    for t in range(ROUNDS):
        updates = []
        for i, reqs in enumerate(per_client):
            f = tmp_path / "cli" / f"r{t}-c{i}.jsonl"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(reqs[t].model_dump_json() + "\n")
            u = tmp_path / "cli" / f"r{t}-c{i}.safetensors"
            args = [
                "client",
                "edit",
                "--model",
                model,
                "--requests",
                str(f),
                "--out",
                str(u),
                "--client-id",
                f"client-{i}",
                *common,
            ]
            if t > 0:
                args += ["--round-state", str(state)]
            r = runner.invoke(app, args)
            assert r.exit_code == 0, r.output
            updates += ["--updates", str(u)]
        out = tmp_path / "cli" / f"model-{t + 1}"
        r = runner.invoke(
            app,
            [
                "server",
                "merge",
                "--model",
                model,
                *updates,
                "--out",
                str(out),
                "--state",
                str(state),
                "--beta1",
                "1",
                *common,
            ],
        )
        assert r.exit_code == 0, r.output
        model = str(out)
        cli_weights.append(arch.snapshot(load_model(out)[0], LAYERS))
    # C_0 was collected once (round 0), on the base model, and read from the cache since
    assert len(collected) == 1
    assert len(list((tmp_path / "cache" / "stats").iterdir())) == 1
    # every saved global model is still a world (its world.json came along)
    assert (tmp_path / "cli" / f"model-{ROUNDS}" / "world.json").is_file()

    # 2. in process, the same client and server rounds
    base = cli_weights[0]
    inproc = [base, *inprocess_rounds(settings, per_client, tmp_path / "inproc", per_round=1)]

    # 3. Flower's simulation engine, one request per client per round
    result = simulate(
        CLIENTS,
        ROUNDS,
        tmp_path / "fed",
        settings,
        seed=5,
        evaluate=False,
        compare=False,
        node_overrides={i: {"per-round": 1} for i in range(CLIENTS)},
    )
    assert result["status"] == "done", result
    assert [r["status"] for r in result["rounds"]][:ROUNDS] == ["merged"] * ROUNDS
    flower = [base] + [
        {k: w[f"layer.{k}.weight"] for k in LAYERS}
        for w in (
            load_file(str(tmp_path / "fed" / "server" / "global" / f"round-{t}.safetensors"))
            for t in range(1, ROUNDS + 1)
        )
    ]
    for name, other in (("in-process", inproc), ("flower", flower)):
        for t, (a, b) in enumerate(zip(_deltas(other), _deltas(cli_weights), strict=True)):
            gap = _gap(a, b)
            print(f"{name} vs CLI, round {t}: max relative delta gap {gap:.2e}")
            assert gap <= 1e-6, f"{name}, round {t}: {gap:.2e}"
    # and the rounds did something: each round's delta is far from zero and from the others
    d = _deltas(cli_weights)
    assert all(min(float(x[k].norm()) for k in LAYERS) > 1e-3 for x in d)
    assert _gap(d[1], d[0]) > 1e-2
