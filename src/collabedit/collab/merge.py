"""Merge methods, each a small unit behind one interface and chosen by name (as mergekit does).

A method sees, for one edited layer, what the clients sent: P_i = R_i K_i^T and S_i = K_i K_i^T
(CollabEdit) and/or their local deltas Delta_i = P_i (A0 + S_i)^-1 (the baselines), plus the
server's regulariser A (the editor's A0 = lambda C for MEMIT, kappa I for MALMEN, plus earlier
rounds' keys with the dynamic covariance). It returns the merged delta (d_out x d_in).

Each method declares what it needs from the clients (`needs`) and its parameters (`config_type`,
pydantic); callers read both from here and never test a method's name.
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
    weighted_cov: torch.Tensor | None = None  # the regulariser A, d_in x d_in


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MergeMethod:
    name: ClassVar[str]
    summary: ClassVar[str] = ""
    # what the clients must send: "P", "S" (sums suffice) and/or "deltas"; "weighted_cov" is
    # the server's own
    needs: ClassVar[tuple[str, ...]]
    config_type: ClassVar[type[MergeConfig]] = MergeConfig

    @property
    def streams(self) -> bool:
        """True when only sums of what clients send are needed: the server adds each update
        into running sums as it arrives and keeps none (and secure aggregation fits)."""
        return set(self.needs) <= {"P", "S", "weighted_cov"}

    @property
    def client_sends(self) -> tuple[str, ...]:
        """The update tensors a client must include ("P", "S", "delta")."""
        return tuple("delta" if n == "deltas" else n for n in self.needs if n != "weighted_cov")

    def config(self, **params) -> MergeConfig:
        """The validated parameters; an unknown one is a ValueError naming the known ones."""
        unknown = set(params) - set(self.config_type.model_fields)
        if unknown:
            known = ", ".join(self.config_type.model_fields) or "none"
            raise ValueError(
                f"merge method {self.name!r} has no parameter(s) {', '.join(sorted(unknown))}; "
                f"its parameters: {known}"
            )
        return self.config_type(**params)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "summary": self.summary,
            "needs": list(self.client_sends),
            "streams": self.streams,
            "params": {
                k: {
                    "default": f.get_default(call_default_factory=True),
                    "description": f.description or "",
                }
                for k, f in self.config_type.model_fields.items()
            },
        }

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
    summary = "non-destructive: (sum P_i)(A + sum S_i)^-1, equal to Global-Edit"
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
    summary = "mean of the clients' local deltas"
    needs = ("deltas",)

    def merge(self, inputs: LayerInputs, cfg: MergeConfig) -> torch.Tensor:
        return torch.stack([d.double() for d in inputs.deltas]).mean(0)


class ScaledConfig(MergeConfig):
    lam: float = Field(1.0, gt=0, description="scale of the merged task vectors")


class TaskArithmetic(MergeMethod):
    """lam * sum_i Delta_i (Ilharco et al. 2023)."""

    name = "task-arithmetic"
    summary = "lam x sum of the clients' local deltas"
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
    summary = "TIES-Merging of the clients' local deltas (trim, elect sign, disjoint mean)"
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
    m.name: m for m in (CollabEdit(), Ties(), TaskArithmetic(), SimpleAverage())
}


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def merge_layer(method: str, inputs: LayerInputs, **params) -> torch.Tensor:
    m = get_method(method)
    m.check(inputs)
    return m.merge(inputs, m.config(**params))
