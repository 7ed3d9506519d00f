"""Factor transport: send F = K Q and G = R Q instead of P = R K^T and S = K K^T.

For one edited layer a client holds keys K (d_in x n) and residuals R (d_out x n). CollabEdit's
server needs only sum_i P_i and sum_i S_i. With Q a random orthogonal n x n matrix drawn by the
client, F F^T = K Q Q^T K^T = S and G F^T = R Q Q^T K^T = P, so (F, G) carries everything the
server needs in n * (d_in + d_out) numbers instead of d_out * d_in + d_in * d_in (S is stored
whole, as update.py stores it). Since d_in * (d_in + d_out) = (d_in + d_out) * d_in, the factor
form is smaller exactly when n < d_in, whatever d_out is.

What Q does and does not hide: it mixes the columns, so the individual keys and residuals and
their order are not readable from (F, G). It is NOT a privacy mechanism: F F^T is S exactly and
G F^T is P exactly, so the server learns everything the full form tells it, and F's columns also
span the column space of K (which S reveals anyway). Treat this as a bandwidth measure only.

Plain float64 tensor math; no model code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

Form = Literal["full", "factor"]


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-distributed n x n orthogonal matrix (float64): QR of a Gaussian with the signs of
    R's diagonal moved into Q, without which Q would be biased towards R's sign convention."""
    if n < 1:
        raise ValueError(f"need n >= 1 columns, got {n}")
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def _check_pair(A: torch.Tensor, B: torch.Tensor, a: str, b: str) -> int:
    if A.dim() != 2 or B.dim() != 2:
        shapes = f"{tuple(A.shape)} and {tuple(B.shape)}"
        raise ValueError(f"{a} and {b} must be 2-D, got shapes {shapes}")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"{a} has {A.shape[1]} columns but {b} has {B.shape[1]}")
    if A.shape[1] == 0:
        raise ValueError(f"{a} and {b} have no columns (n == 0)")
    for name, t in ((a, A), (b, B)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} has {int((~torch.isfinite(t)).sum())} non-finite value(s)")
    return int(A.shape[1])


def check_factors(F: torch.Tensor, G: torch.Tensor) -> int:
    """Validate one layer's factor pair and return n, its column count."""
    return _check_pair(F, G, "F", "G")


def factorise(
    K: torch.Tensor, R: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, G) = (K Q, R Q) in float64 for keys K (d_in x n) and residuals R (d_out x n)."""
    K64, R64 = K.double(), R.double()
    n = _check_pair(K64, R64, "K", "R")
    q = random_orthogonal(n, generator)
    return K64 @ q, R64 @ q


def sums_from_factors(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_i G_i F_i^T, sum_i F_i F_i^T) = (sum P, sum S) in float64; clients' n may differ."""
    if not factors:
        raise ValueError("no factors to sum")
    for i, (F, G) in enumerate(factors):
        try:
            check_factors(F, G)
        except ValueError as exc:
            raise ValueError(f"client {i}: {exc}") from None
    d_in, d_out = factors[0][0].shape[0], factors[0][1].shape[0]
    sum_p = torch.zeros(d_out, d_in, dtype=torch.float64)
    sum_s = torch.zeros(d_in, d_in, dtype=torch.float64)
    for i, (F, G) in enumerate(factors):
        if F.shape[0] != d_in or G.shape[0] != d_out:
            raise ValueError(
                f"client {i}: F is {tuple(F.shape)} and G is {tuple(G.shape)}, expected "
                f"{d_in} and {d_out} rows like client 0"
            )
        F64 = F.double()
        sum_p.addmm_(G.double(), F64.T)
        sum_s.addmm_(F64, F64.T)
    return sum_p, sum_s


def element_count(d_in: int, d_out: int, n: int, form: Form) -> int:
    """Numbers stored for one layer: P and S whole for "full", F and G for "factor"."""
    if d_in < 1 or d_out < 1 or n < 1:
        raise ValueError(f"need d_in, d_out, n >= 1, got {d_in}, {d_out}, {n}")
    if form == "full":
        return d_out * d_in + d_in * d_in
    if form == "factor":
        return d_in * n + d_out * n
    raise ValueError(f"unknown form {form!r}; known: full, factor")


def should_factorise(d_in: int, d_out: int, n: int) -> bool:
    """True when the factor form stores strictly fewer numbers (which is when n < d_in)."""
    return element_count(d_in, d_out, n, "factor") < element_count(d_in, d_out, n, "full")


def message_bytes(d_in: int, d_out: int, n: int, form: Form, dtype_bytes: int = 8) -> int:
    """Tensor payload bytes of one layer's message (the file adds a small JSON header)."""
    if dtype_bytes < 1:
        raise ValueError(f"dtype_bytes must be >= 1, got {dtype_bytes}")
    return element_count(d_in, d_out, n, form) * dtype_bytes
