"""The world's text corpus, for covariance statistics (registered by name in stats.CORPORA)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from collabedit.paths import DEFAULT_WORLD_DIR
from collabedit.world.generator import World
from collabedit.world.store import CORPUS_FILE, WORLD_FILE, is_world_dir


def world_sentences(model_dir: Path | None) -> Iterator[str]:
    """The text of the world in `model_dir` (a world folder), else the shipped one: its corpus
    file (fact sentences mixed with general text) when the world has one, else every fact
    sentence."""
    folder = model_dir if model_dir is not None and is_world_dir(model_dir) else DEFAULT_WORLD_DIR
    corpus = folder / CORPUS_FILE
    if corpus.is_file():
        with corpus.open(encoding="utf-8") as lines:
            yield from (line.rstrip("\n") for line in lines if line.strip())
    else:
        yield from World.load(folder / WORLD_FILE).sentences()
