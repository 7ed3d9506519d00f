"""Load a causal LM and its tokenizer from a Hugging Face id, a local folder, or `world`."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

WORLD_ALIAS = "world"


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> str:
    """`world` means the world shipped in the package; anything else is passed to from_pretrained
    (a local folder, or a hub id such as `gpt2-xl`, which needs the hub to be reachable)."""
    if str(name_or_path) == WORLD_ALIAS:
        from collabedit.world.store import DEFAULT_WORLD_DIR

        return str(DEFAULT_WORLD_DIR)
    return str(name_or_path)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """AutoTokenizer, except for a world: its word-level tokenizer.json must be read as it is,
    and AutoTokenizer would pick the architecture's own class (Qwen2's byte-level pre-tokenizer
    turns every world word into no tokens at all)."""
    from collabedit.world.store import is_world_dir

    if is_world_dir(Path(path)):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def load_model(
    name_or_path: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = resolve_model_path(name_or_path)
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"{local} has no config.json: not a Hugging Face model folder")
    model = (
        AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        if dtype
        else (AutoModelForCausalLM.from_pretrained(path))
    )
    model.to(device)
    model.eval()
    tokenizer = load_tokenizer(path)
    if tokenizer.pad_token_id is None:
        # GPT-2 style tokenizers have no pad token; scoring pads on the right and masks it.
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
