"""In-process collaboration on a small random model: the merge identities the method rests on."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from collabedit.collab.protocol import (
    Client,
    apply_deltas,
    client_update,
    layer_sync_round,
    merge_updates,
    relative_gap,
)
from collabedit.editors.memit import MemitConfig, edit
from collabedit.requests import EditRequest
from collabedit.stats import collect_stats
from collabedit.world.tokenizer import build_tokenizer

NAMES = ["Ann", "Bo", "Cy", "Dee", "Ed", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu"]
OBJECTS = ["French", "Greek", "Oslo", "Paris", "poet", "pilot"]
TEXTS = [f"{n} speaks {o}" for n in NAMES for o in OBJECTS] + ["The weather was cold ."]


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer(TEXTS)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16,
                                       n_layer=4, n_head=2, initializer_range=0.3))
    model = model.double().eval()
    corpus = [" ".join(random.Random(i).choices(" ".join(TEXTS).split(), k=10))
              for i in range(120)]
    cfg = MemitConfig(layers=[1, 2], mom2_update_weight=2.0, v_num_grad_steps=8,
                      context_template_length_params=[(3, 2)], context_start_words=["The"])
    covs = {k: s.mom2 for k, s in collect_stats(model, tok, corpus, cfg.layers).items()}
    reqs = [EditRequest(case_id=i, subject=n, prompt="{} speaks", target_new=OBJECTS[i % 6])
            for i, n in enumerate(NAMES[:9])]
    clients = [Client(f"c{i}", reqs[3 * i : 3 * i + 3]) for i in range(3)]
    return model, tok, cfg, covs, reqs, clients


def _copy(model):
    clone = GPT2LMHeadModel(model.config).double().eval()
    clone.load_state_dict(model.state_dict())
    return clone


def test_frozen_one_shot_collabedit_equals_global_edit(setup):
    model, tok, cfg, covs, reqs, clients = setup
    glob = edit(_copy(model), tok, reqs, cfg, covs, frozen=True, apply=False)
    updates = [client_update(model, tok, c, cfg, covs, "memit-frozen") for c in clients]
    lam_c = {k: cfg.mom2_update_weight * v for k, v in covs.items()}
    merged = merge_updates(updates, lam_c, "collabedit")
    assert relative_gap(merged, {e.layer: e.delta for e in glob.layers}) < 1e-6
    # the destructive baselines are not Global-Edit
    avg = merge_updates(updates, lam_c, "simple-average")
    assert relative_gap(avg, {e.layer: e.delta for e in glob.layers}) > 1e-2


def test_layer_sync_equals_sequential_global_edit_and_one_shot_does_not(setup):
    model, tok, cfg, covs, reqs, clients = setup
    glob = edit(_copy(model), tok, reqs, cfg, covs, frozen=False, apply=False)
    reference = {e.layer: e.delta for e in glob.layers}
    synced = _copy(model)
    merged = layer_sync_round(synced, tok, clients, cfg, covs)
    assert relative_gap(merged, reference) < 1e-6
    lam_c = {k: cfg.mom2_update_weight * v for k, v in covs.items()}
    one_shot = merge_updates([client_update(model, tok, c, cfg, covs, "memit") for c in clients],
                             lam_c, "collabedit")
    assert relative_gap(one_shot, reference) > 1e-6  # close, not equal
    after = _copy(model)
    apply_deltas(after, merged)
    assert all(torch.equal(a, b) for a, b in zip(after.state_dict().values(),
                                                 synced.state_dict().values(), strict=True))
