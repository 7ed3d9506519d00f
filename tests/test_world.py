"""The embedded world: generator, tokenizer, build recipe, and the first shipped checkpoint
(world-v1; the realistic default world is tested in test_realistic_world.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from collabedit.evaluate.metrics import evaluate_requests
from collabedit.world.edit_requests import world_requests
from collabedit.world.generator import World, WorldSpec, generate_world
from collabedit.world.store import build_world, load_world
from collabedit.world.tokenizer import build_tokenizer
from collabedit.world.train import TrainConfig, measure_recall, train_world_model


@pytest.fixture(scope="module")
def shipped():
    return load_world("world-v1")


def test_generator_is_seeded_and_sized():
    a, b = (
        generate_world(WorldSpec(seed=3, n_subjects=200)),
        generate_world(WorldSpec(seed=3, n_subjects=200)),
    )
    assert a.to_json() == b.to_json()
    assert generate_world(WorldSpec(seed=4, n_subjects=200)).subjects != a.subjects
    from collabedit.paths import SHIPPED_WORLDS

    shipped = World.load(SHIPPED_WORLDS["world-v1"] / "world.json")
    assert shipped.to_json() == generate_world(WorldSpec()).to_json()  # defaults = world-v1
    world = generate_world(WorldSpec(n_subjects=200))
    assert len(world.relations) >= 6
    assert all(len(r.phrasings) >= 5 for r in world.relations)
    assert len(set(world.subjects)) == 200
    assert all(len(s.split()) >= 2 for s in world.subjects)  # multi-token names
    # objects dealt evenly: every object of every relation has subjects
    for rel in world.relations:
        counts = [len(world.subjects_with(rel.id, o)) for o in rel.objects]
        assert max(counts) - min(counts) <= 1


def test_world_json_round_trip(tmp_path):
    world = generate_world(WorldSpec(n_subjects=50))
    world.save(tmp_path / "w.json")
    assert World.load(tmp_path / "w.json").to_json() == world.to_json()


def test_tokenizer_covers_every_sentence_without_unknowns():
    world = generate_world(WorldSpec(n_subjects=100))
    tok = build_tokenizer(world.vocabulary_text())
    for sentence in list(world.sentences())[:500]:
        ids = tok(sentence, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids).split() == tok.decode(ids).split()  # decodes
    # multi-word subjects and objects are several tokens
    assert len(tok(" New York", add_special_tokens=False)["input_ids"]) == 2


def test_requests_have_neighbourhoods_and_distinct_subjects():
    world = generate_world(WorldSpec(n_subjects=300))
    for form in ("counterfact", "zsre"):
        reqs = world_requests(world, 120, seed=1, form=form)
        assert len({r.subject for r in reqs}) == 120
        assert all(r.neighborhood_prompts for r in reqs)
        assert all(r.target_new != r.target_true for r in reqs)
        assert all(r.target_new in world.relation(r.relation_id).objects for r in reqs)
    cf = world_requests(world, 50, seed=2)
    for r in cf:
        # neighbourhood subjects share the true object; the edited subject is not among them
        assert all(r.subject not in p for p in r.neighborhood_prompts)
        assert len(r.paraphrase_prompts) == 2
    with pytest.raises(ValueError, match="only 300 subjects"):
        world_requests(world, 301)


def test_requests_ask_the_edited_subjects_other_relations():
    world = generate_world(WorldSpec(n_subjects=300))
    for form in ("counterfact", "zsre"):
        reqs = world_requests(world, 60, seed=3, form=form)
        for r in reqs:
            asked = {rel.id: rel for rel in world.relations if rel.id != r.relation_id}
            assert len(r.relation_prompts) == len(asked)
            for rp, rel in zip(r.relation_prompts, asked.values(), strict=True):
                phrasings = rel.statements if form == "counterfact" else rel.questions
                assert rp.prompt in {t.format(r.subject) for t in phrasings}
                assert rp.answer == world.facts[r.subject][rel.id]


def test_tiny_build_is_reproducible_and_loads(tmp_path):
    spec = WorldSpec(n_subjects=20, seed=1)
    cfg = TrainConfig(
        n_layer=2,
        local_layers=1,
        n_embd=16,
        n_inner=32,
        n_head=2,
        max_epochs=1,
        cooldown_epochs=1,
        recall_sample=20,
    )
    a = build_world(tmp_path / "a", spec, cfg)
    b = build_world(tmp_path / "b", spec, cfg)
    for name in ("world.json", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    wa, wb = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    loaded = load_world(tmp_path / "a")
    assert loaded.build["recall"] == a.build["recall"]
    assert json.loads((tmp_path / "a" / "build.json").read_text())["history"][0]["epoch"] == 1
    assert not list(tmp_path.glob(".world-*"))  # no temp folder left behind
    assert b.world.to_json() == loaded.world.to_json()


class _Stop(Exception):
    pass


def test_stopped_training_continues_from_its_checkpoint_to_the_same_model(tmp_path):
    world = generate_world(WorldSpec(n_subjects=20, seed=2))
    tok = build_tokenizer(world.vocabulary_text())
    cfg = TrainConfig(n_layer=2, n_embd=16, n_inner=32, n_head=2, recall_sample=20,
                      architecture="gpt_neo", local_layers=1, max_epochs=3, switch_recall=1.0,
                      cooldown_epochs=2)
    straight, history = train_world_model(world, tok, cfg)

    def stop_after_epoch_1(epoch: int, entry: dict) -> None:
        raise _Stop  # on_epoch runs after the checkpoint: the file holds epoch 1

    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(_Stop):
        train_world_model(world, tok, cfg, on_epoch=stop_after_epoch_1, checkpoint=ckpt)
    resumed, resumed_history = train_world_model(world, tok, cfg, checkpoint=ckpt)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["epoch"] for h in resumed_history] == [h["epoch"] for h in history]
    with pytest.raises(ValueError, match="another training config"):
        train_world_model(world, tok, cfg.model_copy(update={"lr": 1e-3}), checkpoint=ckpt)


def test_a_resumed_build_may_move_its_epoch_budget_only_where_the_epochs_trained_agree(tmp_path):
    """A build stopped under a 5-epoch budget (the budget's cooldown of 2 would start at epoch
    4) continues under a budget of 4 to exactly the model the 4-epoch config trains from
    scratch, as long as the epochs already trained are ones the new schedule would have trained
    alike; after epoch 3 they are not (epoch 3 would have cooled), and nothing is loaded."""
    world = generate_world(WorldSpec(n_subjects=20, seed=2))
    tok = build_tokenizer(world.vocabulary_text())
    cfg = TrainConfig(n_layer=2, n_embd=16, n_inner=32, n_head=2, recall_sample=20,
                      architecture="gpt_neo", local_layers=1, max_epochs=5, switch_recall=1.0,
                      cooldown_epochs=2)
    short = cfg.model_copy(update={"max_epochs": 4})
    straight, history = train_world_model(world, tok, short)
    assert [h["cooldown"] for h in history] == [False, False, True, True]

    def stop_after(n: int):
        def on_epoch(epoch: int, entry: dict) -> None:
            if epoch == n:
                raise _Stop  # on_epoch runs after the checkpoint: the file holds epoch n

        return on_epoch

    for n in (2, 3):
        with pytest.raises(_Stop):
            ckpt = tmp_path / f"{n}.pt"
            train_world_model(world, tok, cfg, on_epoch=stop_after(n), checkpoint=ckpt)
    resumed, resumed_history = train_world_model(world, tok, short, checkpoint=tmp_path / "2.pt")
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [(h["epoch"], h["cooldown"]) for h in resumed_history] == [
        (h["epoch"], h["cooldown"]) for h in history
    ]
    before = (tmp_path / "3.pt").read_bytes()
    with pytest.raises(ValueError, match="max_epochs the epochs already trained"):
        train_world_model(world, tok, short, checkpoint=tmp_path / "3.pt")
    with pytest.raises(ValueError, match=r"\(lr, max_epochs changed\)"):
        train_world_model(world, tok, short.model_copy(update={"lr": 1e-3}),
                          checkpoint=tmp_path / "3.pt")
    assert (tmp_path / "3.pt").read_bytes() == before


def test_load_world_rejects_a_non_world_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a world folder"):
        load_world(tmp_path)


def test_shipped_world_recalls_every_fact_in_every_phrasing(shipped):
    recall = measure_recall(shipped.model, shipped.tokenizer, shipped.world)
    assert recall["n"] == shipped.world.n_facts() * 7 * 2
    assert recall["recall"] >= 0.99
    assert recall["min_phrasing_recall"] >= 0.97
    assert recall["recall"] == pytest.approx(shipped.build["recall"], abs=1e-9)


def test_shipped_world_is_small(shipped):
    size = sum(f.stat().st_size for f in shipped.path.iterdir())
    assert size <= 25 * 2**20


def test_unedited_world_scores_as_unedited(shipped):
    """ES/PS/EA near 0 (the new facts are not known), NS/NA near 100 (neighbours intact)."""
    for form in ("counterfact", "zsre"):
        reqs = world_requests(shipped.world, 200, seed=7, form=form)
        m = evaluate_requests(shipped.model, shipped.tokenizer, reqs)
        if form == "counterfact":
            assert m["ES"] <= 3 and m["PS"] <= 3 and m["NS"] >= 97
        assert m["EA"] <= 5 and m["PA"] <= 5 and m["NA"] >= 95
        assert m["RS"] >= 99  # the world knows its facts (recall >= 0.99)


def test_shipped_world_local_layers_see_only_their_own_token(shipped):
    """The structural guarantee MEMIT relies on here: up to the last local layer, a position's
    state does not depend on any other token."""
    n_local = shipped.build["train"]["local_layers"]
    assert n_local >= 1
    tok = shipped.tokenizer
    a = tok("Snow covered the mountains. The mother tongue of", return_tensors="pt")["input_ids"]
    b = a.clone()
    b[0, :3] = tok("It rained all", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    with torch.no_grad():
        ha = shipped.model(input_ids=a, output_hidden_states=True).hidden_states
        hb = shipped.model(input_ids=b, output_hidden_states=True).hidden_states
    for layer in range(n_local):  # hidden_states[layer + 1] is block `layer`'s output
        assert torch.allclose(ha[layer + 1][0, 3:], hb[layer + 1][0, 3:], atol=1e-6)
    assert not torch.allclose(ha[n_local + 1][0, -1], hb[n_local + 1][0, -1], atol=1e-6)


def test_shipped_world_recalls_facts_through_the_subject_position(shipped):
    """Causal trace: restoring the subject's last token at the last local layer brings back a
    large share of the true object's probability (measured on 150 facts: 0.35 of a 0.86 gap; the
    rest needs the first name, which stays corrupted). The first world, a plain GPT-2, gave
    0.034 of 0.95: it did not read facts from the subject's position at all."""
    import random

    from collabedit.evaluate.trace import average_trace

    rng = random.Random(5)
    facts = []
    for subject in rng.sample(shipped.world.subjects, 20):
        rel = rng.choice(shipped.world.relations)
        facts.append((rng.choice(rel.statements), subject, shipped.world.facts[subject][rel.id]))
    trace = average_trace(shipped.model, shipped.tokenizer, facts, samples=4)
    last_local = shipped.build["train"]["local_layers"] - 1
    gap = trace["clean"] - trace["corrupted"]
    assert gap > 0.5
    assert trace["hidden"][last_local] >= 0.25 * gap
    assert trace["mlp"][0] >= 0.2 * gap  # the subject is enriched by the first MLP
