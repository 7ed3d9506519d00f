"""What every in-process experiment needs: one world model, one MEMIT config and its statistics,
and the moves the experiments are made of (split requests among clients, build their updates,
merge by a method, apply, score, restore).

Target vectors z depend only on a request and the model they are optimised on (and batched = one
at a time), so an experiment optimises them once per request set and hands each client its slice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from collabedit.collab.protocol import Client, apply_deltas, client_update, merge_updates
from collabedit.editors.memit import MemitConfig, edit
from collabedit.editors.memit.compute import ZResult, context_templates, optimise_z
from collabedit.editors.memit.editor import restore
from collabedit.evaluate.metrics import evaluate_requests
from collabedit.models import arch
from collabedit.requests import EditRequest
from collabedit.stats import layer_stats
from collabedit.world.store import WorldBundle

CF_KEYS = ("ES", "PS", "NS", "Score")
ZSRE_KEYS = ("EA", "PA", "NA", "zsRE_Score")
MERGE_METHODS = ("collabedit", "ties", "task-arithmetic", "simple-average")

Log = Callable[[str], None]


def split_evenly(n: int, parts: int) -> list[range]:
    """`parts` contiguous index ranges covering 0..n-1, sizes differing by at most one."""
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} requests among {parts} clients")
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (i < extra)
        out.append(range(start, start + size))
        start += size
    return out


@dataclass
class Lab:
    bundle: WorldBundle
    cfg: MemitConfig
    layers: list[int]
    covs: dict[int, torch.Tensor]
    templates: list[list[str]]
    base: dict[int, torch.Tensor]
    ties_top_k: float = 0.2
    merge_lam: float = 1.0

    @classmethod
    def open(cls, bundle: WorldBundle, cfg: MemitConfig | None = None, **kw) -> Lab:
        from collabedit.editors import preset

        cfg = cfg or preset("world")
        model, tok = bundle.model, bundle.tokenizer
        layers = list(arch.check_layers(model, cfg.layers or arch.default_layers(model)))
        stats = layer_stats(model, tok, layers, cfg.mom2_dataset, cfg.mom2_n_samples)
        covs = {layer: s.mom2 for layer, s in stats.items()}
        base = {layer: arch.read_weight(model, layer) for layer in layers}
        return cls(bundle, cfg, layers, covs, context_templates(model, tok, cfg), base, **kw)

    @property
    def model(self):
        return self.bundle.model

    @property
    def tok(self):
        return self.bundle.tokenizer

    def covariances(self, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """E[k k^T] of any layers (cached on disk like the lab's own)."""
        missing = [layer for layer in layers if layer not in self.covs]
        cfg = self.cfg
        stats = layer_stats(self.model, self.tok, missing, cfg.mom2_dataset, cfg.mom2_n_samples)
        return {
            layer: self.covs[layer] if layer in self.covs else stats[layer].mom2 for layer in layers
        }

    def weighted_covs(
        self,
        extra_s: dict[int, torch.Tensor] | None = None,
        beta1: float = 0.0,
        covs: dict[int, torch.Tensor] | None = None,
    ):
        """lambda C_0 (+ beta1 * sum of earlier rounds' S: the dynamic covariance)."""
        out = {}
        for layer, c in (covs or self.covs).items():
            w = self.cfg.mom2_update_weight * c.double()
            if extra_s and layer in extra_s and beta1:
                w = w + beta1 * extra_s[layer].double()
            out[layer] = w
        return out

    def z(self, requests: Sequence[EditRequest], templates: list[list[str]] | None = None):
        return optimise_z(
            self.model, self.tok, requests, self.layers[-1], templates or self.templates, self.cfg
        )

    def reset(self) -> None:
        """Back to the unedited base model."""
        restore(self.model, self.base)

    def snapshot(self) -> dict[int, torch.Tensor]:
        return {layer: arch.read_weight(self.model, layer) for layer in self.layers}

    def score(self, requests: Sequence[EditRequest], keys: Sequence[str] | None = None) -> dict:
        m = evaluate_requests(self.model, self.tok, requests)
        return {k: m[k] for k in (keys or m) if isinstance(m.get(k), float)}

    def global_deltas(self, requests, z: ZResult) -> dict[int, torch.Tensor]:
        result = edit(
            self.model, self.tok, requests, self.cfg, self.covs, frozen=True, apply=False, z=z
        )
        return {e.layer: e.delta for e in result.layers}

    def client_updates(
        self, requests: Sequence[EditRequest], n_clients: int, z: ZResult, round: int = 0
    ):
        """memit-frozen updates of `n_clients` clients holding contiguous slices."""
        updates = []
        for i, idx in enumerate(split_evenly(len(requests), n_clients)):
            client = Client(f"client-{i}", [requests[j] for j in idx])
            updates.append(
                client_update(
                    self.model,
                    self.tok,
                    client,
                    self.cfg,
                    self.covs,
                    "memit-frozen",
                    round=round,
                    z=z.select(idx),
                )
            )
        return updates

    def merge(self, updates, method: str, weighted=None) -> dict[int, torch.Tensor]:
        params = {}
        if method in ("ties", "task-arithmetic"):
            params["lam"] = self.merge_lam
        if method == "ties":
            params["top_k"] = self.ties_top_k
        return merge_updates(updates, weighted or self.weighted_covs(), method, **params)

    def compare(
        self,
        requests: Sequence[EditRequest],
        n_clients: int,
        methods: Sequence[str] = ("global", *MERGE_METHODS),
        keys: Sequence[str] | None = None,
        z: ZResult | None = None,
        log: Log | None = None,
    ) -> dict[str, dict]:
        """Score of each method's result, each applied to the model as it is, then undone."""
        start = self.snapshot()
        z = z if z is not None else self.z(requests)
        updates = self.client_updates(requests, n_clients, z) if set(methods) - {"global"} else []
        out = {}
        for method in methods:
            deltas = (
                self.global_deltas(requests, z)
                if method == "global"
                else self.merge(updates, method)
            )
            apply_deltas(self.model, deltas)
            out[method] = self.score(requests, keys)
            restore(self.model, start)
            if log:
                log(f"{method}: " + ", ".join(f"{k} {v:.1f}" for k, v in out[method].items()))
        return out
