"""The realistic world recipe (issue 17): its structure, its training masks, its build and
resume, and how the editors and statistics find what it ships. The trained world's measurements
are in docs/realistic-world.md (a build takes far longer than a test)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from collabedit.cli import app
from collabedit.editors import get_editor
from collabedit.stats import iter_corpus
from collabedit.world import realistic
from collabedit.world.generator import generate_world
from collabedit.world.store import load_world
from collabedit.world.tokenizer import build_tokenizer
from collabedit.world.train import build_model

TINY = {
    "n_layer": 3,
    "local_layers": 2,
    "n_embd": 16,
    "n_head": 2,
    "recall_sample": 20,
    "catalogue_share": 0.25,
    "subject_bottleneck": True,
    # the recipe's readout after layer 2 and its layer-0 skips need the full seven layers; the
    # tests of those set them on the tiny model
    "readout_layer": None,
    "mlp_drop": 0.0,
}


def _world_and_tokenizer(n: int = 30, seed: int = 0):
    world = generate_world(realistic.realistic_spec(n, seed))
    general = realistic.general_corpus(world, 200, seed, 0.5)
    tok = build_tokenizer([*world.vocabulary_text(), *realistic.general_vocabulary(), *general])
    return world, tok


def test_bottleneck_mask_hides_a_subjects_first_tokens_from_what_follows():
    # row: 0 1 [2 3 4] 5 6, subject at positions 2-4, then padding at 7
    batch = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 0]])
    masks = realistic.bottleneck_masks(batch, [[(2, 4)]], pad=0, window=3)
    full, sliding = masks["full_attention"][0, 0], masks["sliding_attention"][0, 0]
    for q in range(8):
        for k in range(8):
            allowed = k <= q and k != 7 and not (q > 4 and k in (2, 3))
            assert bool(full[q, k]) == allowed, (q, k)
            assert bool(sliding[q, k]) == (allowed and k > q - 3), (q, k)


def test_subjects_sharing_a_last_name_get_different_keys_at_the_last_token():
    """Keys are contextual by construction: within the local window, the subject's last token
    sees its first name, so two subjects with one last name differ there (untrained model)."""
    world, tok = _world_and_tokenizer(60)
    by_last: dict[str, list[str]] = {}
    for s in world.subjects:
        by_last.setdefault(s.split()[-1], []).append(s)
    pairs = [names[:2] for names in by_last.values() if len(names) > 1]
    assert pairs, "the spec shares last names"
    cfg = realistic.RealisticConfig(**TINY, n_inner=32)
    model = build_model(cfg, tok).eval()
    keys = {}

    def hook(module, args):
        keys["k"] = args[0]

    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(hook)
    try:
        for a, b in pairs[:5]:
            out = []
            for s in (a, b):
                ids = tok(f"{s} was born in", return_tensors="pt")["input_ids"]
                last = len(tok(s, add_special_tokens=False)["input_ids"]) - 1
                with torch.no_grad():
                    model(input_ids=ids)
                out.append(keys["k"][0, last])
            assert (out[0] - out[1]).norm() / out[0].norm() > 1e-3, (a, b)
    finally:
        handle.remove()


def test_catalogue_lines_list_the_subjects_own_objects():
    world, tok = _world_and_tokenizer(30)
    rng = random.Random(0)
    for _ in range(200):
        subject, objects = realistic.catalogue_line(rng, world)
        assert 1 <= len(objects) <= 3
        by_relation = {world.facts[subject][r.id]: r.id for r in world.relations}
        assert len({by_relation[o] for o in objects}) == len(objects)  # distinct relations
    cfg = realistic.RealisticConfig(**(TINY | {"general_share": 0.0}), n_inner=32)
    plain = realistic._rows(
        world, tok, cfg.model_copy(update={"catalogue_share": 0.0}), random.Random(0)
    )
    more = realistic._rows(
        world, tok, cfg.model_copy(update={"catalogue_share": 1.0}), random.Random(0)
    )
    # one catalogue line per fact sentence: every subject is mentioned about twice as often
    n_plain = sum(len(s) for s in plain[2])
    assert sum(len(s) for s in more[2]) == 2 * n_plain
    # the readout's targets: no token without catalogue lines; with them, one run of object
    # tokens per line (a line starts with its subject, which is not a target), all weight 1
    assert float(plain[4].sum()) == 0
    marked = more[4] == 1
    assert bool((more[1][marked] == 1.0).all())
    starts = marked[:, 1:] & ~marked[:, :-1]
    assert int(starts.sum() + marked[:, 0].sum()) == n_plain


def test_fact_noise_states_other_objects_of_the_relation_and_nothing_else():
    """`fact_noise` p: a share p of fact statements and catalogue objects name another object of
    the same relation (the world then knows its facts with narrower margins); at 0 it draws
    nothing, so the epochs of builds made before the field existed are drawn as they were."""
    world, _ = _world_and_tokenizer(30)
    rng = random.Random(1)
    state = rng.getstate()
    assert all(realistic.stated_object(rng, r, o, 0.0) == o for _, r, o in world.iter_facts())
    assert rng.getstate() == state
    stated = [
        (rel, obj, realistic.stated_object(rng, rel, obj, 0.4))
        for _ in range(20)
        for _, rel, obj in world.iter_facts()
    ]
    changed = [(rel, new) for rel, obj, new in stated if new != obj]
    assert abs(len(changed) / len(stated) - 0.4) < 0.04  # 3,600 draws: 5 standard deviations
    assert all(new in rel.objects for rel, new in changed)
    # catalogue lines draw through the same function
    lines = [realistic.catalogue_line(rng, world, 0.4) for _ in range(500)]
    owned = [o in world.facts[subj].values() for subj, objects in lines for o in objects]
    # about 1,000 objects, 60% of them the subject's own: the bounds are 6 standard deviations
    assert 0.5 < sum(owned) / len(owned) < 0.7
    with pytest.raises(ValueError):
        realistic.RealisticConfig(fact_noise=0.95)


def test_realistic_build_ships_its_corpus_and_presets_and_resumes(tmp_path, monkeypatch):
    runner = CliRunner()
    args = ["world", "build", "--recipe", "realistic", "--subjects", "24", "--out"]
    # with readouts at layers 0 and 1, which the epoch log reports and a resumed build repeats
    recipe = TINY | {"readout_layer": [0, 1]}
    sets = [x for k, v in recipe.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    first = runner.invoke(app, [*args, str(tmp_path / "a"), "--max-epochs", "2", *sets])
    assert first.exit_code == 0, first.output
    assert "(layer 0)" in first.output and "(layer 1)" in first.output
    bundle = load_world(tmp_path / "a")
    assert (tmp_path / "a" / "corpus.txt").is_file() and (tmp_path / "a" / "general.txt").is_file()
    # the editors read the realistic preset the world declares
    cfg = get_editor("memit").default_config(bundle.model)
    assert cfg == get_editor("memit").preset("world-realistic")
    malmen = get_editor("malmen").default_config(bundle.model)
    assert malmen == get_editor("malmen").preset("world-realistic") and malmen.hypernet is None
    # covariance statistics read the corpus (facts mixed with general text), not only facts
    corpus = (tmp_path / "a" / "corpus.txt").read_text().splitlines()
    assert list(iter_corpus("world", model_dir=tmp_path / "a")) == corpus
    assert len(corpus) > len(list(bundle.world.sentences()))
    # a build stopped after epoch 1 continues from its checkpoint to the same model, and
    # tracing each epoch (here in b only) records where the facts are written without changing
    # a weight
    traced = [*sets, "--trace", "5"]
    monkeypatch.setattr(realistic, "measure_recall", _stop_after_epoch_1(realistic.measure_recall))
    stopped = runner.invoke(app, [*args, str(tmp_path / "b"), "--max-epochs", "2", *traced])
    assert stopped.exit_code != 0
    monkeypatch.undo()
    resumed = runner.invoke(app, [*args, str(tmp_path / "b"), "--max-epochs", "2", *traced])
    assert resumed.exit_code == 0, resumed.output
    assert "continuing from the checkpoint" in resumed.output
    assert "MLP effect at the subject by layer" in resumed.output
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = load_world(tmp_path / "b").build["history"]
    assert [len(h["mlp_trace"]) for h in history] == [TINY["n_layer"]] * 2
    assert history[0]["mlp_trace"] != history[1]["mlp_trace"]
    assert all(h["mlp_trace"] is None for h in bundle.build["history"])
    shipped = runner.invoke(app, ["world", "build", "--out", str(tmp_path / "d"), "--trace", "5"])
    assert shipped.exit_code == 1 and "--trace" in shipped.output
    assert not (tmp_path / "d").exists()
    bad = runner.invoke(app, [*args, str(tmp_path / "c"), "--set", "catalog_share=0.1"])
    assert bad.exit_code == 1 and "catalog_share" in bad.output


class _Stop(Exception):
    pass


def _stop_after_epoch_1(measure):
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # epoch 2's sample recall: epoch 1's checkpoint is on disk
            raise _Stop
        return measure(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("n", [240, 2000])
def test_spec_shares_last_names(n):
    spec = realistic.realistic_spec(n)
    assert spec.n_last_names * 2 < n  # about three subjects per last name
    assert realistic.realistic_config(n).n_inner == n // 2


def test_attention_only_global_layers_keep_zero_mlps_through_training():
    world, tok = _world_and_tokenizer(20)
    cfg = realistic.RealisticConfig(
        **(TINY | {"attention_only_global": True}), n_inner=32, max_epochs=1, cooldown_epochs=1
    )
    model, _ = realistic.train_realistic(world, tok, cfg)
    for layer in range(cfg.n_layer):
        weight = model.model.layers[layer].mlp.down_proj.weight
        assert bool((weight == 0).all()) == (layer >= cfg.local_layers), layer


def test_a_later_world_measure_adds_its_batch_sizes_to_the_earlier_ones():
    """measurements.json keeps the batch sizes an earlier run measured and this one did not; a
    size measured again is replaced; another layer set, or a file of another shape, is not
    kept."""
    from collabedit.bench.world_check import merge_measurements

    def run(layers, *sizes, tag):
        return {"layers": layers, "keys": tag, "edits": [{"n": n, "tag": tag} for n in sizes]}

    earlier = run([1, 2, 3], 100, 1000, tag="a")
    merged = merge_measurements(earlier, run([1, 2, 3], 500, 100, tag="b"))
    assert [(e["n"], e["tag"]) for e in merged["edits"]] == [(100, "b"), (500, "b"), (1000, "a")]
    assert merged["keys"] == "b"
    assert earlier["edits"] == [{"n": 100, "tag": "a"}, {"n": 1000, "tag": "a"}]  # not mutated
    new = run([2, 3, 4], 100, tag="c")
    for old in (earlier, None, [1, 2], {"layers": [2, 3, 4], "edits": "broken"}):
        assert merge_measurements(old, new)["edits"] == new["edits"]


def test_world_measure_shows_world_v1s_flaws(tmp_path):
    """`world measure` on world-v1 finds what issue 17 reports of it: keys that no prefix
    changes (window 1), an update far larger than the weight, and `world info` shows it."""
    import shutil

    from collabedit.bench.world_check import measure_world
    from collabedit.paths import SHIPPED_WORLDS

    shutil.copytree(SHIPPED_WORLDS["world-v1"], tmp_path / "w")
    bundle = load_world(tmp_path / "w")
    lines: list[str] = []
    result = measure_world(bundle, sizes=(8, 10_000), log=lines.append, trace_facts=4)
    assert result["keys"]["layer1"]["prefix_subject_first"] < 1e-6
    for part in ("hidden", "mlp"):  # both causal traces are logged, as the JSON holds them
        shown = ", ".join(f"{v:.3f}" for v in result["trace"][part])
        assert f"[trace] {part} {shown}" in lines
    assert len(result["edits"]) == 1  # 10,000 edits: more than the world's subjects, skipped
    edit = result["edits"][0]
    assert edit["memit"]["ES"] >= 50
    assert edit["memit"]["delta_over_W"]["1"] > 10
    assert edit["sequential_vs_frozen"]["1"] < 1e-9  # one edited layer: the editors coincide
    (tmp_path / "w" / "measurements.json").write_text(json.dumps(result))
    shown = CliRunner().invoke(app, ["world", "info", "--path", str(tmp_path / "w"), "--json"])
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.output)
    assert info["memit_8_edits"]["ES"] == round(edit["memit"]["ES"], 1)
    assert info["covariance_full_rank"] is False
    shown_change = info["memit_8_edits"]["max_output_change"]
    assert shown_change == round(edit["memit"]["output_change"]["1"], 3)


def test_output_change_is_the_rms_output_change_over_the_keys():
    """output_change(Delta, W, E[k k^T]) = sqrt(mean ||Delta k||^2 / mean ||W k||^2), and a
    delta on a direction no key uses changes nothing however large it is."""
    from collabedit.bench.world_check import low_variance_share, output_change

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(500, 12, generator=g, dtype=torch.float64)
    keys[:, 11] = 0  # a dead unit
    delta = torch.randn(7, 12, generator=g, dtype=torch.float64)
    weight = torch.randn(7, 12, generator=g, dtype=torch.float64)
    c = keys.T @ keys / len(keys)
    direct = ((keys @ delta.T).pow(2).sum(1).mean() / (keys @ weight.T).pow(2).sum(1).mean()).sqrt()
    assert abs(output_change(delta, weight, 60 * c) - float(direct)) < 1e-12
    on_dead_unit = delta.clone()
    on_dead_unit[:, 11] += 1e6
    assert abs(output_change(on_dead_unit, weight, c) - float(direct)) < 1e-12
    # the dead unit is the covariance's least-variance direction: its share of ||Delta||^2
    dead = float(delta[:, 11].pow(2).sum() / delta.pow(2).sum())
    assert abs(low_variance_share(delta, c, share=0.05) - dead) < 1e-12
    assert low_variance_share(on_dead_unit, c, share=0.05) > 1 - 1e-9


def test_general_only_global_mlps_learn_from_general_text_alone():
    """With global_mlps_general_only, a backward pass through rows of facts leaves the global
    layers' MLPs without gradient while the local MLPs get it; general sentences reach both; the
    flags mark exactly the general sentences' tokens."""
    from pydantic import ValidationError

    world, tok = _world_and_tokenizer(20)
    with pytest.raises(ValidationError, match="attention_only_global"):
        realistic.RealisticConfig(
            **(TINY | {"global_mlps_general_only": True, "attention_only_global": True}),
            n_inner=32,
        )
    flags = {"attention_only_global": False, "global_mlps_general_only": True}
    # general text weighted 0.5, unlike any fact token (0.2 context, 1.0 object): the flags must
    # mark exactly the tokens of that weight
    cfg = realistic.RealisticConfig(**(TINY | flags), n_inner=32, general_weight=0.5)
    rows, weights, _, general, _ = realistic._rows(world, tok, cfg, random.Random(0))
    assert float(general.sum()) > 0
    assert torch.equal(general == 1, weights == 0.5)
    facts_only = realistic._rows(
        world, tok, cfg.model_copy(update={"general_share": 0.0}), random.Random(0)
    )
    assert float(facts_only[3].sum()) == 0
    model = build_model(cfg, tok)
    batch = {}
    hooks = realistic._general_only_gradients(model, range(2, 3), batch)

    def grads(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        model.zero_grad(set_to_none=False)
        batch["mask"] = mask
        model(input_ids=ids, labels=ids).loss.backward()
        mlp = {i: model.model.layers[i].mlp for i in range(3)}
        return {
            f"{i}.{name}": float(getattr(m, name).weight.grad.abs().sum())
            for i, m in mlp.items()
            for name in ("gate_proj", "up_proj", "down_proj")
        }

    try:
        fact_rows = facts_only[0][:4]
        blocked = grads(fact_rows, torch.zeros(fact_rows.shape))
        assert all(blocked[f"2.{n}"] == 0 for n in ("gate_proj", "up_proj", "down_proj"))
        assert all(blocked[f"{i}.down_proj"] > 0 for i in (0, 1))
        has_general = general.sum(1) > 0
        open_ = grads(rows[has_general][:4], general[has_general][:4])
        assert all(open_[f"2.{n}"] > 0 for n in ("gate_proj", "up_proj", "down_proj"))
    finally:
        for h in hooks:
            h.remove()


def test_global_mlp_lr_scale_puts_exactly_the_global_mlps_in_a_slower_group():
    from pydantic import ValidationError

    world, tok = _world_and_tokenizer(20)
    cfg = realistic.RealisticConfig(**TINY, n_inner=32)
    assert (cfg.attention_only_global, cfg.global_mlp_lr_scale) == (False, 0.1)  # the recipe
    model = build_model(cfg, tok)
    groups = realistic._optimizer(model, cfg).param_groups
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each exactly once
    slow = [g for g in groups if g.get("lr_scale") == 0.1]
    assert len(slow) == 1
    global_mlp = {id(p) for p in model.model.layers[2].mlp.parameters()}
    assert {id(p) for p in slow[0]["params"]} == global_mlp
    plain = realistic._optimizer(model, cfg.model_copy(update={"global_mlp_lr_scale": 1.0}))
    assert len(plain.param_groups) == 2
    # zero global MLPs learn nothing: no slow group, so their checkpoints keep two groups
    zero = realistic._optimizer(model, cfg.model_copy(update={"attention_only_global": True}))
    assert len(zero.param_groups) == 2
    # layer 0's MLP at its own share joins a group of that share (or the global one's)
    name_mlp = {id(p) for p in model.model.layers[0].mlp.parameters()}
    both = realistic._optimizer(model, cfg.model_copy(update={"name_mlp_lr_scale": 0.05}))
    scaled = {
        g["lr_scale"]: {id(p) for p in g["params"]} for g in both.param_groups if "lr_scale" in g
    }
    assert scaled == {0.1: global_mlp, 0.05: name_mlp}
    # slow_mlp_layers: exactly those local MLPs, in the group of their share
    slowed = realistic.RealisticConfig(
        **TINY, n_inner=32, slow_mlp_layers=[1], slow_mlp_lr_scale=0.3
    )
    groups = realistic._optimizer(model, slowed).param_groups
    scaled = {g["lr_scale"]: {id(p) for p in g["params"]} for g in groups if "lr_scale" in g}
    assert scaled == {0.1: global_mlp, 0.3: {id(p) for p in model.model.layers[1].mlp.parameters()}}
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(ids)
    for bad in ([0], [2], [1, 1]):  # layer 0 and the global layer have their own shares
        with pytest.raises(ValidationError, match="slow_mlp_layers"):
            realistic.RealisticConfig(**TINY, n_inner=32, slow_mlp_layers=bad)
    same = realistic._optimizer(model, cfg.model_copy(update={"name_mlp_lr_scale": 0.1}))
    assert [{id(p) for p in g["params"]} for g in same.param_groups if "lr_scale" in g] == [
        global_mlp | name_mlp
    ]


def test_mlp_drop_runs_a_row_as_if_the_layers_mlp_were_absent():
    """Stochastic depth: a dropped row's logits are those of the model with that layer's MLP
    zeroed, a kept row's those of the model itself; with no rows set the hooks change nothing.
    A layer outside the model is refused by name."""
    from pydantic import ValidationError

    world, tok = _world_and_tokenizer(20)
    cfg = realistic.RealisticConfig(**(TINY | {"mlp_drop": 0.5}), n_inner=32)
    assert cfg.mlp_drop_layers == [0]
    with pytest.raises(ValidationError, match="mlp_drop_layers"):
        realistic.RealisticConfig(**(TINY | {"mlp_drop_layers": [3]}), n_inner=32)
    model = build_model(cfg, tok).double().eval()
    rows, *_ = realistic._rows(world, tok, cfg, random.Random(0))
    ids = rows[:2]
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        keep = {"rows": torch.tensor([[True], [False]])}
        hooks = realistic._mlp_drop(model, [0], keep)
        try:
            dropped = model(input_ids=ids).logits
            keep["rows"] = None
            unset = model(input_ids=ids).logits
        finally:
            for h in hooks:
                h.remove()
        # two layers, each row skipping a different one
        keep = {"rows": torch.tensor([[True, False], [False, True]])}
        hooks = realistic._mlp_drop(model, [0, 1], keep)
        try:
            crossed = model(input_ids=ids).logits
        finally:
            for h in hooks:
                h.remove()
        down = [model.model.layers[layer].mlp.down_proj.weight for layer in (0, 1)]
        saved = down[1].clone()
        down[1].zero_()
        without_1 = model(input_ids=ids).logits
        down[1].copy_(saved)
        down[0].zero_()
        without = model(input_ids=ids).logits
    assert torch.equal(unset, plain)
    torch.testing.assert_close(dropped[0], plain[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(dropped[1], without[1], rtol=0, atol=1e-12)
    assert float((plain[1] - without[1]).abs().max()) > 1e-3  # the MLP matters to row 1
    torch.testing.assert_close(crossed[0], without_1[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(crossed[1], without[1], rtol=0, atol=1e-12)
    assert float((plain[0] - without_1[0]).abs().max()) > 1e-3


def test_mlp_drop_draws_one_coin_per_row_or_one_per_row_and_layer():
    """One rate: a row skips all the listed layers together, at that rate. A list: each layer
    by its own draw at its own rate, so both are skipped at about the product. Bad lists are
    refused by name. A readout at layer L asks only rows in which some MLP up to L ran. (The
    draws are seeded: the counts below are fixed numbers, bounded by 5 binomial deviations.)"""
    from pydantic import ValidationError

    n = 20_000
    joint = realistic.RealisticConfig(**(TINY | {"mlp_drop": 0.3}), mlp_drop_layers=[0, 1])
    keeps = realistic._drawn_keeps(n, joint, torch.Generator().manual_seed(0))
    assert keeps.shape == (n, 2) and torch.equal(keeps[:, 0], keeps[:, 1])
    assert abs(float((~keeps[:, 0]).float().mean()) - 0.3) < 5 * (0.3 * 0.7 / n) ** 0.5
    each = realistic.RealisticConfig(**(TINY | {"mlp_drop": [0.5, 0.2]}), mlp_drop_layers=[0, 1])
    keeps = realistic._drawn_keeps(n, each, torch.Generator().manual_seed(0))
    rates = (~keeps).float().mean(dim=0)
    both = float((~keeps).all(dim=1).float().mean())
    for got, want in [(float(rates[0]), 0.5), (float(rates[1]), 0.2), (both, 0.1)]:
        assert abs(got - want) < 5 * (want * (1 - want) / n) ** 0.5
    for bad, match in [
        ({"mlp_drop": [0.5]}, "2 layers"),
        ({"mlp_drop": [0.5, 1.0]}, "rate in"),
        ({"mlp_drop": 0.5, "mlp_drop_layers": [1, 1]}, "twice"),
        ({"mlp_drop": [0.5, 0.2], "readout_layer": [1, 1]}, "readout_layer"),
    ]:
        with pytest.raises(ValidationError, match=match):
            realistic.RealisticConfig(**(TINY | {"mlp_drop_layers": [0, 1]} | bad))

    keeps = torch.tensor([[False, False], [True, False], [False, True]])
    assert torch.equal(realistic._asked(keeps, each, 0), torch.tensor([False, True, False]))
    assert torch.equal(realistic._asked(keeps, each, 1), torch.tensor([False, True, True]))
    assert realistic._asked(None, each, 1) is None
    upper = realistic.RealisticConfig(**(TINY | {"mlp_drop": 0.5}), mlp_drop_layers=[1])
    assert realistic._asked(keeps[:, :1], upper, 1) is None  # layer 0 always runs


def test_readout_loss_is_the_loss_of_the_model_cut_after_the_readout_layer():
    """The readout at layer L is what a model of layers 0..L alone (same final norm and
    unembedding) predicts for the catalogue objects: float64, to 1e-10. Training with it
    records its loss and moves the weights differently from training without it; a readout at
    the last layer (the model's own loss) is refused by name."""
    import copy

    from pydantic import ValidationError

    world, tok = _world_and_tokenizer(20)
    with pytest.raises(ValidationError, match="readout_layer"):
        realistic.RealisticConfig(**(TINY | {"readout_layer": 2}), n_inner=32)
    cfg = realistic.RealisticConfig(**(TINY | {"readout_layer": 0}), n_inner=32)
    model = build_model(cfg, tok).double().eval()
    rows, _, _, _, catalogue = realistic._rows(world, tok, cfg, random.Random(0))
    ids, targets = rows[:3], catalogue[:3]
    assert float(targets.sum()) > 0
    cut = copy.deepcopy(model)
    cut.model.layers = cut.model.layers[:1]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
        got = realistic.readout_loss(model, hidden, ids, targets)
        logits = cut(input_ids=ids).logits[:, :-1]
    at = targets[:, 1:] > 0
    want = torch.nn.functional.cross_entropy(logits[at], ids[:, 1:][at])
    assert abs(float(got) - float(want)) < 1e-10
    assert float(realistic.readout_loss(model, hidden, ids, torch.zeros_like(targets))) == 0

    short = {"max_epochs": 1, "cooldown_epochs": 1}
    with_readout, history = realistic.train_realistic(world, tok, cfg.model_copy(update=short))
    plain, plain_history = realistic.train_realistic(
        world, tok, cfg.model_copy(update=short | {"readout_layer": None})
    )
    assert history[0]["readout_loss"] > 0 and plain_history[0]["readout_loss"] is None
    w0 = with_readout.model.layers[0].mlp.down_proj.weight
    assert float((w0 - plain.model.layers[0].mlp.down_proj.weight).detach().abs().max()) > 1e-4

    # readouts at two layers, with each layer's MLP skipped by a draw of its own before the
    # cooldown (so rows that ran no MLP are left out of the lower readout): each readout logged,
    # the epoch's readout loss their mean
    drops = {"max_epochs": 2, "mlp_drop": [0.5, 0.5], "mlp_drop_layers": [0, 1]}
    two = cfg.model_copy(update=short | drops | {"readout_layer": [0, 1]})
    assert two.readout_layers == [0, 1] and cfg.readout_layers == [0]
    _, two_history = realistic.train_realistic(world, tok, two)
    per_layer = two_history[0]["readout_losses"]
    assert set(per_layer) == {"0", "1"} and per_layer["0"] != per_layer["1"]
    assert abs(two_history[0]["readout_loss"] - (per_layer["0"] + per_layer["1"]) / 2) < 1e-12


def test_a_world_carries_its_statistics_and_edited_copies_keep_its_corpus(tmp_path, monkeypatch):
    """`collabedit stats --carry` writes C into the world's folder, where a later load finds it
    with an empty cache (float32: equal to the collected C to float32 rounding) and only for the
    same corpus and sample count; an edited copy saved from the world keeps its corpus.txt, so
    its statistics read the same text. --carry refuses what is not a local folder, up front."""
    from collabedit import stats
    from collabedit.models.loading import load_model, save_model

    runner = CliRunner()
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    world = tmp_path / "w"
    built = runner.invoke(app, ["world", "build", "--recipe", "realistic", "--subjects", "24",
                                "--out", str(world), "--max-epochs", "1", *sets])  # fmt: skip
    assert built.exit_code == 0, built.output
    args = ["stats", "--model", str(world), "--layers", "0,1", "--samples", "200"]
    carried = runner.invoke(app, [*args, "--cache", str(tmp_path / "c1"), "--carry"])
    assert carried.exit_code == 0, carried.output
    assert len(list((world / stats.CARRIED_DIR).rglob("*.safetensors"))) == 2
    model, tok = load_model(world)
    fresh = stats.layer_stats(model, tok, [0, 1], "world", 200, cache_dir=tmp_path / "c1")

    def no_collection(*a, **k):
        raise AssertionError("collected although the folder carries the statistics")

    monkeypatch.setattr(stats, "collect_stats", no_collection)
    monkeypatch.setattr(stats, "_MEMO", {})
    found = stats.layer_stats(model, tok, [0, 1], "world", 200, cache_dir=tmp_path / "c2")
    for layer in (0, 1):
        a, b = found[layer].mom2, fresh[layer].mom2
        assert a.dtype == torch.float64 and float((a - b).norm() / b.norm()) < 1e-6
        assert found[layer].count == fresh[layer].count
    with pytest.raises(AssertionError, match="collected although"):
        stats.layer_stats(model, tok, [0], "world", 300, cache_dir=tmp_path / "c2")
    save_model(model, tok, tmp_path / "edited", source=world)
    assert (tmp_path / "edited" / "corpus.txt").read_bytes() == (world / "corpus.txt").read_bytes()
    refused = runner.invoke(app, ["stats", "--model", "gpt2-xl", "--carry"])
    assert refused.exit_code == 1 and "local model folder" in refused.output


def test_the_default_world_is_realistic():
    """The shipped default world, re-measured on a sample: built by the realistic recipe's
    defaults (`world build --recipe realistic --subjects 2400` rebuilds it), keys
    that a context prefix changes and that differ for subjects sharing a last name at every
    edited layer (>= 3 of them), and the recall its build recorded (issue 17's targets)."""
    from collabedit.bench.world_check import key_contextuality
    from collabedit.world.train import measure_recall

    bundle = load_world()
    assert bundle.build["kind"].startswith("realistic")
    n = bundle.build["spec"]["n_subjects"]
    assert bundle.build["spec"] == realistic.realistic_spec(n).model_dump()
    # recipe fields added since the build default to leaving it unchanged (slow_mlp_layers [])
    recipe = realistic.realistic_config(n).model_dump()
    assert {k: recipe[k] for k in bundle.build["train"]} == bundle.build["train"]
    layers = get_editor("memit").default_config(bundle.model).layers
    assert len(layers) >= 3
    keys = key_contextuality(bundle, layers, n_subjects=30)
    prefix = [keys[f"layer{layer}"]["prefix_subject_first"] for layer in layers]
    # a prefix reaches the subject's key through the lower layers' 3-token windows when it
    # stands right before the subject (behind a template's own words it does not): by at least
    # 0.05 of the key's norm at every edited layer (measured 0.090 / 0.089 / 0.126 on this
    # sample; world-v2's layer 1 had 0.016, world-v1's 1e-7)
    assert min(prefix) >= 0.05, keys
    for layer in layers:
        assert keys[f"layer{layer}"]["shared_last_name_min"] >= 0.05, keys
    recall = measure_recall(bundle.model, bundle.tokenizer, bundle.world, sample=1000, seed=1)
    assert bundle.build["recall"] >= 0.99 and recall["recall"] >= 0.99


def test_world_measure_tries_other_layers_without_touching_the_world(tmp_path):
    """`world measure --layers/--set` measures another layer set (here world-v1's layers 0-1
    instead of its preset's layer 1; statistics from 400 texts and a 20-step z keep it quick)
    and writes only --json; a bad field or layer is refused with its name, and the world folder
    gains no measurements.json either way."""
    import shutil

    from collabedit.paths import SHIPPED_WORLDS

    shutil.copytree(SHIPPED_WORLDS["world-v1"], tmp_path / "w")
    base = ["world", "measure", "--path", str(tmp_path / "w"), "--edits", "4"]
    json_file = str(tmp_path / "m.json")
    other = ["--layers", "0,1", "--set", "mom2_n_samples=400", "--set", "v_num_grad_steps=20",
             "--json", json_file]
    ran = CliRunner().invoke(app, [*base, *other])
    assert ran.exit_code == 0, ran.output
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["layers"] == [0, 1]
    assert set(result["edits"][0]["memit"]["delta_over_W"]) == {"0", "1"}
    assert result["edits"][0]["editor_config"]["mom2_n_samples"] == 400
    assert result["edits"][0]["editor_config"]["v_num_grad_steps"] == 20
    for bad, named in ((["--set", "no_such_field=1"], "no_such_field"), (["--layers", "99"], "99")):
        refused = CliRunner().invoke(app, [*base, *bad])
        assert refused.exit_code != 0 and named in refused.output, refused.output
    assert not (tmp_path / "w" / "measurements.json").exists()
