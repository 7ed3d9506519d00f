"""The conflict benchmark loader and the world's conflicting requests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collabedit.conflict_requests import load_conflict_pairs
from collabedit.requests import RequestFileError
from collabedit.world.edit_requests import world_conflict_pairs
from collabedit.world.generator import WorldSpec, generate_world

SHARED_CONFLICT = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "easy_conflict_1000_p1.json"
)

RECORD = {
    "type": "1-2@P27",
    "edit": {
        "relation": {"id": "P27", "prompt": "{} is a citizen of", "query": "Where is {} from?"},
        "subject": {"id": "Q1", "label": "Ada Lovelace"},
        "new_object": "France",
        "object": {"id": "Q145", "label": "United Kingdom"},
        "conflict_object": {"id": "Q-2", "label": "Spain"},
    },
}


def test_reads_the_published_conflict_file() -> None:
    pairs = load_conflict_pairs(SHARED_CONFLICT)
    raw = json.loads(SHARED_CONFLICT.read_text())
    assert len(pairs) == len(raw) == 1000
    for pair, rec in zip(pairs, raw, strict=True):
        assert pair.first.subject == pair.second.subject == rec["edit"]["subject"]["label"]
        assert pair.first.prompt == pair.second.prompt == rec["edit"]["relation"]["prompt"]
        assert pair.first.target_new == rec["edit"]["new_object"].strip()
        assert pair.second.target_new == rec["edit"]["conflict_object"]["label"].strip()
        assert pair.first.target_true == rec["edit"]["object"]["label"].strip()
    ids = [r.case_id for p in pairs for r in (p.first, p.second)]
    assert len(set(ids)) == 2000
    # the published file asks for the same object on both sides in some records
    assert sum(p.is_overlap for p in pairs) == 71


def test_record_becomes_two_requests_with_the_question_as_paraphrase(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps([RECORD]))
    (pair,) = load_conflict_pairs(path)
    assert (pair.first.target_new, pair.second.target_new) == ("France", "Spain")
    assert pair.first.paraphrase_prompts == ["Where is Ada Lovelace from?"]
    assert pair.kind == "1-2@P27" and not pair.is_overlap


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r["edit"].pop("new_object"), "edit.new_object"),
        (lambda r: r["edit"]["conflict_object"].pop("label"), "edit.conflict_object.label"),
        (lambda r: r["edit"]["subject"].update(label=7), "edit.subject.label"),
        (lambda r: r["edit"]["relation"].update(prompt="no placeholder"), "edit.relation.prompt"),
        (lambda r: r["edit"].update(new_object="  "), "edit.new_object"),
    ],
)
def test_bad_record_names_file_record_and_field(tmp_path: Path, mutate, field: str) -> None:
    bad = json.loads(json.dumps(RECORD))
    mutate(bad)
    path = tmp_path / "c.json"
    path.write_text(json.dumps([RECORD, bad]))
    with pytest.raises(RequestFileError) as err:
        load_conflict_pairs(path)
    assert (err.value.record, err.value.field) == (1, field)
    assert str(path) in str(err.value)


def test_world_conflicts_share_subject_and_relation_but_not_target() -> None:
    world = generate_world(WorldSpec(n_subjects=60))
    pairs = world_conflict_pairs(world, 30, seed=3)
    assert len({p.first.subject for p in pairs}) == 30
    for p in pairs:
        assert p.first.relation_id == p.second.relation_id
        assert (
            p.first.target_true
            == p.second.target_true
            == world.facts[p.first.subject][p.first.relation_id]
        )
        assert len({p.first.target_new, p.second.target_new, p.first.target_true}) == 3
