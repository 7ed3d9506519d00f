"""In-process collaboration on a small random model: the merge identities the method rests on."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from collabedit.collab.protocol import (
    apply_deltas,
    layer_sync_round,
    merge_updates,
    relative_gap,
)
from collabedit.collab.rounds import client_round
from collabedit.collab.setup import EditingSetup
from collabedit.editors import closed_form_edit, get_editor
from collabedit.editors.memit import MemitConfig
from collabedit.models import arch
from collabedit.models.tracing import subject_last_index
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
    clients = [reqs[3 * i : 3 * i + 3] for i in range(3)]
    return model, tok, cfg, covs, reqs, clients


def _copy(model):
    clone = GPT2LMHeadModel(model.config).double().eval()
    clone.load_state_dict(model.state_dict())
    return clone


def party(setup, editor: str, model=None) -> EditingSetup:
    """An EditingSetup on `model` (default: the fixture's) with A0 = lambda C from the
    fixture's covariances (collected on a small corpus, not a cached file)."""
    base, tok, cfg, covs, _, _ = setup
    model = base if model is None else model
    a0 = {k: cfg.mom2_update_weight * c.double() for k, c in covs.items()}
    return EditingSetup(model, tok, get_editor(editor), cfg, a0, arch.fingerprint(model), "",
                        arch.snapshot(model, cfg.layers))


def _deltas(result):
    return {e.layer: e.delta for e in result.layers}


def test_frozen_one_shot_collabedit_equals_global_edit(setup):
    _, _, _, _, reqs, clients = setup
    glob_party = party(setup, "memit-frozen", _copy(setup[0]))
    glob = closed_form_edit(glob_party.session(reqs), glob_party.regulariser, apply=False)
    p = party(setup, "memit-frozen")
    updates = [client_round(p, c, f"c{i}").update for i, c in enumerate(clients)]
    merged = merge_updates(updates, p.regulariser, "collabedit")
    assert relative_gap(merged, _deltas(glob)) < 1e-6
    # the destructive baselines are not Global-Edit
    avg = merge_updates(updates, p.regulariser, "simple-average")
    assert relative_gap(avg, _deltas(glob)) > 1e-2


def test_layer_sync_equals_sequential_global_edit_and_one_shot_does_not(setup):
    model, _, _, _, reqs, clients = setup
    glob_party = party(setup, "memit", _copy(model))
    reference = _deltas(closed_form_edit(glob_party.session(reqs), glob_party.regulariser, False))
    synced = party(setup, "memit", _copy(model))
    sessions = [synced.session(c) for c in clients]
    merged = layer_sync_round(synced.model, sessions, synced.regulariser)
    assert relative_gap(merged, reference) < 1e-6
    p = party(setup, "memit")
    one_shot = merge_updates([client_round(p, c, f"c{i}").update for i, c in enumerate(clients)],
                             p.regulariser, "collabedit")
    assert relative_gap(one_shot, reference) > 1e-6  # close, not equal
    after = _copy(model)
    apply_deltas(after, merged)
    assert all(torch.equal(a, b) for a, b in zip(after.state_dict().values(),
                                                 synced.model.state_dict().values(), strict=True))


def test_client_round_leaves_the_model_as_it_was(setup):
    model, _, cfg, _, _, clients = setup
    before = arch.snapshot(model, cfg.layers)
    client_round(party(setup, "memit"), clients[0], "c0")
    assert all(torch.equal(before[k], arch.read_weight(model, k)) for k in cfg.layers)


def _keys_by_hook(model, tok, requests, layer, templates):
    """MEMIT's key, computed here without the editor's code: the input of the layer's MLP
    output projection at the subject's last token, averaged within each context group, then
    across groups."""
    module = arch.mlp_out(model, layer)
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    out = []
    try:
        for req in requests:
            group_means = []
            for group in templates:
                ks = []
                for context in group:
                    template = context.replace("{}", req.prompt)
                    ids = tok(template.format(req.subject), add_special_tokens=False)["input_ids"]
                    seen.clear()
                    with torch.no_grad():
                        model(input_ids=torch.tensor([ids]))
                    ks.append(seen[0][0, subject_last_index(tok, template, req.subject)])
                group_means.append(torch.stack(ks).double().mean(0))
            out.append(torch.stack(group_means).mean(0))
    finally:
        handle.remove()
    return torch.stack(out)


def test_update_sends_r_kt_and_k_kt_of_independently_read_keys(setup):
    """P = R K^T and S = K K^T, with K read by a forward hook (not by the editor's key code)
    and R = (z - the last edited layer's unedited output) / (layers left), as MEMIT defines."""
    model, tok, cfg, _, _, clients = setup
    p = party(setup, "memit-frozen")
    session = p.session(clients[0])
    update = client_round(p, clients[0], "c0", session=session).update
    cur = []
    block = arch.block(model, cfg.layers[-1])
    handle = block.register_forward_hook(lambda m, a, o: cur.append(o[0] if isinstance(o, tuple)
                                                                     else o))
    try:
        for req in clients[0]:
            cur_len = len(cur)
            ids = tok(req.rewrite_prompt, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]))
            cur[cur_len] = cur[cur_len][0, subject_last_index(tok, req.prompt, req.subject)]
    finally:
        handle.remove()
    target = session.z.z - torch.stack(cur).double()
    for j, layer in enumerate(cfg.layers):
        K = _keys_by_hook(model, tok, clients[0], layer, session.templates)
        R = target / (len(cfg.layers) - j)
        P, S = update.layers[layer].p_and_s()
        assert torch.allclose(S, K.T @ K, rtol=1e-9, atol=1e-12)
        assert torch.allclose(P, R.T @ K, rtol=1e-9, atol=1e-12)
