"""Batched teacher-forced scoring of (prompt, target) pairs: the one primitive every metric uses.

For each pair we run prompt + target once and read, at every target position, the log-probability
of the target token and whether it is the argmax. CounterFact metrics use the mean log-probability
(MEMIT compares mean token NLLs of multi-token objects); zsRE metrics and the world's recall use
the argmax agreement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from collabedit.models.tracing import encode_pairs, pad_batch


@dataclass(frozen=True)
class TargetScore:
    mean_logprob: float
    token_correct: tuple[bool, ...]

    @property
    def all_correct(self) -> bool:
        return all(self.token_correct)

    @property
    def token_accuracy(self) -> float:
        return sum(self.token_correct) / len(self.token_correct)


@torch.no_grad()
def score_targets(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 256,
    progress=None,
) -> list[TargetScore]:
    """Score every (prompt, target) pair; right padding keeps absolute positions intact.

    Pairs with the same model input (prompt + all but the last target token: one prompt with
    several one-token targets, as CounterFact's new and true objects mostly are) share one row of
    the forward pass: a causal model's logits at a row depend on that row's tokens only.
    `batch_size` counts rows; `progress` is told the pairs each batch scored."""
    encoded = encode_pairs(tokenizer, pairs)
    rows: dict[tuple[int, ...], list[int]] = {}
    for i, (prompt_ids, target_ids) in enumerate(encoded):
        rows.setdefault(tuple(prompt_ids + target_ids[:-1]), []).append(i)
    # sorting by length keeps padding (wasted compute) small
    inputs = sorted(rows, key=len)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[TargetScore | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start : start + batch_size]
            input_ids, attention = pad_batch(batch, pad_id)
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention.to(device)
            ).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)
            scored = 0
            for row, seq in enumerate(batch):
                for i in rows[seq]:
                    prompt_ids, target_ids = encoded[i]
                    positions = torch.arange(len(target_ids)) + len(prompt_ids) - 1
                    targets = torch.tensor(target_ids)
                    lp = logprobs[row, positions].cpu()
                    token_lp = lp.gather(1, targets[:, None]).squeeze(1)
                    correct = (lp.argmax(dim=-1) == targets).tolist()
                    results[i] = TargetScore(
                        float(token_lp.mean()), tuple(bool(c) for c in correct)
                    )
                    scored += 1
            if progress is not None:
                progress(scored)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]
