"""Factor transport (F = K Q, G = R Q): the identities, the merge from factors, factor update files
and their rejection, and the size arithmetic."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from collabedit.collab.merge import LayerInputs, merge_layer, solve_from_sums
from collabedit.collab.protocol import merge_updates
from collabedit.collab.transport import (
    element_count,
    factorise,
    message_bytes,
    random_orthogonal,
    should_factorise,
    sums_from_factors,
)
from collabedit.collab.update import ClientUpdate, Expectation, UpdateError, load_update
from collabedit.linalg import memit_update

D_OUT, D_IN = 3, 7


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _spd(d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, 3 * d, generator=gen, dtype=torch.float64)
    return a @ a.T / (3 * d)


@settings(max_examples=30, deadline=None)
@given(d_in=st.integers(1, 24), d_out=st.integers(1, 16), n=st.integers(1, 40),
       seed=st.integers(0, 2**16))
def test_factors_reproduce_p_and_s(d_in, d_out, n, seed):
    gen = torch.Generator().manual_seed(seed)
    K = torch.randn(d_in, n, generator=gen, dtype=torch.float64)
    R = torch.randn(d_out, n, generator=gen, dtype=torch.float64)
    F, G = factorise(K, R, gen)
    assert F.shape == (d_in, n) and G.shape == (d_out, n)
    assert _rel(F @ F.T, K @ K.T) < 1e-10
    assert _rel(G @ F.T, R @ K.T) < 1e-10


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 60), seed=st.integers(0, 2**16))
def test_q_is_orthogonal_and_reproducible(n, seed):
    q = random_orthogonal(n, torch.Generator().manual_seed(seed))
    eye = torch.eye(n, dtype=torch.float64)
    assert (q.T @ q - eye).abs().max() < 1e-12
    assert (q @ q.T - eye).abs().max() < 1e-12
    assert torch.equal(q, random_orthogonal(n, torch.Generator().manual_seed(seed)))


def test_q_mixes_the_columns():
    gen = torch.Generator().manual_seed(0)
    K = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    F, _ = factorise(K, torch.randn(2, 4, generator=gen, dtype=torch.float64), gen)
    # no column of F is (up to sign) a column of K
    for j in range(4):
        assert min((F[:, j] - s * K[:, i]).norm() for i in range(4) for s in (1, -1)) > 1e-3


@settings(max_examples=20, deadline=None)
@given(clients=st.integers(1, 8), d_in=st.integers(2, 20), d_out=st.integers(1, 12),
       seed=st.integers(0, 2**16), lam=st.floats(0.1, 1e3))
def test_merge_from_factor_sums_equals_merge_from_full_sums(clients, d_in, d_out, seed, lam):
    gen = torch.Generator().manual_seed(seed)
    C = _spd(d_in, gen)
    Ks = [torch.randn(d_in, int(torch.randint(1, 30, (1,), generator=gen)), generator=gen,
                      dtype=torch.float64) for _ in range(clients)]
    Rs = [torch.randn(d_out, k.shape[1], generator=gen, dtype=torch.float64) for k in Ks]
    full = merge_layer("collabedit", LayerInputs(
        P=[r @ k.T for k, r in zip(Ks, Rs, strict=True)], S=[k @ k.T for k in Ks],
        weighted_cov=lam * C))
    sum_p, sum_s = sums_from_factors([factorise(k, r, gen) for k, r in zip(Ks, Rs, strict=True)])
    assert _rel(solve_from_sums(sum_p, sum_s, lam * C), full) < 1e-10


def _keys_residuals(seed: int, n: int = 4):
    gen = torch.Generator().manual_seed(seed)
    K = {layer: torch.randn(n, D_IN, generator=gen) for layer in (1, 2)}
    R = {layer: torch.randn(n, D_OUT, generator=gen) for layer in (1, 2)}
    return K, R


def _update(seed: int = 0, form: str = "factor", **kw) -> ClientUpdate:
    K, R = _keys_residuals(seed)
    args = dict(base_fingerprint="abc", client_id=f"c{seed}", round=0, form=form,
                generator=torch.Generator().manual_seed(100 + seed)) | kw
    return ClientUpdate.from_keys_residuals(K, R, **args)


EXPECT = Expectation("abc", {1: (D_OUT, D_IN), 2: (D_OUT, D_IN)}, round=0)


def test_saved_factor_update_merges_like_the_full_update(tmp_path):
    covs = {layer: 10.0 * _spd(D_IN, torch.Generator().manual_seed(layer)) for layer in (1, 2)}
    full, fact = [], []
    for seed in (0, 1, 2):
        for form, out in (("full", full), ("factor", fact)):
            path = tmp_path / f"{form}{seed}.safetensors"
            _update(seed, form).save(path)
            out.append(load_update(path, EXPECT))
    with safe_open(str(tmp_path / "factor0.safetensors"), "pt") as f:
        assert sorted(f.keys()) == [f"layer.{la}.{k}" for la in (1, 2) for k in ("F", "G")]
        assert f.metadata()["format_version"] == "2"
    with safe_open(str(tmp_path / "full0.safetensors"), "pt") as f:
        assert f.metadata()["format_version"] == "1"  # older readers still read full updates
    assert fact[0].layers[1].F.shape == (D_IN, 4) and fact[0].layers[1].G.shape == (D_OUT, 4)
    want = merge_updates(full, covs)
    got = merge_updates(fact, covs)
    mixed = merge_updates([full[0], fact[1], full[2]], covs)
    for layer in (1, 2):
        assert _rel(got[layer], want[layer]) < 1e-10
        assert _rel(mixed[layer], want[layer]) < 1e-10
        K = torch.cat([_keys_residuals(s)[0][layer] for s in (0, 1, 2)]).double().T
        R = torch.cat([_keys_residuals(s)[1][layer] for s in (0, 1, 2)]).double().T
        assert _rel(got[layer], memit_update(K, R, covs[layer], 1.0)) < 1e-10
        P, S = fact[0].layers[layer].p_and_s()
        assert torch.equal(P, fact[0].layers[layer].P) and torch.equal(S, fact[0].layers[layer].S)


def test_loaded_factor_update_saves_as_factors_again(tmp_path):
    _update().save(tmp_path / "a.safetensors")
    first = load_update(tmp_path / "a.safetensors", EXPECT)
    first.save(tmp_path / "b.safetensors")
    second = load_update(tmp_path / "b.safetensors", EXPECT)
    for layer in (1, 2):
        assert torch.equal(second.layers[layer].F, first.layers[layer].F)
        assert torch.equal(second.layers[layer].S, first.layers[layer].S)


def test_auto_form_factorises_only_where_smaller():
    gen = torch.Generator().manual_seed(0)
    K = {1: torch.randn(3, D_IN, generator=gen), 2: torch.randn(D_IN, D_IN, generator=gen)}
    R = {1: torch.randn(3, D_OUT, generator=gen), 2: torch.randn(D_IN, D_OUT, generator=gen)}
    u = ClientUpdate.from_keys_residuals(K, R, base_fingerprint="a", client_id="c", round=0,
                                         form="auto")
    assert u.layers[1].is_factor and u.layers[1].P is None
    assert not u.layers[2].is_factor and u.layers[2].P is not None
    with pytest.raises(ValueError, match="unknown form"):
        ClientUpdate.from_keys_residuals(K, R, base_fingerprint="a", client_id="c", round=0,
                                         form="packed")


def _set(lu, kind, value):
    setattr(lu, kind, value)


@pytest.mark.parametrize("mutate,message", [
    (lambda u: _set(u.layers[1], "G", u.layers[1].G[:, :3].clone()), "F has 4 columns but G has 3"),
    (lambda u: _set(u.layers[2], "F", torch.zeros(D_IN + 1, 4, dtype=torch.float64)),
     "layer 2 F: shape \\(8, 4\\), expected 7 rows"),
    (lambda u: _set(u.layers[1], "G", torch.zeros(D_OUT + 2, 4, dtype=torch.float64)),
     "layer 1 G: shape \\(5, 4\\), expected 3 rows"),
    (lambda u: u.layers[1].F.__setitem__((0, 0), float("nan")), "layer 1 F: non-finite"),
    (lambda u: u.layers[2].G.__setitem__((1, 2), float("inf")), "layer 2 G: non-finite"),
    (lambda u: _set(u.layers[1], "F", torch.full((D_IN, 4), 1e200, dtype=torch.float64)),
     "from F, G\\): non-finite"),
    (lambda u: _set(u.layers[1], "G", None), "layer 1: missing G"),
    (lambda u: _set(u.layers[1], "F", None), "layer 1: missing F"),
    (lambda u: (_set(u.layers[1], "F", torch.zeros(D_IN, 0, dtype=torch.float64)),
                _set(u.layers[1], "G", torch.zeros(D_OUT, 0, dtype=torch.float64))), "n == 0"),
])
def test_bad_factor_updates_are_rejected(tmp_path, mutate, message):
    u = _update()
    mutate(u)
    path = tmp_path / "bad.safetensors"
    u.save(path)
    with pytest.raises(UpdateError, match=message) as info:
        load_update(path, EXPECT)
    assert "bad.safetensors" in str(info.value)


def test_a_layer_mixing_both_forms_is_rejected(tmp_path):
    from safetensors.torch import save_file

    full, fact = _update(form="full"), _update()
    full.save(tmp_path / "full.safetensors")
    with safe_open(str(tmp_path / "full.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["layer.1.F"] = fact.layers[1].F
    tensors["layer.1.G"] = fact.layers[1].G
    save_file(tensors, tmp_path / "mix.safetensors", metadata=meta | {"format_version": "2"})
    with pytest.raises(UpdateError, match="mix.safetensors: layer 1: mixes P/S with F/G"):
        load_update(tmp_path / "mix.safetensors", EXPECT)
    save_file(tensors, tmp_path / "v3.safetensors", metadata=meta | {"format_version": "3"})
    with pytest.raises(UpdateError, match="format version 3"):
        load_update(tmp_path / "v3.safetensors", EXPECT)


def test_factorise_and_sums_validate_their_inputs():
    gen = torch.Generator().manual_seed(0)
    K, R = torch.randn(5, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="K has 4 columns but R has 3"):
        factorise(K, R[:, :3], gen)
    with pytest.raises(ValueError, match="n == 0"):
        factorise(K[:, :0], R[:, :0], gen)
    with pytest.raises(ValueError, match="2-D"):
        factorise(K[0], R, gen)
    bad = K.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="K has 1 non-finite"):
        factorise(bad, R, gen)
    F, G = factorise(K, R, gen)
    with pytest.raises(ValueError, match="client 1: F is \\(6, 4\\)"):
        sums_from_factors([(F, G), (torch.zeros(6, 4), G)])
    with pytest.raises(ValueError, match="client 0: F has 4 columns but G has 2"):
        sums_from_factors([(F, G[:, :2])])
    with pytest.raises(ValueError, match="no factors"):
        sums_from_factors([])


@pytest.mark.parametrize("d_in,d_out,n,full,factor", [
    (4, 2, 3, 2 * 4 + 4 * 4, 3 * 4 + 3 * 2),  # 24 vs 18
    (4, 2, 4, 24, 24),  # a tie is not smaller
    (4, 2, 5, 24, 30),
    (1, 1, 1, 2, 2),
    (6400, 1600, 500, 51_200_000, 4_000_000),  # GPT-2 XL MLP, 500 edits
    (1024, 128, 200, 1_179_648, 230_400),
])
def test_sizes_by_hand(d_in, d_out, n, full, factor):
    assert element_count(d_in, d_out, n, "full") == full
    assert element_count(d_in, d_out, n, "factor") == factor
    assert should_factorise(d_in, d_out, n) == (factor < full) == (n < d_in)
    assert message_bytes(d_in, d_out, n, "full") == 8 * full
    assert message_bytes(d_in, d_out, n, "factor", dtype_bytes=4) == 4 * factor


def test_sizes_match_the_tensors_actually_stored():
    u = _update()
    v = _update(form="full")
    assert sum(t.numel() for t in (u.layers[1].F, u.layers[1].G)) == element_count(
        D_IN, D_OUT, 4, "factor")
    assert sum(t.numel() for t in (v.layers[1].P, v.layers[1].S)) == element_count(
        D_IN, D_OUT, 4, "full")
    with pytest.raises(ValueError, match="n >= 1"):
        should_factorise(4, 2, 0)
    with pytest.raises(ValueError, match="unknown form"):
        message_bytes(4, 2, 1, "packed")


def test_transport_imports_no_model_code():
    code = ("import sys, collabedit.collab.transport; "
            "sys.exit(any(m.split('.')[0] in ('transformers', 'flwr') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
