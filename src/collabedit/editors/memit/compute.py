"""MEMIT's pieces (Meng et al. 2023): context prefixes, keys, target vectors z, the layer loop.

Batching z: every request has its own delta vector, its loss depends on its own rows only, and
Adam is element-wise, so optimising all deltas at once on the SUM of the per-request losses gives
the same deltas as one request at a time. Early stopping is kept per request (a stopped request's
delta is frozen and its rows leave the batch), exactly as the reference loop stops. One
forward/backward per step serves all requests instead of one per request per step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from collabedit import io
from collabedit.editors.memit.config import MemitConfig
from collabedit.models import arch
from collabedit.models.tracing import (
    capture_block_outputs,
    capture_mlp_inputs,
    encode_pair,
    pad_batch,
    shift_block_output,
    subject_last_index,
)
from collabedit.requests import EditRequest

Progress = Callable[[str, int, int], None] | None


@torch.no_grad()
def context_templates(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: MemitConfig
) -> list[list[str]]:
    """[["{}"], [generated prefix + ". {}", ...]] as MEMIT's get_context_templates.

    Prefixes are sampled from the model itself (top-k 5), starting from the start words the
    tokenizer knows; seeded so that every party derives the same templates.
    """
    unk = tokenizer.unk_token_id
    starts = [
        w
        for w in cfg.context_start_words
        if unk is None or unk not in tokenizer(w, add_special_tokens=False)["input_ids"]
    ]
    if not starts:
        starts = [tokenizer.eos_token or ""]
    groups: list[list[str]] = [["{}"]]
    gen = torch.Generator().manual_seed(cfg.seed)
    for length, count in cfg.context_template_length_params:
        group = []
        for i in range(count):
            ids = tokenizer(starts[i % len(starts)], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ids or [tokenizer.eos_token_id]])
            while ids.shape[1] < length:
                logits = model(input_ids=ids).logits[0, -1].float()
                top = torch.topk(logits, k=min(5, logits.numel()))
                probs = torch.softmax(top.values, dim=-1)
                nxt = top.indices[torch.multinomial(probs, 1, generator=gen)]
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            text = tokenizer.decode(ids[0], skip_special_tokens=True)
            group.append(text.replace("{", " ").replace("}", " ") + ". {}")
        groups.append(group)
    return groups


def _fill(context: str, request: EditRequest) -> str:
    """Context template with the request's prompt in it (still holding the subject's '{}')."""
    return context.replace("{}", request.prompt)


@torch.no_grad()
def compute_keys(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    layers: Sequence[int],
    templates: list[list[str]],
    batch_rows: int = 2048,
) -> dict[int, torch.Tensor]:
    """Keys (n x d_in, float64) per layer: the projection's input at the subject's last token,
    averaged within each context group, then across groups (so the bare prompt weighs 1/2)."""
    rows, lookups = [], []
    for req in requests:
        for group in templates:
            for context in group:
                template = _fill(context, req)
                rows.append(
                    tokenizer(template.format(req.subject), add_special_tokens=False)["input_ids"]
                )
                lookups.append(subject_last_index(tokenizer, template, req.subject))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    per_layer: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(rows), batch_rows):
        ids, mask = pad_batch(rows[start : start + batch_rows], pad)
        idx = torch.tensor(lookups[start : start + batch_rows])
        with capture_mlp_inputs(model, layers) as keys:
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
        for layer in layers:
            per_layer[layer].append(keys[layer][torch.arange(len(idx)), idx].double().cpu())
    sizes = [len(g) for g in templates]
    out = {}
    for layer in layers:
        k = torch.cat(per_layer[layer]).view(len(requests), sum(sizes), -1)
        groups = torch.split(k, sizes, dim=1)
        out[layer] = torch.stack([g.mean(dim=1) for g in groups], dim=0).mean(dim=0)
    return out


@torch.no_grad()
def current_outputs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    layer: int,
    batch_rows: int = 2048,
) -> torch.Tensor:
    """The block output of `layer` at the subject's last token of the bare prompt (n x d)."""
    rows = [tokenizer(r.rewrite_prompt, add_special_tokens=False)["input_ids"] for r in requests]
    lookups = [subject_last_index(tokenizer, r.prompt, r.subject) for r in requests]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    outs = []
    for start in range(0, len(rows), batch_rows):
        ids, mask = pad_batch(rows[start : start + batch_rows], pad)
        idx = torch.tensor(lookups[start : start + batch_rows])
        with capture_block_outputs(model, [layer]) as hs:
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
        outs.append(hs[layer][torch.arange(len(idx)), idx].double().cpu())
    return torch.cat(outs)


@dataclass
class _ZRows:
    ids: list[list[int]] = field(default_factory=list)
    lookup: list[int] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)
    kl: list[bool] = field(default_factory=list)
    targets: list[list[int]] = field(default_factory=list)  # empty for KL rows
    first_row: list[int] = field(default_factory=list)  # per request: its bare-prompt row


def _z_rows(
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    templates: list[list[str]],
    kl_prompt: str,
) -> _ZRows:
    rows = _ZRows()
    for r, req in enumerate(requests):
        rows.first_row.append(len(rows.ids))
        for group in templates:
            for context in group:
                template = _fill(context, req)
                prompt_ids, target_ids = encode_pair(
                    tokenizer, template.format(req.subject), req.target_new
                )
                rows.ids.append(prompt_ids + target_ids[:-1])
                rows.lookup.append(subject_last_index(tokenizer, template, req.subject))
                rows.owner.append(r)
                rows.kl.append(False)
                rows.targets.append(target_ids)
        rows.ids.append(
            tokenizer(kl_prompt.format(req.subject), add_special_tokens=False)["input_ids"]
        )
        rows.lookup.append(subject_last_index(tokenizer, kl_prompt, req.subject))
        rows.owner.append(r)
        rows.kl.append(True)
        rows.targets.append([])
    return rows


def _subset(rows: _ZRows, keep: torch.Tensor) -> _ZRows:
    """The rows of the requests flagged in `keep`, shortest first so that chunks of similar
    lengths waste little padding (owners stay indices into all requests)."""
    out = _ZRows()
    firsts = set(rows.first_row)
    kept = [g for g, owner in enumerate(rows.owner) if keep[owner]]
    for g in sorted(kept, key=lambda g: len(rows.ids[g])):
        owner = rows.owner[g]
        if g in firsts:
            out.first_row.append(len(out.ids))
        out.ids.append(rows.ids[g])
        out.lookup.append(rows.lookup[g])
        out.owner.append(owner)
        out.kl.append(rows.kl[g])
        out.targets.append(rows.targets[g])
    return out


@dataclass
class ZResult:
    z: torch.Tensor  # (n, d) target block outputs, float64
    z_init: torch.Tensor  # (n, d) unedited block outputs at the same place
    final_loss: torch.Tensor  # (n,) last computed loss per request
    steps_taken: torch.Tensor  # (n,) optimiser steps applied per request

    @property
    def relative_residuals(self) -> torch.Tensor:
        """||z - z_init|| / ||z_init|| per request: near zero when the model already gives the
        new object (an overlapping, already-made edit), so it flags overlap before merging."""
        return (self.z - self.z_init).norm(dim=1) / self.z_init.norm(dim=1).clamp_min(1e-12)

    def select(self, index: Sequence[int]) -> ZResult:
        idx = torch.as_tensor(list(index), dtype=torch.long)
        return ZResult(self.z[idx], self.z_init[idx], self.final_loss[idx], self.steps_taken[idx])

    @classmethod
    def cat(cls, parts: Sequence[ZResult]) -> ZResult:
        """The z of several request blocks, in order: z of a request does not depend on the
        other requests optimised with it (module note), so blocks join into the whole."""
        return cls(*(torch.cat([getattr(p, name) for p in parts]) for name in _Z_FIELDS))

    def save(self, path: Path, key: str) -> None:
        """Write to safetensors, tagged with `key` (see `z_cache_key`)."""
        tensors = {name: getattr(self, name) for name in _Z_FIELDS}
        io.write_safetensors(path, tensors, {"key": key})

    @classmethod
    def load(cls, path: Path, key: str) -> ZResult | None:
        """The z saved at `path` if it was computed for `key`, else None (recompute)."""
        if not path.exists():
            return None
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return cls(*(f.get_tensor(name) for name in _Z_FIELDS))


_Z_FIELDS = ("z", "z_init", "final_loss", "steps_taken")


def z_cache_key(
    model: PreTrainedModel,
    requests: Sequence[EditRequest],
    layer: int,
    templates: list[list[str]],
    cfg: MemitConfig,
) -> str:
    """Everything z depends on: the whole model, the requests, the layer, the prefixes and the z
    settings (not lambda or the edited layers, which only the solve uses)."""
    z_fields = cfg.model_dump(
        exclude={"layers", "mom2_update_weight", "mom2_dataset", "mom2_n_samples"}
    )
    payload = {
        "model": arch.fingerprint(model),
        "requests": [r.model_dump(mode="json") for r in requests],
        "layer": layer,
        "templates": templates,
        "config": z_fields,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Half-precision models still optimise z and compare log-probabilities in float32."""
    return torch.float32 if param_dtype in (torch.float16, torch.bfloat16) else param_dtype


def _chunk_bounds(
    lengths: Sequence[int], max_rows: int, slack: float = 1.25, min_rows: int = 256
) -> list[range]:
    """Consecutive row ranges (rows sorted by length) of at most `max_rows` rows; a range of
    `min_rows` or more also ends where the next row is `slack` times longer than its first.
    Small batches stay whole: a forward pass has a fixed cost that padding does not."""
    bounds, start = [], 0
    for g in range(1, len(lengths) + 1):
        if (
            g == len(lengths)
            or g - start >= max_rows
            or (g - start >= min_rows and lengths[g] > slack * max(lengths[start], 1))
        ):
            bounds.append(range(start, g))
            start = g
    return bounds


def _chunk(
    rows: _ZRows, start: int, end: int, n_rewrite: torch.Tensor, pad: int, device: torch.device
) -> dict:
    """Precomputed index tensors for one forward chunk of z rows."""
    ids, mask = pad_batch(rows.ids[start:end], pad)
    t_row, t_pos, t_tok, t_w, t_owner, kl_row, kl_pos, kl_owner = ([] for _ in range(8))
    first_local, first_owner = [], []
    firsts = set(rows.first_row)
    for j, g in enumerate(range(start, end)):
        owner = rows.owner[g]
        if g in firsts:
            first_local.append(j)
            first_owner.append(owner)
        if rows.kl[g]:
            kl_row.append(j)
            kl_pos.append(rows.lookup[g])
            kl_owner.append(owner)
            continue
        tgt = rows.targets[g]
        p0 = len(rows.ids[g]) - len(tgt)
        for k, tok in enumerate(tgt):
            t_row.append(j)
            t_pos.append(p0 + k)
            t_tok.append(tok)
            t_w.append(1.0 / (len(tgt) * float(n_rewrite[owner])))
            t_owner.append(owner)

    def t(x, dtype=torch.long):
        return torch.tensor(x, dtype=dtype, device=device)

    return {
        "ids": ids.to(device),
        "mask": mask.to(device),
        "rows": torch.arange(end - start, device=device),
        "lookup": t(rows.lookup[start:end]),
        "owner": t(rows.owner[start:end]),
        "t_row": t(t_row),
        "t_pos": t(t_pos),
        "t_tok": t(t_tok),
        "t_w": t(t_w, torch.float32),
        "t_owner": t(t_owner),
        "kl_row": t(kl_row),
        "kl_pos": t(kl_pos),
        "kl_owner": t(kl_owner),
        "first_local": t(first_local),
        "first_owner": t(first_owner),
    }


def optimise_z(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    layer: int,
    templates: list[list[str]],
    cfg: MemitConfig,
    progress: Progress = None,
) -> ZResult:
    """Target vectors z for all requests at once (see the module note on batching)."""
    rows = _z_rows(tokenizer, requests, templates, cfg.kl_prompt)
    n = len(requests)
    d = getattr(model.config, arch.arch_of(model).hidden_size_attr)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_rewrite = torch.zeros(n)
    for owner, is_kl in zip(rows.owner, rows.kl, strict=True):
        if not is_kl:
            n_rewrite[owner] += 1

    def make_chunks(keep: torch.Tensor) -> list[dict]:
        sub = _subset(rows, keep)
        bounds = _chunk_bounds([len(ids) for ids in sub.ids], cfg.batch_rows)
        return [_chunk(sub, b.start, b.stop, n_rewrite, pad, device) for b in bounds]

    dtype = _compute_dtype(next(model.parameters()).dtype)
    delta = torch.zeros(n, d, device=device, dtype=dtype, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    z_init = torch.zeros(n, d, dtype=torch.float64)
    active = torch.ones(n, dtype=torch.bool)
    steps = torch.zeros(n, dtype=torch.long)
    final = torch.zeros(n, dtype=torch.float64)
    kl_init: torch.Tensor | None = None  # (n, vocab) log-probabilities on the KL prompt
    chunks, chunk_active = make_chunks(active), active.clone()
    head = model.get_output_embeddings()
    grad_flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for it in range(cfg.v_num_grad_steps):
            if not torch.equal(active, chunk_active):
                # stopped requests' deltas are frozen: their rows need no forward pass any more
                chunks, chunk_active = make_chunks(active), active.clone()
            losses = torch.zeros(n, dtype=torch.float64)
            weight = active.to(device, dtype)
            for ch in chunks:
                captured = {}

                def shift(h, ch=ch, captured=captured, first=it == 0):
                    rows_, look = ch["rows"], ch["lookup"]
                    if first:
                        captured["h"] = h[ch["first_local"], look[ch["first_local"]]].detach()
                    h = h.clone()
                    h[rows_, look] = h[rows_, look] + delta[ch["owner"]]
                    return h

                with shift_block_output(model, layer, shift):
                    # logits only where a loss reads them: the full (rows x length x vocab)
                    # tensor and its backward dominate otherwise
                    hidden = model.base_model(
                        input_ids=ch["ids"], attention_mask=ch["mask"]
                    ).last_hidden_state
                if "h" in captured:
                    z_init[ch["first_owner"].cpu()] = captured["h"].double().cpu()
                # NLL of the target tokens, each row weighted 1/(tokens * rows of its request)
                tl = torch.log_softmax(head(hidden[ch["t_row"], ch["t_pos"]]).to(dtype), dim=-1)
                token_nll = -tl.gather(1, ch["t_tok"][:, None]).squeeze(1) * ch["t_w"]
                req_loss = torch.zeros(n, device=device, dtype=dtype).index_add(
                    0, ch["t_owner"], token_nll
                )
                if len(ch["kl_row"]):
                    cur = torch.log_softmax(
                        head(hidden[ch["kl_row"], ch["kl_pos"]]).to(dtype), dim=-1
                    )
                    if kl_init is None:
                        kl_init = torch.zeros(n, cur.shape[-1], device=device, dtype=dtype)
                    if it == 0:
                        kl_init[ch["kl_owner"]] = cur.detach()
                    # MEMIT's kl_div(init, current, log_target=True) is KL(current || init)
                    init = kl_init[ch["kl_owner"]]
                    kl = (cur.exp() * (cur - init)).sum(-1) * cfg.kl_factor
                    req_loss = req_loss.index_add(0, ch["kl_owner"], kl)
                # stopped requests contribute nothing: their deltas are frozen
                (req_loss * weight).sum().backward()
                losses += req_loss.detach().double().cpu()
            norms = torch.linalg.vector_norm(z_init, dim=1).clamp_min(1e-12)
            dnorm = torch.linalg.vector_norm(delta.detach().double().cpu(), dim=1)
            total = losses + cfg.v_weight_decay * dnorm / norms**2
            final = torch.where(active, total, final)
            active &= ~(total < cfg.early_stop_loss)
            if progress is not None:
                progress("z", it + 1, cfg.v_num_grad_steps)
            if it == cfg.v_num_grad_steps - 1 or not active.any():
                break
            with torch.no_grad():
                # gradient of the weight decay v_wd * ||delta|| / ||z0||^2
                dn = torch.linalg.vector_norm(delta, dim=1, keepdim=True).clamp_min(1e-12)
                coef = (cfg.v_weight_decay / norms**2).to(device, dtype)[:, None]
                delta.grad += coef * delta / dn * active.to(device)[:, None]
            frozen = delta.detach().clone()
            opt.step()
            with torch.no_grad():
                inactive = ~active.to(device)
                delta[inactive] = frozen[inactive]
                max_norm = (cfg.clamp_norm_factor * norms).to(device, dtype)
                dn = torch.linalg.vector_norm(delta, dim=1)
                scale = torch.where(
                    dn > max_norm, max_norm / dn.clamp_min(1e-12), torch.ones_like(dn)
                )
                delta.mul_(scale[:, None])
            steps += active.long()
            delta.grad.zero_()
    finally:
        for p, flag in zip(model.parameters(), grad_flags, strict=True):
            p.requires_grad_(flag)
    z = z_init + delta.detach().double().cpu()
    return ZResult(z, z_init, final, steps)
