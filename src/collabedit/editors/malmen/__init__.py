"""MALMEN (Tan, Zhang, Fu, ICLR 2024): `malmen`, a meta-learned hypernetwork editor."""

from collabedit.editors import register
from collabedit.editors.malmen.config import PRESETS, MalmenConfig
from collabedit.editors.malmen.editor import Malmen, MalmenSession
from collabedit.editors.malmen.hypernet import (
    HypernetError,
    HypernetInfo,
    MalmenNets,
    load_hypernet,
)

register(Malmen)

__all__ = [
    "PRESETS",
    "HypernetError",
    "HypernetInfo",
    "Malmen",
    "MalmenConfig",
    "MalmenNets",
    "MalmenSession",
    "load_hypernet",
]
