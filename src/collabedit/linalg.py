"""The closed-form least-squares update, as plain float64 tensor math (no model code).

One edited layer: Delta = P A^-1 with P = R K^T (d_out x d_in) and A = lambda C + K K^T
(d_in x d_in, symmetric positive definite). A is factorised with Cholesky, never inverted; a
numerically singular A is solved on the subspace it determines (see solve_update).
"""

from __future__ import annotations

import torch


class NotSymmetricError(ValueError):
    pass


def check_finite(t: torch.Tensor, name: str) -> None:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} has {bad} non-finite value(s)")


def check_symmetric(t: torch.Tensor, name: str, rtol: float = 1e-8) -> None:
    if t.dim() != 2 or t.shape[0] != t.shape[1]:
        raise NotSymmetricError(f"{name} must be square, got shape {tuple(t.shape)}")
    scale = t.abs().max().clamp_min(1e-300)
    asym = (t - t.T).abs().max() / scale
    if asym > rtol:
        raise NotSymmetricError(f"{name} is not symmetric (relative asymmetry {asym:.2e})")


# Eigenvalues below this share of the largest are treated as zero. A's noise floor in float64 is
# ~1e-16 x d_in x the largest (2e-13 at d_in 1024), but the world's rare tokens give real
# eigenvalues down to ~1e-12: dropping those (cut 1e-8) cost the world's edits 7 points of NS,
# keeping them all (cut 1e-12) lets the clients' sums and one party's sum differ by 7e-7.
# 1e-10 keeps the quality (ES 95, NS 97 at 60 edits) with sums that agree to 2e-7.
PINV_RTOL = 1e-10


def solve_update(P: torch.Tensor, A: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """Delta = P A^-1 for symmetric positive (semi-)definite A, in float64.

    Cholesky when A is well conditioned. A key direction that the corpus excites little or not at
    all (dead MLP units; a model whose keys take few distinct values, as the world's local layers
    do) makes lambda*C + K K^T singular or nearly so. There P A^-1 is dominated by rounding noise
    divided by tiny eigenvalues, so the sums of several parties and one party's own sum give
    unrelated results. Such an A is solved on the subspace it determines (eigenvalues above
    PINV_RTOL of the largest), the minimum-norm solution: the limit of P (A + eps I)^-1 as
    eps -> 0 for every P whose rows lie in A's range, as P = R K^T always does.

    `floor`: eigenvalues up to this absolute size are treated as zero too. A and P that carry
    known noise (secure aggregation quantises them) set it to the noise's spectral norm: along
    directions weaker than the noise, A^-1 would amplify the noise instead of the data.
    """
    P64, A64 = P.double(), A.double()
    if P64.shape[1] != A64.shape[0]:
        raise ValueError(f"P is {tuple(P.shape)} but A is {tuple(A.shape)}")
    if not floor >= 0:
        raise ValueError(f"floor must be >= 0, got {floor}")
    check_finite(P64, "P")
    check_finite(A64, "A")
    check_symmetric(A64, "A")
    if floor == 0:
        factor, info = torch.linalg.cholesky_ex(A64)
        if info == 0:
            pivots = factor.diagonal() ** 2
            if pivots.min() > PINV_RTOL * pivots.max():
                # A X = P^T  =>  X = A^-1 P^T  =>  Delta = X^T (A symmetric)
                return torch.cholesky_solve(P64.T.contiguous(), factor).T
    w, V = torch.linalg.eigh(A64)
    top = float(w.abs().max())
    cut = max(PINV_RTOL * top, floor)
    if top == 0 or float(w.min()) < -cut:
        raise ValueError("A = lambda*C + K K^T is not positive definite")
    keep = w > cut
    Vk = V[:, keep]
    return ((P64 @ Vk) / w[keep]) @ Vk.T


def memit_update(
    keys: torch.Tensor, residuals: torch.Tensor, cov: torch.Tensor, lam: float
) -> torch.Tensor:
    """MEMIT's per-layer update for keys K (d_in x n) and residuals R (d_out x n):
    Delta = R K^T (lam C + K K^T)^-1."""
    K, R = keys.double(), residuals.double()
    if K.shape[1] != R.shape[1]:
        raise ValueError(f"{K.shape[1]} keys but {R.shape[1]} residuals")
    return solve_update(R @ K.T, lam * cov.double() + K @ K.T)
