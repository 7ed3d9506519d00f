"""Where the package keeps its data; imported by layers that must not import each other."""

from __future__ import annotations

import os
from pathlib import Path

_WORLDS = Path(__file__).resolve().parent / "world"
# the embedded world shipped inside the package (`--model world`), built by the realistic recipe
DEFAULT_WORLD_DIR = _WORLDS / "default"
# every world shipped inside the package, by the name `--model` and `--world` take, the older
# ones kept for comparison: `world-v1` is the first (one edited layer, one-token attention below
# it), `world-v2` the first realistic one (its layers 1-2 write almost nothing at the subject, so
# MEMIT's updates there are 50-160 x the weight)
SHIPPED_WORLDS = {
    "world": DEFAULT_WORLD_DIR,
    "world-v1": _WORLDS / "v1",
    "world-v2": _WORLDS / "v2",
}
# how help texts name them: "'world' (the default), 'world-v1' or 'world-v2'"
_quoted = [f"'{name}'" + (" (the default)" if name == "world" else "") for name in SHIPPED_WORLDS]
SHIPPED_WORLD_NAMES = ", ".join(_quoted[:-1]) + " or " + _quoted[-1]


def resolve_world(name_or_path: str | os.PathLike[str] | None = None) -> Path:
    """A shipped world's folder by its name (None: `world`), else the path as given."""
    if name_or_path is None:
        return DEFAULT_WORLD_DIR
    return SHIPPED_WORLDS.get(str(name_or_path), Path(name_or_path))
