"""MALMEN's hyper-parameters: one typed config and presets.

Field names follow the authors' configuration (rank, n_blocks, lr, meta_lr, loc_coef,
max_grad_norm, n_edits, batch_size) where they mean the same thing.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import Field

from collabedit.editors.base import EditorConfig


class MalmenConfig(EditorConfig):
    hypernet: str | None = Field(
        None,
        description="folder of the trained hypernetwork editing uses (`collabedit malmen train`)",
    )
    rank: int = Field(1920, ge=1, description="rank of each hypernetwork block's linear map")
    n_blocks: int = Field(2, ge=1, description="residual blocks of the hypernetwork")
    lr: float = Field(1e-6, gt=0, description="initial step size of the pseudo value difference")
    meta_lr: float = Field(1e-5, gt=0, description="Adam learning rate of the hypernetwork")
    loc_coef: float = Field(1.0, ge=0, description="weight of the locality (KL) loss")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping of the hypernetwork")
    n_edits: int = Field(512, ge=1, description="edits per meta-training step")
    batch_size: int = Field(32, ge=1, description="prompts per forward/backward pass")
    editor_batch_size: int = Field(1024, ge=1, description="token rows per hypernetwork pass")
    n_steps: int = Field(10_000, ge=1, description="meta-training steps")
    val_interval: int = Field(100, ge=1, description="meta-training steps between validations")
    seed: int = Field(0, description="seed of the hypernetwork's initialisation and batches")


PRESETS: dict[str, MalmenConfig] = {
    # Published settings (the authors' configuration and EasyEdit's MALMEN hparams): the second
    # MLP projection of the last six layers.
    "gpt2-xl": MalmenConfig(layers=[42, 43, 44, 45, 46, 47]),
    "gpt-j-6b": MalmenConfig(layers=[22, 23, 24, 25, 26, 27]),
    # The world's four global-attention layers: layers 0-1 see one token, so a key there at the
    # prompt's last token knows nothing of the subject. A small model and few training subjects
    # (200): rank 256, Adam at 3e-4, and validation every 25 steps, because the network fits
    # its training subjects within ~100 steps and held-out ES falls after (the best is kept).
    # loc_coef 0.1 instead of 1: on the world, 1 keeps held-out EA at 83 (0.25: 89, 0.1: 93),
    # at a cost in NA (82, 74, 62); docs/benchmarks.md has the sweep. The hypernetwork is the
    # one the world's folder carries (`malmen/`, found by the editor).
    "world": MalmenConfig(
        layers=[2, 3, 4, 5],
        rank=256,
        lr=1e-3,
        meta_lr=3e-4,
        loc_coef=0.1,
        n_edits=128,
        batch_size=128,
        n_steps=200,
        val_interval=25,
    ),
}
# A realistic world (`collabedit world build --recipe realistic`): the positions that predict the
# answer see the subject only through the global layers 4-6, so those are edited. loc_coef 1 (the
# published weight) instead of world-v1's 0.1: on the default world (1,200 training subjects) it
# keeps the edits specific at little cost in efficacy: validation ES 89 / GS 89 / LS 85 against
# 96 / 95 / 66 at 0.1, and in the 8 x 25 demo NS 93.7 / RS 91.1 against 83.3 / 75.9
# (docs/benchmarks.md). The default world carries the hypernetwork so trained in `malmen/`.
PRESETS["world-realistic"] = PRESETS["world"].model_copy(
    update={"layers": [4, 5, 6], "loc_coef": 1.0}
)
PRESETS["gpt-j"] = PRESETS["gpt-j-6b"]


# EasyEdit MALMEN YAML keys and what they are called here
_EASYEDIT_KEYS = {
    "rank": "rank",
    "n_blocks": "n_blocks",
    "lr": "lr",
    "meta_lr": "meta_lr",
    "loc_coef": "loc_coef",
    "max_grad_norm": "max_grad_norm",
    "n_edits": "n_edits",
    "batch_size": "batch_size",
    "editor_batch_size": "editor_batch_size",
    "max_iters": "n_steps",
    "val_interval": "val_interval",
}
_LAYER_IN_NAME = re.compile(r"\.(\d+)\.")


def from_easyedit_yaml(path: str | Path, base: MalmenConfig | None = None) -> MalmenConfig:
    """The fields of an EasyEdit MALMEN hparams YAML that match ours; the edited layers from
    its `inner_params` (e.g. transformer.h.42.mlp.c_proj.weight)."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a YAML mapping")
    picked = {ours: data[theirs] for theirs, ours in _EASYEDIT_KEYS.items() if theirs in data}
    if "inner_params" in data:
        layers = []
        for name in data["inner_params"]:
            found = _LAYER_IN_NAME.search(str(name))
            if not found:
                raise ValueError(f"{path}: field inner_params: no layer number in {name!r}")
            layers.append(int(found.group(1)))
        picked["layers"] = sorted(set(layers))
    return MalmenConfig(**((base or MalmenConfig()).model_dump() | picked))
