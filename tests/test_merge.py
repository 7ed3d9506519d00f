"""Merge methods against first principles and hand-computed cases (float64)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collabedit.collab.merge import LayerInputs, merge_layer, trim_top_k
from collabedit.linalg import memit_update, solve_update


def _spd(d, gen):
    a = torch.randn(d, 3 * d, generator=gen, dtype=torch.float64)
    return a @ a.T / (3 * d)


@settings(max_examples=20, deadline=None)
@given(clients=st.integers(1, 12), d_in=st.integers(2, 24), d_out=st.integers(1, 16),
       seed=st.integers(0, 2**16), lam=st.floats(0.1, 1e4))
def test_collabedit_merge_equals_global_edit(clients, d_in, d_out, seed, lam):
    gen = torch.Generator().manual_seed(seed)
    C = _spd(d_in, gen)
    Ks = [torch.randn(d_in, int(torch.randint(1, 6, (1,), generator=gen)), generator=gen,
                      dtype=torch.float64) for _ in range(clients)]
    Rs = [torch.randn(d_out, k.shape[1], generator=gen, dtype=torch.float64) for k in Ks]
    glob = memit_update(torch.cat(Ks, 1), torch.cat(Rs, 1), C, lam)
    P = [r @ k.T for k, r in zip(Ks, Rs, strict=True)]
    S = [k @ k.T for k in Ks]
    merged = merge_layer("collabedit", LayerInputs(P=P, S=S, weighted_cov=lam * C))
    assert (merged - glob).norm() / glob.norm() < 1e-6
    # the paper's form: sum_i Delta_i (lC + S_i) (lC + sum_j S_j)^-1
    deltas = [solve_update(p, lam * C + s) for p, s in zip(P, S, strict=True)]
    paper = solve_update(sum(d @ (lam * C + s) for d, s in zip(deltas, S, strict=True)),
                         lam * C + sum(S))
    assert (paper - glob).norm() / glob.norm() < 1e-6


def test_simple_average_divides_by_the_clients_present():
    d = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]]), torch.tensor([[5.0, 0.0]])]
    out = merge_layer("simple-average", LayerInputs(deltas=d))
    assert torch.equal(out, torch.tensor([[3.0, 2.0]], dtype=torch.float64))


def test_task_arithmetic_scales_the_sum():
    d = [torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 4.0]])]
    out = merge_layer("task-arithmetic", LayerInputs(deltas=d), lam=0.5)
    assert torch.equal(out, torch.tensor([[2.0, 1.0]], dtype=torch.float64))


def test_ties_by_hand():
    d1 = torch.tensor([[3.0, -1.0, 0.5, 2.0]])
    d2 = torch.tensor([[-1.0, 2.0, 0.2, 4.0]])
    d3 = torch.tensor([[-2.0, -3.0, 0.1, 1.0]])
    # trimmed to top 50%: [3,0,0,2], [0,2,0,4], [-2,-3,0,0]; elected signs [+,-,0,+];
    # agreeing means: 3, -3, 0, (2+4)/2
    out = merge_layer("ties", LayerInputs(deltas=[d1, d2, d3]), top_k=0.5, lam=2.0)
    assert torch.equal(out, 2.0 * torch.tensor([[3.0, -3.0, 0.0, 3.0]], dtype=torch.float64))
    assert torch.equal(trim_top_k(torch.tensor([1.0, -5.0, 2.0]), 0.34),
                       torch.tensor([0.0, -5.0, 2.0]))


def test_methods_name_what_they_miss():
    with pytest.raises(ValueError, match="needs 'S'"):
        merge_layer("collabedit", LayerInputs(P=[torch.zeros(1, 2)],
                                              weighted_cov=torch.eye(2)))
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_layer("average", LayerInputs())


@settings(max_examples=15, deadline=None)
@given(clients=st.integers(1, 6), rank=st.integers(2, 20), seed=st.integers(0, 2**16))
def test_singular_covariance_merge_is_still_exact_and_stays_in_the_keys_span(clients, rank, seed):
    """Keys that take few distinct values (the world's local layers) leave lambda*C + K K^T
    singular: the update must not fill the null space with amplified rounding noise, and the
    clients' sums must still give the global update."""
    gen = torch.Generator().manual_seed(seed)
    d_in, d_out = 32, 6
    basis = torch.linalg.qr(torch.randn(d_in, rank, generator=gen, dtype=torch.float64))[0]
    corpus = basis @ torch.randn(rank, 4 * rank, generator=gen, dtype=torch.float64)
    C = corpus @ corpus.T / corpus.shape[1]  # rank `rank` < d_in
    Ks = [basis @ torch.randn(rank, 3, generator=gen, dtype=torch.float64)
          for _ in range(clients)]
    Rs = [torch.randn(d_out, 3, generator=gen, dtype=torch.float64) for _ in Ks]
    K, R = torch.cat(Ks, 1), torch.cat(Rs, 1)
    glob = memit_update(K, R, C, 10.0)
    null = torch.eye(d_in, dtype=torch.float64) - basis @ basis.T  # projector off the span
    assert (glob @ null).norm() < 1e-8 * glob.norm()  # nothing outside the keys' span
    A = 10.0 * C + K @ K.T
    assert ((glob @ A - R @ K.T).norm() / (R @ K.T).norm()) < 1e-8  # normal equations
    P = [r @ k.T for k, r in zip(Ks, Rs, strict=True)]
    S = [k @ k.T for k in Ks]
    merged = merge_layer("collabedit", LayerInputs(P=P, S=S, weighted_cov=10.0 * C))
    assert (merged - glob).norm() / glob.norm() < 1e-6


def test_noise_floor_keeps_noisy_sums_from_being_amplified():
    """Secure aggregation returns sum P and sum S with quantisation noise. Where lambda*C + S has
    directions weaker than the noise, solving without a floor amplifies the noise (the result
    is unrelated to the exact one); with the floor at the noise level the result matches the
    exact sums solved with the same floor."""
    gen = torch.Generator().manual_seed(0)
    d_in, d_out, n = 40, 5, 12
    q = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=torch.float64))[0]
    w = torch.cat([torch.logspace(0, -2, 20, dtype=torch.float64),
                   torch.logspace(-11, -13, 20, dtype=torch.float64)])  # strong and near-null
    lam_c = q @ torch.diag(w) @ q.T
    K = q[:, :20] @ torch.randn(20, n, generator=gen, dtype=torch.float64) * 0.1
    R = torch.randn(d_out, n, generator=gen, dtype=torch.float64)
    P, S = R @ K.T, K @ K.T
    eps = 1e-7
    e = torch.randn(d_in, d_in, generator=gen, dtype=torch.float64)
    noise_s = (e + e.T) / 2 * eps / torch.linalg.matrix_norm(e, 2)
    noise_p = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) * eps
    exact = solve_update(P, lam_c + S, floor=4 * eps)
    floored = solve_update(P + noise_p, lam_c + S + noise_s, floor=4 * eps)
    assert (floored - exact).norm() / exact.norm() < 1e-4
    # without the floor: symmetric noise makes A indefinite, which is refused ...
    with pytest.raises(ValueError, match="not positive definite"):
        solve_update(P + noise_p, lam_c + S + noise_s)
    # ... and positive noise of the same size is amplified into the result
    plain = solve_update(P + noise_p, lam_c + S + noise_s @ noise_s / eps)
    assert (plain - exact).norm() / exact.norm() > 0.1
    # the floor only removes directions: on a well-conditioned A it changes nothing
    eye = torch.eye(d_in, dtype=torch.float64)
    assert torch.allclose(
        solve_update(P, eye + S, floor=1e-9), solve_update(P, eye + S), rtol=1e-10, atol=0
    )
    with pytest.raises(ValueError, match="floor"):
        solve_update(P, lam_c + S, floor=-1.0)
