"""Load a causal LM and its tokenizer from a Hugging Face id, a local folder, or `world`; save an
edited one with everything its folder carried."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from collabedit.io import OutputError, writable_parent
from collabedit.paths import SHIPPED_WORLDS

__all__ = ["OutputError", "check_output_dir", "load_model", "load_tokenizer", "save_model"]

# tokenizer_config.json classes that mean "the tokenizer.json as it is": AutoTokenizer would pick
# the architecture's own class instead (Qwen2's byte-level pre-tokenizer turns every word of a
# word-level vocabulary into no tokens at all)
_PLAIN_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> str:
    """A shipped world's name (paths.SHIPPED_WORLDS) means its folder; anything else is passed to
    from_pretrained (a local folder, or a hub id such as `gpt2-xl`, which needs the hub)."""
    shipped = SHIPPED_WORLDS.get(str(name_or_path))
    return str(shipped) if shipped is not None else str(name_or_path)


def looks_local(name: str) -> bool:
    """A path rather than a hub id ("owner/name" or "name"): absolute, relative with ./ or ../,
    home-relative, or with more than one separator."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


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
    if not local.exists() and looks_local(path):
        # never ask the hub for what is meant as a folder (it retries for half a minute)
        raise FileNotFoundError(f"{local}: no such model folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **({"dtype": dtype} if dtype else {}))
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OSError(f"{path}: cannot load the model ({first})") from exc
    model.to(device)
    model.eval()
    tokenizer = load_tokenizer(path)
    if tokenizer.pad_token_id is None:
        # GPT-2 style tokenizers have no pad token; scoring pads on the right and masks it.
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _local(path: str | os.PathLike[str] | None) -> Path | None:
    if path is None:
        return None
    p = Path(resolve_model_path(path))
    return p.resolve() if p.exists() else None


def check_output_dir(
    out_dir: str | os.PathLike[str],
    source: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Refuse, before any work, an output folder that is the input model's, an existing file,
    an existing non-empty folder (unless `overwrite`), or one that cannot be created."""
    out = Path(out_dir)
    src = _local(source)
    if src is not None and out.exists() and out.resolve() == src:
        raise OutputError(f"{out} is the input model's folder; write the result elsewhere")
    if out.is_file():
        raise OutputError(f"{out} is an existing file, not a folder for a model")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    writable_parent(out)
    return out


def _saved_tensor(folder: Path, name: str) -> torch.Tensor | None:
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            if name in st.keys():
                return st.get_tensor(name)
    return None


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | os.PathLike[str],
    source: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    verify: Sequence[str] = (),
) -> Path:
    """save_pretrained (safetensors) and the tokenizer; the JSON and text files of the `source`
    folder that save_pretrained does not write (a world's world.json, build.json and corpus.txt,
    say) come along, so the saved model is the same kind of folder as the one it was loaded
    from (and a world's statistics are read from the same text).

    Written into a temporary folder beside `out_dir`, checked (config present; the parameters
    named in `verify` read back bit for bit), then renamed into place: a crash or a failed
    check leaves whatever was at `out_dir` before, and `out_dir` is never the source folder."""
    out = check_output_dir(out_dir, source, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        written = {f.name for f in tmp.iterdir()}
        src = _local(source)
        if src is not None and src.is_dir():
            for f in sorted([*src.glob("*.json"), *src.glob("*.txt")]):
                if f.name not in written:
                    shutil.copy(f, tmp / f.name)
        if not (tmp / "config.json").is_file():
            raise OSError(f"{out}: the model's config.json was not written")
        state = model.state_dict()
        for name in verify:
            saved = _saved_tensor(tmp, name)
            if saved is None or not torch.equal(saved, state[name].detach().cpu()):
                raise OSError(f"{out}: {name} did not read back as written")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a model folder is an ordinary one
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
