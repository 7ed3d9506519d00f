"""Merge methods, each a small unit behind one interface and chosen by name (as mergekit does).

A method sees, for one edited layer, what the clients sent: P_i = R_i K_i^T and S_i = K_i K_i^T
(CollabEdit) and/or their local deltas Delta_i = P_i (lambda C + S_i)^-1 (the baselines), plus the
server's lambda-weighted covariance lambda C. It returns the merged delta (d_out x d_in).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from collabedit.linalg import solve_update


@dataclass
class LayerInputs:
    P: Sequence[torch.Tensor] | None = None  # per client, d_out x d_in
    S: Sequence[torch.Tensor] | None = None  # per client, d_in x d_in
    deltas: Sequence[torch.Tensor] | None = None  # per client, d_out x d_in
    weighted_cov: torch.Tensor | None = None  # lambda * C, d_in x d_in


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MergeMethod:
    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]]
    config_type: ClassVar[type[MergeConfig]] = MergeConfig

    def merge(self, inputs: LayerInputs, cfg: MergeConfig) -> torch.Tensor:
        raise NotImplementedError

    def check(self, inputs: LayerInputs) -> None:
        for need in self.needs:
            value = getattr(inputs, need)
            if value is None or (isinstance(value, Sequence) and len(value) == 0):
                raise ValueError(f"merge method {self.name!r} needs {need!r} from the clients")


class CollabEditConfig(MergeConfig):
    floor: float = Field(
        0.0, ge=0, description="eigenvalues of lC + sum S up to this are noise (secure aggregation)"
    )


class CollabEdit(MergeMethod):
    """Delta = sum_i Delta_i (lC + S_i) (lC + sum_j S_j)^-1 = (sum P_i)(lC + sum S_i)^-1: only the
    two sums are needed, one Cholesky solve per layer whatever the number of clients."""

    name = "collabedit"
    needs = ("P", "S", "weighted_cov")
    config_type = CollabEditConfig

    def merge(self, inputs: LayerInputs, cfg: CollabEditConfig) -> torch.Tensor:
        return solve_from_sums(
            running_sum(inputs.P), running_sum(inputs.S), inputs.weighted_cov, cfg.floor
        )


def running_sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Float64 sum, added in order into one buffer (stacking would hold every client's copy)."""
    total = tensors[0].double().clone()
    for t in tensors[1:]:
        total.add_(t.double())
    return total


def solve_from_sums(
    sum_p: torch.Tensor, sum_s: torch.Tensor, weighted_cov: torch.Tensor, floor: float = 0.0
) -> torch.Tensor:
    """The server's whole job for CollabEdit (and for Global-Edit from one party's P and S)."""
    return solve_update(sum_p, weighted_cov.double() + sum_s.double(), floor)


class SimpleAverage(MergeMethod):
    """mean_i Delta_i (over the clients actually present, not a fixed count)."""

    name = "simple-average"
    needs = ("deltas",)

    def merge(self, inputs: LayerInputs, cfg: MergeConfig) -> torch.Tensor:
        return torch.stack([d.double() for d in inputs.deltas]).mean(0)


class ScaledConfig(MergeConfig):
    lam: float = Field(1.0, gt=0, description="scale of the merged task vectors")


class TaskArithmetic(MergeMethod):
    """lam * sum_i Delta_i (Ilharco et al. 2023)."""

    name = "task-arithmetic"
    needs = ("deltas",)
    config_type = ScaledConfig

    def merge(self, inputs: LayerInputs, cfg: ScaledConfig) -> torch.Tensor:
        return cfg.lam * torch.stack([d.double() for d in inputs.deltas]).sum(0)


class TiesConfig(ScaledConfig):
    top_k: float = Field(0.2, gt=0, le=1, description="share of entries kept per client delta")


class Ties(MergeMethod):
    """TIES-Merging (Yadav et al. 2023): trim each delta to its top-k magnitudes, elect a sign
    per entry from the summed trimmed deltas, average the entries agreeing with it, scale.
    Applied per edited layer (per tensor), as mergekit applies it."""

    name = "ties"
    needs = ("deltas",)
    config_type = TiesConfig

    def merge(self, inputs: LayerInputs, cfg: TiesConfig) -> torch.Tensor:
        stacked = torch.stack([d.double() for d in inputs.deltas])
        trimmed = torch.stack([trim_top_k(d, cfg.top_k) for d in stacked])
        elected = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
        count = agree.sum(0)
        merged = (trimmed * agree).sum(0) / count.clamp_min(1)
        return cfg.lam * merged


def trim_top_k(delta: torch.Tensor, share: float) -> torch.Tensor:
    """Keep the ceil(share * numel) largest-magnitude entries, zero the rest."""
    k = max(1, int(-(-share * delta.numel() // 1)))
    flat = delta.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    return (flat * keep).view_as(delta)


METHODS: dict[str, MergeMethod] = {
    m.name: m for m in (CollabEdit(), SimpleAverage(), TaskArithmetic(), Ties())
}


def merge_layer(method: str, inputs: LayerInputs, **params) -> torch.Tensor:
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; known: {', '.join(METHODS)}")
    m = METHODS[method]
    m.check(inputs)
    return m.merge(inputs, m.config_type(**params))
