"""MALMEN's hypernetwork (Tan, Zhang, Fu, ICLR 2024), written from the paper's description.

For each edited linear layer y = W k, every cached token gives its key k (the layer's input) and
its value gradient g = dL/dy of the edit loss. The network maps (k, g) to a pseudo key k~ and a
pseudo gradient g~, and the token's pseudo value difference is d = -lr * <k, k~> * g~ (lr learned
per layer). The layer's shift then solves the ridge normal equation over all tokens of all edits:
Delta = D^T U (kappa I + U^T U)^-1, kappa = exp(lambda) learned per layer — the closed form every
editor here shares (editors/base.py), with A0 = kappa I.

Layers of one shape share a network; per-layer scale and shift embeddings tell them apart. Inputs
are standardised with statistics gathered during training; at edit time the statistics are
frozen, so a token's pseudo value difference depends on that token alone — which is what makes
the clients' sums add up exactly to one party's edit of all requests (the authors' code keeps
updating them while editing, so an edit there depends on which requests share its batch).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from collabedit import io
from collabedit.models import arch

WEIGHTS_FILE = "hypernet.safetensors"
INFO_FILE = "malmen.json"
FORMAT = "collabedit-malmen-hypernet"


class HypernetError(ValueError):
    """A hypernetwork folder that cannot be used with this model; the message says why."""


class Normaliser(nn.Module):
    """Per-feature standardisation with running statistics (Chan et al.'s parallel update)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("n", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("m2", torch.zeros(size))  # sum of squared deviations

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.to(self.mean.dtype)
        k = x.shape[0]
        if k == 0:
            return
        n = self.n + k
        mean_x = x.mean(0)
        delta = mean_x - self.mean
        self.m2 += ((x - mean_x) ** 2).sum(0) + delta**2 * self.n * k / n
        self.mean += delta * k / n
        self.n.copy_(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(x.dtype).eps
        std = (self.m2 / (self.n - 1).clamp_min(1)).sqrt()
        return (x - self.mean) / (std + eps)


class Block(nn.Module):
    """x + scale_l * relu(x A B + b) + shift_l: a low-rank residual block with per-layer affine
    modulation. B starts at zero, so an untrained block is the identity."""

    def __init__(self, size: int, rank: int, n_modules: int) -> None:
        super().__init__()
        # the authors draw A from N(0, 1); 1/sqrt(size) keeps x A at x's scale, so the first
        # steps of B do not have to undo a factor sqrt(size)
        self.A = nn.Parameter(torch.randn(size, rank) / size**0.5)
        self.B = nn.Parameter(torch.zeros(rank, size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.scale = nn.Parameter(torch.ones(n_modules, size))
        self.shift = nn.Parameter(torch.zeros(n_modules, size))

    def forward(self, x: torch.Tensor, module: int) -> torch.Tensor:
        h = (x @ self.A @ self.B + self.bias).clamp_min(0)
        return x + self.scale[module] * h + self.shift[module]


class HyperNet(nn.Module):
    """One network for the edited layers of one shape (d_in keys, d_out values)."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_blocks: int, n_modules: int, lr: float):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.normaliser = Normaliser(d_in + d_out)
        self.blocks = nn.ModuleList(Block(d_in + d_out, rank, n_modules) for _ in range(n_blocks))
        self.lr = nn.Parameter(torch.full((n_modules,), float(lr)))
        self.log_kappa = nn.Parameter(torch.zeros(n_modules))

    def forward(self, keys: torch.Tensor, grads: torch.Tensor, module: int) -> torch.Tensor:
        """(rows, d_out) pseudo value differences of the rows' keys and value gradients."""
        h = self.normaliser(torch.cat([keys, grads], -1))
        for block in self.blocks:
            h = block(h, module)
        pseudo_keys, pseudo_grads = h.split([self.d_in, self.d_out], -1)
        coeff = -self.lr[module] * (keys * pseudo_keys).sum(-1, keepdim=True)
        return coeff * pseudo_grads


@dataclass(frozen=True)
class Slot:
    net: str  # key into MalmenNets.nets
    module: int  # index among the layers sharing that net


@dataclass
class HypernetInfo:
    """What a hypernetwork folder says about itself besides its weights."""

    layers: list[int]
    rank: int
    n_blocks: int
    lr: float
    base_fingerprint: str
    trained_subjects: list[str] = field(default_factory=list)
    training: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "layers": self.layers,
            "rank": self.rank,
            "n_blocks": self.n_blocks,
            "lr": self.lr,
            "base_fingerprint": self.base_fingerprint,
            "trained_subjects": self.trained_subjects,
            "training": self.training,
        }


def _shape_key(d_in: int, d_out: int) -> str:
    return f"{d_in}x{d_out}"


class MalmenNets(nn.Module):
    """The hypernetworks of one model's edited layers: one per weight shape."""

    def __init__(
        self, shapes: dict[int, tuple[int, int]], rank: int, n_blocks: int, lr: float
    ) -> None:
        super().__init__()
        self.layers = sorted(shapes)
        counts: dict[str, int] = {}
        self.slots: dict[int, Slot] = {}
        for layer in self.layers:
            key = _shape_key(*shapes[layer])
            self.slots[layer] = Slot(key, counts.get(key, 0))
            counts[key] = counts.get(key, 0) + 1
        self.nets = nn.ModuleDict()
        for layer in self.layers:
            key = self.slots[layer].net
            if key not in self.nets:
                d_in, d_out = shapes[layer]
                self.nets[key] = HyperNet(d_in, d_out, rank, n_blocks, counts[key], lr)
        self.rank, self.n_blocks, self.lr0 = rank, n_blocks, lr

    @classmethod
    def for_model(
        cls, model: PreTrainedModel, layers: Sequence[int], rank: int, n_blocks: int, lr: float
    ) -> MalmenNets:
        shapes = {}
        for layer in layers:
            d_out, d_in = arch.read_weight(model, layer).shape
            shapes[layer] = (int(d_in), int(d_out))
        return cls(shapes, rank, n_blocks, lr)

    def net(self, layer: int) -> tuple[HyperNet, int]:
        if layer not in self.slots:
            raise HypernetError(f"the hypernetwork edits layers {self.layers}, not layer {layer}")
        slot = self.slots[layer]
        return self.nets[slot.net], slot.module

    def value_diffs(
        self, layer: int, keys: torch.Tensor, grads: torch.Tensor, batch_rows: int = 1024
    ) -> torch.Tensor:
        """(rows, d_out) pseudo value differences, `batch_rows` rows per pass."""
        net, module = self.net(layer)
        dtype = net.lr.dtype
        parts = [
            net(keys[i : i + batch_rows].to(dtype), grads[i : i + batch_rows].to(dtype), module)
            for i in range(0, keys.shape[0], batch_rows)
        ]
        return torch.cat(parts) if parts else keys.new_zeros((0, net.d_out), dtype=dtype)

    def kappa(self, layer: int) -> torch.Tensor:
        net, module = self.net(layer)
        return net.log_kappa[module].exp()

    def observe(self, layer: int, keys: torch.Tensor, grads: torch.Tensor) -> None:
        """Add rows to the input statistics (training only)."""
        net, _ = self.net(layer)
        net.normaliser.update(torch.cat([keys, grads], -1))

    def shapes(self) -> dict[int, tuple[int, int]]:
        out = {}
        for layer in self.layers:
            net, _ = self.net(layer)
            out[layer] = (net.d_in, net.d_out)
        return out

    # -- saving and loading ------------------------------------------------------------------

    def save(self, folder: str | os.PathLike[str], info: HypernetInfo) -> None:
        """Weights as safetensors and the description as JSON, each written atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().contiguous() for k, v in self.state_dict().items()}
        meta = {"format": FORMAT, "layers": json.dumps(self.layers)}
        io.write_safetensors(folder / WEIGHTS_FILE, tensors, meta)
        payload = info.to_json() | {"shapes": {str(k): list(v) for k, v in self.shapes().items()}}
        io.write_json(folder / INFO_FILE, payload)


def read_info(folder: str | os.PathLike[str]) -> tuple[HypernetInfo, dict[int, tuple[int, int]]]:
    folder = Path(folder)
    path = folder / INFO_FILE
    if not path.is_file():
        raise HypernetError(
            f"{folder} is not a MALMEN hypernetwork folder (no {INFO_FILE}); train one with "
            "`collabedit malmen train`"
        )
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise HypernetError(f"{path}: field format is {data.get('format')!r}, not {FORMAT!r}")
        info = HypernetInfo(
            layers=[int(x) for x in data["layers"]],
            rank=int(data["rank"]),
            n_blocks=int(data["n_blocks"]),
            lr=float(data["lr"]),
            base_fingerprint=str(data["base_fingerprint"]),
            trained_subjects=[str(s) for s in data.get("trained_subjects", [])],
            training=dict(data.get("training", {})),
        )
        shapes = {int(k): (int(v[0]), int(v[1])) for k, v in data["shapes"].items()}
    except HypernetError:
        raise
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise HypernetError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    return info, shapes


_CACHE: dict[tuple[str, int], tuple[MalmenNets, HypernetInfo]] = {}


def load_hypernet(folder: str | os.PathLike[str]) -> tuple[MalmenNets, HypernetInfo]:
    """A saved hypernetwork (float32, eval mode); cached by folder and file time, so every
    session of a run shares one copy. Callers must not train the returned networks."""
    folder = Path(folder).resolve()
    weights = folder / WEIGHTS_FILE
    info, shapes = read_info(folder)
    if not weights.is_file():
        raise HypernetError(f"{folder}: {WEIGHTS_FILE} is missing")
    key = (str(folder), weights.stat().st_mtime_ns)
    if key in _CACHE:
        return _CACHE[key]
    nets = MalmenNets(shapes, info.rank, info.n_blocks, info.lr)
    try:
        state = load_file(weights)
        nets.load_state_dict(state, strict=True)
    except (RuntimeError, OSError) as exc:
        raise HypernetError(f"{weights}: does not match {INFO_FILE} ({exc})") from None
    nets.eval().requires_grad_(False)
    _CACHE[key] = (nets, info)
    return nets, info


def check_tied(info: HypernetInfo, folder: str, fingerprint: str, layers: Sequence[int]) -> None:
    """A hypernetwork is trained for one base model and its layers: anything else is refused."""
    if info.base_fingerprint != fingerprint:
        raise HypernetError(
            f"the hypernetwork in {folder} was trained for the model with fingerprint "
            f"{info.base_fingerprint[:16]}…, not this one ({fingerprint[:16]}…); train one for "
            "this model with `collabedit malmen train`"
        )
    if list(layers) != list(info.layers):
        raise HypernetError(
            f"the hypernetwork in {folder} edits layers {info.layers}, not {list(layers)}"
        )
