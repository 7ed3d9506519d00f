"""ClientUpdate: what one client sends for one round, as one safetensors file.

Per edited layer: P_i = R_i K_i^T and S_i = K_i K_i^T (what CollabEdit needs) and/or the client's
local delta Delta_i (what the baselines need). The metadata names the base model by fingerprint;
loading validates everything, so a bad update is rejected whole before anything is merged.

Instead of P and S a layer may carry the factors F = K Q and G = R Q (collab/transport.py), which
are smaller when the client has fewer edits than d_in; loading then fills P = G F^T and S = F F^T,
so everything downstream reads P and S whichever form was sent. Files with factors are written as
format version 2, so an older reader refuses them by version instead of reporting a missing P;
files without factors are still version 1, byte for byte as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, Json, ValidationError
from safetensors import SafetensorError, safe_open

from collabedit import io
from collabedit.collab.transport import check_factors, factorise, should_factorise
from collabedit.linalg import NotSymmetricError, check_symmetric

FORMAT = "collabedit-client-update"
FORMAT_VERSION = 2
_READABLE_VERSIONS = ("1", "2")
_KINDS = ("P", "S", "delta", "F", "G")


class UpdateError(ValueError):
    """An update that cannot be merged; the message names the file and the problem."""


@dataclass
class LayerUpdate:
    P: torch.Tensor | None = None
    S: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    F: torch.Tensor | None = None  # d_in x n; when set, F and G are what is saved, not P and S
    G: torch.Tensor | None = None  # d_out x n

    @property
    def is_factor(self) -> bool:
        return self.F is not None or self.G is not None

    def p_and_s(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, S) from whichever form this layer carries, in float64."""
        if self.P is not None and self.S is not None:
            return self.P.double(), self.S.double()
        if self.F is not None and self.G is not None:
            F = self.F.double()
            return self.G.double() @ F.T, F @ F.T
        raise ValueError("layer carries neither P and S nor F and G")


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
    # rows of keys in S when more than the edits (cover keys, collab/mitigations.py); None = n_edits
    n_keys: int | None = None

    @property
    def key_rows(self) -> int:
        """How many keys S is the sum of: what the server's rank and norm bounds count."""
        return self.n_edits if self.n_keys is None else self.n_keys

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
        form: Literal["full", "factor", "auto"] = "full",
        generator: torch.Generator | None = None,
        n_edits: int | None = None,
        **kw,
    ) -> ClientUpdate:
        """keys[layer] is (n, d_in), residuals[layer] is (n, d_out), as an editor returns them.

        form "factor" sends F and G instead of P and S, "auto" does so for the layers where that
        is smaller. `generator` draws the mixing matrices Q; by default a freshly seeded one, so
        Q is not predictable from anything the server knows."""
        if form not in ("full", "factor", "auto"):
            raise ValueError(f"unknown form {form!r}; known: full, factor, auto")
        if generator is None and form != "full":
            generator = torch.Generator()
            generator.seed()
        layers = {}
        n = None
        for layer, K in keys.items():
            R = residuals[layer]
            if K.shape[0] != R.shape[0]:
                raise ValueError(f"layer {layer}: {K.shape[0]} keys but {R.shape[0]} residuals")
            n = K.shape[0]
            K64, R64 = K.double(), R.double()
            delta = None if deltas is None else deltas[layer].double()
            factor = form == "factor" or (
                form == "auto" and n > 0 and should_factorise(K.shape[1], R.shape[1], n)
            )
            if factor:
                F, G = factorise(K64.T, R64.T, generator)
                layers[layer] = LayerUpdate(delta=delta, F=F, G=G)
            else:
                layers[layer] = LayerUpdate(P=R64.T @ K64, S=K64.T @ K64, delta=delta)
        n = n or 0
        if n_edits is not None and n_edits != n:
            # an editor with several key rows per edit (MALMEN: one per answer token)
            if n_edits > n:
                raise ValueError(f"{n_edits} edits but only {n} key rows")
            kw["n_keys"] = n
        return cls(
            base_fingerprint, client_id, round, n_edits if n_edits is not None else n, layers, **kw
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        tensors = {}
        for layer, lu in self.layers.items():
            # a loaded factor layer also holds the P and S derived from it; sending those too
            # would defeat the point and make the file a mix that loading refuses
            kinds = ("F", "G", "delta") if lu.is_factor else ("P", "S", "delta")
            for kind in kinds:
                t = getattr(lu, kind)
                if t is not None:
                    tensors[f"layer.{layer}.{kind}"] = t.contiguous()
        any_factor = any(lu.is_factor for lu in self.layers.values())
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION if any_factor else 1),
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
        if self.n_keys is not None:
            meta["n_keys"] = str(self.n_keys)
        io.write_safetensors(path, tensors, meta)


class UpdateMeta(BaseModel):
    """The metadata of an update file, parsed in one place: every field typed and bounded, so a
    malformed file is one update's rejection with the field named, never a crash of the round."""

    model_config = ConfigDict(extra="ignore", str_max_length=4096)

    format: Literal["collabedit-client-update"]
    format_version: Literal["1", "2"]
    base_fingerprint: str = Field(min_length=1, max_length=128)
    client_id: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
    round: int = Field(ge=0)
    n_edits: int = Field(ge=0)
    n_keys: int | None = Field(None, ge=0)
    layers: Json[list[int]]
    modules: Json[dict[int, str]] = Field(default_factory=dict)
    editor: str = Field("", max_length=200)
    created_at: float = 0.0
    extra: Json[dict[str, Any]] = Field(default_factory=dict)

    @classmethod
    def parse(cls, meta: dict[str, str], fail) -> UpdateMeta:
        if meta.get("format") != FORMAT:
            raise fail("not a collabedit client update")
        if meta.get("format_version") not in _READABLE_VERSIONS:
            raise fail(
                f"format version {meta.get('format_version')} is not one of "
                f"{', '.join(_READABLE_VERSIONS)}"
            )
        try:
            parsed = cls.model_validate(meta)
        except ValidationError as exc:
            problems = "; ".join(
                f"metadata field {'.'.join(map(str, e['loc'])) or '?'}: {e['msg']}"
                for e in exc.errors(include_url=False, include_input=False)
            )
            raise fail(problems) from None
        if parsed.n_keys is not None and parsed.n_keys < parsed.n_edits:
            raise fail(f"metadata field n_keys: {parsed.n_keys} keys for {parsed.n_edits} edits")
        return parsed


def payload_sha256(update: ClientUpdate) -> str:
    """Hash of the tensors alone (names, dtypes, shapes, bytes): the same payload relabelled with
    another client id, round or fingerprint has the same hash."""
    h = hashlib.sha256()
    for layer in sorted(update.layers):
        lu = update.layers[layer]
        kinds = ("F", "G", "delta") if lu.is_factor else ("P", "S", "delta")
        for kind in kinds:
            t = getattr(lu, kind)
            if t is None:
                continue
            t = t.detach().contiguous()
            h.update(f"{layer}.{kind}.{t.dtype}.{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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

    if not path.is_file():
        raise fail("cannot read (no such file)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = UpdateMeta.parse(f.metadata() or {}, fail)
            names = set(f.keys())
            layers = {}
            for layer in meta.layers:
                lu = LayerUpdate(
                    **{
                        k: f.get_tensor(f"layer.{layer}.{k}")
                        for k in _KINDS
                        if f"layer.{layer}.{k}" in names
                    }
                )
                layers[layer] = lu
            known = {f"layer.{layer}.{k}" for layer in meta.layers for k in _KINDS}
            if names - known:
                raise fail(f"tensors of no declared layer: {', '.join(sorted(names - known))}")
    except SafetensorError as exc:
        raise fail(f"unreadable safetensors file ({exc})") from None
    except OSError as exc:
        raise fail(f"cannot read ({exc.strerror or exc})") from None
    update = ClientUpdate(
        base_fingerprint=meta.base_fingerprint,
        client_id=meta.client_id,
        round=meta.round,
        n_edits=meta.n_edits,
        layers=layers,
        modules=meta.modules,
        editor=meta.editor,
        created_at=meta.created_at,
        extra=meta.extra,
        n_keys=meta.n_keys,
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
        if lu.is_factor:
            if lu.P is not None or lu.S is not None:
                raise fail(f"layer {layer}: mixes P/S with F/G (send one form per layer)")
            if lu.F is None or lu.G is None:
                missing = "G" if lu.G is None else "F"
                raise fail(f"layer {layer}: missing {missing} (F and G are sent together)")
            try:
                check_factors(lu.F, lu.G)
            except ValueError as exc:
                raise fail(f"layer {layer}: {exc}") from None
            lu.P, lu.S = lu.p_and_s()
            # finite factors can still overflow in the products
            for kind in ("P", "S"):
                if not torch.isfinite(getattr(lu, kind)).all():
                    raise fail(f"layer {layer} {kind} (from F, G): non-finite values")
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
            # F and G first, so a wrong factor is named rather than the P or S derived from it
            for kind, rows in (("F", d_in), ("G", d_out)):
                t = getattr(lu, kind)
                if t is not None and t.shape[0] != rows:
                    raise fail(
                        f"layer {layer} {kind}: shape {tuple(t.shape)}, expected {rows} rows"
                    )
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
