"""Sanity bounds on what one client sends, checked by the server before anything is merged.

An update is P = R K^T and S = K K^T per layer (and the client's local delta for the baselines).
A client that is buggy or hostile can send anything of the right shape; these checks refuse what
no honest client can produce, from the base model and the number of keys n_keys the update
declares (its edits, plus cover keys when it adds them, collab/mitigations.py):

* S is positive semi-definite (within rounding) and its rank is at most n_keys: it is a sum of
  n_keys outer products;
* trace(S) = sum of the keys' squared norms is at most n_keys times `key_slack` times the
  largest squared key norm the model produces on probe inputs;
* P's rows lie in S's range (P = R K^T: every row is a combination of the keys);
* the residuals' size, which the server can read exactly from P and S (||R||_F^2 = trace(P S^+
  P^T) when the keys are independent), is at most n_keys times (`residual_slack` times the
  largest norm of the residual stream at the edited layers)^2: an edit moves the layer's output by
  less than a few times the stream it writes into;
* a local delta is the edit P and S describe: the server solves P (A0 + S)^-1 itself and
  compares (checking only Delta (A0 + S) = P would let a delta carry anything large along
  directions where A0 + S is nearly singular).

What they do not stop: a well-formed edit of harmful content, or one with large but plausible
residuals, passes. Under secure aggregation the server sees only the sum of several clients'
P and S plus masking noise: rank and PSD tests are meaningless there (the noise has full rank),
and a bad client cannot be singled out; see docs/reliability.md for how bounds are enforced then.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from collabedit.linalg import solve_update
from collabedit.models import tracing


class BoundError(ValueError):
    """An update outside what an honest client can send; the message names layer and check."""


@dataclass(frozen=True)
class UpdateBounds:
    """Per edited layer: the largest squared key norm and residual-stream norm on probe inputs."""

    key_sq_max: dict[int, float]
    stream_max: float
    # on squared norms; the world's subject keys measured 5e-4..2e-3 of the probe's largest
    key_slack: float = 10.0
    # MEMIT clamps ||z - z0|| to 0.75-4 x ||z0||; the world's residuals measured 0.43-0.48 of
    # the probe's largest stream norm per edit
    residual_slack: float = 10.0
    psd_rtol: float = 1e-8  # most negative eigenvalue allowed, relative to the largest
    rank_rtol: float = 1e-9  # eigenvalues above this share of the largest count towards rank
    range_rtol: float = 1e-6  # share of P allowed outside S's range (rounding)
    # relative gap allowed between the delta sent and P (A0 + S)^-1 solved by the server: two
    # float64 solves of one system (measured exactly 0 on the world: the same function)
    delta_rtol: float = 1e-4
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def probe_bounds(
    model: PreTrainedModel,
    layers: Sequence[int],
    n_texts: int = 32,
    length: int = 32,
    seed: int = 0,
) -> UpdateBounds:
    """Key and stream norms at `layers` on random token sequences of the model's vocabulary:
    no corpus needed, deterministic, and keys of random tokens span the range real text reaches
    (the checks then allow generous slack)."""
    vocab = int(model.get_input_embeddings().weight.shape[0])
    max_len = int(getattr(model.config, "max_position_embeddings", 0) or 0) or int(
        getattr(model.config, "n_positions", length)
    )
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n_texts, min(length, max_len)), generator=gen)
    device = next(model.parameters()).device
    with tracing.capture_mlp_inputs(model, layers) as keys, tracing.capture_block_outputs(
        model, layers
    ) as stream:
        model(input_ids=ids.to(device))
    key_sq = {layer: float(keys[layer].double().pow(2).sum(-1).max()) for layer in layers}
    stream_max = max(float(stream[layer].double().norm(dim=-1).max()) for layer in layers)
    return UpdateBounds(key_sq, stream_max)


def check_layer(
    layer: int,
    n_keys: int,
    P: torch.Tensor,
    S: torch.Tensor,
    bounds: UpdateBounds,
    delta: torch.Tensor | None = None,
    regulariser: torch.Tensor | None = None,
) -> None:
    """Raise BoundError when this layer's P, S (and delta) cannot come from n_keys honest
    edits of the model the bounds were probed on."""
    P64, S64 = P.double(), S.double()
    w, V = torch.linalg.eigh(S64)
    top = float(w.abs().max())
    if top == 0:
        if P64.abs().max() > 0:
            raise BoundError(f"layer {layer}: S is zero but P is not")
        return
    if float(w.min()) < -bounds.psd_rtol * top:
        raise BoundError(
            f"layer {layer}: S is not positive semi-definite (eigenvalue {float(w.min()):.3g}, "
            f"largest {top:.3g}): it is not a sum of K K^T"
        )
    keep = w > bounds.rank_rtol * top
    rank = int(keep.sum())
    if rank > n_keys:
        raise BoundError(
            f"layer {layer}: S has rank {rank} but the update declares {n_keys} key(s)"
        )
    key_cap = n_keys * bounds.key_slack * bounds.key_sq_max[layer]
    if float(S64.trace()) > key_cap:
        raise BoundError(
            f"layer {layer}: trace(S) = {float(S64.trace()):.3g} exceeds {key_cap:.3g} "
            f"({n_keys} key(s) x {bounds.key_slack:g} x the largest squared key norm "
            f"{bounds.key_sq_max[layer]:.3g})"
        )
    Vk, wk = V[:, keep], w[keep]
    PV = P64 @ Vk
    p_norm = float(P64.norm())
    outside = float((P64 - PV @ Vk.T).norm())
    if p_norm and outside > bounds.range_rtol * p_norm + 1e-12:
        raise BoundError(
            f"layer {layer}: {outside / p_norm:.2e} of P lies outside the span of the keys in "
            "S (P = R K^T lies inside it)"
        )
    r_sq = float(((PV / wk.sqrt()) ** 2).sum())  # trace(P S^+ P^T) = ||R||_F^2
    r_cap = n_keys * (bounds.residual_slack * bounds.stream_max) ** 2
    if r_sq > r_cap:
        raise BoundError(
            f"layer {layer}: the residuals' norm {r_sq**0.5:.3g} exceeds {r_cap**0.5:.3g} "
            f"(sqrt({n_keys} key(s)) x {bounds.residual_slack:g} x the largest residual-stream "
            f"norm {bounds.stream_max:.3g})"
        )
    if delta is not None and regulariser is not None:
        expected = solve_update(P64, regulariser.double() + S64)
        gap = float((delta.double() - expected).norm()) / max(float(expected.norm()), 1e-300)
        if gap > bounds.delta_rtol:
            raise BoundError(
                f"layer {layer}: the delta is not the edit P and S describe, P (A0 + S)^-1 "
                f"(relative gap {gap:.2e})"
            )
