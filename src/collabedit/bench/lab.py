"""What every in-process experiment needs: one world model, one editor with its config and
regulariser, and the moves the experiments are made of (split requests among clients, build their
updates with the one client round, merge by a method, apply, score, restore).

An editor session holds what depends only on the requests and the base model (MEMIT's target
vectors), so an experiment makes one session per request set and hands each client its slice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from collabedit.collab.merge import METHODS, get_method
from collabedit.collab.protocol import apply_deltas, merge_updates
from collabedit.collab.rounds import RoundInfo, client_round
from collabedit.collab.setup import EditingSetup
from collabedit.editors import DEFAULT_EDITOR, EditSession, closed_form_edit
from collabedit.editors.base import EditorConfig
from collabedit.evaluate.metrics import evaluate_requests
from collabedit.models import arch
from collabedit.requests import EditRequest
from collabedit.world.edit_requests import RequestForm, world_requests
from collabedit.world.store import WorldBundle

# RS (relation specificity) is reported where the requests carry relation prompts (world ones do)
CF_KEYS = ("ES", "PS", "NS", "Score", "RS")
ZSRE_KEYS = ("EA", "PA", "NA", "zsRE_Score", "RS")

Log = Callable[[str], None]


def merge_methods() -> tuple[str, ...]:
    """Every registered merge method, CollabEdit first (the registry's order)."""
    return tuple(METHODS)


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


def score_line(name: str, scores: dict[str, float]) -> str:
    """One method's scores as a log line: `name: ES 93.1, PS 89.8, ...`."""
    return f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in scores.items())


@dataclass
class Lab:
    bundle: WorldBundle
    setup: EditingSetup
    # parameters per merge method, e.g. {"ties": {"top_k": 0.2}}; the rest are the defaults
    method_params: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def open(
        cls,
        bundle: WorldBundle,
        cfg: EditorConfig | None = None,
        editor: str = DEFAULT_EDITOR,
        method_params: dict[str, dict] | None = None,
        layers: Sequence[int] | None = None,
        settings: dict | None = None,
    ) -> Lab:
        """A lab on `bundle` with `editor`: its config is `cfg` (default: the world's preset),
        then `settings` (config fields) and `layers` over it."""
        overrides = (cfg.model_dump() if cfg is not None else {}) | (settings or {})
        setup = EditingSetup.open(
            (bundle.model, bundle.tokenizer), editor, layers=layers, overrides=overrides or None
        )
        for name, params in (method_params or {}).items():
            get_method(name).config(**params)  # unknown methods and parameters fail here
        return cls(bundle, setup, dict(method_params or {}))

    @property
    def model(self):
        return self.bundle.model

    @property
    def tok(self):
        return self.bundle.tokenizer

    @property
    def cfg(self) -> EditorConfig:
        return self.setup.cfg

    @property
    def layers(self) -> list[int]:
        return self.setup.layers

    def weighted(
        self, extra_s: dict[int, torch.Tensor] | None = None, beta1: float = 0.0
    ) -> dict[int, torch.Tensor]:
        """A0 (+ beta1 * sum of earlier rounds' S: the dynamic covariance)."""
        out = {}
        for layer, a0 in self.setup.regulariser.items():
            w = a0.double()
            if extra_s and layer in extra_s and beta1:
                w = w + beta1 * extra_s[layer].double()
            out[layer] = w
        return out

    def eval_subjects(self) -> list[str]:
        """The world's subjects the editor has not learned from (all of them for MEMIT; the
        held-out ones for a trained hypernetwork), in the world's order."""
        seen = self.setup.editor.trained_subjects(self.cfg)
        return [s for s in self.bundle.world.subjects if s not in seen]

    def requests(
        self, n: int, seed: int = 0, form: RequestForm = "counterfact"
    ) -> list[EditRequest]:
        """`n` world requests on distinct subjects the editor has not learned from."""
        return world_requests(
            self.bundle.world, n, seed=seed, form=form, subjects=self.eval_subjects()
        )

    def session(self, requests: Sequence[EditRequest], **overrides) -> EditSession:
        """The editor's session for `requests` on the model as it is now; `overrides` change
        config fields for this session only (e.g. more context prompts)."""
        if not overrides:
            return self.setup.session(requests)
        cfg = self.cfg.model_copy(update=overrides)
        type(self.cfg)(**cfg.model_dump())  # validate the overrides
        return self.setup.editor.session(self.model, self.tok, requests, cfg)

    def reset(self) -> None:
        """Back to the unedited base model."""
        self.setup.reset()

    def snapshot(self) -> dict[int, torch.Tensor]:
        return arch.snapshot(self.model, self.layers)

    def score(self, requests: Sequence[EditRequest], keys: Sequence[str] | None = None) -> dict:
        m = evaluate_requests(self.model, self.tok, requests)
        return {k: m[k] for k in (keys or m) if isinstance(m.get(k), float)}

    def global_deltas(self, session: EditSession) -> dict[int, torch.Tensor]:
        result = closed_form_edit(session, self.setup.regulariser, apply=False)
        return {e.layer: e.delta for e in result.layers}

    def client_updates(self, session: EditSession, n_clients: int, round: int = 0):
        """Updates of `n_clients` clients holding contiguous slices of the session's requests,
        each built by the one client round on the model as it is."""
        info = RoundInfo(round, arch.fingerprint(self.model, self.layers), tuple(self.layers))
        updates = []
        for i, idx in enumerate(split_evenly(len(session.requests), n_clients)):
            part = session.select(idx)
            updates.append(
                client_round(self.setup, part.requests, f"client-{i}", info, session=part).update
            )
        return updates

    def merge(self, updates, method: str, weighted=None) -> dict[int, torch.Tensor]:
        params = self.method_params.get(method, {})
        return merge_updates(updates, weighted or self.weighted(), method, **params)

    def compare(
        self,
        requests: Sequence[EditRequest],
        n_clients: int,
        methods: Sequence[str] | None = None,
        keys: Sequence[str] | None = None,
        session: EditSession | None = None,
        log: Log | None = None,
    ) -> dict[str, dict]:
        """Score of each method's result ("global" = one party edits all), each applied to the
        model as it is, then undone."""
        methods = list(methods or ("global", *merge_methods()))
        start = self.snapshot()
        session = session if session is not None else self.session(requests)
        updates = self.client_updates(session, n_clients) if set(methods) - {"global"} else []
        out = {}
        for method in methods:
            deltas = (
                self.global_deltas(session) if method == "global" else self.merge(updates, method)
            )
            apply_deltas(self.model, deltas)
            out[method] = self.score(requests, keys)
            arch.restore(self.model, start)
            if log:
                log(score_line(method, out[method]))
        return out
