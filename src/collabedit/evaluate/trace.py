"""Causal tracing (Meng et al. 2022): where does a model recall a fact?

Corrupt the subject's token embeddings with noise, then restore one component's clean output at
one position and see how much of the true object's probability comes back (the indirect effect).
We restore (a) the whole block output (hidden state) and (b) only the MLP output, at the subject's
last token, for every layer; MEMIT edits the layers whose MLP output matters most there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from collabedit.models import arch
from collabedit.models.tracing import encode_pair, subject_last_index


def _mlp(model: PreTrainedModel, layer: int) -> torch.nn.Module:
    return arch.mlp_out(model, layer)


@torch.no_grad()
def trace_fact(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    subject: str,
    target: str,
    noise: float,
    samples: int = 10,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Indirect effects per layer at the subject's last token: {"hidden": [...], "mlp": [...]},
    plus the clean and corrupted probabilities of the target's first token."""
    text = prompt.format(subject)
    ids, target_ids = encode_pair(tokenizer, text, target)
    first_target = target_ids[0]
    start = len(tokenizer(prompt[: prompt.index("{}")], add_special_tokens=False)["input_ids"])
    last = subject_last_index(tokenizer, prompt, subject)
    subj = list(range(start, last + 1))
    x = torch.tensor([ids] * (samples + 1))
    n = arch.n_layers(model)
    emb = model.get_input_embeddings()
    gen = torch.Generator().manual_seed(seed)
    noise_vals = torch.randn(samples, len(subj), emb.embedding_dim, generator=gen) * noise

    def corrupt(module, args, output):
        out = output.clone()
        out[1:, subj] += noise_vals.to(out.dtype)
        return out

    clean_hidden, clean_mlp = {}, {}
    hooks = []
    for layer in range(n):
        hooks.append(
            arch.block(model, layer).register_forward_hook(
                lambda m, a, o, layer=layer: clean_hidden.__setitem__(
                    layer, (o[0] if isinstance(o, tuple) else o)[0, last].clone()
                )
            )
        )
        hooks.append(
            _mlp(model, layer).register_forward_hook(
                lambda m, a, o, layer=layer: clean_mlp.__setitem__(layer, o[0, last].clone())
            )
        )
    probs = torch.softmax(model(input_ids=x[:1]).logits[0, -1].float(), -1)
    for h in hooks:
        h.remove()
    clean_p = float(probs[first_target])
    h = emb.register_forward_hook(corrupt)
    try:
        corrupted_p = float(
            torch.softmax(model(input_ids=x).logits[1:, -1].float(), -1)[:, first_target].mean()
        )
        effects: dict[str, list[float]] = {"hidden": [], "mlp": []}
        for kind, module_of, clean in (
            ("hidden", lambda layer: arch.block(model, layer), clean_hidden),
            ("mlp", lambda layer: _mlp(model, layer), clean_mlp),
        ):
            for layer in range(n):

                def restore(m, a, o, layer=layer, clean=clean):
                    hs = o[0] if isinstance(o, tuple) else o
                    hs = hs.clone()
                    hs[1:, last] = clean[layer]
                    return (hs, *o[1:]) if isinstance(o, tuple) else hs

                rh = module_of(layer).register_forward_hook(restore)
                p = torch.softmax(model(input_ids=x).logits[1:, -1].float(), -1)[:, first_target]
                rh.remove()
                effects[kind].append(float(p.mean()) - corrupted_p)
    finally:
        h.remove()
    return effects | {"clean": [clean_p], "corrupted": [corrupted_p]}


def average_trace(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[tuple[str, str, str]],
    samples: int = 10,
) -> dict:
    """Mean indirect effects over (prompt, subject, target) facts; noise = 3 x the embeddings'
    standard deviation, as the ROME paper chose it."""
    noise = 3.0 * float(model.get_input_embeddings().weight.detach().std())
    runs = [
        trace_fact(model, tokenizer, p, s, t, noise, samples, seed=i)
        for i, (p, s, t) in enumerate(facts)
    ]
    n = arch.n_layers(model)
    return {
        "noise": noise,
        "n_facts": len(facts),
        "hidden": [sum(r["hidden"][i] for r in runs) / len(runs) for i in range(n)],
        "mlp": [sum(r["mlp"][i] for r in runs) / len(runs) for i in range(n)],
        "clean": sum(r["clean"][0] for r in runs) / len(runs),
        "corrupted": sum(r["corrupted"][0] for r in runs) / len(runs),
    }
