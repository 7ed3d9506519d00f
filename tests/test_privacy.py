"""Privacy audit (issue 16): the attacks' spectral pieces, the mitigations' identities, and a small
`bench privacy` run on the shipped world."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from collabedit.cli import app
from collabedit.collab import mitigations
from collabedit.collab.merge import solve_from_sums
from collabedit.collab.update import ClientUpdate, LayerUpdate
from collabedit.privacy import attacks

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_key_in_span_scores_one_and_random_key_scores_rank_over_d():
    d, n = 200, 20
    g = _gen()
    K = torch.randn(n, d, generator=g, dtype=torch.float64)
    spec = attacks.dominant(K.T @ K)
    assert spec.rank == n
    inside = attacks.span_scores(spec, K[:5])
    assert torch.allclose(inside, torch.ones(5, dtype=torch.float64), atol=1e-9)
    # a mix of edited keys is in the span too (the score is about the span, not the columns)
    assert float(attacks.span_scores(spec, (K[0] + K[1]).view(1, -1))) == pytest.approx(1.0)
    rnd = torch.randn(500, d, generator=g, dtype=torch.float64)
    mean = float(attacks.span_scores(spec, rnd).mean())
    assert mean == pytest.approx(n / d, rel=0.1)


def test_whitening_separates_members_when_keys_share_a_common_direction():
    """Raw MLP keys share a large mean component: raw scores of non-members are high; whitened by
    the public covariance they fall to ~rank/d while members stay at 1."""
    d, n = 100, 10
    g = _gen(1)
    mean = 30 * torch.randn(d, generator=g, dtype=torch.float64)
    corpus = mean + torch.randn(5000, d, generator=g, dtype=torch.float64)
    a0 = corpus.T @ corpus / len(corpus)
    K = mean + torch.randn(n, d, generator=g, dtype=torch.float64)
    others = mean + torch.randn(300, d, generator=g, dtype=torch.float64)
    s = K.T @ K
    raw = attacks.span_scores(attacks.dominant(s), others)
    assert float(raw.mean()) > 0.9  # useless in raw coordinates
    wh = attacks.Whitener(a0)
    spec = attacks.dominant(wh.gram(s))
    white_others = attacks.span_scores(spec, wh.keys(others))
    white_members = attacks.span_scores(spec, wh.keys(K))
    assert float(white_others.max()) < 0.5 < float(white_members.min())
    assert float(white_members.min()) == pytest.approx(1.0, abs=1e-8)


def test_residual_estimate_recovers_each_edits_residual_exactly():
    d_in, d_out, n = 60, 12, 8
    g = _gen(2)
    K = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    R = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    a0 = torch.eye(d_in, dtype=torch.float64) * 3.0
    wh = attacks.Whitener(a0)
    spec = attacks.dominant(wh.gram(K.T @ K))
    r_hat = attacks.residual_estimates(R.T @ K, spec, wh, K)
    assert torch.allclose(r_hat, R, atol=1e-8)
    # a zero-residual (cover) key added to S gets r = 0: P exposes which keys are cover
    kc = torch.randn(3, d_in, generator=g, dtype=torch.float64)
    p, s = mitigations.cover_layer(R.T @ K, K.T @ K, kc)
    spec = attacks.dominant(wh.gram(s))
    assert torch.allclose(
        attacks.residual_estimates(p, spec, wh, kc),
        torch.zeros(3, d_out, dtype=torch.float64),
        atol=1e-8,
    )
    assert torch.allclose(attacks.residual_estimates(p, spec, wh, K), R, atol=1e-8)


def _update(K, R, **kw) -> ClientUpdate:
    return ClientUpdate.from_keys_residuals(
        {0: K}, {0: R}, base_fingerprint="fp", client_id="c", round=0, **kw
    )


def test_cover_keys_only_change_the_regulariser_side_of_the_solve():
    d_in, d_out, n, m = 40, 10, 6, 5
    g = _gen(3)
    K = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    R = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    kc = torch.randn(m, d_in, generator=g, dtype=torch.float64)
    a0 = 2.0 * torch.eye(d_in, dtype=torch.float64)
    plain = _update(K, R)
    covered = mitigations.add_cover_keys(plain, {0: kc})
    p0, s0 = plain.layers[0].p_and_s()
    p1, s1 = covered.layers[0].p_and_s()
    # P is untouched (up to the last bit: p_and_s() recomputes G F^T, and BLAS may round a
    # recomputation differently)
    torch.testing.assert_close(p1, p0, rtol=1e-12, atol=0)
    assert covered.n_edits == n and covered.extra["privacy"] == [{"cover_keys": m}]
    with_cover = solve_from_sums(p1, s1, a0)
    as_regulariser = solve_from_sums(p0, s0, a0 + kc.T @ kc)
    assert torch.allclose(with_cover, as_regulariser, atol=1e-10)
    # and it is a different edit: the cover keys are protected (pulled towards no change)
    without = solve_from_sums(p0, s0, a0)
    assert (with_cover @ kc.T).norm() < (without @ kc.T).norm()
    assert not torch.allclose(with_cover, without, atol=1e-6)


def test_a_local_delta_is_recomputed_or_refused():
    g = _gen(4)
    K = torch.randn(4, 20, generator=g, dtype=torch.float64)
    R = torch.randn(4, 5, generator=g, dtype=torch.float64)
    a0 = {0: torch.eye(20, dtype=torch.float64)}
    with_delta = _update(K, R, deltas={0: torch.zeros(5, 20, dtype=torch.float64)})
    with pytest.raises(ValueError, match="local delta"):
        mitigations.add_noise(with_delta, 0.1, 0.1, seed=0)
    noisy = mitigations.add_noise(with_delta, 0.01, 0.01, seed=0, a0=a0)
    p, s = noisy.layers[0].p_and_s()
    assert torch.allclose(noisy.layers[0].delta, solve_from_sums(p, s, a0[0]), atol=1e-10)


def test_noise_scale_zero_is_the_identity_and_noise_is_symmetric_and_seeded():
    g = _gen(5)
    K = torch.randn(7, 30, generator=g, dtype=torch.float64)
    R = torch.randn(7, 9, generator=g, dtype=torch.float64)
    # P and S stored, not F and G: p_and_s() would recompute F F^T on every call, and BLAS does
    # not promise the same last bit twice (it differed once with another job on the machine),
    # so the identities below would test BLAS rather than the noise
    u = _update(K, R)
    p, s = u.layers[0].p_and_s()
    s = (s + s.T) / 2  # exactly symmetric, so that S + N - S is symmetric bit for bit
    u.layers[0] = LayerUpdate(P=p, S=s)
    same = mitigations.add_noise(u, 0.0, 0.0, seed=1)
    assert torch.equal(same.layers[0].P, p) and torch.equal(same.layers[0].S, s)
    a = mitigations.add_noise(u, 0.5, 0.2, seed=1)
    b = mitigations.add_noise(u, 0.5, 0.2, seed=1)
    c = mitigations.add_noise(u, 0.5, 0.2, seed=2)
    assert torch.equal(a.layers[0].S, b.layers[0].S) and not torch.equal(
        a.layers[0].S, c.layers[0].S
    )
    ns = a.layers[0].S - s
    assert torch.equal(ns, ns.T)
    assert float(ns.std()) == pytest.approx(0.5, rel=0.1)
    assert float((a.layers[0].P - p).std()) == pytest.approx(0.2, rel=0.15)
    # the noise edge the attacker reads from negative eigenvalues is the noise's spectral scale
    big = mitigations.symmetric_noise(300, 1.0, _gen(6))
    edge = -float(torch.linalg.eigvalsh(big).min())
    assert edge == pytest.approx(2 * 300**0.5, rel=0.1)
    assert mitigations.noise_floor(1.0, 1, 300) > edge


@pytest.fixture(scope="module")
def world_target():
    from collabedit.bench.lab import Lab
    from collabedit.bench.privacy import Target
    from collabedit.world.store import load_world

    bundle = load_world("world-v1")
    lab = Lab.open(bundle)
    # a dictionary of 80 subjects (the attacked ones among them) keeps the test short
    return Target("world-v1", lab, list(bundle.world.subjects[:80]), 1)


def test_dictionary_attack_finds_the_edited_subject_of_one_request(world_target):
    """M = 1 on the world: S alone names the edited subject, and no other."""
    from collabedit.world.edit_requests import world_requests

    t = world_target
    req = world_requests(t.lab.bundle.world, 3, seed=4, subjects=t.lab.bundle.world.subjects[:80])
    k = t.key_fn(req)[t.first_layer]  # the keys the client's S is made of
    for i in range(3):
        s = k[i : i + 1].T @ k[i : i + 1]
        res = attacks.dictionary_attack(None, s, t.a0, t.candidates, t.keys)
        assert res.rank == 1
        assert [g.subject for g in res.guesses] == [req[i].subject]
    # the raw (unwhitened) score would flag many subjects: whitening is what makes it work
    s = k[:1].T @ k[:1]
    raw = attacks.dictionary_attack(None, s, t.a0, t.candidates, t.keys, whiten=False)
    assert len(raw.guesses) > 1


def _one_by_one(model, tok, layer, items, shifts):
    """Reference for object_logprobs: one unbatched forward per (prompt, object) item."""
    from collabedit.models.tracing import encode_pair, shift_block_output, subject_last_index

    out = []
    for (cand, obj), r in zip(items, shifts, strict=True):
        prompt_ids, target_ids = encode_pair(tok, cand.text, obj)
        ids = torch.tensor([prompt_ids + target_ids[:-1]])
        at = subject_last_index(tok, cand.prompt, cand.subject)

        def shift(h, at=at, r=r):
            h = h.clone()
            h[0, at] += r.to(h.dtype)
            return h

        with torch.no_grad(), shift_block_output(model, layer, shift):
            lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        pos = torch.arange(len(target_ids)) + len(prompt_ids) - 1
        out.append(float(lp[pos, torch.tensor(target_ids)].mean()))
    return torch.tensor(out, dtype=torch.float64)


def test_probe_shares_forward_passes_without_changing_a_logprob(world_target):
    """object_logprobs reads every one-token object of a prompt from one row and batches rows of
    different shifts: each item's value equals its own unbatched forward (multi-token objects
    included), and items of one owner get that owner's shift."""
    t = world_target
    cands = [c for c in t.candidates if c.subject == t.candidates[0].subject][:6]  # 6 relations
    cands += [c for c in t.candidates if c.subject == t.candidates[-1].subject][:2]
    cands += cands[:1]  # the same prompt under another shift must not share its row
    items = [(c, o) for c in cands for o in t.objects[c.relation_id]]
    owner = [j for j, c in enumerate(cands) for _ in t.objects[c.relation_id]]
    assert any(len(t.lab.tok(" " + o)["input_ids"]) > 1 for _, o in items)  # multi-token too
    d = t.lab.model.config.hidden_size
    shifts = torch.randn(len(cands), d, generator=_gen(7), dtype=torch.float64)
    got = attacks.object_logprobs(t.lab.model, t.lab.tok, t.layer, items, shifts, owner)
    want = _one_by_one(t.lab.model, t.lab.tok, t.layer, items, shifts[torch.tensor(owner)])
    assert torch.allclose(got, want, atol=1e-4)
    base = attacks.object_logprobs(t.lab.model, t.lab.tok, t.layer, items)
    zero = _one_by_one(t.lab.model, t.lab.tok, t.layer, items, torch.zeros(len(items), d))
    assert torch.allclose(base, zero, atol=1e-4)
    assert not torch.allclose(base, got, atol=1e-2)  # the shifts do act


def test_cached_base_logprobs_give_the_same_attack(world_target):
    """The unedited model's log-probabilities are cached across attacks on one model: an attack
    with a filled cache guesses exactly what an attack without one guesses."""
    t = world_target
    g = _gen(8)
    keys = t.keys[torch.tensor([0, 6 * 5, 6 * 11])]  # three subjects' first-relation keys
    r = 3.0 * torch.randn(3, t.lab.model.config.hidden_size, generator=g, dtype=torch.float64)
    p, s = r.T @ keys.double(), keys.double().T @ keys.double()
    kw = {
        "objects": t.objects,
        "model": t.lab.model,
        "tokenizer": t.lab.tok,
        "layer": t.layer,
        "gain_threshold": -1e9,  # keep every flagged subject's guess, to compare them all
    }
    plain = attacks.dictionary_attack(p, s, t.a0, t.candidates, t.keys, **kw)
    cache: dict = {}
    first = attacks.dictionary_attack(p, s, t.a0, t.candidates, t.keys, base_cache=cache, **kw)
    n_cached = len(cache)
    again = attacks.dictionary_attack(p, s, t.a0, t.candidates, t.keys, base_cache=cache, **kw)
    assert len(plain.guesses) == 3 and n_cached == 3 * sum(len(v) for v in t.objects.values())
    assert len(cache) == n_cached  # nothing recomputed the second time
    for res in (first, again):
        assert [(x.subject, x.relation_id, x.target_new) for x in res.guesses] == [
            (x.subject, x.relation_id, x.target_new) for x in plain.guesses
        ]
        assert [x.gain for x in res.guesses] == pytest.approx([x.gain for x in plain.guesses])


def test_small_bench_run_writes_json_and_png(tmp_path):
    settings = [
        "z_steps=5",
        "per_client=[1,3]",
        "secagg_clients=4",
        "secagg_per_client=2",
        "secagg_groups=[1,2]",
        "mitigation_clients=2",
        "mitigation_per_client=3",
        "noise_scales=[0,0.0001]",
        "cover_counts=[0,4]",
        "inversion_victims=6",
        "inversion_m=[1,3]",
        "inversion_epochs=2",
        "random_gpt2=false",
    ]
    args = [
        "bench",
        "privacy",
        "--world",
        "world-v1",
        "--json",
        str(tmp_path / "p.json"),
        "--plot",
        str(tmp_path / "p.png"),
    ]
    for s in settings:
        args += ["--set", s]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.png").read_bytes().startswith(PNG_MAGIC)
    data = json.loads((tmp_path / "p.json").read_text())
    assert [r["M"] for r in data["dictionary"]] == [1, 3]
    assert [r["group"] for r in data["secagg"]] == [1, 2]
    # membership from S alone on world-v1 (keys of the subject's last token): every edited
    # subject is found and nothing else
    for row in data["dictionary"]:
        assert row["s_only"]["subject_recall"] == 1.0
        assert row["s_only"]["subject_precision"] == 1.0
    assert [r["cover"] for r in data["mitigations"]["cover"]] == [0, 4]
    # cover keys dilute what S alone shows
    cover = data["mitigations"]["cover"]
    assert cover[1]["s_only"]["subject_precision"] < cover[0]["s_only"]["subject_precision"]
    inv = data["inversion"]
    assert {r["input"] for r in inv["rows"]} == {"K", "S"}
    # the encoder tells different requests apart: unrelated pairs are far from identical
    # (a constant or broken encoder gives 1.0; measured 0.21 on world-v1 at default settings)
    assert 0.0 < inv["random_pair"] < 0.9
