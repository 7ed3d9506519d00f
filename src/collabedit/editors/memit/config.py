"""MEMIT's hyper-parameters: one typed config, presets, and EasyEdit YAML import."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, PositiveFloat

from collabedit.editors.base import EditorConfig

# Fields only the closed-form solve reads: z, the target vectors, does not depend on them, so a
# session's z serves any values of these (and the z cache key leaves them out).
SOLVE_FIELDS = frozenset(
    {
        "layers",
        "mom2_update_weight",
        "mom2_update_weight_by_layer",
        "mom2_dataset",
        "mom2_n_samples",
    }
)


class MemitConfig(EditorConfig):
    """Field names follow MEMIT / EasyEdit where they mean the same thing."""

    mom2_update_weight: float = Field(15000.0, gt=0, description="lambda, weight of C")
    mom2_update_weight_by_layer: dict[int, PositiveFloat] = Field(
        default_factory=dict,
        description="lambda of a layer, where it differs from mom2_update_weight; applies when "
        "that layer is edited",
    )
    mom2_dataset: str = Field("world", description="corpus for C: 'world', a text file, HF id")
    mom2_n_samples: int = Field(100_000, ge=1, description="texts used for C")
    v_num_grad_steps: int = Field(25, ge=1, description="optimiser steps for each target z")
    v_lr: float = Field(0.5, gt=0, description="Adam learning rate of z")
    v_weight_decay: float = Field(0.5, ge=0, description="penalty on ||z - z0|| / ||z0||")
    clamp_norm_factor: float = Field(
        0.75, gt=0, description="||z - z0|| is kept below this times ||z0||"
    )
    kl_factor: float = Field(0.0625, ge=0, description="weight of the KL term on the KL prompt")
    early_stop_loss: float = Field(5e-2, ge=0, description="MEMIT stops a request's z below it")
    context_template_length_params: list[tuple[int, int]] = Field(
        default_factory=lambda: [(10, 5)],
        description="(length in tokens, number) of generated context prefixes",
    )
    context_start_words: list[str] = Field(
        default_factory=lambda: ["The", "Therefore", "Because", "I", "You"],
        description="words the context prefixes start with",
    )
    kl_prompt: str = Field("{} is a", description="prompt whose distribution z must keep")
    seed: int = Field(0, description="seed of the generated context prefixes")
    batch_rows: int = Field(2048, ge=1, description="rows per forward pass in z optimisation")
    z_memory_mb: float = Field(
        2048.0,
        gt=0,
        description="memory budget of the z optimisation (MB): requests are optimised in blocks "
        "whose cached states and activations fit it, so the peak does not grow with their number",
    )

    def update_weight(self, layer: int) -> float:
        """lambda, the weight of C, at `layer`."""
        return self.mom2_update_weight_by_layer.get(layer, self.mom2_update_weight)


PRESETS: dict[str, MemitConfig] = {
    # Published settings (MEMIT reference hparams; lambda as the CollabEdit authors use).
    "gpt2-xl": MemitConfig(
        layers=[13, 14, 15, 16, 17],
        mom2_update_weight=20000.0,
        mom2_dataset="wikipedia:20220301.en",
        v_num_grad_steps=20,
    ),
    "gpt-j-6b": MemitConfig(
        layers=[3, 4, 5, 6, 7, 8],
        mom2_update_weight=15000.0,
        mom2_dataset="wikipedia:20220301.en",
        v_num_grad_steps=25,
    ),
    # The world model's layers 0-1 see only their own token, so the subject's state after layer
    # 1 is where its facts enter the global layers (causal trace in docs/benchmarks.md): z is
    # read there and layer 1's MLP is edited. One layer, because an edit of layer 0 moves layer
    # 1's keys so far that the frozen editor misses z (ES 30 vs 77 at 100 edits). Every
    # subject fills a large share of the world's small corpus, so lambda is far below GPT-2
    # XL's. The residual stream is large (||h|| 300-800): lr 5, and 200 steps because a
    # quarter of the requests are still above 0.5 nats after 50 (docs/benchmarks.md).
    "world": MemitConfig(
        layers=[1],
        mom2_update_weight=100.0,
        mom2_dataset="world",
        mom2_n_samples=100_000,
        v_num_grad_steps=200,
        v_lr=5.0,
        clamp_norm_factor=4.0,
    ),
    # A realistic world (`collabedit world build --recipe realistic`, docs/realistic-world.md):
    # layer 0 composes the subject's name, the MLPs of layers 1-3 write its facts at its last
    # token, and the global layers above mostly read them, hence z at 3. The KL term keeps the
    # subject's own next-token distribution, which the world's catalogue lines make its list of
    # attributes (MEMIT's "essence" prompt, pointed at what means essence there): it keeps the
    # subject's other facts (RS). lambda 200: on the default world it keeps ES >= 94 at 1,000
    # edits with both editors while NS and RS rise over lambda 60; 600 costs the sequential
    # editor ES (docs/realistic-world.md, session 15). Layer 2's MLP hardly writes at the subject
    # (causal trace 0.02 against 0.42 and 0.17 at layers 1 and 3), so the share of the residual
    # MEMIT gives it went into directions the corpus hardly visits, 6 x ||W|| at 100 edits; a
    # lambda 300 times larger there keeps it within its weight without costing ES, and a
    # quarter of the lambda at layer 3, which then takes that share, keeps the sequential
    # editor's ES at 1,000 edits (docs/realistic-world.md, session 19).
    "world-realistic": MemitConfig(
        layers=[1, 2, 3],
        mom2_update_weight=200.0,
        mom2_update_weight_by_layer={2: 60000.0, 3: 50.0},
        mom2_dataset="world",
        mom2_n_samples=100_000,
        v_num_grad_steps=100,
        v_lr=1.0,
        clamp_norm_factor=1.0,
        kl_prompt="{}",
        kl_factor=1.0,
    ),
}

# EasyEdit MEMIT YAML keys that mean the same here; the rest (model paths, module templates,
# devices) is decided by our architecture adapters.
_EASYEDIT_KEYS = {
    "layers",
    "mom2_update_weight",
    "mom2_dataset",
    "mom2_n_samples",
    "v_num_grad_steps",
    "v_lr",
    "v_weight_decay",
    "clamp_norm_factor",
    "kl_factor",
}


PRESETS["gpt-j"] = PRESETS["gpt-j-6b"]  # the short name users type


def preset(name: str) -> MemitConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown MEMIT preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name].model_copy(deep=True)


def from_easyedit_yaml(path: str | Path, base: MemitConfig | None = None) -> MemitConfig:
    """Read the fields of an EasyEdit MEMIT hparams YAML that match ours."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a YAML mapping")
    picked = {k: v for k, v in data.items() if k in _EASYEDIT_KEYS}
    if data.get("mom2_dataset") == "wikipedia":
        picked["mom2_dataset"] = "wikipedia:20220301.en"
    return MemitConfig(**((base or MemitConfig()).model_dump() | picked))
