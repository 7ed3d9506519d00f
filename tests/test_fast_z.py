"""The z optimisation that recomputes only what z changes (blocks above the z layer, positions
from the subject on, cached keys/values before it) gives the same z as the full forward at every
step, and so the same edit, on every supported architecture (float64, random models), on the
shipped world, for both MEMIT variants; keys read from truncated rows and stopped forwards equal
the plain full forward's; the benchmark's one-request-at-a-time reference is the same algorithm.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from test_memit import INIT, TEXTS, _cfg, _models, _requests, _subject_final_requests
from transformers import Qwen2Config, Qwen2ForCausalLM

from collabedit.editors.memit import compute as C
from collabedit.editors.memit import edit, preset
from collabedit.editors.memit.compute import context_templates, fast_z_supported, optimise_z
from collabedit.models import arch
from collabedit.models.tracing import capture_block_outputs, capture_mlp_inputs
from collabedit.requests import EditRequest
from collabedit.world.tokenizer import build_tokenizer

TOL = 1e-6
# GPT-Neo computes attention scores in float32 whatever the model's dtype (transformers'
# GPTNeoSelfAttention._attn), so its two paths differ by float32 rounding (~1e-7), which Adam's
# normalised steps amplify; with float64 scores the paths agree to 0 (checked by hand).
TOL_FLOAT32_ATTENTION = 1e-4


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TEXTS)


def _qwen2(vocab: int, sliding: bool) -> Qwen2ForCausalLM:
    """Qwen2 as the world builds it; with `sliding`, sliding-window layers above the z layer too
    (the cache must then hold every position and the mask apply the window)."""
    torch.manual_seed(0)
    types = ["full_attention", "sliding_attention"] * 2 if sliding else ["full_attention"] * 4
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            use_sliding_window=sliding,
            sliding_window=3,
            layer_types=types,
            initializer_range=INIT,
        )
    )


def _model(name: str, vocab: int):
    if name.startswith("qwen2"):
        model = _qwen2(vocab, sliding=name == "qwen2-sliding")
    else:
        model = _models(vocab)[name]
    return model.eval().double()


def _mixed_requests() -> list[EditRequest]:
    """Subjects at different positions (lookups 0..3 in the bare prompt; more after a context),
    one- and two-token subjects and targets: rows of one chunk have different prefixes."""
    return [
        *_requests(),
        *_subject_final_requests(),
        EditRequest(
            case_id=6, subject="Gus", prompt="{} lives in", target_new="Rome Oslo", target_true="x"
        ),
    ]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-300)).max())


ARCHS = ["gpt2", "gptj", "gpt_neox", "llama", "qwen2", "qwen2-sliding", "gpt_neo"]


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_fast_z_equals_full_forward(tok, name, layer):
    """Layer 1: blocks 2-3 above the z layer; 2: one; 3: none (only the final norm and the
    head). At the last layer z reaches only its own position, so only requests whose subject
    ends the prompt are used there: for the others the gradient is zero up to rounding, which
    Adam's normalised steps turn into full steps on either path (a chaotic, not a real, z)."""
    model = _model(name, len(tok))
    assert fast_z_supported(model)
    cfg = _cfg(early_stop_loss=0.5, clamp_norm_factor=10.0, v_num_grad_steps=15)
    templates = context_templates(model, tok, cfg)
    reqs = _subject_final_requests() if layer == 3 else _mixed_requests()
    full = optimise_z(model, tok, reqs, layer, templates, cfg, fast=False)
    fast = optimise_z(model, tok, reqs, layer, templates, cfg, fast=True)
    tol = TOL_FLOAT32_ATTENTION if name == "gpt_neo" else TOL
    assert _rel(fast.z, full.z) < tol
    assert _rel(fast.z_init, full.z_init) < (1e-6 if name == "gpt_neo" else 1e-12)
    assert torch.equal(fast.steps_taken, full.steps_taken)
    assert torch.allclose(fast.final_loss, full.final_loss, rtol=1e-6, atol=1e-9)
    assert ((full.z - full.z_init).norm(dim=1) > 1e-3).all()  # z did move


def test_early_stopping_and_small_chunks(tok):
    """Requests stop at different steps (the fast path keeps stopped rows, weighted 0, until it
    re-chunks) and chunks of 4 rows split requests' rows across chunks: still the same z."""
    model = _model("llama", len(tok))
    cfg = _cfg(early_stop_loss=2.0, clamp_norm_factor=10.0, v_num_grad_steps=30, batch_rows=4)
    templates = context_templates(model, tok, cfg)
    reqs = _mixed_requests()
    full = optimise_z(model, tok, reqs, 1, templates, cfg, fast=False)
    fast = optimise_z(model, tok, reqs, 1, templates, cfg, fast=True)
    assert len(set(full.steps_taken.tolist())) >= 3, full.steps_taken  # stops do differ
    assert int(full.steps_taken.max()) == 29
    assert torch.equal(fast.steps_taken, full.steps_taken)
    assert _rel(fast.z, full.z) < TOL


def test_fast_chunks_cover_rows_once_and_respect_the_row_limit():
    lookups = [0, 0, 1, 1, 1, 5, 5, 9, 9, 9, 9]
    lengths = [3, 4, 3, 3, 8, 7, 9, 12, 12, 13, 20]
    for max_rows in (1, 2, 3, 100):
        bounds = C._fast_bounds(lookups, lengths, max_rows, overhead=4)
        assert [g for b in bounds for g in b] == list(range(len(lookups)))
        assert all(0 < len(b) <= max_rows for b in bounds)


@pytest.mark.parametrize("name", ["gpt2", "gptj", "gpt_neox", "llama", "qwen2"])
@pytest.mark.parametrize("frozen", [False, True], ids=["memit", "memit-frozen"])
def test_edit_with_fast_z_equals_edit_with_full_forward_z(tok, name, frozen):
    model = _model(name, len(tok))
    cfg = _cfg(v_num_grad_steps=10)
    reqs = _subject_final_requests()
    cov = {
        layer: torch.eye(arch.read_weight(model, layer).shape[1], dtype=torch.float64)
        for layer in cfg.layers
    }
    templates = context_templates(model, tok, cfg)
    z_full = optimise_z(model, tok, reqs, cfg.layers[-1], templates, cfg, fast=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = edit(model, tok, reqs, cfg, cov, frozen=frozen, apply=False, z=z_full)
    new = edit(model, tok, reqs, cfg, cov, frozen=frozen, apply=False)  # fast z inside
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for a, b in zip(new.layers, ref.layers, strict=True):
        assert (a.delta - b.delta).norm() / b.delta.norm() < TOL


@pytest.mark.parametrize("name", ["gpt2", "gptj", "gpt_neox", "llama", "qwen2-sliding"])
def test_keys_and_outputs_equal_the_plain_full_forward(tok, name):
    """Rows cut after the subject and forwards stopped at the last layer read change nothing."""
    model = _model(name, len(tok))
    cfg = _cfg()
    templates = context_templates(model, tok, cfg)
    reqs = _mixed_requests()
    layers = [0, 2]
    keys = C.compute_keys(model, tok, reqs, layers, templates, batch_rows=5)
    cur = C.current_outputs(model, tok, reqs, 2, batch_rows=5)
    plain_keys = {layer: [] for layer in layers}
    plain_cur = []
    with torch.no_grad():
        for r in reqs:
            per = {layer: [] for layer in layers}
            for group in templates:
                g = {layer: [] for layer in layers}
                for context in group:
                    template = context.replace("{}", r.prompt)
                    text = template.format(r.subject)
                    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
                    look = C.subject_last_index(tok, template, r.subject)
                    with capture_mlp_inputs(model, layers) as k:
                        model(input_ids=ids)
                    for layer in layers:
                        g[layer].append(k[layer][0, look])
                for layer in layers:
                    per[layer].append(torch.stack(g[layer]).mean(0))
            for layer in layers:
                plain_keys[layer].append(torch.stack(per[layer]).mean(0))
            ids = tok(r.rewrite_prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with capture_block_outputs(model, [2]) as hs:
                model(input_ids=ids)
            plain_cur.append(hs[2][0, C.subject_last_index(tok, r.prompt, r.subject)])
    for layer in layers:
        assert _rel(keys[layer], torch.stack(plain_keys[layer])) < 1e-12
    assert _rel(cur, torch.stack(plain_cur)) < 1e-12


def test_unsupported_architecture_takes_the_full_forward(tok, monkeypatch):
    model = _model("gpt2", len(tok))
    cfg = _cfg(v_num_grad_steps=5)
    templates = context_templates(model, tok, cfg)
    reqs = _requests()
    full = optimise_z(model, tok, reqs, 1, templates, cfg, fast=False)

    def no_norm(model):  # an architecture whose final norm is not at the known path
        raise AttributeError("no final norm")

    monkeypatch.setattr(arch, "final_norm", no_norm)
    assert not fast_z_supported(model)

    def boom(*args, **kwargs):
        raise AssertionError("fast path used")

    monkeypatch.setattr(C, "_forward_fast", boom)
    again = optimise_z(model, tok, reqs, 1, templates, cfg, fast=True)
    assert torch.equal(again.z, full.z)


def _reference_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memit_reference.py"
    spec = importlib.util.spec_from_file_location("memit_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_reference_is_the_same_algorithm(tok):
    """benchmarks/memit_reference.py (MEMIT's loop, one request at a time, full logits) finds
    the z that the batched, fast optimisation finds."""
    reference = _reference_module()
    model = _model("gpt2", len(tok))
    cfg = _cfg(early_stop_loss=0.5, clamp_norm_factor=10.0, v_num_grad_steps=15)
    templates = context_templates(model, tok, cfg)
    reqs = _mixed_requests()
    ref = reference.reference_z(model, tok, reqs, 2, templates, cfg)
    fast = optimise_z(model, tok, reqs, 2, templates, cfg)
    assert _rel(fast.z, ref.z) < TOL
    assert torch.equal(fast.steps_taken, ref.steps_taken)


@pytest.fixture(scope="module")
def world():
    from collabedit.world.store import load_world

    return load_world("world-v1")  # the world preset's layers are world-v1's


@pytest.mark.parametrize("frozen", [False, True], ids=["memit", "memit-frozen"])
def test_world_fast_z_and_edit_equal_full_forward(world, frozen):
    from collabedit.world.edit_requests import world_requests

    model = world.model.double()
    try:
        cfg = preset("world").model_copy(update={"v_num_grad_steps": 25})
        reqs = world_requests(world.world, 4, seed=3)
        templates = context_templates(model, world.tokenizer, cfg)
        layer = cfg.layers[-1]
        full = optimise_z(model, world.tokenizer, reqs, layer, templates, cfg, fast=False)
        fast = optimise_z(model, world.tokenizer, reqs, layer, templates, cfg, fast=True)
        assert _rel(fast.z, full.z) < TOL
        assert torch.equal(fast.steps_taken, full.steps_taken)
        d_in = arch.read_weight(model, layer).shape[1]
        cov = {layer: torch.eye(d_in, dtype=torch.float64)}
        ref = edit(model, world.tokenizer, reqs, cfg, cov, frozen=frozen, apply=False, z=full)
        new = edit(model, world.tokenizer, reqs, cfg, cov, frozen=frozen, apply=False, z=fast)
        for a, b in zip(new.layers, ref.layers, strict=True):
            assert (a.delta - b.delta).norm() / b.delta.norm() < TOL
    finally:
        world.model.float()


def test_common_prefix():
    assert C._common_prefix([[1, 2, 3], [1, 2, 4, 5], [1, 2]]) == 2
    assert C._common_prefix([[1, 2, 3], [2, 2, 3]]) == 0
    assert C._common_prefix([[7, 8]]) == 2


def test_shared_context_prefix_is_computed_once_and_changes_nothing(tok, monkeypatch):
    """Chunks whose rows all start with one context's tokens run them once (batch of one) into
    the cache; the z is the one found with every row computed in full."""
    model = _model("gpt_neox", len(tok))
    cfg = _cfg(
        early_stop_loss=0.0,
        v_num_grad_steps=6,
        context_template_length_params=[(4, 1)],
        batch_rows=3,
    )
    templates = context_templates(model, tok, cfg)
    reqs = _requests()
    used = []
    prepare = C._prepare_fast

    def spy(model, layer, ch, shared=0):
        used.append(min(shared, int(ch["lookup"].min())))
        return prepare(model, layer, ch, shared)

    monkeypatch.setattr(C, "_prepare_fast", spy)
    shared = optimise_z(model, tok, reqs, 1, templates, cfg)
    assert max(used) >= 3  # a context prefix (4 tokens here) was shared
    monkeypatch.setattr(C, "_common_prefix", lambda rows: 0)
    alone = optimise_z(model, tok, reqs, 1, templates, cfg)
    full = optimise_z(model, tok, reqs, 1, templates, cfg, fast=False)
    assert _rel(shared.z, alone.z) < 1e-12
    assert _rel(shared.z, full.z) < TOL


def test_blocks_sized_by_the_memory_budget_give_the_same_z(tok):
    """A tiny `z_memory_mb` splits the requests into blocks optimised one after the other; z of a
    request does not depend on the others, so the blocks give the one batch's z (float64)."""
    model = _model("gpt2", len(tok))
    cfg = _cfg(early_stop_loss=0.5, clamp_norm_factor=10.0, v_num_grad_steps=12)
    templates = context_templates(model, tok, cfg)
    reqs = _mixed_requests()
    per_request_mb = cfg.z_memory_mb / C.z_block_size(model, tok, reqs, templates, cfg)
    small = cfg.model_copy(update={"z_memory_mb": 2.5 * per_request_mb})
    assert C.z_block_size(model, tok, reqs, templates, small) == 2 < len(reqs)
    seen = []
    blocked = optimise_z(model, tok, reqs, 1, templates, small,
                         progress=lambda stage, done, total: seen.append((done, total)))
    whole = optimise_z(model, tok, reqs, 1, templates, cfg)
    assert _rel(blocked.z, whole.z) < TOL
    assert torch.equal(blocked.steps_taken, whole.steps_taken)
    # one progress bar over all blocks, ending complete
    assert seen[-1][0] == seen[-1][1] and all(t == seen[0][1] for _, t in seen)


@pytest.mark.parametrize("name", ARCHS)
def test_final_norm_is_the_norm_before_the_unembedding(tok, name):
    """The last block's output through `arch.final_norm` and the unembedding gives the model's
    own logits (float64, to 1e-10): the readout of the realistic world's recipe and the fast z
    path read the residual the way the model does."""
    model = _model(name, len(tok))
    ids = torch.tensor([tok("the quick brown fox", add_special_tokens=False)["input_ids"]])
    last = arch.n_layers(model) - 1
    with capture_block_outputs(model, [last]) as store, torch.no_grad():
        logits = model(input_ids=ids).logits
    h = store[last]
    with torch.no_grad():
        read = model.get_output_embeddings()(arch.final_norm(model)(h))
    assert float((read - logits).abs().max()) < 1e-10
