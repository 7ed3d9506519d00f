"""What a party (client or server) holds for a federation: the model, the editor and its config,
and the regulariser A0 of the federation's BASE model.

A0 (lambda C_0 for MEMIT) belongs to the round-0 model, not to the global model of the current
round: the paper's dynamic covariance is C_t = beta0 C_0 + beta1 sum S, and re-collecting C on an
edited model would both change C_0 and re-read the whole corpus every round. So A0 is computed
once on the base model, cached by its whole-model fingerprint (`origin_fingerprint`), and every
later round — whichever model file it starts from — reads it from that cache.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from collabedit.collab.bounds import UpdateBounds, probe_bounds
from collabedit.editors import EditorConfig, EditSession, Progress, get_editor, make_config
from collabedit.editors.base import Editor
from collabedit.models import arch
from collabedit.models.loading import load_model
from collabedit.requests import EditRequest


@dataclass
class EditingSetup:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    editor: Editor
    cfg: EditorConfig
    regulariser: dict[int, torch.Tensor]  # A0 per layer, float64
    origin_fingerprint: str  # whole-model fingerprint of the federation's round-0 model
    source: str  # what the model was loaded from (name or folder), for saving alike
    base_weights: dict[int, torch.Tensor]  # the edited layers as loaded
    _bounds: UpdateBounds | None = field(default=None, repr=False)

    @property
    def layers(self) -> list[int]:
        return list(self.cfg.layers or [])

    @classmethod
    def open(
        cls,
        model: str | os.PathLike[str] | tuple[PreTrainedModel, PreTrainedTokenizerBase],
        editor: str,
        preset: str | None = None,
        hparams: Path | None = None,
        layers: Sequence[int] | None = None,
        overrides: dict | None = None,
        origin_fingerprint: str | None = None,
        cache_dir: Path | None = None,
        progress: Progress = None,
    ) -> EditingSetup:
        """Load (or take) the model, resolve the editor's config, and get A0: computed on this
        model when it is the base (`origin_fingerprint` None or its own), else read from the
        cache under `origin_fingerprint`. Raises ValueError / OSError with the reason."""
        if isinstance(model, tuple):
            lm, tok = model
            source = str(getattr(lm.config, "_name_or_path", ""))
        else:
            source = str(model)
            lm, tok = load_model(model)
        ed = get_editor(editor)
        cfg = make_config(ed, lm, preset, hparams, layers, overrides)
        own = arch.fingerprint(lm)
        origin = origin_fingerprint or own
        a0 = ed.regulariser(
            lm,
            tok,
            cfg,
            base_fingerprint=None if origin == own else origin,
            cache_dir=cache_dir,
            progress=progress,
        )
        base = arch.snapshot(lm, cfg.layers or [])
        return cls(lm, tok, ed, cfg, a0, origin, source, base)

    def update_bounds(self) -> UpdateBounds:
        """What an honest client's update can look like, probed on this model (collab/bounds)."""
        if self._bounds is None:
            self._bounds = probe_bounds(self.model, self.layers)
        return self._bounds

    def session(
        self, requests: Sequence[EditRequest], progress: Progress = None, **kw
    ) -> EditSession:
        """The editor's session for `requests` on the model as it is now (after
        `check_requests`)."""
        check_requests(self.model, self.tokenizer, requests)
        return self.editor.session(self.model, self.tokenizer, requests, self.cfg, progress, **kw)

    def reset(self) -> None:
        """Back to the edited layers as loaded."""
        arch.restore(self.model, self.base_weights)


def check_requests(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
) -> None:
    """Refuse, before any work, requests the model cannot take: an edit prompt and target longer
    than the model's positions (an unbounded prompt would otherwise grow memory until the
    process is killed), and, for a tokenizer with an unknown-word token (the world's), a
    subject or target with words outside its vocabulary — they would all become that one
    token and the edit would land on it. ValueError naming the case and the field."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    unk = tokenizer.unk_token_id if getattr(tokenizer, "unk_token", None) else None
    for r in requests:
        if limit:
            n = len(tokenizer(r.rewrite_prompt + " " + r.target_new)["input_ids"])
            if n > limit:
                raise ValueError(
                    f"case {r.case_id}: prompt and target_new are {n} tokens; the model takes "
                    f"at most {limit}"
                )
        if unk is None:
            continue
        for name in ("subject", "target_new"):
            text = getattr(r, name)
            unknown = [w for w in text.split() if unk in tokenizer(w)["input_ids"]]
            if unknown:
                raise ValueError(
                    f"case {r.case_id}: {name} has words the model's vocabulary does not know "
                    f"({', '.join(map(repr, unknown[:5]))}); they would all read as "
                    f"{tokenizer.unk_token!r}"
                )
