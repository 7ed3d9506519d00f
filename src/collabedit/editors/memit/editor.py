"""The two MEMIT editors: `memit` (published: layers written one after another, keys re-read after
each write) and `memit-frozen` (every layer's keys and residuals from the unedited model, the
variant the CollabEdit authors' code runs; the collaborative merge is exact for it).

Both regularise with A0 = lambda C, C the uncentered key covariance of the base model on a corpus
(stats.py; cached by the base model's fingerprint, so every round of a federation reuses C_0).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from collabedit.editors.base import (
    Editor,
    EditorConfig,
    EditResult,
    EditSession,
    LayerInputs,
    Progress,
    closed_form_edit,
)
from collabedit.editors.memit.compute import (
    ZResult,
    compute_keys,
    context_templates,
    current_outputs,
    optimise_z,
)
from collabedit.editors.memit.config import (
    PRESETS,
    SOLVE_FIELDS,
    MemitConfig,
    from_easyedit_yaml,
)
from collabedit.models import arch
from collabedit.models.tracing import subject_last_index
from collabedit.requests import EditRequest
from collabedit.stats import layer_stats


def validate_requests(
    tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], kl_prompt: str
) -> None:
    """Fail before any weight changes when a subject cannot be located in its prompt."""
    if not requests:
        raise ValueError("no requests to edit")
    for req in requests:
        try:
            subject_last_index(tokenizer, req.prompt, req.subject)
            subject_last_index(tokenizer, kl_prompt, req.subject)
        except ValueError as exc:
            raise ValueError(f"request case_id={req.case_id}: {exc}") from None


class MemitSession(EditSession):
    """One party's MEMIT work: target vectors z optimised once, on the model as it is when the
    session starts (the base model); keys and residuals read on the model as it is when asked."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        cfg: MemitConfig,
        frozen: bool,
        editor: str,
        progress: Progress = None,
        z: ZResult | None = None,
        templates: list[list[str]] | None = None,
    ) -> None:
        """`z`: target vectors already optimised for exactly these requests on this base model
        (z depends only on the request and the base, so a simulation reuses them)."""
        self.started = time.perf_counter()
        self.layers = list(arch.check_layers(model, cfg.layers or arch.default_layers(model)))
        validate_requests(tokenizer, requests, cfg.kl_prompt)
        self._model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.requests = list(requests)
        self.frozen, self.editor = frozen, editor
        self.templates = templates or context_templates(model, tokenizer, cfg)
        if z is not None and z.z.shape[0] != len(requests):
            raise ValueError(f"{z.z.shape[0]} target vectors for {len(requests)} requests")
        self.z = z or optimise_z(
            model, tokenizer, self.requests, self.layers[-1], self.templates, cfg, progress
        )
        self.timings = {"z": time.perf_counter() - self.started, "keys": 0.0}

    @property
    def model(self) -> PreTrainedModel:
        return self._model

    def _derived(self, model: PreTrainedModel, index: Sequence[int] | None) -> MemitSession:
        requests = self.requests if index is None else [self.requests[i] for i in index]
        z = self.z if index is None else self.z.select(index)
        return type(self)(
            model,
            self.tokenizer,
            requests,
            self.cfg,
            self.frozen,
            self.editor,
            z=z,
            templates=self.templates,
        )

    def select(self, index: Sequence[int]) -> MemitSession:
        return self._derived(self._model, list(index))

    def on(self, model: PreTrainedModel) -> MemitSession:
        return self._derived(model, None)

    def relative_residuals(self) -> torch.Tensor:
        return self.z.relative_residuals

    def keys(self, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """(n, d_in) keys per layer, read on the model's current weights."""
        t0 = time.perf_counter()
        out = compute_keys(
            self._model, self.tokenizer, self.requests, layers, self.templates, self.cfg.batch_rows
        )
        self.timings["keys"] += time.perf_counter() - t0
        return out

    def targets(self) -> torch.Tensor:
        """(n, d) how far each z still is from the last edited layer's current output."""
        t0 = time.perf_counter()
        cur = current_outputs(
            self._model, self.tokenizer, self.requests, self.layers[-1], self.cfg.batch_rows
        )
        self.timings["keys"] += time.perf_counter() - t0
        return self.z.z - cur

    def share(self, layer: int) -> float:
        """MEMIT spreads the remaining residual evenly over the layers not yet written."""
        return 1.0 / (len(self.layers) - self.layers.index(layer))

    def inputs(self, layers: Sequence[int]) -> dict[int, LayerInputs]:
        keys, targets = self.keys(layers), self.targets()
        return {layer: LayerInputs(keys[layer], targets * self.share(layer)) for layer in layers}


class Memit(Editor):
    name = "memit"
    summary = "MEMIT (Meng et al. 2023), layers written one after another (published)"
    config_type = MemitConfig
    presets = PRESETS
    frozen = False

    def read_hparams(self, path: Path, base: EditorConfig) -> MemitConfig:
        """An EasyEdit MEMIT hparams YAML."""
        return from_easyedit_yaml(path, base)

    def regulariser(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        cfg: MemitConfig,
        base_fingerprint: str | None = None,
        cache_dir: Path | None = None,
        progress: Progress = None,
    ) -> dict[int, torch.Tensor]:
        """lambda C_0 per layer; C_0 cached on disk by the base model's fingerprint."""
        layers = self.layers(model, cfg)
        check_update_weights(model, cfg)  # before the statistics, which can take minutes

        def stats_progress(texts: int, tokens: int) -> None:
            if progress is not None:
                progress("statistics", texts, cfg.mom2_n_samples)

        stats = layer_stats(
            model,
            tokenizer,
            layers,
            cfg.mom2_dataset,
            cfg.mom2_n_samples,
            cache_dir=cache_dir,
            progress=stats_progress,
            fingerprint=base_fingerprint,
        )
        return weigh_covariances(cfg, {layer: stats[layer].mom2 for layer in layers})

    def session(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        cfg: MemitConfig,
        progress: Progress = None,
        reuse: EditSession | None = None,
        z: ZResult | None = None,
        templates: list[list[str]] | None = None,
    ) -> MemitSession:
        """`z`: target vectors already optimised for these requests on this base model; taken
        from `reuse` too when it is a MEMIT session whose z sits at the same layer with the
        same z settings (z depends on nothing else)."""
        if z is None and isinstance(reuse, MemitSession) and _same_z(reuse, model, cfg):
            z, templates = reuse.z, templates or reuse.templates
        return MemitSession(
            model, tokenizer, requests, cfg, self.frozen, self.name, progress, z, templates
        )


def _same_z(other: MemitSession, model: PreTrainedModel, cfg: MemitConfig) -> bool:
    layers = arch.check_layers(model, cfg.layers or arch.default_layers(model))
    return layers[-1] == other.layers[-1] and cfg.model_dump(exclude=SOLVE_FIELDS) == (
        other.cfg.model_dump(exclude=SOLVE_FIELDS)
    )


def check_update_weights(model: PreTrainedModel, cfg: MemitConfig) -> None:
    """A per-layer lambda must name layers the model has (a typo would otherwise go unused)."""
    named = sorted(cfg.mom2_update_weight_by_layer)
    if named:
        try:
            arch.check_layers(model, named)
        except ValueError as exc:
            raise ValueError(f"mom2_update_weight_by_layer: {exc}") from exc


def weigh_covariances(
    cfg: MemitConfig, covariances: dict[int, torch.Tensor]
) -> dict[int, torch.Tensor]:
    """A0 = lambda C per layer (float64), lambda the layer's own where the config gives one.
    Callers check the config first (`check_update_weights`), before any expensive work."""
    return {k: cfg.update_weight(k) * c.double() for k, c in covariances.items()}


class MemitFrozen(Memit):
    name = "memit-frozen"
    summary = "MEMIT with every layer's keys and residuals read on the unedited model"
    frozen = True


def edit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    cfg: MemitConfig,
    covariances: dict[int, torch.Tensor],
    frozen: bool = False,
    apply: bool = True,
    progress: Progress = None,
    z: ZResult | None = None,
) -> EditResult:
    """MEMIT with given covariances (covariances[layer] = E[k k^T]); in place when `apply`.
    Layers and covariances are checked before any work."""
    layers = arch.check_layers(model, cfg.layers or arch.default_layers(model))
    missing = [layer for layer in layers if layer not in covariances]
    if missing:
        raise ValueError(f"no covariance statistics for layer(s) {missing}")
    check_update_weights(model, cfg)
    editor = MemitFrozen() if frozen else Memit()
    session = editor.session(model, tokenizer, requests, cfg, progress, z=z)
    a0 = weigh_covariances(cfg, covariances)
    return closed_form_edit(session, a0, apply=apply)
