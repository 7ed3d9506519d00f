"""Where a world lives on disk and how it is built: one folder that is at once a Hugging Face model
folder (config.json, model.safetensors, tokenizer files) and the world's description (world.json)
plus how it was built and how well it recalls (build.json)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from collabedit.paths import resolve_world
from collabedit.world.generator import World, WorldSpec, generate_world
from collabedit.world.tokenizer import build_tokenizer
from collabedit.world.train import TrainConfig, measure_recall, train_world_model

WORLD_FILE = "world.json"
BUILD_FILE = "build.json"
CORPUS_FILE = "corpus.txt"  # optional: the world's text for covariance statistics
# Written into a world model's config: the preset each editor uses on a world by default. The
# attribute name is editors.base.PRESETS_ATTR, repeated here so that neither package needs the
# other.
PRESETS_ATTR = "collabedit_presets"
WORLD_PRESETS = {"*": "world"}  # every editor's preset named "world", where it has one


@dataclass
class WorldBundle:
    world: World
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    build: dict
    path: Path


def is_world_dir(path: Path) -> bool:
    return (Path(path) / WORLD_FILE).is_file()


def load_world(path: str | os.PathLike[str] | None = None) -> WorldBundle:
    """Load a world folder or a shipped world by name (default: the shipped `world`)."""
    folder = resolve_world(path)
    if not is_world_dir(folder):
        raise FileNotFoundError(
            f"{folder} is not a world folder (no {WORLD_FILE}); build one with "
            "`collabedit world build --out DIR`"
        )
    world = World.load(folder / WORLD_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    if not getattr(model.config, PRESETS_ATTR, None):  # worlds built before it was written
        setattr(model.config, PRESETS_ATTR, dict(WORLD_PRESETS))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    build_path = folder / BUILD_FILE
    build = json.loads(build_path.read_text()) if build_path.is_file() else {}
    return WorldBundle(world, model, tokenizer, build, folder)


def checkpoint_path(out: Path) -> Path:
    return Path(out).parent / f".{Path(out).name}.checkpoint.pt"


def build_world(
    out: str | os.PathLike[str],
    spec: WorldSpec | None = None,
    train: TrainConfig | None = None,
    on_step: Callable[[int, int, int, float], None] | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> WorldBundle:
    """Generate, tokenize, train, measure recall on every fact and phrasing, save atomically.

    Training state is saved after every epoch beside `out` (``.<name>.checkpoint.pt``); a build
    that was stopped continues from there when run again with the same settings."""
    spec = spec or WorldSpec()
    train = train or TrainConfig()
    world = generate_world(spec)
    tokenizer = build_tokenizer(world.vocabulary_text())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_path(out)
    model, history = train_world_model(world, tokenizer, train, on_step, on_epoch, ckpt)
    train_seconds = sum(h["seconds"] for h in history)  # across resumed runs too
    recall = measure_recall(model, tokenizer, world)
    build = {
        "spec": spec.model_dump(),
        "train": train.model_dump(),
        "history": history,
        "train_seconds": train_seconds,
        "recall": recall["recall"],
        "min_phrasing_recall": recall["min_phrasing_recall"],
        "recall_by_phrasing": recall["by_phrasing"],
        "recall_prompts": recall["n"],
        "n_parameters": sum(p.numel() for p in model.parameters()),
    }
    save_world(out, world, model, tokenizer, build, WORLD_PRESETS)
    ckpt.unlink(missing_ok=True)
    return load_world(out)  # what was written, with its folder as the model's name_or_path


def save_world(
    out: Path,
    world: World,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    build: dict,
    presets: dict[str, str],
    texts: dict[str, str] | None = None,
) -> None:
    """Write a world folder atomically: the model with the editors' `presets` for it (read by
    Editor.default_config), tokenizer, world.json, build.json and any extra text files."""
    setattr(model.config, PRESETS_ATTR, dict(presets))
    # Build into a sibling temp folder and swap it in, so a crash never leaves half a world.
    tmp = Path(tempfile.mkdtemp(prefix=".world-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        world.save(tmp / WORLD_FILE)
        (tmp / BUILD_FILE).write_text(json.dumps(build, indent=1) + "\n")
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        # mkdtemp makes a private folder; a shipped world must be readable by everyone
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
