"""The `malmen` editor: a trained hypernetwork turns each answer token's key and value gradient
into a pseudo value difference, and each edited layer moves by the ridge solution over all tokens
of all edits, A0 = kappa I (kappa learned per layer).

Every layer's tokens are read in one forward and backward pass on the model as it is when asked
(the unedited base, for a one-shot edit): the editor is frozen in the sense of editors/base.py, so
the collaborative merge reproduces its Global-Edit exactly.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from collabedit.editors.base import Editor, EditorConfig, EditSession, LayerInputs, Progress
from collabedit.editors.malmen.compute import encode, token_rows
from collabedit.editors.malmen.config import PRESETS, MalmenConfig, from_easyedit_yaml
from collabedit.editors.malmen.hypernet import (
    INFO_FILE,
    HypernetError,
    HypernetInfo,
    MalmenNets,
    check_tied,
    load_hypernet,
    read_info,
)
from collabedit.models import arch
from collabedit.requests import EditRequest

# a model folder's own hypernetwork (the shipped world carries one), used when a config names none
CARRIED_HYPERNET = "malmen"


def require_hypernet(cfg: MalmenConfig) -> tuple[MalmenNets, HypernetInfo]:
    if not cfg.hypernet:
        raise HypernetError(
            "MALMEN edits with a trained hypernetwork: train one with `collabedit malmen train` "
            "and name its folder in the config field hypernet"
        )
    return load_hypernet(cfg.hypernet)


def kappa_regulariser(nets: MalmenNets, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """A0 = kappa_l I per layer (float64), kappa_l as the hypernetwork has learned it."""
    shapes = nets.shapes()
    return {
        layer: float(nets.kappa(layer).detach()) * torch.eye(shapes[layer][0], dtype=torch.float64)
        for layer in layers
    }


class MalmenSession(EditSession):
    """One party's MALMEN edit of its requests. Nothing is optimised per request: the tokens'
    keys and value gradients are read when `inputs` is called, on the model as it is then."""

    frozen = True

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        cfg: MalmenConfig,
        nets: MalmenNets,
        editor: str,
    ) -> None:
        self.started = time.perf_counter()
        if not requests:
            raise ValueError("no requests to edit")
        for req in requests:
            try:
                encode(tokenizer, [(req.rewrite_prompt, req.target_new)])
            except ValueError as exc:
                raise ValueError(f"request case_id={req.case_id}: {exc}") from None
        self.layers = list(arch.check_layers(model, cfg.layers or []))
        for layer in self.layers:
            nets.net(layer)  # a layer the hypernetwork does not edit fails here
        self._model, self.tokenizer, self.cfg, self.nets = model, tokenizer, cfg, nets
        self.requests = list(requests)
        self.editor = editor
        self._nll: torch.Tensor | None = None
        self.timings = {"keys": 0.0, "hypernet": 0.0}

    @property
    def model(self) -> PreTrainedModel:
        return self._model

    def _pairs(self) -> list[tuple[str, str]]:
        return [(r.rewrite_prompt, r.target_new) for r in self.requests]

    def _derived(self, model: PreTrainedModel, requests: list[EditRequest]) -> MalmenSession:
        return MalmenSession(model, self.tokenizer, requests, self.cfg, self.nets, self.editor)

    def select(self, index: Sequence[int]) -> MalmenSession:
        return self._derived(self._model, [self.requests[i] for i in index])

    def on(self, model: PreTrainedModel) -> MalmenSession:
        return self._derived(model, self.requests)

    def inputs(self, layers: Sequence[int]) -> dict[int, LayerInputs]:
        """Keys U and pseudo value differences D of every answer token, per layer."""
        t0 = time.perf_counter()
        rows = token_rows(self._model, self.tokenizer, self._pairs(), layers, self.cfg.batch_size)
        if self._nll is None:
            self._nll = rows.nll
        t1 = time.perf_counter()
        dtype = next(self._model.parameters()).dtype
        nets = self.nets if dtype == torch.float32 else _cast(self.nets, dtype)
        out = {}
        with torch.no_grad():
            for layer in layers:
                D = nets.value_diffs(
                    layer, rows.keys[layer], rows.grads[layer], self.cfg.editor_batch_size
                )
                out[layer] = LayerInputs(rows.keys[layer], D)
        self.timings["keys"] += t1 - t0
        self.timings["hypernet"] += time.perf_counter() - t1
        return out

    def relative_residuals(self) -> torch.Tensor:
        """1 - the geometric mean of the target tokens' probabilities on the model: near zero for
        a request the model already answers with certainty."""
        if self._nll is None:
            self._nll = token_rows(
                self._model, self.tokenizer, self._pairs(), self.layers[:1], self.cfg.batch_size
            ).nll
        return 1.0 - torch.exp(-self._nll.double())


_CAST: dict[tuple[int, torch.dtype], MalmenNets] = {}


def _cast(nets: MalmenNets, dtype: torch.dtype) -> MalmenNets:
    """A copy of the hypernetwork in another dtype (float64 sessions), made once."""
    key = (id(nets), dtype)
    if key not in _CAST:
        _CAST[key] = copy.deepcopy(nets).to(dtype)
    return _CAST[key]


class Malmen(Editor):
    name = "malmen"
    summary = "MALMEN (Tan et al. 2024): a meta-learned hypernetwork, no per-request optimisation"
    config_type = MalmenConfig
    presets = PRESETS
    # the paper's Table 3 has 8 clients; 25 edits each fill the world's held-out half
    demo_layout = (8, 25)

    def read_hparams(self, path: Path, base: EditorConfig) -> MalmenConfig:
        """A trained hypernetwork's folder (its layers come with it), or an EasyEdit MALMEN
        hparams YAML."""
        if Path(path).is_dir():
            info = read_info(path)[0]
            return base.model_copy(update={"hypernet": str(path), "layers": info.layers})
        return from_easyedit_yaml(path, base)

    def fill_from_model(self, model: PreTrainedModel, cfg: EditorConfig) -> EditorConfig:
        """A config that names no hypernetwork uses the one in the model folder's `malmen/`."""
        folder = arch.model_folder(model)
        if getattr(cfg, "hypernet", None) or folder is None:
            return cfg
        carried = folder / CARRIED_HYPERNET
        if not (carried / INFO_FILE).is_file():
            return cfg
        return cfg.model_copy(update={"hypernet": str(carried)})

    def layers(self, model: PreTrainedModel, cfg: EditorConfig) -> list[int]:
        """The config's layers, else the hypernetwork's, else the last six (as published)."""
        if cfg.layers:
            return list(arch.check_layers(model, cfg.layers))
        if getattr(cfg, "hypernet", None):
            return list(arch.check_layers(model, require_hypernet(cfg)[1].layers))
        n = arch.n_layers(model)
        return list(range(max(0, n - 6), n))

    def trained_subjects(self, cfg: EditorConfig) -> frozenset[str]:
        if not getattr(cfg, "hypernet", None):
            return frozenset()
        return frozenset(require_hypernet(cfg)[1].trained_subjects)

    def regulariser(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        cfg: MalmenConfig,
        base_fingerprint: str | None = None,
        cache_dir: Path | None = None,
        progress: Progress = None,
    ) -> dict[int, torch.Tensor]:
        """kappa_l I per edited layer, from a hypernetwork trained for this base model."""
        nets, info = require_hypernet(cfg)
        layers = self.layers(model, cfg)
        check_tied(info, str(cfg.hypernet), base_fingerprint or arch.fingerprint(model), layers)
        return kappa_regulariser(nets, layers)

    def session(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        cfg: MalmenConfig,
        progress: Progress = None,
        reuse: EditSession | None = None,
        nets: MalmenNets | None = None,
    ) -> MalmenSession:
        """`nets`: use these hypernetworks instead of the config's folder (training)."""
        if nets is None:
            nets = require_hypernet(cfg)[0]
        cfg = cfg.model_copy(update={"layers": self.layers(model, cfg)})
        return MalmenSession(model, tokenizer, requests, cfg, nets, self.name)
