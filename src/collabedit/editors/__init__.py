"""Knowledge-editing back-ends behind one call, chosen by name.

An editor turns requests into per-layer keys, residuals and updates (an `EditResult`); the
collaborative code only ever sees those, never the editor's internals.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from collabedit.editors.memit import EditResult, MemitConfig, edit, preset
from collabedit.editors.memit.compute import Progress, ZResult
from collabedit.models import arch
from collabedit.requests import EditRequest

EDITORS: dict[str, bool] = {"memit": False, "memit-frozen": True}  # name -> frozen keys


def default_config(model: PreTrainedModel) -> MemitConfig:
    """The preset matching the model (the world, gpt2-xl, gpt-j), else MEMIT's defaults with
    the architecture's default layers."""
    name = str(getattr(model.config, "_name_or_path", "")).rstrip("/")
    if (Path(name) / "world.json").is_file():
        return preset("world")
    base = name.split("/")[-1].lower()
    if base == "gpt2-xl":
        return preset("gpt2-xl")
    if base in ("gpt-j-6b", "gpt-j"):
        return preset("gpt-j")
    return MemitConfig(layers=list(arch.default_layers(model)))


def apply_edits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    editor: str = "memit",
    config: MemitConfig | None = None,
    stats_cache: Path | None = None,
    apply: bool = True,
    progress: Progress = None,
    z: ZResult | None = None,
) -> EditResult:
    """Edit `requests` into `model`: covariance statistics (cached) + the chosen editor.

    `z`: target vectors already optimised on this model for these requests (e.g. a slice of a
    larger set's), instead of optimising them again."""
    from collabedit.stats import layer_stats

    if editor not in EDITORS:
        raise ValueError(f"unknown editor {editor!r}; known: {', '.join(EDITORS)}")
    cfg = config or default_config(model)
    layers = arch.check_layers(model, cfg.layers or arch.default_layers(model))
    cfg = cfg.model_copy(update={"layers": list(layers)})

    def stats_progress(texts: int, tokens: int) -> None:
        if progress is not None:
            progress("stats", texts, cfg.mom2_n_samples)

    stats = layer_stats(
        model,
        tokenizer,
        layers,
        cfg.mom2_dataset,
        cfg.mom2_n_samples,
        cache_dir=stats_cache,
        progress=stats_progress,
    )
    covariances = {layer: s.mom2 for layer, s in stats.items()}
    return edit(
        model,
        tokenizer,
        requests,
        cfg,
        covariances,
        frozen=EDITORS[editor],
        apply=apply,
        progress=progress,
        z=z,
    )


__all__ = ["EDITORS", "EditResult", "MemitConfig", "apply_edits", "default_config", "preset"]
