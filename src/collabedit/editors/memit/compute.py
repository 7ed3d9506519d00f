"""MEMIT's pieces (Meng et al. 2023): context prefixes, keys, target vectors z, the layer loop.

Batching z: every request has its own delta vector, its loss depends on its own rows only, and
Adam is element-wise, so optimising all deltas at once on the SUM of the per-request losses gives
the same deltas as one request at a time. Early stopping is kept per request (a stopped request's
delta is frozen and its rows leave the batch), exactly as the reference loop stops. One
forward/backward per step serves all requests instead of one per request per step.

Recomputing only what z changes (`fast=True`, the default): z enters at one place, the output of
the z layer L at the subject's last token (the lookup). Nothing below L and nothing before the
lookup depends on z, so once per chunk of rows (no grad) the rows' first P tokens (P = the
chunk's smallest lookup) are run through the whole model into a key/value cache, and the rest
once more to read the block-L output there and the arguments the model hands each block above L
(masks, rotary embeddings, the cache). Every step then runs only the blocks above L, only on the
positions from P on, attending to the cached keys/values of the first P positions, and the final
norm. This is the same computation as the full forward (the attention of a position sees the same
keys and values), so z agrees with `fast=False` (the full forward at every step) to rounding.
Rows are grouped by lookup so that P is close to each row's own lookup (`_fast_bounds`); tokens
that every row of a chunk shares (a context prefix) go through the model once. Architectures the
fast path does not know (`fast_z_supported`) take the full forward. Tests: tests/test_fast_z.py;
throughput against MEMIT's own one-request loop: benchmarks/memit_reference.py.

Keys and current outputs are read the same way: rows end at the subject's last token, the forward
stops at the last layer read, and a context prefix shared by a pass is run once.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

try:  # transformers >= 4.56: caches made of per-layer objects
    from transformers.cache_utils import DynamicLayer as _DynamicLayer
except ImportError:  # pragma: no cover - older transformers: the full forward only
    _DynamicLayer = None

from collabedit import io
from collabedit.editors.memit.config import SOLVE_FIELDS, MemitConfig
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


def _locate(
    tokenizer: PreTrainedTokenizerBase, templates: Sequence[str], subjects: Sequence[str]
) -> tuple[list[list[int]], list[int]]:
    """Token ids of each `template.format(subject)` and its subject's last position: what
    `subject_last_index` finds (and refuses) one prompt at a time, with batched tokenizer calls."""
    for template in templates:
        if template.count("{}") != 1:
            subject_last_index(tokenizer, template, "")  # raises the usual error
    fulls = tokenizer(
        [t.format(s) for t, s in zip(templates, subjects, strict=True)], add_special_tokens=False
    )["input_ids"]
    heads = tokenizer(
        [t[: t.index("{}")] + s for t, s in zip(templates, subjects, strict=True)],
        add_special_tokens=False,
    )["input_ids"]
    lookups = []
    for template, subject, full, part in zip(templates, subjects, fulls, heads, strict=True):
        if not part or full[: len(part)] != part:
            subject_last_index(tokenizer, template, subject)  # raises SubjectNotFoundError
        lookups.append(len(part) - 1)
    return [list(f) for f in fulls], lookups


# Rows x positions per no-grad forward: larger batches of a small model are slower on a CPU
# (every intermediate leaves the cache), and a forward of this size is far from its fixed cost.
TOKENS_PER_PASS = 4096


def _passes(
    lengths: Sequence[int], max_rows: int, groups: Sequence[int] | None = None
) -> list[list[int]]:
    """Row indices per forward pass: rows by group (rows of one context template share its
    tokens), then length (little padding), at most `max_rows` rows and about `TOKENS_PER_PASS`
    padded positions in each."""
    key = groups or [0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda g: (key[g], lengths[g]))
    out, cur = [], []
    for g in order:
        if cur and (
            len(cur) >= max_rows
            or (len(cur) + 1) * lengths[g] > TOKENS_PER_PASS
            or key[g] != key[cur[0]]
        ):
            out.append(cur)
            cur = []
        cur.append(g)
    if cur:
        out.append(cur)
    return out


class _Stop(Exception):
    """Raised by a hook once a forward pass has produced everything that is read from it."""


def _forward_until(model: PreTrainedModel, module: torch.nn.Module, **inputs) -> None:
    """Run the model only up to and including `module` (later layers cannot change what hooks
    registered before this call have read)."""

    def stop(*_):
        raise _Stop

    handle = module.register_forward_hook(stop)
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()


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
    averaged within each context group, then across groups (so the bare prompt weighs 1/2).

    A causal model's state at the subject's last token depends on nothing after it, nor on the
    layers above the last one read: rows end at that token and the forward at that projection;
    the tokens that all rows of a pass share (a context prefix) are run once into a cache."""
    filled = [_fill(c, req) for req in requests for group in templates for c in group]
    subjects = [req.subject for req in requests for group in templates for _ in group]
    full, lookups = _locate(tokenizer, filled, subjects)
    rows = [ids[: look + 1] for ids, look in zip(full, lookups, strict=True)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    last = arch.mlp_out(model, max(layers))
    found: dict[int, list] = {layer: [None] * len(rows) for layer in layers}
    n_templates = sum(len(g) for g in templates)
    groups = [g % n_templates for g in range(len(rows))]
    share = fast_z_supported(model)
    for part in _passes([len(r) for r in rows], batch_rows, groups):
        ids, mask = pad_batch([rows[g] for g in part], pad)
        ids, mask = ids.to(device), mask.to(device)
        inputs = {"input_ids": ids, "attention_mask": mask}
        c = 0
        if share:
            # the context's tokens once (all but the subject's last token, which is read)
            c = min(_common_prefix([rows[g] for g in part]), min(len(rows[g]) for g in part) - 1)
            cache = _shared_cache(model, ids, c, until=last)
            inputs = {"input_ids": ids[:, c:], "attention_mask": mask, "use_cache": True}
            inputs[_cache_kwarg(model)] = cache
        idx = torch.tensor([lookups[g] - c for g in part])
        with capture_mlp_inputs(model, layers) as keys:
            _forward_until(model.base_model, last, **inputs)
        for layer in layers:
            picked = keys[layer][torch.arange(len(idx)), idx].double().cpu()
            for g, k in zip(part, picked, strict=True):
                found[layer][g] = k
    sizes = [len(g) for g in templates]
    out = {}
    for layer in layers:
        k = torch.stack(found[layer]).view(len(requests), sum(sizes), -1)
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
    """The block output of `layer` at the subject's last token of the bare prompt (n x d); rows
    end at that token and the forward at that block (as in `compute_keys`)."""
    prompts, subjects = [r.prompt for r in requests], [r.subject for r in requests]
    full, lookups = _locate(tokenizer, prompts, subjects)
    rows = [ids[: look + 1] for ids, look in zip(full, lookups, strict=True)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    outs: list = [None] * len(rows)
    for part in _passes([len(r) for r in rows], batch_rows):
        ids, mask = pad_batch([rows[g] for g in part], pad)
        idx = torch.tensor([lookups[g] for g in part])
        with capture_block_outputs(model, [layer]) as hs:
            _forward_until(
                model,
                arch.block(model, layer),
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
            )
        picked = hs[layer][torch.arange(len(idx)), idx].double().cpu()
        for g, h in zip(part, picked, strict=True):
            outs[g] = h
    return torch.stack(outs)


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
    filled, subjects, owners = [], [], []
    for r, req in enumerate(requests):
        for template in [_fill(c, req) for group in templates for c in group] + [kl_prompt]:
            filled.append(template)
            subjects.append(req.subject)
            owners.append(r)
    full, lookups = _locate(tokenizer, filled, subjects)
    target: dict[int, list[int]] = {}
    for g, r in enumerate(owners):
        is_kl = g + 1 == len(owners) or owners[g + 1] != r  # each request's last row
        if r not in target:
            rows.first_row.append(g)
            target[r] = encode_pair(
                tokenizer, filled[g].format(subjects[g]), requests[r].target_new
            )[1]
        rows.ids.append(full[g] if is_kl else full[g] + target[r][:-1])
        rows.lookup.append(lookups[g])
        rows.owner.append(r)
        rows.kl.append(is_kl)
        rows.targets.append([] if is_kl else target[r])
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
    z_fields = cfg.model_dump(exclude=SOLVE_FIELDS)
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


def _final_norm(model: PreTrainedModel) -> torch.nn.Module | None:
    """The norm after the last block, or None where the model has none at the known path."""
    try:
        return arch.final_norm(model)
    except AttributeError:
        return None


def _cache_kwarg(model: PreTrainedModel) -> str | None:
    """The name under which the base model's forward takes a key/value cache."""
    params = inspect.signature(model.base_model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def fast_z_supported(model: PreTrainedModel) -> bool:
    """Whether `optimise_z(fast=True)` can recompute only the blocks above the z layer: the
    architecture's final norm is known, the base model takes a `DynamicCache` and the cache
    exposes per-layer `crop` (transformers' layered caches). Otherwise it runs the full forward
    at every step (`fast=False`), which gives the same z, only slower."""
    try:
        norm = _final_norm(model)
    except arch.UnsupportedModelError:
        return False
    return (
        norm is not None
        and _cache_kwarg(model) is not None
        and hasattr(DynamicCache(), "layers")
        and hasattr(_DynamicLayer, "crop")
    )


def _fast_bounds(
    lookups: Sequence[int], lengths: Sequence[int], max_rows: int, overhead: int = 128
) -> list[range]:
    """Chunks of rows sorted by (lookup, length): each chunk costs about `overhead` token
    positions (a forward's fixed cost) plus rows x (its longest row - its smallest lookup); cuts
    fall where the (lookup, length) pair changes and are chosen to minimise the sum (dynamic
    programming), then chunks of more than `max_rows` rows or `TOKENS_PER_PASS` positions are
    split."""
    n = len(lookups)
    starts = [
        g
        for g in range(n)
        if g == 0 or (lookups[g], lengths[g]) != (lookups[g - 1], lengths[g - 1])
    ] + [n]
    k = len(starts) - 1
    best = [0.0] + [float("inf")] * k
    cut = [0] * (k + 1)
    for j in range(1, k + 1):
        longest = 0
        for i in range(j - 1, -1, -1):
            longest = max(longest, max(lengths[starts[i] : starts[i + 1]]))
            rows = starts[j] - starts[i]
            pieces = max(-(-rows // max_rows), -(-rows * longest // TOKENS_PER_PASS))
            cost = best[i] + overhead * pieces + rows * (longest - lookups[starts[i]])
            if cost < best[j]:
                best[j], cut[j] = cost, i
    segments, j = [], k
    while j > 0:
        segments.append((starts[cut[j]], starts[j]))
        j = cut[j]
    bounds = []
    for a, b in reversed(segments):
        longest = max(lengths[a:b])
        pieces = max(-(-(b - a) // max_rows), -(-(b - a) * longest // TOKENS_PER_PASS))
        size = -(-(b - a) // pieces)
        bounds += [range(g, min(g + size, b)) for g in range(a, b, size)]
    return bounds


def _subset_by_lookup(rows: _ZRows, keep: torch.Tensor) -> _ZRows:
    """As `_subset`, but ordered by (lookup, length), as the fast path's chunks group lookups
    (rows on one context template are not kept together: the steps' positions count 20-200
    times, the setup's once), and with KL rows ending at their subject: the KL term reads only
    that position, which in a causal model nothing after it changes."""

    def ids(g: int) -> list[int]:
        return rows.ids[g][: rows.lookup[g] + 1] if rows.kl[g] else rows.ids[g]

    order = sorted(
        (g for g, owner in enumerate(rows.owner) if keep[owner]),
        key=lambda g: (rows.lookup[g], len(ids(g))),
    )
    out = _ZRows()
    firsts = set(rows.first_row)
    for g in order:
        if g in firsts:
            out.first_row.append(len(out.ids))
        out.ids.append(ids(g))
        out.lookup.append(rows.lookup[g])
        out.owner.append(rows.owner[g])
        out.kl.append(rows.kl[g])
        out.targets.append(rows.targets[g])
    return out


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """How many first tokens all rows share (rows on one context template share its tokens)."""
    first, c = rows[0], min(len(r) for r in rows)
    for r in rows[1:]:
        while c and r[:c] != first[:c]:
            c -= 1
    return c


def _shared_cache(model: PreTrainedModel, ids: torch.Tensor, c: int, until=None) -> DynamicCache:
    """A cache holding the first `c` positions of every row of `ids`, which all rows share:
    computed once (one row) and repeated, since a causal model's state at a position depends
    only on the tokens up to it. `until`: stop the pass after that module (see
    `_forward_until`); the layers above it are then missing from the cache."""
    cache = DynamicCache()
    if c > 0:
        inputs = {"input_ids": ids[:1, :c], "use_cache": True, _cache_kwarg(model): cache}
        if until is None:
            model.base_model(**inputs)
        else:
            _forward_until(model.base_model, until, **inputs)
        if ids.shape[0] > 1:
            cache.batch_repeat_interleave(ids.shape[0])
    return cache


@torch.no_grad()
def _prepare_fast(model: PreTrainedModel, layer: int, ch: dict, shared: int = 0) -> dict:
    """Everything of a chunk that z cannot change (module note): the cache of the first P
    positions (of which the first `shared`, the same tokens in every row, computed once), the
    block-L output from P on, and each upper block's call arguments."""
    ids, mask = ch["ids"], ch["mask"]
    p = int(ch["lookup"].min())
    c = min(shared, p)
    cache = _shared_cache(model, ids, c)
    kw = _cache_kwarg(model)
    base = model.base_model
    if p > c:
        base(input_ids=ids[:, c:p], attention_mask=mask[:, :p], use_cache=True, **{kw: cache})
    blocks = arch.blocks(model)
    upper = list(range(layer + 1, len(blocks)))
    calls: dict[int, tuple] = {}
    store: dict[str, torch.Tensor] = {}
    handles = []

    def grab(module, args, kwargs, index):
        calls[index] = (tuple(args[1:]), dict(kwargs))

    def out(module, args, output):
        store["h"] = output[0] if isinstance(output, tuple) else output

    for index in upper:
        handles.append(
            blocks[index].register_forward_pre_hook(
                lambda m, a, k, index=index: grab(m, a, k, index), with_kwargs=True
            )
        )
    handles.append(blocks[layer].register_forward_hook(out))
    try:
        base(input_ids=ids[:, p:], attention_mask=mask, use_cache=True, **{kw: cache})
    finally:
        for h in handles:
            h.remove()
    width = ids.shape[1] - p
    prefix = {}
    for index, cache_layer in enumerate(cache.layers):
        # blocks up to L are never run again; the upper ones keep only the first P positions
        cache_layer.crop(-cache_layer.get_seq_length() if index <= layer else -width)
        if index > layer:
            prefix[index] = (cache_layer.keys, cache_layer.values)
    shifted = {name: ch[name] - p for name in ("lookup", "t_pos", "kl_pos")}
    return (
        ch | shifted | {"h": store["h"].detach(), "calls": calls, "cache": cache, "prefix": prefix}
    )


def _forward_fast(model: PreTrainedModel, ch: dict, shift: Callable) -> torch.Tensor:
    """Final hidden states from P on: shift(block-L output), then the blocks above L."""
    h = shift(ch["h"])
    blocks = arch.blocks(model)
    try:
        for index, (args, kwargs) in sorted(ch["calls"].items()):
            out = blocks[index](h, *args, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
    finally:
        # forget what this step appended (and its graph): the cache holds the first P again
        for index, (keys, values) in ch["prefix"].items():
            cache_layer = ch["cache"].layers[index]
            cache_layer.keys, cache_layer.values = keys, values
    return _final_norm(model)(h)


def z_block_size(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    templates: list[list[str]],
    cfg: MemitConfig,
) -> int:
    """Requests per block so that one block's z optimisation fits `cfg.z_memory_mb`. Per request:
    its rows (context prompts and the KL prompt) x their longest length x the hidden size x the
    layers, for the cached keys and values (2 per layer) and the activations kept for the
    backward (about 12 per layer and position: attention and a 4x MLP), plus the target
    positions' log-probabilities over the vocabulary (3 copies: logits, log-softmax, gradient)."""
    if not requests:
        return 1
    spec = arch.arch_of(model)
    d = int(getattr(model.config, spec.hidden_size_attr))
    n_layers = arch.n_layers(model)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    size = torch.finfo(_compute_dtype(next(model.parameters()).dtype)).bits // 8
    prefix = max((len(tokenizer(t)["input_ids"]) for g in templates for t in g), default=0)
    longest = max(
        len(tokenizer(r.rewrite_prompt + " " + r.target_new)["input_ids"]) for r in requests
    )
    rows = sum(len(g) for g in templates) + 1
    target = max(len(tokenizer(" " + r.target_new)["input_ids"]) for r in requests)
    per_request = rows * size * ((prefix + longest) * d * n_layers * 14 + target * vocab * 3)
    return max(1, int(cfg.z_memory_mb * 2**20 // per_request))


def optimise_z(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    layer: int,
    templates: list[list[str]],
    cfg: MemitConfig,
    progress: Progress = None,
    fast: bool = True,
) -> ZResult:
    """Target vectors z for all requests, in blocks of `z_block_size` requests optimised one after
    the other: z of a request does not depend on the requests optimised with it (module note),
    so the blocks give the same z as one batch while the peak memory is set by the budget
    (`cfg.z_memory_mb`), not by the number of requests."""
    n = len(requests)
    block = z_block_size(model, tokenizer, requests, templates, cfg)
    if block >= n:
        return _optimise_z_block(model, tokenizer, requests, layer, templates, cfg, progress, fast)
    starts = range(0, n, block)
    parts = []
    for b, start in enumerate(starts):
        report = None
        if progress is not None:

            def report(stage, done, total, b=b):
                progress(stage, b * total + done, len(starts) * total)

        part = list(requests[start : start + block])
        parts.append(_optimise_z_block(model, tokenizer, part, layer, templates, cfg, report, fast))
    return ZResult.cat(parts)


def _optimise_z_block(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    layer: int,
    templates: list[list[str]],
    cfg: MemitConfig,
    progress: Progress = None,
    fast: bool = True,
) -> ZResult:
    """Target vectors z for the requests at once (see the module note on batching).

    `fast`: recompute at each step only what z changes (module note); the same z as the full
    forward at every step (`fast=False`) to rounding. Architectures without a usable cache
    (`fast_z_supported`) take the full forward whatever `fast` says.
    """
    fast = fast and fast_z_supported(model)
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
        if not fast:
            sub = _subset(rows, keep)
            bounds = _chunk_bounds([len(ids) for ids in sub.ids], cfg.batch_rows)
            return [_chunk(sub, b.start, b.stop, n_rewrite, pad, device) for b in bounds]
        sub = _subset_by_lookup(rows, keep)
        bounds = _fast_bounds(sub.lookup, [len(ids) for ids in sub.ids], cfg.batch_rows)
        chunks = []
        for b in bounds:
            ch = _chunk(sub, b.start, b.stop, n_rewrite, pad, device)
            shared = _common_prefix(sub.ids[b.start : b.stop])
            chunks.append(_prepare_fast(model, layer, ch, shared))
        return chunks

    dtype = _compute_dtype(next(model.parameters()).dtype)
    delta = torch.zeros(n, d, device=device, dtype=dtype, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    z_init = torch.zeros(n, d, dtype=torch.float64)
    active = torch.ones(n, dtype=torch.bool)
    steps = torch.zeros(n, dtype=torch.long)
    final = torch.zeros(n, dtype=torch.float64)
    kl_init: torch.Tensor | None = None  # (n, vocab) log-probabilities on the KL prompt
    head = model.get_output_embeddings()
    grad_flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        chunks, chunk_active = make_chunks(active), active.clone()
        for it in range(cfg.v_num_grad_steps):
            if _rebuild(active, chunk_active, fast):
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

                if fast:
                    hidden = _forward_fast(model, ch, shift)
                else:
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


def _rebuild(active: torch.Tensor, chunk_active: torch.Tensor, fast: bool) -> bool:
    """Whether to re-chunk for the requests still optimised. The full forward re-chunks as soon
    as one stops; the fast path keeps stopped rows (weighted 0, exactly as if absent) until they
    are a third of its rows, since re-chunking costs it a full forward of every row."""
    if torch.equal(active, chunk_active):
        return False
    if not fast:
        return True
    return int(active.sum()) < (2 * int(chunk_active.sum())) // 3
