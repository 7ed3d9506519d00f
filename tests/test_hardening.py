"""The server round under misuse and attack (docs/reliability.md): outputs that would lose work,
concurrent merges, replays, hostile or malformed updates (built by rewriting a real update's
metadata or tensors with safetensors), user text with markup, oversized or unknown input.
Every bad update is rejected alone while the good ones of the same round merge."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from collabedit.cli import app
from collabedit.collab.protocol import merge_updates, relative_gap
from collabedit.collab.rounds import client_round, commit_round, open_state, server_round
from collabedit.collab.setup import EditingSetup
from collabedit.collab.state import (
    StaleStateError,
    load_state,
    save_state,
    state_lock,
)
from collabedit.collab.update import load_update
from collabedit.models import arch
from collabedit.models.loading import load_model
from collabedit.paths import SHIPPED_WORLDS
from collabedit.requests import EditRequest, save_requests
from collabedit.world.edit_requests import world_requests
from collabedit.world.store import load_world

runner = CliRunner()
QUICK_Z = {"v_num_grad_steps": 20}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def world_round(tmp_path_factory):
    """The shipped world-v1 (one edited layer, quick), its setup, two clients' 2-request updates
    of round 0 (files), a copy of the world folder to use as --model, and `quick.yaml`, the
    setup's z settings for `client edit --hparams`. These tests check what the server accepts
    and writes, not how well an edit takes, so z runs 20 steps instead of the preset's 200."""
    tmp = tmp_path_factory.mktemp("hardening")
    bundle = load_world("world-v1")
    setup = EditingSetup.open((bundle.model, bundle.tokenizer), "memit-frozen",
                              overrides=QUICK_Z)
    (tmp / "quick.yaml").write_text("".join(f"{k}: {v}\n" for k, v in QUICK_Z.items()))
    reqs = world_requests(bundle.world, 4, seed=11)
    paths = []
    for i in range(2):
        path = tmp / f"c{i}.safetensors"
        client_round(setup, reqs[2 * i : 2 * i + 2], f"c{i}").update.save(path)
        paths.append(path)
    model_dir = tmp / "model"
    shutil.copytree(SHIPPED_WORLDS["world-v1"], model_dir)
    save_requests(reqs[:2], tmp / "reqs.jsonl", "jsonl")
    return setup, paths, model_dir, tmp


def _rewrite(src: Path, dst: Path, meta=None, tensors=None) -> Path:
    """A copy of an update file with metadata keys changed (None = removed) and tensors
    transformed: `tensors` maps a name to a function of the tensor."""
    with safe_open(str(src), "pt") as f:
        md = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}
    for k, v in (meta or {}).items():
        if v is None:
            md.pop(k, None)
        else:
            md[k] = v
    for name, fn in (tensors or {}).items():
        ts[name] = fn(ts[name])
    save_file(ts, str(dst), metadata=md)
    return dst


def _fresh_round(setup, tmp_path):
    setup.reset()
    return open_state(tmp_path / "state", setup, "collabedit", beta1=1.0)


# ------------------------------------------------------------------------------ hostile updates


def test_hostile_updates_are_rejected_alone(world_round, tmp_path):
    setup, (c0, c1), _, _ = world_round
    bounds = setup.update_bounds()
    hostile = {
        "scaled-P": _rewrite(c1, tmp_path / "p.safetensors", {"client_id": "m1"},
                             tensors={"layer.1.P": lambda t: t * 1e6,
                                      "layer.1.delta": lambda t: t * 1e6}),
        "scaled-S": _rewrite(c1, tmp_path / "s.safetensors", {"client_id": "m2"},
                             tensors={"layer.1.S": lambda t: t * 1e6}),
        "delta-only-scaled": _rewrite(c1, tmp_path / "d.safetensors", {"client_id": "m3"},
                                      tensors={"layer.1.delta": lambda t: t * 2}),
        "not-psd": _rewrite(c1, tmp_path / "n.safetensors", {"client_id": "m4"},
                            tensors={"layer.1.S": lambda t: t - 1e3 * torch.eye(t.shape[0],
                                                                                 dtype=t.dtype)}),
        "rank": _rewrite(c1, tmp_path / "r.safetensors", {"client_id": "m5", "n_edits": "1"}),
        "outside-span": _rewrite(c1, tmp_path / "o.safetensors", {"client_id": "m6"},
                                 tensors={"layer.1.P": lambda t: t + t.norm() * 1e-3
                                          * torch.randn(t.shape, dtype=t.dtype,
                                                        generator=torch.Generator().manual_seed(0))}),
        "replay-other-id": _rewrite(c1, tmp_path / "x.safetensors", {"client_id": "c9"}),
    }
    reasons = {
        "scaled-P": "residuals' norm",
        "scaled-S": "trace(S)",
        "delta-only-scaled": "the delta is not the edit P and S describe",
        "not-psd": "not positive semi-definite",
        "rank": "rank 2 but the update declares 1",
        "outside-span": "outside the span",
        "replay-other-id": "the same tensors as",
    }
    state, sums = _fresh_round(setup, tmp_path)
    paths = [c0, c1, *hostile.values()]
    out = server_round(setup.model, paths, state, sums, setup.regulariser, bounds=bounds)
    assert out.accepted == [str(c0), str(c1)]
    for name, path in hostile.items():
        assert reasons[name] in out.rejected[str(path)], (name, out.rejected[str(path)])
        assert str(path) in out.rejected[str(path)]  # the culprit's file is named
    # ... and the good ones merged exactly as they would have alone
    clean = merge_updates([load_update(c0), load_update(c1)], setup.regulariser, "collabedit")
    assert relative_gap(out.deltas, clean) < 1e-12
    setup.reset()


def test_client_metadata_cannot_steer_the_solve(world_round, tmp_path):
    setup, (c0, c1), _, _ = world_round
    floor = _rewrite(c1, tmp_path / "f.safetensors", {"extra": json.dumps({"noise_floor": 1e30,
                                                                            "floor": 1e30})})
    state, sums = _fresh_round(setup, tmp_path)
    out = server_round(setup.model, [c0, floor], state, sums, setup.regulariser,
                       bounds=setup.update_bounds())
    clean = merge_updates([load_update(c0), load_update(c1)], setup.regulariser, "collabedit")
    assert out.accepted == [str(c0), str(floor)]
    assert relative_gap(out.deltas, clean) < 1e-12
    assert float(out.deltas[1].norm()) > 0
    setup.reset()


def test_replay_after_relabelling_to_the_next_round_is_refused(world_round, tmp_path):
    setup, (c0, c1), _, _ = world_round
    state, sums = _fresh_round(setup, tmp_path)
    first = server_round(setup.model, [c0], state, sums, setup.regulariser,
                         bounds=setup.update_bounds())
    # the next round's public values, copied onto the merged payload under a new id
    relabelled = _rewrite(c0, tmp_path / "again.safetensors", {
        "client_id": "c0-again", "round": "1",
        "base_fingerprint": first.state.base_fingerprint})
    second = server_round(setup.model, [relabelled, _relabel(c1, first, tmp_path)], first.state,
                          first.sum_s, setup.regulariser, bounds=setup.update_bounds())
    assert "merged in round 0 as c0's update" in second.rejected[str(relabelled)]
    assert len(second.accepted) == 1
    setup.reset()


def _relabel(path, outcome, tmp_path):
    """An honest late client whose round-0 edit is sent in round 1 (its keys do not depend on
    the edited layer, so the bounds still hold)."""
    return _rewrite(path, tmp_path / "late.safetensors", {
        "round": "1", "base_fingerprint": outcome.state.base_fingerprint})


def test_senders_bind_client_ids(world_round, tmp_path):
    setup, (c0, c1), _, _ = world_round
    state, sums = _fresh_round(setup, tmp_path)
    first = server_round(setup.model, [c0], state, sums, setup.regulariser,
                         senders={str(c0): "node-1"})
    impostor = _rewrite(c1, tmp_path / "imp.safetensors", {
        "client_id": "c0", "round": "1", "base_fingerprint": first.state.base_fingerprint})
    honest = _relabel(c1, first, tmp_path)
    second = server_round(setup.model, [impostor, honest], first.state, first.sum_s,
                          setup.regulariser, senders={str(impostor): "node-2",
                                                      str(honest): "node-3"})
    assert "belongs to another sender (node-1)" in second.rejected[str(impostor)]
    assert second.accepted == [str(honest)]
    setup.reset()


MALFORMED = {
    "missing-round": ({"round": None}, "metadata field round: Field required"),
    "extra-list": ({"extra": "[]"}, "metadata field extra"),
    "extra-bad-json": ({"extra": "{oops"}, "metadata field extra: Invalid JSON"),
    "round-text": ({"round": "first"}, "metadata field round"),
    "layers-text": ({"layers": '["a"]'}, "metadata field layers"),
    "client-control": ({"client_id": "a\nb"}, "metadata field client_id"),
}


def test_malformed_updates_are_rejected_alone_by_the_cli(world_round, tmp_path):
    setup, (c0, c1), model_dir, _ = world_round
    bad = {name: _rewrite(c1, tmp_path / f"{name}.safetensors", meta)
           for name, (meta, _) in MALFORMED.items()}
    markup = _rewrite(c1, tmp_path / "markup.safetensors", {"client_id": "[/] [bold]c1"})
    missing = tmp_path / "nope.safetensors"
    result = run("server", "merge", "--model", model_dir, "--updates", c0, *sum(
        (["--updates", p] for p in [*bad.values(), missing, markup]), []),
        "--out", tmp_path / "merged", "--state", tmp_path / "state", "--json",
        tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["accepted"] == [str(c0), str(markup)]
    for name, (_, needle) in MALFORMED.items():
        assert needle in report["rejected"][str(bad[name])], (name, report["rejected"])
    assert "cannot read" in report["rejected"][str(missing)]
    state, _ = load_state(tmp_path / "state")
    assert [e.client_id for e in state.ledger] == ["c0", "[/] [bold]c1"]
    assert "Traceback" not in result.output


# ------------------------------------------------------------------------------- outputs, state


def _fingerprint_of(folder):
    model, _ = load_model(folder)
    return arch.fingerprint(model)


def test_outputs_that_would_lose_work_are_refused_before_any_work(world_round, tmp_path):
    _, (c0, _), model_dir, tmp = world_round
    before = _fingerprint_of(model_dir)
    same = run("server", "merge", "--model", model_dir, "--updates", c0, "--out", model_dir,
               "--state", tmp_path / "state")
    assert same.exit_code == 1 and "input model's folder" in same.output
    edit_same = run("edit", "--model", model_dir, "--requests", tmp / "reqs.jsonl",
                    "--out", model_dir)
    assert edit_same.exit_code == 1 and "input model's folder" in edit_same.output
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    as_file = run("server", "merge", "--model", model_dir, "--updates", c0, "--out", a_file,
                  "--state", tmp_path / "state")
    assert as_file.exit_code == 1 and "existing file" in as_file.output
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep me")
    not_empty = run("server", "merge", "--model", model_dir, "--updates", c0, "--out", full,
                    "--state", tmp_path / "state")
    assert not_empty.exit_code == 1 and "--overwrite" in not_empty.output
    # nothing changed anywhere, and no state was started
    assert _fingerprint_of(model_dir) == before
    assert a_file.read_text() == "keep me" and (full / "x").read_text() == "keep me"
    assert not (tmp_path / "state" / "server_state.safetensors").exists()
    # with --overwrite the folder is replaced by a complete model
    ok = run("server", "merge", "--model", model_dir, "--updates", c0, "--out", full,
             "--state", tmp_path / "state", "--overwrite")
    assert ok.exit_code == 0, ok.output
    assert not (full / "x").exists() and (full / "world.json").is_file()
    assert load_state(tmp_path / "state")[0].base_fingerprint == arch.fingerprint(
        load_model(full)[0], [1])


def test_a_crash_at_any_step_leaves_the_previous_model_and_state(world_round, tmp_path,
                                                                monkeypatch):
    setup, (c0, c1), _, _ = world_round
    state_dir = tmp_path / "state"
    state, sums = _fresh_round(setup, tmp_path)
    save_state(state_dir, state, sums)
    import collabedit.collab.rounds as rounds_mod
    import collabedit.models.loading as loading_mod

    def boom(*a, **k):
        raise KeyboardInterrupt("killed")

    steps = {  # where the process dies
        "while writing the model": (setup.model, "save_pretrained"),
        "before the model is renamed into place": (loading_mod.os, "replace"),
        "after the model, before the state": (rounds_mod, "save_state"),
    }
    for i, (step, (owner, name)) in enumerate(steps.items()):
        setup.reset()
        out_dir = tmp_path / f"out-{i}"
        outcome = server_round(setup.model, [c0, c1], state, sums, setup.regulariser)
        monkeypatch.setattr(owner, name, boom)
        with pytest.raises(KeyboardInterrupt):
            commit_round(setup, outcome, out_dir, state_dir)
        monkeypatch.undo()
        back, _ = load_state(state_dir)
        assert back.round == 0 and not back.ledger, step
        # the output is absent or complete, and no temporary folder is left behind
        assert not out_dir.exists() or (out_dir / "config.json").is_file(), step
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], step
    # the round simply runs again
    setup.reset()
    outcome = server_round(setup.model, [c0, c1], state, sums, setup.regulariser)
    commit_round(setup, outcome, tmp_path / "final", state_dir, overwrite=True)
    back, _ = load_state(state_dir)
    assert back.round == 1 and [e.client_id for e in back.ledger] == ["c0", "c1"]
    setup.reset()


def test_a_second_merge_on_a_locked_state_fails_and_a_stale_one_writes_nothing(world_round,
                                                                              tmp_path):
    setup, (c0, _), model_dir, _ = world_round
    state_dir = tmp_path / "state"
    with state_lock(state_dir):
        busy = run("server", "merge", "--model", model_dir, "--updates", c0, "--out",
                   tmp_path / "m", "--state", state_dir)
    assert busy.exit_code == 1 and "another merge is running" in busy.output
    assert not (tmp_path / "m").exists()
    # compare-and-swap: a merge that started from round 0 cannot write over round 1
    state, sums = _fresh_round(setup, tmp_path)
    outcome = server_round(setup.model, [c0], state, sums, setup.regulariser)
    save_state(state_dir, outcome.state, outcome.sum_s)
    with pytest.raises(StaleStateError, match="at round 1"):
        save_state(state_dir, outcome.state, outcome.sum_s, expect_round=0)
    setup.reset()


def test_two_concurrent_merges_apply_exactly_one_round(world_round, tmp_path):
    _, (c0, c1), model_dir, _ = world_round
    state_dir = tmp_path / "state"
    procs = []
    for i, update in enumerate((c0, c1)):
        cmd = [sys.executable, "-m", "collabedit.cli", "server", "merge", "--model",
               str(model_dir), "--updates", str(update), "--out", str(tmp_path / f"m{i}"),
               "--state", str(state_dir)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
        time.sleep(0.5)
    outputs = [(p.wait(timeout=600), p.stdout.read()) for p in procs]
    codes = sorted(code for code, _ in outputs)
    assert codes == [0, 1], outputs
    loser = next(text for code, text in outputs if code == 1)
    # refused at the lock while the other runs, or — if the other finished first — because
    # its model is no longer the round's global model; either way one clear line
    assert "another merge is running" in loser or "not the global model of round 0" in loser
    state, _ = load_state(state_dir)
    assert state.round == 1 and len(state.ledger) == 1


# --------------------------------------------------------------------------------- user input


def test_requests_the_model_cannot_take_are_refused_up_front(world_round, tmp_path):
    _, _, model_dir, _ = world_round
    long = EditRequest(case_id=7, subject="Anna", prompt="{} " + "lives " * 10_000 + "in",
                       target_new="Paris")
    unknown = EditRequest(case_id=8, subject="Zorblax [/]", prompt="{} lives in",
                          target_new="Paris")
    for req, needle in ((long, "case 7: prompt and target_new are"),
                        (unknown, "case 8: subject has words the model's vocabulary")):
        path = tmp_path / f"{req.case_id}.jsonl"
        save_requests([req], path, "jsonl")
        result = run("client", "edit", "--model", model_dir, "--requests", path, "--out",
                     tmp_path / f"{req.case_id}.safetensors")
        assert result.exit_code == 1, result.output
        assert needle in result.output
        assert not (tmp_path / f"{req.case_id}.safetensors").exists()
    assert "'[/]'" in result.output  # printed as it is, not read as markup


def test_a_missing_local_model_is_one_clear_line_without_hub_retries(tmp_path):
    result = run("server", "merge", "--model", tmp_path / "no" / "such", "--updates",
                 tmp_path / "u.safetensors", "--out", tmp_path / "o")
    assert result.exit_code == 1
    # refused before from_pretrained, so the hub is never asked (it retries for ~30 s)
    assert "no such model folder" in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------------------- privacy options


def test_cover_keys_pass_the_bounds_and_act_as_regulariser(world_round, tmp_path):
    """A covered update declares its keys (n_keys) and passes every bound; merged, the cover keys
    are exactly extra regulariser: Delta = P (A0 + S + K_c K_c^T)^-1."""
    setup, (c0, _), model_dir, tmp = world_round
    cover = tmp_path / "cover.txt"
    reqs = world_requests(load_world("world-v1").world, 6, seed=99)
    cover.write_text("\n".join(r.rewrite_prompt for r in reqs) + "\n")
    out = tmp_path / "covered.safetensors"
    result = run("client", "edit", "--model", model_dir, "--requests", tmp / "reqs.jsonl",
                 "--hparams", tmp / "quick.yaml", "--cover-text", cover, "--out", out)
    assert result.exit_code == 0, result.output
    covered, plain = load_update(out), load_update(c0)
    assert covered.n_edits == 2 and covered.n_keys == 8
    state, sums = _fresh_round(setup, tmp_path)
    merged = server_round(setup.model, [out], state, sums, setup.regulariser,
                          bounds=setup.update_bounds())
    assert merged.accepted == [str(out)]
    from collabedit.collab.mitigations import text_keys
    from collabedit.linalg import solve_update

    setup.reset()
    kc = text_keys(setup.model, setup.tokenizer, cover.read_text().split("\n")[:6], [1])[1]
    P, S = plain.layers[1].p_and_s()
    expected = solve_update(P, setup.regulariser[1].double() + S + kc.T @ kc)
    # P is untouched (up to the last bit, as p_and_s() may recompute it from factors)
    torch.testing.assert_close(covered.layers[1].P.double(), P, rtol=1e-12, atol=0)
    # two float64 solves of the world's ill-conditioned system, sums formed in another order
    # (measured 7e-8): the project's 1e-6 bound for identities of the merge
    assert relative_gap({1: merged.deltas[1]}, {1: expected}) < 1e-6


def test_noisy_updates_need_a_server_that_expects_them(world_round, tmp_path):
    from collabedit.collab.mitigations import noise_floor

    setup, _, model_dir, tmp = world_round
    out = tmp_path / "noisy.safetensors"
    result = run("client", "edit", "--model", model_dir, "--requests", tmp / "reqs.jsonl",
                 "--hparams", tmp / "quick.yaml", "--noise-scale", "1e-6", "--noise-seed", "0",
                 "--out", out)
    assert result.exit_code == 0, result.output
    checked = run("server", "merge", "--model", model_dir, "--updates", out, "--out",
                  tmp_path / "a", "--json", tmp_path / "a.json")
    assert checked.exit_code == 1 and "not positive semi-definite" in checked.output
    # the floor a server derives from the federation's public noise scale and its own A0
    a0 = setup.regulariser[1].double()
    floor = noise_floor(1e-6 * float(a0.diagonal().mean()), 1, a0.shape[0])
    accepted = run("server", "merge", "--model", model_dir, "--updates", out, "--out",
                   tmp_path / "b", "--no-bounds", "--param", f"floor={floor}", "--json",
                   tmp_path / "b.json")
    assert accepted.exit_code == 0, accepted.output
    assert json.loads((tmp_path / "b.json").read_text())["accepted"] == [str(out)]
