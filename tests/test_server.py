"""The server's round: validation per update, ledger, state on disk, reruns."""

from __future__ import annotations

import pytest
import torch
from test_protocol import _copy, party, setup  # noqa: F401  (fixture)

from collabedit.collab.protocol import merge_updates, relative_gap
from collabedit.collab.rounds import client_round, open_state, server_round
from collabedit.collab.state import load_state, save_state
from collabedit.collab.update import load_update
from collabedit.models import arch


def _updates(setup, tmp_path, round=0):  # noqa: F811
    p = party(setup, "memit-frozen")
    paths = []
    for i, c in enumerate(setup[5]):
        u = client_round(p, c, f"c{i}").update
        u.round = round
        paths.append(tmp_path / f"c{i}.safetensors")
        u.save(paths[-1])
    return paths


def test_round_merges_valid_updates_and_records_them(setup, tmp_path):  # noqa: F811
    model, tok, cfg, covs, reqs, clients = setup
    paths = _updates(setup, tmp_path)
    bad = tmp_path / "bad.safetensors"
    u = client_round(party(setup, "memit-frozen"), clients[0], "mallory").update
    u.layers[1].S[0, 1] += 5.0  # not symmetric
    u.save(bad)
    server = party(setup, "memit-frozen", _copy(model))
    state, sums = open_state(tmp_path / "state", server, "collabedit", beta1=0.0)
    out = server_round(server.model, [*paths, bad, paths[0]], state, sums, server.regulariser)
    assert out.accepted == [str(p) for p in paths]
    assert "not symmetric" in out.rejected[str(bad)]
    # the second copy of client 0's update is refused
    assert len(out.rejected) == 2
    loaded = [load_update(p) for p in paths]
    expected = merge_updates(loaded, server.regulariser, "collabedit")
    assert relative_gap(out.deltas, expected) < 1e-12
    # the running sums kept for the dynamic covariance are the accepted clients' S, nothing else
    for layer in cfg.layers:
        direct = sum(u.layers[layer].S.double() for u in loaded)
        assert torch.allclose(out.sum_s[layer], direct, rtol=1e-12, atol=0)
    assert out.state.round == 1
    assert [e.client_id for e in out.state.ledger] == ["c0", "c1", "c2"]
    assert sum(e.n_edits for e in out.state.ledger) == len(reqs)
    assert out.state.base_fingerprint == arch.fingerprint(server.model, cfg.layers)
    assert out.state.editor == "memit-frozen"
    assert out.state.origin_fingerprint == arch.fingerprint(model)
    save_state(tmp_path / "state", out.state, out.sum_s)
    back, sums_back = load_state(tmp_path / "state")
    assert back == out.state
    assert torch.equal(sums_back[1], out.sum_s[1])
    # round 1 refuses round-0 updates: a request is never merged twice
    with pytest.raises(ValueError, match="no valid update"):
        server_round(server.model, paths, back, sums_back, server.regulariser)


def test_dynamic_regulariser_adds_earlier_rounds_keys(setup, tmp_path):  # noqa: F811
    """Round 2 with beta1 solves with A0 + beta1 * sum S of round 1: checked against the
    closed form built by hand from the files."""
    model = setup[0]
    paths = _updates(setup, tmp_path)
    server = party(setup, "memit-frozen", _copy(model))
    state, sums = open_state(None, server, "collabedit", beta1=3.0)
    first = server_round(server.model, paths[:1], state, sums, server.regulariser)
    later = party(setup, "memit-frozen", server.model)
    later.regulariser = server.regulariser
    u = client_round(later, setup[5][1], "c1").update
    u.round = 1
    u.save(tmp_path / "r1.safetensors")
    second = server_round(
        server.model, [tmp_path / "r1.safetensors"], first.state, first.sum_s, server.regulariser
    )
    s0 = load_update(paths[0])
    for layer in setup[2].layers:
        P, S = u.layers[layer].p_and_s()
        a = server.regulariser[layer] + 3.0 * s0.layers[layer].S.double() + S
        want = torch.linalg.solve(a, P.T).T
        assert torch.allclose(second.deltas[layer], want, rtol=1e-8, atol=1e-10)


def test_interrupted_round_reruns_to_the_same_result(setup, tmp_path):  # noqa: F811
    model = setup[0]
    paths = _updates(setup, tmp_path)
    results = []
    for _ in range(2):  # the first run "crashes" before writing its state
        server = party(setup, "memit-frozen", _copy(model))
        state, sums = open_state(tmp_path / "state", server, "collabedit", beta1=0.0)
        results.append(server_round(server.model, paths, state, sums, server.regulariser))
    assert relative_gap(results[0].deltas, results[1].deltas) == 0.0
    assert results[1].state.round == 1


def test_server_model_must_be_the_rounds_base(setup, tmp_path):  # noqa: F811
    paths = _updates(setup, tmp_path)
    server = party(setup, "memit-frozen")
    state, sums = open_state(None, server, "collabedit", 0.0)
    other = _copy(setup[0])
    arch.add_to_weight(other, 1, torch.ones_like(arch.read_weight(other, 1)))
    with pytest.raises(ValueError, match="not the global model"):
        server_round(other, paths, state, sums, server.regulariser)


def test_the_noise_floor_is_the_servers_setting_not_a_clients(setup, tmp_path):  # noqa: F811
    """A client file that claims a noise floor does not change the solve; the server's own
    floor parameter does."""
    model, _, cfg, _, _, clients = setup
    p = party(setup, "memit-frozen")
    update = client_round(p, clients[0], "c0").update
    plain = tmp_path / "plain.safetensors"
    update.save(plain)
    layer = cfg.layers[0]
    eig = torch.linalg.eigvalsh(p.regulariser[layer] + update.layers[layer].S.double())
    floor = float(eig.median())  # binds: cuts half the spectrum
    update.extra["noise_floor"] = floor
    tagged = tmp_path / "tagged.safetensors"
    update.save(tagged)

    def merged(path, **params):
        server = party(setup, "memit-frozen", _copy(model))
        state, sums = open_state(None, server, "collabedit", beta1=0.0)
        return server_round(server.model, [path], state, sums, server.regulariser,
                            "collabedit", params).deltas

    assert relative_gap(merged(tagged), merged(plain)) == 0.0
    assert relative_gap(merged(plain, floor=floor), merged(plain)) > 1e-3


def test_unknown_method_parameter_is_refused_before_any_work(setup, tmp_path):  # noqa: F811
    server = party(setup, "memit-frozen")
    state, sums = open_state(None, server, "ties", 0.0)
    with pytest.raises(ValueError, match="no parameter.*density"):
        server_round(server.model, [], state, sums, server.regulariser, "ties", {"density": 0.2})
