"""Delta files: written by `edit --delta`, applied only to the model they were computed for."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from collabedit.deltas import apply_deltas, load_deltas, save_deltas
from collabedit.models import arch


def _model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=30, n_positions=16, n_embd=8, n_layer=3,
                                      n_head=2))


def test_round_trip_and_apply(tmp_path):
    model = _model()
    deltas = {1: torch.randn(8, 32, dtype=torch.float64), 2: torch.randn(8, 32)}
    path = tmp_path / "d.safetensors"
    save_deltas(path, arch.fingerprint(model, [1, 2]), deltas,
                {1: arch.mlp_out_name(model, 1), 2: arch.mlp_out_name(model, 2)}, {"n": 1})
    loaded, meta = load_deltas(path)
    assert torch.allclose(loaded[1], deltas[1].float())
    before = arch.read_weight(model, 1)
    apply_deltas(model, path)
    assert torch.allclose(arch.read_weight(model, 1), before + deltas[1].float())
    # applying again: the model is no longer the base the deltas were computed for
    with pytest.raises(ValueError, match="computed for base model"):
        apply_deltas(model, path)


def test_other_model_and_bad_files_change_nothing(tmp_path):
    model, other = _model(0), _model(1)
    path = tmp_path / "d.safetensors"
    save_deltas(path, arch.fingerprint(model, [1]), {1: torch.ones(8, 32)},
                {1: arch.mlp_out_name(model, 1)}, {})
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="computed for base model"):
        apply_deltas(other, path)
    nan = tmp_path / "nan.safetensors"
    save_deltas(nan, arch.fingerprint(other, [1]), {1: torch.full((8, 32), float("nan"))},
                {1: arch.mlp_out_name(other, 1)}, {})
    with pytest.raises(ValueError, match="non-finite"):
        apply_deltas(other, nan)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a collabedit delta"):
        apply_deltas(other, foreign)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
