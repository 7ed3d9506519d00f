"""MEMIT (Meng et al. 2023): `memit` (sequential layers) and `memit-frozen`."""

from collabedit.editors.memit.config import MemitConfig, from_easyedit_yaml, preset
from collabedit.editors.memit.editor import EditResult, LayerEdit, edit

__all__ = ["EditResult", "LayerEdit", "MemitConfig", "edit", "from_easyedit_yaml", "preset"]
