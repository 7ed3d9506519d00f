"""Where the package keeps its data; imported by layers that must not import each other."""

from __future__ import annotations

import os
from pathlib import Path

# the embedded world shipped inside the package (`--model world`)
DEFAULT_WORLD_DIR = Path(__file__).resolve().parent / "world" / "default"
# every world shipped inside the package, by the name `--model` and `--world` take. `world-v1`
# names the first world (one edited layer, one-token attention below it) for good: today it is
# also `world`; when a realistic world becomes `world` (issue 17), `world-v1` keeps meaning this
# one, and what is tested on it by that name keeps testing the same model.
SHIPPED_WORLDS = {"world": DEFAULT_WORLD_DIR, "world-v1": DEFAULT_WORLD_DIR}


def resolve_world(name_or_path: str | os.PathLike[str] | None = None) -> Path:
    """A shipped world's folder by its name (None: `world`), else the path as given."""
    if name_or_path is None:
        return DEFAULT_WORLD_DIR
    return SHIPPED_WORLDS.get(str(name_or_path), Path(name_or_path))
