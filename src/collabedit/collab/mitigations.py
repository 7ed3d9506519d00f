"""What a client can do to its own P_i and S_i before sending them (`client edit --cover-text`,
`--noise-scale`; the Flower client's `cover-text`, `noise-scale` node config), measured by
`collabedit bench privacy` (docs/privacy.md).

* Cover keys: keys of the client's own text that it does NOT edit, added with residual 0. They
  enter S only (P = R K^T gains nothing from a zero residual), so for the merge they are exactly
  extra regulariser: (P)(A0 + S + K_c K_c^T)^-1 — the server's solve protects the cover keys like
  preserved knowledge. They hide which keys in S are edits from an attacker who reads S alone,
  not from one who also reads P (P S^+ k_c = 0 for a cover key; see attacks.py).
* Gaussian noise: a symmetric N(0, sigma_s^2) matrix added to S (every entry on and above the
  diagonal drawn once, mirrored, so S stays exactly symmetric) and N(0, sigma_p^2) added to P.
  Noisy S is indefinite where A0 is small: the server must solve with an eigenvalue floor
  above the summed noise's spectral norm (`noise_floor`, the CollabEdit merge's `floor`).

Cover keys are counted in the update's `n_keys` (the rank of S shows their number to the server
anyway), so the server's rank and norm bounds (collab/bounds.py) still hold for a covered update.
A noisy update breaks them (noisy S has full rank and is indefinite): a server that accepts
noisy updates turns the per-update bounds off and sets its floor (`--no-bounds --param floor=`),
as under secure aggregation.

A noisy or covered update can no longer be sent in factor form (F F^T is never indefinite and
never has the cover keys' rank) and must not carry the client's local delta, which is a function
of the true P and S: the update functions recompute it from the modified P and S when given A0,
and refuse otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from collabedit.collab.update import ClientUpdate, LayerUpdate
from collabedit.linalg import solve_update
from collabedit.models import tracing


@dataclass(frozen=True)
class Mitigation:
    """A client's protections for one update: cover texts whose keys join S with zero residual,
    and Gaussian noise of `noise_scale` (units of A0's mean eigenvalue; see relative_sigmas)."""

    cover_texts: tuple[str, ...] = ()
    noise_scale: float = 0.0
    noise_seed: int | None = None  # None: a fresh seed the server cannot predict

    def __post_init__(self) -> None:
        if self.noise_scale < 0:
            raise ValueError(f"noise scale must be >= 0, got {self.noise_scale}")

    @property
    def active(self) -> bool:
        return bool(self.cover_texts) or self.noise_scale > 0


def read_cover_texts(path) -> tuple[str, ...]:
    """The non-blank lines of a cover-text file (ValueError naming the file when it has none)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the cover texts ({exc.strerror or exc})") from None
    texts = tuple(t.strip() for t in lines if t.strip())
    if not texts:
        raise ValueError(f"{path}: no cover text in it (one sentence per line)")
    return texts


@torch.no_grad()
def text_keys(model, tokenizer, texts: Sequence[str], layers: Sequence[int], batch: int = 32):
    """Keys of `layers` (the edited projections' inputs) at the last token of each text, float64
    (n, d_in) per layer: what an edit located at that token would write under."""
    device = next(model.parameters()).device
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(texts), batch):
        enc = [tokenizer(t)["input_ids"] for t in texts[start : start + batch]]
        ids, mask = tracing.pad_batch(enc, pad)
        last = torch.tensor([len(e) - 1 for e in enc])
        with tracing.capture_mlp_inputs(model, layers) as store:
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
        for layer in layers:
            out[layer].append(store[layer][torch.arange(len(enc)), last].double().cpu())
    return {layer: torch.cat(v) for layer, v in out.items()}


def protect(
    update: ClientUpdate,
    mitigation: Mitigation,
    model,
    tokenizer,
    a0: dict[int, torch.Tensor],
    keys: dict[int, torch.Tensor],
    residuals: dict[int, torch.Tensor],
) -> ClientUpdate:
    """The client round's last step: the update with the client's protections applied (cover
    keys first, then noise, whose scale is set from the client's own keys and residuals)."""
    if not mitigation.active:
        return update
    if any(lu.is_factor for lu in update.layers.values()):
        raise ValueError("a covered or noisy update is sent as full P and S, not as factors")
    has_delta = any(lu.delta is not None for lu in update.layers.values())
    a0_for_delta = a0 if has_delta else None
    if mitigation.cover_texts:
        cover = text_keys(model, tokenizer, list(mitigation.cover_texts), sorted(update.layers))
        update = add_cover_keys(update, cover, a0_for_delta)
    if mitigation.noise_scale > 0:
        sigmas = {
            layer: relative_sigmas(a0[layer], keys[layer], residuals[layer], mitigation.noise_scale)
            for layer in update.layers
        }
        update = add_noise(
            update,
            {layer: s[0] for layer, s in sigmas.items()},
            {layer: s[1] for layer, s in sigmas.items()},
            mitigation.noise_seed,
            a0_for_delta,
        )
    return update


def cover_layer(
    p: torch.Tensor, s: torch.Tensor, cover_keys: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, S + K_c^T K_c) for cover keys K_c (m, d_in): P is returned unchanged."""
    kc = cover_keys.to(s.dtype)
    if kc.dim() != 2 or kc.shape[1] != s.shape[0]:
        raise ValueError(f"cover keys of shape {tuple(kc.shape)} for S of {tuple(s.shape)}")
    return p, s + kc.T @ kc


def symmetric_noise(d: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """d x d symmetric, every entry N(0, sigma^2) (upper triangle drawn, mirrored), float64."""
    g = torch.randn(d, d, generator=generator, dtype=torch.float64) * sigma
    upper = torch.triu(g)
    return upper + torch.triu(g, diagonal=1).T


def noise_layer(
    p: torch.Tensor,
    s: torch.Tensor,
    sigma_s: float,
    sigma_p: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P + N_p, S + N_s), float64; scale 0 returns the inputs unchanged (as float64)."""
    if sigma_s < 0 or sigma_p < 0:
        raise ValueError("noise scales must be >= 0")
    p64, s64 = p.double(), s.double()
    if sigma_s > 0:
        s64 = s64 + symmetric_noise(s64.shape[0], sigma_s, generator)
    if sigma_p > 0:
        p64 = p64 + torch.randn(p64.shape, generator=generator, dtype=torch.float64) * sigma_p
    return p64, s64


def noise_floor(sigma_s: float, n_noisy_clients: int, d_in: int, margin: float = 1.5) -> float:
    """An eigenvalue floor for the server's solve: the spectral norm of the sum of n symmetric
    Gaussian matrices of entry scale sigma_s is about 2 sigma_s sqrt(n d_in) (Wigner); `margin`
    times that."""
    return margin * 2.0 * sigma_s * math.sqrt(max(n_noisy_clients, 1) * d_in)


def _rebuild(
    update: ClientUpdate,
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]],
    a0: dict[int, torch.Tensor] | None,
    note: dict,
    floors: dict[int, float] | None = None,
) -> ClientUpdate:
    has_delta = any(lu.delta is not None for lu in update.layers.values())
    if has_delta and a0 is None:
        raise ValueError(
            "the update carries the client's local delta, a function of the true P and S: pass "
            "a0 to recompute it from the modified ones, or build the update without a delta"
        )
    out = {}
    for layer, (p, s) in layers.items():
        s = (s + s.T) / 2
        # a noisy S is solved above its own noise (as the server solves the noisy sums)
        floor = (floors or {}).get(layer, 0.0)
        delta = (
            solve_update(p, a0[layer].double() + s, floor)
            if has_delta and a0 is not None
            else None
        )
        out[layer] = LayerUpdate(P=p, S=s, delta=delta)
    extra = dict(update.extra)
    extra.setdefault("privacy", []).append(note)
    return replace(update, layers=out, extra=extra)


def add_cover_keys(
    update: ClientUpdate,
    cover_keys: dict[int, torch.Tensor],
    a0: dict[int, torch.Tensor] | None = None,
) -> ClientUpdate:
    """The update with cover keys (per layer, (m, d_in), zero residual) added to every S.
    n_edits stays the number of real edits, n_keys counts the cover keys too;
    `extra["privacy"]` records the cover count."""
    layers = {}
    for layer, lu in update.layers.items():
        if layer not in cover_keys:
            raise ValueError(f"no cover keys for layer {layer}")
        layers[layer] = cover_layer(*lu.p_and_s(), cover_keys[layer].double())
    m = next(iter(cover_keys.values())).shape[0] if cover_keys else 0
    covered = _rebuild(update, layers, a0, {"cover_keys": m})
    return replace(covered, n_keys=update.key_rows + m)


def add_noise(
    update: ClientUpdate,
    sigma_s: float | dict[int, float],
    sigma_p: float | dict[int, float],
    seed: int | None = None,
    a0: dict[int, torch.Tensor] | None = None,
) -> ClientUpdate:
    """The update with Gaussian noise on every layer's S (symmetric) and P. `seed` None draws a
    fresh seed (the server must not be able to predict, hence subtract, the noise). The scales
    are recorded in `extra["privacy"]`, so the server can set its noise floor."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    layers = {}
    for layer in sorted(update.layers):
        ss = sigma_s[layer] if isinstance(sigma_s, dict) else sigma_s
        sp = sigma_p[layer] if isinstance(sigma_p, dict) else sigma_p
        layers[layer] = noise_layer(*update.layers[layer].p_and_s(), ss, sp, gen)
    note = {
        "noise_sigma_s": sigma_s
        if not isinstance(sigma_s, dict)
        else {str(k): v for k, v in sigma_s.items()},
        "noise_sigma_p": sigma_p
        if not isinstance(sigma_p, dict)
        else {str(k): v for k, v in sigma_p.items()},
    }
    floors = {
        layer: noise_floor(
            sigma_s[layer] if isinstance(sigma_s, dict) else sigma_s, 1, s.shape[0]
        )
        for layer, (_, s) in layers.items()
    }
    return _rebuild(update, layers, a0, note, floors)


def relative_sigmas(
    a0: torch.Tensor, keys: torch.Tensor, residuals: torch.Tensor, scale: float
) -> tuple[float, float]:
    """(sigma_s, sigma_p) for a noise `scale` given in units of the public regulariser: sigma_s =
    scale x mean eigenvalue of A0 (trace / d_in); sigma_p = sigma_s x the client's median
    ||r|| / ||k|| (so P and S are perturbed alike relative to what an edit puts in them).
    The client's own norms stay with the client: only the noisy P and S are sent."""
    sigma_s = scale * float(torch.diagonal(a0.double()).mean())
    ratio = float((residuals.double().norm(dim=1) / keys.double().norm(dim=1)).median())
    return sigma_s, sigma_s * ratio
