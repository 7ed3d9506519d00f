"""ClientUpdate: what one client sends for one round, as one safetensors file.

Per edited layer: P_i = R_i K_i^T and S_i = K_i K_i^T (what CollabEdit needs) and/or the client's
local delta Delta_i (what the baselines need). The metadata names the base model by fingerprint;
loading validates everything, so a bad update is rejected whole before anything is merged.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from collabedit.linalg import NotSymmetricError, check_symmetric

FORMAT = "collabedit-client-update"
FORMAT_VERSION = 1
_KINDS = ("P", "S", "delta")


class UpdateError(ValueError):
    """An update that cannot be merged; the message names the file and the problem."""


@dataclass
class LayerUpdate:
    P: torch.Tensor | None = None
    S: torch.Tensor | None = None
    delta: torch.Tensor | None = None


@dataclass
class ClientUpdate:
    base_fingerprint: str
    client_id: str
    round: int
    n_edits: int
    layers: dict[int, LayerUpdate]
    modules: dict[int, str] = field(default_factory=dict)
    editor: str = "memit-frozen"
    created_at: float = field(default_factory=time.time)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_keys_residuals(
        cls,
        keys: dict[int, torch.Tensor],
        residuals: dict[int, torch.Tensor],
        *,
        base_fingerprint: str,
        client_id: str,
        round: int,
        deltas: dict[int, torch.Tensor] | None = None,
        **kw,
    ) -> ClientUpdate:
        """keys[layer] is (n, d_in), residuals[layer] is (n, d_out), as an editor returns them."""
        layers = {}
        n = None
        for layer, K in keys.items():
            R = residuals[layer]
            if K.shape[0] != R.shape[0]:
                raise ValueError(f"layer {layer}: {K.shape[0]} keys but {R.shape[0]} residuals")
            n = K.shape[0]
            K64, R64 = K.double(), R.double()
            layers[layer] = LayerUpdate(
                P=R64.T @ K64,
                S=K64.T @ K64,
                delta=None if deltas is None else deltas[layer].double(),
            )
        return cls(base_fingerprint, client_id, round, n or 0, layers, **kw)

    def save(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        tensors = {}
        for layer, lu in self.layers.items():
            for kind in _KINDS:
                t = getattr(lu, kind)
                if t is not None:
                    tensors[f"layer.{layer}.{kind}"] = t.contiguous()
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "base_fingerprint": self.base_fingerprint,
            "client_id": self.client_id,
            "round": str(self.round),
            "n_edits": str(self.n_edits),
            "layers": json.dumps(sorted(self.layers)),
            "modules": json.dumps({str(k): v for k, v in self.modules.items()}),
            "editor": self.editor,
            "created_at": repr(self.created_at),
            "extra": json.dumps(self.extra),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@dataclass(frozen=True)
class Expectation:
    """What the server requires of every update this round."""

    base_fingerprint: str
    shapes: dict[int, tuple[int, int]]  # layer -> (d_out, d_in)
    needs: tuple[str, ...] = ("P", "S")
    round: int | None = None


def load_update(
    path: str | os.PathLike[str], expect: Expectation | None = None, symmetry_rtol: float = 1e-6
) -> ClientUpdate:
    """Read and validate an update; raises UpdateError naming the file and what is wrong."""
    path = Path(path)

    def fail(msg: str) -> UpdateError:
        return UpdateError(f"{path}: {msg}")

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise fail("not a collabedit client update")
            if meta.get("format_version") != str(FORMAT_VERSION):
                raise fail(f"format version {meta.get('format_version')} is not {FORMAT_VERSION}")
            names = set(f.keys())
            layers_list = json.loads(meta["layers"])
            layers = {}
            for layer in layers_list:
                lu = LayerUpdate(
                    **{
                        k: f.get_tensor(f"layer.{layer}.{k}")
                        for k in _KINDS
                        if f"layer.{layer}.{k}" in names
                    }
                )
                layers[int(layer)] = lu
    except SafetensorError as exc:
        raise fail(f"unreadable safetensors file ({exc})") from None
    except (KeyError, json.JSONDecodeError) as exc:
        raise fail(f"bad metadata ({exc})") from None
    update = ClientUpdate(
        base_fingerprint=meta["base_fingerprint"],
        client_id=meta["client_id"],
        round=int(meta["round"]),
        n_edits=int(meta["n_edits"]),
        layers=layers,
        modules={int(k): v for k, v in json.loads(meta.get("modules", "{}")).items()},
        editor=meta.get("editor", ""),
        created_at=float(meta.get("created_at", "0")),
        extra=json.loads(meta.get("extra", "{}")),
    )
    for layer, lu in layers.items():
        for kind in _KINDS:
            t = getattr(lu, kind)
            if t is None:
                continue
            if t.dtype not in (torch.float32, torch.float64):
                raise fail(f"layer {layer} {kind}: dtype {t.dtype} (float32/float64 expected)")
            if not torch.isfinite(t).all():
                raise fail(f"layer {layer} {kind}: non-finite values")
        if lu.S is not None:
            try:
                check_symmetric(lu.S.double(), "S", rtol=symmetry_rtol)
            except NotSymmetricError as exc:
                raise fail(f"layer {layer}: {exc}") from None
    if expect is not None:
        if update.base_fingerprint != expect.base_fingerprint:
            raise fail(
                f"made for base model {update.base_fingerprint}, "
                f"the server's is {expect.base_fingerprint}"
            )
        if expect.round is not None and update.round != expect.round:
            raise fail(f"round {update.round}, the server expects round {expect.round}")
        if set(layers) != set(expect.shapes):
            raise fail(f"layers {sorted(layers)}, the server edits {sorted(expect.shapes)}")
        for layer, (d_out, d_in) in expect.shapes.items():
            lu = layers[layer]
            want = {"P": (d_out, d_in), "S": (d_in, d_in), "delta": (d_out, d_in)}
            for kind in expect.needs:
                t = getattr(lu, kind)
                if t is None:
                    raise fail(f"layer {layer}: missing {kind}")
            for kind, shape in want.items():
                t = getattr(lu, kind)
                if t is not None and tuple(t.shape) != shape:
                    raise fail(f"layer {layer} {kind}: shape {tuple(t.shape)}, expected {shape}")
    return update
