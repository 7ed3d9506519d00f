"""Causal tracing, checked where the answer is known exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from collabedit.evaluate.trace import average_trace, trace_fact
from collabedit.world.tokenizer import build_tokenizer


def test_restoring_the_last_layer_at_the_predicting_subject_token_restores_everything():
    tok = build_tokenizer(["Ann speaks French", "Bo speaks English"])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=16,
                                       n_layer=3, n_head=2, initializer_range=0.3)).eval()
    # subject last = the position that predicts the target: the final block output there is
    # everything the prediction depends on
    effects = trace_fact(model, tok, "speaks {}", "Ann", "French", noise=1.0, samples=4)
    assert effects["hidden"][-1] == pytest.approx(
        effects["clean"][0] - effects["corrupted"][0], abs=1e-6)
    assert len(effects["mlp"]) == 3
    avg = average_trace(model, tok, [("speaks {}", "Ann", "French"),
                                     ("{} speaks", "Bo", "English")], samples=2)
    assert avg["n_facts"] == 2 and len(avg["hidden"]) == 3
