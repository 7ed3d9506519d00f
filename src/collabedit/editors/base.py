"""The interface every knowledge-editing back-end implements, and the closed-form edit they share.

CollabEdit (Algorithm 1 of the paper) carries any editor whose update of an edited linear layer is
the ridge solution  Delta = R K^T (A0 + K K^T)^-1 : MEMIT (A0 = lambda C, C the layer's key
covariance on a corpus), MALMEN (A0 = kappa I with a learned kappa per layer), a plain ridge
editor. Per edited layer the collaborative code needs only the keys K (n x d_in), the
(pseudo-)residuals R (n x d_out) and the regulariser A0 (d_in x d_in); it never sees how an
editor computes them. So a back-end is:

* a config type (pydantic) with at least `layers`, and optional named presets;
* `regulariser(...)`: A0 per layer, computed on the BASE model of a federation and cached, so
  every round and every party uses the same A0;
* `session(...)`: one party's work on its requests (e.g. MEMIT's target vectors, optimised once),
  from which keys and residuals are read layer by layer on the model as it is at that moment.

`closed_form_edit` turns a session and A0 into per-layer deltas; the protocols in collab/ read
the same session layer by layer when they merge between layers.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from collabedit.linalg import solve_update
from collabedit.models import arch
from collabedit.requests import EditRequest

# The model config attribute in which a model names the preset each editor should use with it.
PRESETS_ATTR = "collabedit_presets"

# progress(stage, done, total): long steps report here (the CLI draws bars from it)
Progress = Callable[[str, int, int], None] | None


class EditorConfig(BaseModel):
    """Fields every editor's config has; each editor adds its own."""

    model_config = ConfigDict(extra="forbid")

    layers: list[int] | None = Field(None, description="edited layers; None: the model's default")


@dataclass
class LayerInputs:
    """What one party contributes to one layer: keys (n, d_in) and residuals (n, d_out)."""

    keys: torch.Tensor
    residuals: torch.Tensor


@dataclass
class LayerEdit:
    """What one layer's update is made of: Delta = R K^T (A0 + K K^T)^-1."""

    layer: int
    module: str
    keys: torch.Tensor  # (n, d_in) float64
    residuals: torch.Tensor  # (n, d_out) float64
    delta: torch.Tensor  # (d_out, d_in) float64

    @property
    def unmet(self) -> torch.Tensor:
        """Per request, ||Delta k - r|| / ||r||: the share of its residual that this layer's
        update does not deliver at the request's own key. The regulariser always keeps some
        back; it grows sharply when the edited keys, together with the keys A0 protects, no
        longer fit in the layer's key width."""
        miss = self.keys @ self.delta.T - self.residuals
        return miss.norm(dim=1) / self.residuals.norm(dim=1).clamp_min(1e-12)


@dataclass
class EditResult:
    editor: str
    layers: list[LayerEdit]
    timings: dict[str, float] = field(default_factory=dict)
    session: EditSession | None = None


class EditSession(ABC):
    """One party's work on its requests for one base model.

    Whatever is expensive and depends only on the requests and the base model (MEMIT's target
    vectors) is done once, when the session is made. Keys and residuals are read on the model as
    it is when `inputs` is called: the unedited base (frozen editors), the party's own partly
    edited copy (sequential editors), or the merged global model (layer-synchronous rounds).
    """

    editor: str  # the registered name of the editor that made it
    layers: list[int]
    requests: list[EditRequest]
    started: float  # time.perf_counter() when the session was made
    # True: every layer's inputs are read on the unedited model (the merge is exact per layer);
    # False: layer l's are read after the layers before it were written
    frozen: bool
    timings: dict[str, float]

    @abstractmethod
    def inputs(self, layers: Sequence[int]) -> dict[int, LayerInputs]:
        """Keys and this layer's share of the residuals, read on the model's current weights."""

    @abstractmethod
    def relative_residuals(self) -> torch.Tensor:
        """(n,) how far each request is from being satisfied by the base model, relative; near
        zero for a request the model already knows (knowledge overlap)."""

    @abstractmethod
    def select(self, index: Sequence[int]) -> EditSession:
        """The same session restricted to some requests (nothing is recomputed)."""

    @abstractmethod
    def on(self, model: PreTrainedModel) -> EditSession:
        """The same requests and targets, read on another copy of the same base model (e.g. a
        float64 copy)."""

    @property
    def model(self) -> PreTrainedModel:
        raise NotImplementedError


class Editor(ABC):
    """A registered back-end. Instances hold no state; everything per run is in the session."""

    name: ClassVar[str]
    summary: ClassVar[str]
    config_type: ClassVar[type[EditorConfig]]
    presets: ClassVar[dict[str, EditorConfig]] = {}
    # clients x edits per client of `collabedit demo` with this editor (the paper's Table 1
    # shape for MEMIT, scaled to the world)
    demo_layout: ClassVar[tuple[int, int]] = (10, 10)

    def default_config(self, model: PreTrainedModel) -> EditorConfig:
        """The preset the model's config declares for this editor (`collabedit_presets`, e.g.
        {"memit": "world"} or {"*": "world"}, written by whoever built the model), else the
        preset named after the model (gpt2-xl, gpt-j-6b), else the config's defaults."""
        declared = getattr(model.config, PRESETS_ATTR, None) or {}
        if isinstance(declared, dict):
            # by editor name, or "*": the preset name any editor uses if it has one
            for key in (self.name, "*"):
                if declared.get(key) in self.presets:
                    return self.preset(declared[key])
        name = str(getattr(model.config, "_name_or_path", "")).rstrip("/").split("/")[-1].lower()
        if name in self.presets:
            return self.preset(name)
        return self.config_type()

    def fill_from_model(self, model: PreTrainedModel, cfg: EditorConfig) -> EditorConfig:
        """The config with what it leaves open and the model's folder provides (a learned part
        shipped beside the weights); by default the config as it is."""
        return cfg

    def preset(self, name: str) -> EditorConfig:
        if name not in self.presets:
            known = ", ".join(self.presets) or "none"
            raise ValueError(f"editor {self.name!r} has no preset {name!r}; presets: {known}")
        return self.presets[name].model_copy(deep=True)

    def read_hparams(self, path: Path, base: EditorConfig) -> EditorConfig:
        """Settings from a hyper-parameter file in the back-end's published format."""
        raise ValueError(f"editor {self.name!r} reads no hyper-parameter files")

    def layers(self, model: PreTrainedModel, cfg: EditorConfig) -> list[int]:
        return list(arch.check_layers(model, cfg.layers or arch.default_layers(model)))

    def trained_subjects(self, cfg: EditorConfig) -> frozenset[str]:
        """Subjects the editor's learned parts have seen (a hypernetwork's training requests);
        experiments evaluate on the others. Empty for editors that learn nothing."""
        return frozenset()

    @abstractmethod
    def regulariser(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        cfg: EditorConfig,
        base_fingerprint: str | None = None,
        cache_dir: Path | None = None,
        progress: Progress = None,
    ) -> dict[int, torch.Tensor]:
        """A0 per edited layer (d_in x d_in, float64), of the base model whose whole-model
        fingerprint is `base_fingerprint` (default: `model` itself, which must then be it)."""

    @abstractmethod
    def session(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        cfg: EditorConfig,
        progress: Progress = None,
        reuse: EditSession | None = None,
    ) -> EditSession:
        """Validate the requests (before any weight changes) and prepare their targets.

        `reuse`: a session of the same requests on the same base model (perhaps another editor's
        or another copy's) whose prepared work this one may take over where it is valid."""

    def describe(self) -> dict:
        """Name, summary, config fields with defaults and descriptions, presets (for
        `collabedit editors list`)."""
        fields = {
            k: {
                "default": _jsonable(f.get_default(call_default_factory=True)),
                "description": f.description or "",
                "type": _type_name(f.annotation),
            }
            for k, f in self.config_type.model_fields.items()
        }
        return {
            "name": self.name,
            "summary": self.summary,
            "config": fields,
            "presets": sorted(self.presets),
        }


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def closed_form_edit(
    session: EditSession, regulariser: dict[int, torch.Tensor], apply: bool = True
) -> EditResult:
    """Delta_l = R_l K_l^T (A0_l + K_l K_l^T)^-1 for each edited layer of the session's model.

    Frozen sessions read every layer's inputs first, then write; sequential ones write layer l
    before reading layer l+1's. With `apply` False the model is left exactly as it was.
    """
    model = session.model
    layers = session.layers
    missing = [layer for layer in layers if layer not in regulariser]
    if missing:
        raise ValueError(f"no regulariser for layer(s) {missing}")
    t0 = time.perf_counter()
    originals = {layer: arch.read_weight(model, layer) for layer in layers}
    edits: list[LayerEdit] = []
    solve = 0.0
    try:
        inputs = session.inputs(layers) if session.frozen else {}
        for layer in layers:
            if not session.frozen:
                inputs = session.inputs([layer])  # on the model edited so far
            K, R = inputs[layer].keys.double(), inputs[layer].residuals.double()
            t1 = time.perf_counter()
            delta = solve_update(R.T @ K, regulariser[layer].double() + K.T @ K)
            solve += time.perf_counter() - t1
            edits.append(LayerEdit(layer, arch.mlp_out_name(model, layer), K, R, delta))
            if not session.frozen:
                arch.add_to_weight(model, layer, delta)
        if session.frozen and apply:
            for e in edits:
                arch.add_to_weight(model, e.layer, e.delta)
        if not apply:
            arch.restore(model, originals)
    except BaseException:
        arch.restore(model, originals)
        raise
    now = time.perf_counter()
    timings = dict(session.timings) | {
        "solve": solve,
        "edit": now - t0,
        "total": now - session.started,
    }
    return EditResult(session.editor, edits, timings, session)
