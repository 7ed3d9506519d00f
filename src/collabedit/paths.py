"""Where the package keeps its data; imported by layers that must not import each other."""

from pathlib import Path

# the embedded world shipped inside the package (`--model world`)
DEFAULT_WORLD_DIR = Path(__file__).resolve().parent / "world" / "default"
