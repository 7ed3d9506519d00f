"""Load a causal LM and its tokenizer from a Hugging Face id, a local folder, or `world`; save an
edited one with everything its folder carried."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from collabedit.paths import DEFAULT_WORLD_DIR

WORLD_ALIAS = "world"

# tokenizer_config.json classes that mean "the tokenizer.json as it is": AutoTokenizer would pick
# the architecture's own class instead (Qwen2's byte-level pre-tokenizer turns every word of a
# word-level vocabulary into no tokens at all)
_PLAIN_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> str:
    """`world` means the world shipped in the package; anything else is passed to from_pretrained
    (a local folder, or a hub id such as `gpt2-xl`, which needs the hub to be reachable)."""
    if str(name_or_path) == WORLD_ALIAS:
        return str(DEFAULT_WORLD_DIR)
    return str(name_or_path)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """AutoTokenizer, except where the folder declares a plain tokenizers-library tokenizer."""
    config = Path(path) / "tokenizer_config.json"
    if config.is_file() and (Path(path) / "tokenizer.json").is_file():
        declared = json.loads(config.read_text()).get("tokenizer_class")
        if declared in _PLAIN_TOKENIZER_CLASSES:
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


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | os.PathLike[str],
    source: str | os.PathLike[str] | None = None,
) -> Path:
    """save_pretrained (safetensors) and the tokenizer; the JSON files of the `source` folder
    that save_pretrained does not write (a world's world.json and build.json, say) come along,
    so the saved model is the same kind of folder as the one it was loaded from."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    written = {f.name for f in out.iterdir() if before.get(f.name) != f.stat().st_mtime_ns}
    src = Path(resolve_model_path(source)) if source is not None else None
    if src is not None and src.is_dir() and src.resolve() != out.resolve():
        for f in sorted(src.glob("*.json")):
            if f.name not in written:
                shutil.copy(f, out / f.name)
    return out
