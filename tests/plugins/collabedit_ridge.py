"""A toy ridge editor, registered from outside the package: the test that a new back-end is one
module and runs unchanged through every entry point (`client edit`, `server merge`, `demo`,
`federate simulate`).

Delta_l = R_l K_l^T (kappa I + K_l K_l^T)^-1, with K_l the input of layer l's MLP output
projection at the subject's last token of the bare prompt, and R_l MEMIT's residual share of the
target z that MEMIT's own z optimiser finds. Every layer is read on the unedited model (frozen).
It is loaded by naming this module in COLLABEDIT_PLUGINS (tests/plugins on the Python path).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import Field

from collabedit.editors import LayerInputs, register
from collabedit.editors.base import Editor
from collabedit.editors.memit import MemitConfig, MemitSession, preset
from collabedit.editors.memit.compute import compute_keys
from collabedit.models import arch


class RidgeConfig(MemitConfig):
    """MEMIT's z settings (its corpus fields are unused) plus the ridge weight."""

    kappa: float = Field(1.0, gt=0, description="A0 = kappa I")


class RidgeSession(MemitSession):
    def inputs(self, layers: Sequence[int]) -> dict[int, LayerInputs]:
        keys = compute_keys(self.model, self.tokenizer, self.requests, layers, [["{}"]])
        targets = self.targets()
        return {layer: LayerInputs(keys[layer], targets * self.share(layer)) for layer in layers}


class Ridge(Editor):
    name = "ridge"
    summary = "toy ridge editor: R K^T (kappa I + K K^T)^-1, keys at the subject's last token"
    config_type = RidgeConfig
    # MEMIT's world preset with half its z steps: the tests' edits take as with 200 (measured:
    # ES 75 of 4 requests at 100, 120 and 200 steps, 50 at 60) in half the z time
    presets = {
        "world": RidgeConfig(**(preset("world").model_dump() | {"v_num_grad_steps": 100}),
                             kappa=1.0)
    }

    def regulariser(self, model, tokenizer, cfg, base_fingerprint=None, cache_dir=None,
                    progress=None) -> dict[int, torch.Tensor]:
        return {
            layer: cfg.kappa * torch.eye(arch.read_weight(model, layer).shape[1],
                                         dtype=torch.float64)
            for layer in self.layers(model, cfg)
        }

    def session(self, model, tokenizer, requests, cfg, progress=None, reuse=None, z=None,
                templates=None):
        if z is None and isinstance(reuse, MemitSession) and reuse.layers[-1] == cfg.layers[-1]:
            z, templates = reuse.z, reuse.templates  # MEMIT's z, at the same layer
        frozen = True
        return RidgeSession(model, tokenizer, requests, cfg, frozen, self.name, progress, z,
                            templates)

    def read_hparams(self, path: Path, base):
        raise ValueError("the ridge editor reads no hyper-parameter files")


register(Ridge)
