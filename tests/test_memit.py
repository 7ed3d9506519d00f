"""MEMIT: the closed-form update from first principles, batched z, architectures, bad input."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from collabedit.editors.memit import MemitConfig, edit, from_easyedit_yaml, preset
from collabedit.editors.memit.compute import (
    ZResult,
    context_templates,
    optimise_z,
    z_cache_key,
)
from collabedit.linalg import NotSymmetricError, memit_update, solve_update
from collabedit.models import arch
from collabedit.models.tracing import SubjectNotFoundError, capture_mlp_inputs
from collabedit.requests import EditRequest
from collabedit.stats import collect_stats, layer_stats, load_stats
from collabedit.world.tokenizer import build_tokenizer

TEXTS = [
    "Ann Bo speaks French",
    "Cy Dee speaks English",
    "Ed Fay lives in Paris",
    "Gus Hal lives in Rome",
    "Ann Bo is a poet",
    "Cy Dee is a pilot",
    "The weather was cold.",
    "Everyone waited for the results.",
    "Ivy Jo works in Oslo",
    "Ivy Jo speaks Greek",
]
_WORDS = " ".join(TEXTS).replace(".", " .").split()
# A corpus with more tokens than any key width below, so C = E[k k^T] is full rank.
CORPUS = [" ".join(random.Random(i).choices(_WORDS, k=12)) for i in range(80)]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TEXTS)


def _requests() -> list[EditRequest]:
    return [
        EditRequest(
            case_id=0,
            subject="Ann Bo",
            prompt="{} speaks",
            target_new="Greek",
            target_true="French",
        ),
        EditRequest(
            case_id=1,
            subject="Ed Fay",
            prompt="{} lives in",
            target_new="Oslo",
            target_true="Paris",
        ),
        EditRequest(
            case_id=2, subject="Cy Dee", prompt="{} is a", target_new="poet", target_true="pilot"
        ),
    ]


# Random models at the usual init (0.02) barely react to their residual stream; a larger init
# gives them logits that an edit can move, as a trained model's are.
INIT = 0.3


def _subject_final_requests() -> list[EditRequest]:
    """Random models have unstructured attention: the subject sits at the predicting position so
    the test measures the edit (keys, z, update, write-back), not the model's routing."""
    return [
        EditRequest(
            case_id=0,
            subject="Ann Bo",
            prompt="The poet {}",
            target_new="Greek",
            target_true="French",
        ),
        EditRequest(
            case_id=1,
            subject="Ed Fay",
            prompt="Everyone speaks {}",
            target_new="Oslo",
            target_true="Paris",
        ),
        EditRequest(
            case_id=2, subject="Cy Dee", prompt="{}", target_new="poet", target_true="pilot"
        ),
    ]


def _models(vocab: int):
    torch.manual_seed(0)
    return {
        "gpt2": GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab,
                n_positions=64,
                n_embd=32,
                n_layer=4,
                n_head=4,
                initializer_range=INIT,
            )
        ),
        "gpt_neo": GPTNeoForCausalLM(
            GPTNeoConfig(
                vocab_size=vocab,
                max_position_embeddings=64,
                hidden_size=32,
                num_layers=4,
                num_heads=4,
                attention_types=[[["local", "global"], 2]],
                window_size=4,
                initializer_range=INIT,
            )
        ),
        "gptj": GPTJForCausalLM(
            GPTJConfig(
                vocab_size=vocab,
                n_positions=64,
                n_embd=32,
                n_layer=4,
                n_head=4,
                rotary_dim=8,
                initializer_range=INIT,
            )
        ),
        "gpt_neox": GPTNeoXForCausalLM(
            GPTNeoXConfig(
                vocab_size=vocab,
                hidden_size=32,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=64,
                initializer_range=INIT,
            )
        ),
        "llama": LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=32,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=64,
                max_position_embeddings=64,
                initializer_range=INIT,
            )
        ),
    }


def _spd(d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, 3 * d, generator=gen, dtype=torch.float64)
    return a @ a.T / (3 * d)


@settings(max_examples=25, deadline=None)
@given(
    d_in=st.integers(2, 40),
    d_out=st.integers(1, 30),
    n=st.integers(1, 60),
    lam=st.floats(1e-2, 1e4),
    seed=st.integers(0, 2**16),
)
def test_update_satisfies_its_normal_equations(d_in, d_out, n, lam, seed):
    gen = torch.Generator().manual_seed(seed)
    K = torch.randn(d_in, n, generator=gen, dtype=torch.float64)
    R = torch.randn(d_out, n, generator=gen, dtype=torch.float64)
    C = _spd(d_in, gen)
    delta = memit_update(K, R, C, lam)
    lhs = (lam * C + K @ K.T) @ delta.T
    rhs = K @ R.T
    assert (lhs - rhs).norm() / rhs.norm() < 1e-8


def test_unmet_residual_measures_what_the_update_cannot_deliver():
    """A layer delivers each residual at its key when the keys fit in its width and lambda is
    small; it cannot when there are more edits than key dimensions, nor when C dominates."""
    from collabedit.editors import LayerEdit

    gen = torch.Generator().manual_seed(0)
    d_in, d_out = 32, 16
    C = _spd(d_in, gen)

    def unmet(n: int, lam: float) -> torch.Tensor:
        K = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
        R = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
        return LayerEdit(0, "m", K, R, memit_update(K.T, R.T, C, lam)).unmet

    assert unmet(8, 1e-6).max() < 1e-3
    # 64 random targets in a 32-wide layer: least squares leaves about sqrt(1 - 32/64) of each
    assert 0.5 < unmet(64, 1e-6).mean() < 0.9
    assert unmet(8, 1e8).min() > 0.99


def test_solve_rejects_bad_matrices():
    gen = torch.Generator().manual_seed(0)
    A = _spd(4, gen)
    P = torch.randn(3, 4, dtype=torch.float64)
    bad = A.clone()
    bad[0, 1] += 1.0
    with pytest.raises(NotSymmetricError):
        solve_update(P, bad)
    nan = A.clone()
    nan[2, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        solve_update(P, nan)
    with pytest.raises(ValueError, match="positive definite"):
        solve_update(P, -A)
    with pytest.raises(ValueError, match="shape|is"):
        solve_update(torch.randn(3, 5, dtype=torch.float64), A)


def _cfg(**kw) -> MemitConfig:
    # published z settings; lambda scaled to our tiny corpus; fewer, shorter context prefixes
    base = dict(
        layers=[1, 2],
        mom2_update_weight=1.0,
        context_template_length_params=[(4, 3)],
        context_start_words=["The"],
    )
    return MemitConfig(**(base | kw))


def _cov(model, tok, layers):
    return {layer: s.mom2 for layer, s in collect_stats(model, tok, CORPUS, layers).items()}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-2)])
def test_batched_z_equals_one_request_at_a_time(tok, dtype, tol):
    """Same algorithm, same numbers; in float32 padding changes the rounding, and Adam's
    normalised steps amplify it near convergence, hence the looser tolerance there."""
    model = _models(len(tok))["gpt2"].eval().to(dtype)
    cfg = _cfg(early_stop_loss=0.5, clamp_norm_factor=10.0)
    templates = context_templates(model, tok, cfg)
    reqs = _requests()
    together = optimise_z(model, tok, reqs, 2, templates, cfg)
    each = [optimise_z(model, tok, [r], 2, templates, cfg) for r in reqs]
    alone = torch.cat([z.z for z in each])
    rel = (together.z - alone).norm(dim=1) / alone.norm(dim=1)
    assert rel.max() < tol
    assert together.steps_taken.tolist() == [int(z.steps_taken) for z in each]
    # the optimisation did move every z
    assert ((together.z - together.z_init).norm(dim=1) > 1e-3).all()


def test_z_cache_round_trips_and_refuses_other_inputs(tok, tmp_path):
    model = _models(len(tok))["gpt2"].eval()
    cfg = _cfg(v_num_grad_steps=3)
    templates = context_templates(model, tok, cfg)
    reqs = _requests()
    z = optimise_z(model, tok, reqs, 2, templates, cfg)
    key = z_cache_key(model, reqs, 2, templates, cfg)
    path = tmp_path / "z.safetensors"
    z.save(path, key)
    back = ZResult.load(path, key)
    joined = ZResult.cat([back.select([0]), back.select(range(1, len(reqs)))])
    for name in ("z", "z_init", "final_loss", "steps_taken"):
        assert torch.equal(getattr(back, name), getattr(z, name))
        assert torch.equal(getattr(joined, name), getattr(z, name))
    # lambda and the edited layers do not change z; everything z depends on changes the key
    assert z_cache_key(model, reqs, 2, templates, cfg.model_copy(update={"layers": [2]})) == key
    others = [
        z_cache_key(model, reqs[:-1], 2, templates, cfg),
        z_cache_key(model, reqs, 1, templates, cfg),
        z_cache_key(model, reqs, 2, templates, cfg.model_copy(update={"v_lr": 0.1})),
    ]
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] += 1.0
    others.append(z_cache_key(model, reqs, 2, templates, cfg))
    assert key not in others
    assert all(ZResult.load(path, other) is None for other in others)
    assert ZResult.load(tmp_path / "missing.safetensors", key) is None


@pytest.mark.parametrize("name", ["gpt2", "gpt_neo", "gptj", "gpt_neox", "llama"])
def test_edit_each_architecture_only_touches_chosen_layers(tok, name):
    model = _models(len(tok))[name].eval()
    cfg = _cfg()
    reqs = _subject_final_requests()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = edit(model, tok, reqs, cfg, _cov(model, tok, cfg.layers))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {f"{arch.mlp_out_name(model, layer)}.weight" for layer in cfg.layers}
    assert changed == expected
    assert [e.layer for e in result.layers] == cfg.layers
    # efficacy: the new target is the top-1 next token on each edit prompt
    for r in reqs:
        ids = tok(r.rewrite_prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        top = model(input_ids=ids).logits[0, -1].argmax().item()
        assert tok.convert_ids_to_tokens(top) == r.target_new, (name, r.case_id)


def test_gpt2_conv1d_is_read_and_written_transposed(tok):
    model = _models(len(tok))["gpt2"]
    w = arch.read_weight(model, 1)
    assert w.shape == (32, 4 * 32)  # (d_out, d_in), while Conv1D stores (d_in, d_out)
    delta = torch.zeros_like(w)
    delta[3, 5] = 1.0
    arch.add_to_weight(model, 1, delta)
    assert model.transformer.h[1].mlp.c_proj.weight[5, 3].item() == pytest.approx(
        w[3, 5].item() + 1.0
    )


def test_frozen_editor_uses_unedited_keys_for_every_layer(tok):
    model = _models(len(tok))["gpt2"].eval()
    cfg = _cfg()
    reqs = _requests()
    cov = _cov(model, tok, cfg.layers)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = edit(model, tok, reqs, cfg, cov, frozen=True, apply=False)
    seq = edit(model, tok, reqs, cfg, cov, frozen=False, apply=False)
    # apply=False leaves the model exactly as it was, bit for bit
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.allclose(frozen.layers[0].keys, seq.layers[0].keys)
    # the sequential editor re-reads layer 2's keys after writing layer 1; frozen does not
    assert not torch.allclose(frozen.layers[1].keys, seq.layers[1].keys)
    templates = context_templates(model, tok, cfg)
    from collabedit.editors.memit.compute import compute_keys

    unedited = compute_keys(model, tok, reqs, [2], templates)[2]
    assert torch.allclose(frozen.layers[1].keys, unedited)


def test_a_layer_can_have_its_own_lambda(tok):
    """mom2_update_weight_by_layer weighs C at one layer only: each layer's update solves its
    normal equations with its own lambda. The frozen editor reads every layer on the unedited
    model, so each layer's update is the one a uniform run with that layer's lambda makes."""
    model = _models(len(tok))["gpt2"].eval()
    cov = _cov(model, tok, [1, 2])
    reqs = _requests()
    own = edit(model, tok, reqs, _cfg(mom2_update_weight_by_layer={2: 50.0}), cov, True, False)
    at1 = edit(model, tok, reqs, _cfg(), cov, frozen=True, apply=False)
    at50 = edit(model, tok, reqs, _cfg(mom2_update_weight=50.0), cov, frozen=True, apply=False)
    assert torch.allclose(own.layers[0].delta, at1.layers[0].delta, rtol=1e-9, atol=1e-12)
    assert torch.allclose(own.layers[1].delta, at50.layers[1].delta, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(at1.layers[1].delta, at50.layers[1].delta, rtol=1e-3)
    for le, lam in zip(own.layers, (1.0, 50.0), strict=True):
        K, R = le.keys.T, le.residuals.T  # (d_in, n), (d_out, n)
        lhs = (lam * cov[le.layer].double() + K @ K.T) @ le.delta.T
        assert (lhs - K @ R.T).norm() / (K @ R.T).norm() < 1e-8
    # z does not depend on lambda: the z cache key ignores the per-layer weights
    templates = context_templates(model, tok, _cfg())
    assert z_cache_key(model, reqs, 2, templates, _cfg()) == z_cache_key(
        model, reqs, 2, templates, _cfg(mom2_update_weight_by_layer={2: 50.0})
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"mom2_update_weight_by_layer.*\[9\] out of range"):
        edit(model, tok, reqs, _cfg(mom2_update_weight_by_layer={9: 5.0}), cov)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValidationError, match="greater than 0"):
        _cfg(mom2_update_weight_by_layer={2: 0.0})


def test_bad_input_fails_before_any_weight_changes(tok):
    model = _models(len(tok))["gpt2"].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cov = _cov(model, tok, [1, 2])
    with pytest.raises(ValueError, match="out of range"):
        edit(model, tok, _requests(), _cfg(layers=[1, 9]), cov)
    glued = EditRequest(case_id=7, subject="Ann", prompt="{}Bo speaks", target_new="Greek")
    # word-level tokens cannot split "AnnBo": the subject does not tokenise inside the prompt
    with pytest.raises(ValueError, match="does not tokenise"):
        edit(model, tok, [*_requests(), glued], _cfg(), cov)
    with pytest.raises(ValueError, match="no covariance"):
        edit(model, tok, _requests(), _cfg(), {1: cov[1]})
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    opt = OPTForCausalLM(
        OPTConfig(
            vocab_size=len(tok),
            hidden_size=16,
            num_hidden_layers=2,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
        )
    )
    with pytest.raises(arch.UnsupportedModelError, match="not supported"):
        edit(opt, tok, _requests(), _cfg(), cov)
    with pytest.raises(SubjectNotFoundError):
        from collabedit.models.tracing import subject_last_index

        subject_last_index(tok, "{}Bo speaks", "Ann")


def test_statistics_are_the_second_moment_and_cached(tok, tmp_path):
    model = _models(len(tok))["gpt2"].eval()
    stats = collect_stats(model, tok, TEXTS, [1], batch_size=3)
    keys = []
    with torch.no_grad():
        for text in TEXTS:
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with capture_mlp_inputs(model, [1]) as k:
                model(input_ids=ids)
            keys.append(k[1][0].double())
    K = torch.cat(keys)
    assert stats[1].count == K.shape[0]
    # padding in batches changes float32 rounding only
    assert torch.allclose(stats[1].mom2, K.T @ K / K.shape[0], rtol=1e-5, atol=1e-6)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS))
    first = layer_stats(model, tok, [1, 2], corpus=str(corpus), samples=10, cache_dir=tmp_path)
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 2
    again = layer_stats(model, tok, [1, 2], corpus=str(corpus), samples=10, cache_dir=tmp_path)
    assert torch.equal(first[1].mom2, again[1].mom2)
    assert again[1].meta["model_fingerprint"] == arch.fingerprint(model)
    other = _models(len(tok))["llama"]
    with pytest.raises(ValueError, match="belong to model"):
        load_stats(files[0], expect_fingerprint=arch.fingerprint(other))


def test_fingerprint_tracks_weights(tok):
    a = _models(len(tok))["gpt2"]
    fp = arch.fingerprint(a, [1, 2])
    assert fp == arch.fingerprint(a, [1, 2])
    arch.add_to_weight(a, 2, torch.full_like(arch.read_weight(a, 2), 1e-3))
    assert arch.fingerprint(a, [1, 2]) != fp
    assert arch.fingerprint(a, [0, 1]) == arch.fingerprint(_models(len(tok))["gpt2"], [0, 1])


def test_presets_and_easyedit_yaml(tmp_path):
    assert preset("gpt2-xl").layers == [13, 14, 15, 16, 17]
    assert preset("gpt-j").mom2_update_weight == 15000
    with pytest.raises(ValueError, match="unknown MEMIT preset"):
        preset("nope")
    y = tmp_path / "memit.yaml"
    y.write_text(
        "alg_name: MEMIT\nmodel_name: ./gpt-j\nlayers: [3, 4]\nv_lr: 0.2\n"
        "mom2_update_weight: 12000\nmom2_dataset: wikipedia\ndevice: 0\n"
    )
    cfg = from_easyedit_yaml(y)
    assert cfg.layers == [3, 4] and cfg.v_lr == 0.2 and cfg.mom2_update_weight == 12000
    assert cfg.mom2_dataset.startswith("wikipedia")


def test_residual_shrinks_when_the_edit_is_already_made():
    """Overlap signal (the paper's Figure 3): re-editing a made edit needs a smaller residual.
    z runs 60 steps, not the preset's 200 (measured on one thread, relative residual after the
    edit over before: 0.23 at 200 steps, 0.32 at 60, 0.53 at 30)."""
    from collabedit.world.edit_requests import world_requests
    from collabedit.world.store import load_world

    b = load_world("world-v1")
    cfg = preset("world").model_copy(update={"mom2_n_samples": 3000, "v_num_grad_steps": 60})
    reqs = world_requests(b.world, 10, seed=11)
    cov = {
        k: s.mom2 for k, s in layer_stats(b.model, b.tokenizer, cfg.layers, "world", 3000).items()
    }
    templates = context_templates(b.model, b.tokenizer, cfg)
    first = optimise_z(b.model, b.tokenizer, reqs, cfg.layers[-1], templates, cfg)
    edit(b.model, b.tokenizer, reqs, cfg, cov, z=first)
    again = optimise_z(b.model, b.tokenizer, reqs, cfg.layers[-1], templates, cfg)
    assert again.relative_residuals.mean() < 0.5 * first.relative_residuals.mean()
