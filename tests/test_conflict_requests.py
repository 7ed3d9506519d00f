"""The conflict benchmark loader and the world's conflicting requests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collabedit.conflict_requests import load_conflict_pairs
from collabedit.requests import RequestFileError
from collabedit.world.edit_requests import world_conflict_pairs
from collabedit.world.generator import WorldSpec, generate_world

# a few records of the published easy_conflict_1000_p1.json (source and licence: README.md there)
SAMPLE = Path(__file__).resolve().parent / "fixtures" / "conflict" / "easy_conflict_sample.json"
SAMPLE_INDICES = (0, 1, 2, 3, 4, 5, 6, 187)  # their record numbers in the published file
# the whole published file, when the reference data sits next to the project (not in a clone)
PUBLISHED = (
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


def test_reads_the_published_conflict_format() -> None:
    pairs = load_conflict_pairs(SAMPLE)
    raw = json.loads(SAMPLE.read_text())
    assert len(pairs) == len(raw) == len(SAMPLE_INDICES)
    for pair, rec in zip(pairs, raw, strict=True):
        assert pair.first.subject == pair.second.subject == rec["edit"]["subject"]["label"]
        assert pair.first.prompt == pair.second.prompt == rec["edit"]["relation"]["prompt"]
        assert pair.first.target_new == rec["edit"]["new_object"].strip()
        assert pair.second.target_new == rec["edit"]["conflict_object"]["label"].strip()
        assert pair.first.target_true == rec["edit"]["object"]["label"].strip()
        assert pair.first.relation_id == rec["edit"]["relation"]["id"]
        assert pair.kind == rec["type"]
        query = rec["edit"]["relation"]["query"]
        assert pair.first.paraphrase_prompts == [query.format(rec["edit"]["subject"]["label"])]
    # record i gives case ids 2i and 2i+1
    assert [(p.first.case_id, p.second.case_id) for p in pairs] == [
        (2 * i, 2 * i + 1) for i in range(len(pairs))
    ]
    first = pairs[0]
    assert (first.first.subject, first.first.target_new, first.second.target_new) == (
        "fpart", "fraking", "franking"
    )
    # the published file asks for the same object on both sides in some records: record 6
    # exactly ("Amiuk"), record 187 up to case ("Garage House" / "garage house")
    assert [p.is_overlap for p in pairs] == [False] * 6 + [True, True]
    assert pairs[7].first.target_new != pairs[7].second.target_new


@pytest.mark.skipif(not PUBLISHED.is_file(), reason="the published conflict file is absent")
def test_sample_is_a_verbatim_copy_and_the_whole_file_loads() -> None:
    raw = json.loads(PUBLISHED.read_text())
    assert json.loads(SAMPLE.read_text()) == [raw[i] for i in SAMPLE_INDICES]
    pairs = load_conflict_pairs(PUBLISHED)
    assert len(pairs) == 1000
    assert len({r.case_id for p in pairs for r in (p.first, p.second)}) == 2000
    assert sum(p.is_overlap for p in pairs) == 71  # 66 exactly, 5 more up to case


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
