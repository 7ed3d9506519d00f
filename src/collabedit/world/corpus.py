"""The world's text corpus, for covariance statistics (registered by name in stats.CORPORA)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from collabedit.paths import DEFAULT_WORLD_DIR
from collabedit.world.generator import World
from collabedit.world.store import WORLD_FILE, is_world_dir


def world_sentences(model_dir: Path | None) -> Iterator[str]:
    """Every fact sentence of the world in `model_dir` (a world folder), else the shipped one."""
    folder = model_dir if model_dir is not None and is_world_dir(model_dir) else DEFAULT_WORLD_DIR
    yield from World.load(folder / WORLD_FILE).sentences()
