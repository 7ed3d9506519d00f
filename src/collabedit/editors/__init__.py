"""Knowledge-editing back-ends, registered by name (peft/mergekit style).

A back-end is one folder here (or a module of a plugin package) with its config type and an
`Editor` subclass, registered with `register`. Nothing outside that folder names it: the CLI,
the collaboration round, Flower and the experiments look editors up here.

Plugins outside this package register the same way. They are found through the entry-point group
`collabedit.editors` of installed packages, or the modules named in the environment variable
`COLLABEDIT_PLUGINS` (comma-separated; useful for experiments and tests, and inherited by the
processes a Flower simulation starts). Either is imported the first time the registry is read.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from collabedit.defaults import DEFAULT_EDITOR, DEFAULT_SINGLE_EDITOR, FIDELITY_EDITORS
from collabedit.editors.base import (
    Editor,
    EditorConfig,
    EditResult,
    EditSession,
    LayerEdit,
    LayerInputs,
    Progress,
    closed_form_edit,
)
from collabedit.requests import EditRequest

PLUGINS_ENV = "COLLABEDIT_PLUGINS"
ENTRY_POINT_GROUP = "collabedit.editors"

_REGISTRY: dict[str, Editor] = {}
_loaded: set[str] = set()


def register(editor: Editor | type[Editor]) -> Editor:
    """Add an editor under its `name`; registering the same class again is a no-op."""
    inst = editor() if isinstance(editor, type) else editor
    old = _REGISTRY.get(inst.name)
    if old is not None and type(old) is not type(inst):
        raise ValueError(f"an editor named {inst.name!r} is already registered ({type(old)})")
    _REGISTRY[inst.name] = inst
    return inst


def _load_plugins() -> None:
    names = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    for module in names:
        if module not in _loaded:
            _loaded.add(module)
            importlib.import_module(module)
    key = f"entry-points:{ENTRY_POINT_GROUP}"
    if key not in _loaded:
        _loaded.add(key)
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            obj = ep.load()
            if isinstance(obj, Editor) or (isinstance(obj, type) and issubclass(obj, Editor)):
                register(obj)


def _builtins() -> None:
    # the built-in back-ends register themselves when their folder is imported
    import collabedit.editors.malmen  # noqa: F401
    import collabedit.editors.memit  # noqa: F401


# the built-in editors in the order they are listed, whichever module was imported first;
# plugins follow in the order they registered
BUILTIN_ORDER = ("memit", "memit-frozen", "malmen")


def registry() -> dict[str, Editor]:
    _builtins()
    _load_plugins()
    names = [n for n in BUILTIN_ORDER if n in _REGISTRY]
    names += [n for n in _REGISTRY if n not in BUILTIN_ORDER]
    return {n: _REGISTRY[n] for n in names}


def names() -> list[str]:
    return list(registry())


def get_editor(name: str) -> Editor:
    editors = registry()
    if name not in editors:
        raise ValueError(f"unknown editor {name!r}; known: {', '.join(editors)}")
    return editors[name]


def make_config(
    editor: Editor,
    model: PreTrainedModel,
    preset: str | None = None,
    hparams: Path | None = None,
    layers: Sequence[int] | None = None,
    overrides: dict | None = None,
) -> EditorConfig:
    """A preset (or the model's default), then a hyper-parameter file, then `overrides` and
    `layers`, then what the model's folder provides; validated against the model. Raises
    ValueError with the reason."""
    cfg = editor.preset(preset) if preset else editor.default_config(model)
    if hparams:
        cfg = editor.read_hparams(Path(hparams), cfg)
    update = dict(overrides or {})
    if layers:
        update["layers"] = list(layers)
    if update:
        cfg = editor.config_type(**(cfg.model_dump() | update))
    cfg = editor.fill_from_model(model, cfg)
    return cfg.model_copy(update={"layers": editor.layers(model, cfg)})


def apply_edits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    editor: str = DEFAULT_SINGLE_EDITOR,
    config: EditorConfig | None = None,
    apply: bool = True,
    progress: Progress = None,
    cache_dir: Path | None = None,
    **session_kw,
) -> EditResult:
    """Global-Edit in one call: the editor's regulariser (cached), a session, the closed-form
    edit (in place when `apply`). `session_kw` go to the editor's session (e.g. MEMIT's `z`)."""
    ed = get_editor(editor)
    cfg = make_config(ed, model) if config is None else config
    cfg = cfg.model_copy(update={"layers": ed.layers(model, cfg)})
    a0 = ed.regulariser(model, tokenizer, cfg, cache_dir=cache_dir, progress=progress)
    session = ed.session(model, tokenizer, requests, cfg, progress=progress, **session_kw)
    return closed_form_edit(session, a0, apply=apply)


__all__ = [
    "DEFAULT_EDITOR",
    "DEFAULT_SINGLE_EDITOR",
    "FIDELITY_EDITORS",
    "EditResult",
    "EditSession",
    "Editor",
    "EditorConfig",
    "LayerEdit",
    "LayerInputs",
    "apply_edits",
    "closed_form_edit",
    "get_editor",
    "make_config",
    "names",
    "register",
    "registry",
]
