"""The closed-form least-squares update, as plain float64 tensor math (no model code).

One edited layer: Delta = P A^-1 with P = R K^T (d_out x d_in) and A = lambda C + K K^T
(d_in x d_in, symmetric positive definite). A is factorised with Cholesky, never inverted.
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


def solve_update(P: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Delta = P A^-1 for symmetric positive definite A, in float64."""
    P64, A64 = P.double(), A.double()
    if P64.shape[1] != A64.shape[0]:
        raise ValueError(f"P is {tuple(P.shape)} but A is {tuple(A.shape)}")
    check_finite(P64, "P")
    check_finite(A64, "A")
    check_symmetric(A64, "A")
    factor, info = torch.linalg.cholesky_ex(A64)
    # A key direction no corpus text ever excites (a dead MLP unit, a tiny corpus) leaves
    # lambda*C + K K^T singular. The smallest diagonal jitter that makes it factorisable
    # changes nothing the data determine; a matrix that still fails is a real error.
    scale = float(A64.diagonal().abs().mean())
    for eps in (1e-12, 1e-10, 1e-8):
        if info == 0 or not torch.isfinite(torch.tensor(scale)) or scale <= 0:
            break
        factor, info = torch.linalg.cholesky_ex(
            A64 + eps * scale * torch.eye(A64.shape[0], dtype=A64.dtype)
        )
    if info != 0:
        raise ValueError("A = lambda*C + K K^T is not positive definite (is lambda*C singular?)")
    # A X = P^T  =>  X = A^-1 P^T  =>  Delta = X^T (A symmetric)
    return torch.cholesky_solve(P64.T.contiguous(), factor).T


def memit_update(
    keys: torch.Tensor, residuals: torch.Tensor, cov: torch.Tensor, lam: float
) -> torch.Tensor:
    """MEMIT's per-layer update for keys K (d_in x n) and residuals R (d_out x n):
    Delta = R K^T (lam C + K K^T)^-1."""
    K, R = keys.double(), residuals.double()
    if K.shape[1] != R.shape[1]:
        raise ValueError(f"{K.shape[1]} keys but {R.shape[1]} residuals")
    return solve_update(R @ K.T, lam * cov.double() + K @ K.T)
