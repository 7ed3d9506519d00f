"""MEMIT (Meng et al. 2023): `memit` (sequential layers) and `memit-frozen`."""

from collabedit.editors import register
from collabedit.editors.memit.config import MemitConfig, from_easyedit_yaml, preset
from collabedit.editors.memit.editor import Memit, MemitFrozen, MemitSession, edit

register(Memit)
register(MemitFrozen)

__all__ = [
    "Memit",
    "MemitConfig",
    "MemitFrozen",
    "MemitSession",
    "edit",
    "from_easyedit_yaml",
    "preset",
]
