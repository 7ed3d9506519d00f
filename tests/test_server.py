"""The server's round: validation per update, ledger, state on disk, reruns."""

from __future__ import annotations

import pytest
import torch
from test_protocol import _copy, setup  # noqa: F401  (fixture)

from collabedit.collab.protocol import client_update, merge_updates, relative_gap
from collabedit.collab.server import merge_round, open_state
from collabedit.collab.state import load_state, save_state
from collabedit.models import arch


def _updates(setup, tmp_path, round=0):  # noqa: F811
    model, tok, cfg, covs, reqs, clients = setup
    paths = []
    for c in clients:
        u = client_update(model, tok, c, cfg, covs, "memit-frozen", round=round)
        paths.append(tmp_path / f"{c.client_id}.safetensors")
        u.save(paths[-1])
    return paths


def test_round_merges_valid_updates_and_records_them(setup, tmp_path):  # noqa: F811
    model, tok, cfg, covs, reqs, clients = setup
    paths = _updates(setup, tmp_path)
    bad = tmp_path / "bad.safetensors"
    u = client_update(model, tok, clients[0], cfg, covs, "memit-frozen")
    u.client_id = "mallory"
    u.layers[1].S[0, 1] += 5.0  # not symmetric
    u.save(bad)
    server_model = _copy(model)
    state, sums = open_state(tmp_path / "state", server_model, cfg.layers, "collabedit",
                             beta0=cfg.mom2_update_weight, beta1=0.0)
    out = merge_round(server_model, [*paths, bad, paths[0]], state, sums, covs, "collabedit")
    assert out.accepted == [str(p) for p in paths]
    assert "not symmetric" in out.rejected[str(bad)]
    # the second copy of client 0's update is refused
    assert len(out.rejected) == 2
    lam_c = {k: cfg.mom2_update_weight * v for k, v in covs.items()}
    from collabedit.collab.update import load_update

    loaded = [load_update(p) for p in paths]
    expected = merge_updates(loaded, lam_c, "collabedit")
    assert relative_gap(out.deltas, expected) < 1e-12
    # the running sums kept for the dynamic covariance are the accepted clients' S, nothing else
    for layer in cfg.layers:
        direct = sum(u.layers[layer].S.double() for u in loaded)
        assert torch.allclose(out.sum_s[layer], direct, rtol=1e-12, atol=0)
    assert out.state.round == 1
    assert [e.client_id for e in out.state.ledger] == [c.client_id for c in clients]
    assert sum(e.n_edits for e in out.state.ledger) == len(reqs)
    assert out.state.base_fingerprint == arch.fingerprint(server_model, cfg.layers)
    save_state(tmp_path / "state", out.state, out.sum_s)
    back, sums_back = load_state(tmp_path / "state")
    assert back == out.state
    assert torch.equal(sums_back[1], out.sum_s[1])
    # round 1 refuses round-0 updates: a request is never merged twice
    with pytest.raises(ValueError, match="no valid update"):
        merge_round(server_model, paths, back, sums_back, covs, "collabedit")


def test_interrupted_round_reruns_to_the_same_result(setup, tmp_path):  # noqa: F811
    model, tok, cfg, covs, reqs, clients = setup
    paths = _updates(setup, tmp_path)
    results = []
    for _ in range(2):  # the first run "crashes" before writing its state
        server_model = _copy(model)
        state, sums = open_state(tmp_path / "state", server_model, cfg.layers, "collabedit",
                                 beta0=cfg.mom2_update_weight, beta1=0.0)
        results.append(merge_round(server_model, paths, state, sums, covs, "collabedit"))
    assert relative_gap(results[0].deltas, results[1].deltas) == 0.0
    assert results[1].state.round == 1


def test_server_model_must_be_the_rounds_base(setup, tmp_path):  # noqa: F811
    model, tok, cfg, covs, reqs, clients = setup
    paths = _updates(setup, tmp_path)
    state, sums = open_state(None, model, cfg.layers, "collabedit", 1.0, 0.0)
    other = _copy(model)
    arch.add_to_weight(other, 1, torch.ones_like(arch.read_weight(other, 1)))
    with pytest.raises(ValueError, match="not the global model"):
        merge_round(other, paths, state, sums, covs)


def test_a_sum_that_carries_its_noise_floor_is_solved_with_it(setup, tmp_path):  # noqa: F811
    """A securely aggregated sum is saved with its noise floor; merging that file again (by the
    engine or by hand) must solve with the floor, as the round that produced it did."""
    from collabedit.collab.server import NOISE_FLOOR_KEY
    from collabedit.collab.update import load_update

    model, tok, cfg, covs, reqs, clients = setup
    plain = tmp_path / "plain.safetensors"
    update = client_update(model, tok, clients[0], cfg, covs, "memit-frozen")
    update.save(plain)
    layer = cfg.layers[0]
    a = cfg.mom2_update_weight * covs[layer].double() + update.layers[layer].S.double()
    eig = torch.linalg.eigvalsh(a)
    floor = float(eig.median())  # binds: cuts half the spectrum
    update.extra[NOISE_FLOOR_KEY] = floor
    tagged = tmp_path / "tagged.safetensors"
    update.save(tagged)
    assert load_update(tagged).extra[NOISE_FLOOR_KEY] == floor

    def merged(path, **params):
        server_model = _copy(model)
        state, sums = open_state(None, server_model, cfg.layers, "collabedit",
                                 beta0=cfg.mom2_update_weight, beta1=0.0)
        return merge_round(server_model, [path], state, sums, covs, "collabedit", **params).deltas

    with_tag = merged(tagged)
    assert relative_gap(with_tag, merged(plain, floor=floor)) < 1e-12
    assert relative_gap(with_tag, merged(plain)) > 1e-3
