"""What MALMEN reads from the model: at every answer token of every edit, the edited layers' keys
and the gradient of the edit loss with respect to their outputs (the "value gradients").

An answer token here is a position whose logits predict a target token (MALMEN's `token: ans`):
the prompt's last token and every target token but the last. Each request's edit loss is the mean
cross-entropy of its own target tokens, so its gradients do not depend on which requests share its
batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from collabedit.models import arch
from collabedit.models.tracing import capture_mlp_inputs, encode_pairs, pad_batch


@dataclass
class Batch:
    """Right-padded prompt+target ids, with where each target token is predicted."""

    input_ids: torch.Tensor  # (b, t)
    attention_mask: torch.Tensor  # (b, t)
    rows: torch.Tensor  # (tokens,) batch row of each answer token
    cols: torch.Tensor  # (tokens,) position whose logits predict it
    labels: torch.Tensor  # (tokens,) the target token
    owner: torch.Tensor  # (tokens,) index of its pair within the batch
    n_pairs: int

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.rows.to(device),
            self.cols.to(device),
            self.labels.to(device),
            self.owner.to(device),
            self.n_pairs,
        )


def encode(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]]) -> Batch:
    """(prompt, target) pairs as one batch."""
    seqs, rows, cols, labels = [], [], [], []
    for i, (p, t) in enumerate(encode_pairs(tokenizer, pairs)):
        seqs.append(p + t[:-1])
        for j, tok in enumerate(t):
            rows.append(i)
            cols.append(len(p) - 1 + j)
            labels.append(tok)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = pad_batch(seqs, pad_id)
    rows_t = torch.tensor(rows, dtype=torch.long)
    return Batch(
        ids,
        mask,
        rows_t,
        torch.tensor(cols, dtype=torch.long),
        torch.tensor(labels, dtype=torch.long),
        rows_t.clone(),
        len(pairs),
    )


def answer_logits(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """(tokens, vocab) logits at the answer tokens."""
    device = next(model.parameters()).device
    b = batch.to(device)
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    return logits[b.rows, b.cols]


def per_pair_nll(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(pairs,) mean cross-entropy of each pair's target tokens."""
    tok = F.cross_entropy(logits.float(), batch.labels.to(logits.device), reduction="none")
    owner = batch.owner.to(logits.device)
    total = torch.zeros(batch.n_pairs, dtype=tok.dtype, device=tok.device).index_add(0, owner, tok)
    count = torch.bincount(owner, minlength=batch.n_pairs).clamp_min(1)
    return total / count


@contextmanager
def _probes(model: PreTrainedModel, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """While active, a zero tensor that requires grad is added to each edited projection's
    output: the gradient with respect to that zero is the gradient with respect to the output,
    on every path through the layers above."""
    store: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:

        def post(module, args, output, layer=layer):
            store[layer] = torch.zeros_like(output, requires_grad=True)
            return output + store[layer]

        handles.append(arch.mlp_out(model, layer).register_forward_hook(post))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@dataclass
class TokenRows:
    """Per edited layer, one row per answer token of every request, request by request."""

    keys: dict[int, torch.Tensor]  # (rows, d_in)
    grads: dict[int, torch.Tensor]  # (rows, d_out)
    owner: torch.Tensor  # (rows,) index of the request each row belongs to
    nll: torch.Tensor  # (requests,) mean target cross-entropy on the model read


def token_rows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    layers: Sequence[int],
    batch_size: int = 32,
) -> TokenRows:
    """Keys and value gradients of the edit loss at the answer tokens of (prompt, target) pairs,
    on the model's current weights (which are not changed)."""
    keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    grads: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    owners, nlls = [], []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(pairs), batch_size):
            batch = encode(tokenizer, pairs[start : start + batch_size])
            with (
                torch.enable_grad(),
                capture_mlp_inputs(model, layers) as inputs,
                _probes(model, layers) as probes,
            ):
                logits = answer_logits(model, batch)
                nll = per_pair_nll(logits, batch)
                found = torch.autograd.grad(nll.sum(), [probes[layer] for layer in layers])
            for layer, g in zip(layers, found, strict=True):
                keys[layer].append(inputs[layer][batch.rows, batch.cols].detach())
                grads[layer].append(g[batch.rows, batch.cols])
            owners.append(batch.owner + start)
            nlls.append(nll.detach())
    finally:
        model.train(was_training)
    return TokenRows(
        {layer: torch.cat(v) for layer, v in keys.items()},
        {layer: torch.cat(v) for layer, v in grads.items()},
        torch.cat(owners),
        torch.cat(nlls),
    )
