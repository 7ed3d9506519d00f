"""Forward hooks: read the edited projection's input (keys), read or shift a block's output
(the residual stream), and locate a subject's last token inside a prompt."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from collabedit.models import arch


class SubjectNotFoundError(ValueError):
    pass


def subject_last_index(tokenizer: PreTrainedTokenizerBase, prompt: str, subject: str) -> int:
    """Position of the subject's last token in `prompt.format(subject)`.

    The text up to and including the subject must tokenise to a prefix of the whole text's
    tokens; otherwise the subject's tokens are merged with their neighbours and there is no
    token that is "the subject's last" (MEMIT would silently edit the wrong position).
    """
    if prompt.count("{}") != 1:
        raise SubjectNotFoundError(f"prompt {prompt!r} must contain exactly one '{{}}'")
    head = prompt[: prompt.index("{}")] + subject
    full = tokenizer(prompt.format(subject), add_special_tokens=False)["input_ids"]
    part = tokenizer(head, add_special_tokens=False)["input_ids"]
    if not part or full[: len(part)] != part:
        raise SubjectNotFoundError(
            f"subject {subject!r} does not tokenise inside prompt {prompt!r}: "
            "its tokens merge with the text around it"
        )
    return len(part) - 1


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _capture(
    modules: dict[int, torch.nn.Module], inputs: bool
) -> Iterator[dict[int, torch.Tensor]]:
    store: dict[int, torch.Tensor] = {}
    handles = []
    for layer, module in modules.items():
        if inputs:

            def pre(module, args, layer=layer):
                store[layer] = args[0]

            handles.append(module.register_forward_pre_hook(pre))
        else:

            def post(module, args, output, layer=layer):
                store[layer] = _first(output)

            handles.append(module.register_forward_hook(post))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def capture_mlp_inputs(model: PreTrainedModel, layers: Sequence[int]):
    """Within the block, `store[layer]` holds the last forward's input of the edited projection
    (the keys)."""
    return _capture({layer: arch.mlp_out(model, layer) for layer in layers}, inputs=True)


def capture_block_outputs(model: PreTrainedModel, layers: Sequence[int]):
    """Within the block, `store[layer]` holds the last forward's hidden-state output of the block
    (the residual stream after that layer)."""
    return _capture({layer: arch.block(model, layer) for layer in layers}, inputs=False)


@contextmanager
def shift_block_output(
    model: PreTrainedModel, layer: int, shift: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Replace the block's hidden-state output h by shift(h) (used to add z-deltas)."""

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (shift(output[0]), *output[1:])
        return shift(output)

    handle = arch.block(model, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask (right padding keeps absolute positions)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, target: str
) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the target as it continues the prompt.

    The target is encoded with a leading space, as MEMIT does, so BPE tokenizers pick the
    word-initial pieces; a word-level tokenizer ignores the space.
    """
    return encode_pairs(tokenizer, [(prompt, target)])[0]


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]]
) -> list[tuple[list[int], list[int]]]:
    """`encode_pair` of every pair, with each distinct prompt and target text tokenised once, in
    one batched call each (an evaluation repeats a prompt for several targets and an object for
    many prompts; per-pair calls were most of its tokenisation time)."""
    if not pairs:
        return []
    prompts = list(dict.fromkeys(p for p, _ in pairs))
    targets = list(dict.fromkeys(t for _, t in pairs))
    prompt_ids = dict(
        zip(prompts, tokenizer(prompts, add_special_tokens=False)["input_ids"], strict=True)
    )
    spaced = [" " + t.strip() for t in targets]
    target_ids = dict(
        zip(targets, tokenizer(spaced, add_special_tokens=False)["input_ids"], strict=True)
    )
    for prompt, ids in prompt_ids.items():
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens")
    for target, ids in target_ids.items():
        if not ids:
            raise ValueError(f"target {target!r} encodes to no tokens")
    return [(list(prompt_ids[p]), list(target_ids[t])) for p, t in pairs]
