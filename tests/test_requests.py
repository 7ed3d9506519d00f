"""Tests of edit requests and their file formats (collabedit.requests)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from collabedit.requests import (
    EditRequest,
    RelationPrompt,
    RequestFileError,
    detect_format,
    load_requests,
    save_requests,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "requests"
MCF = FIXTURES / "mcf_small.json"
ZSRE = FIXTURES / "zsre_small.json"
JSONL = FIXTURES / "requests_small.jsonl"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# EditRequest
# ---------------------------------------------------------------------------------------------


def _request(**overrides: Any) -> EditRequest:
    fields: dict[str, Any] = {
        "case_id": 0,
        "subject": "Danielle Darrieux",
        "prompt": "The mother tongue of {} is",
        "target_new": "English",
        "target_true": "French",
    }
    fields.update(overrides)
    return EditRequest(**fields)


def test_rewrite_prompt_fills_subject() -> None:
    request = _request()
    assert request.rewrite_prompt == "The mother tongue of Danielle Darrieux is"
    assert _request(subject="A {0} B").rewrite_prompt == "The mother tongue of A {0} B is"


def test_targets_are_stripped_and_model_is_frozen() -> None:
    request = _request(target_new="  English ", target_true=" French")
    assert (request.target_new, request.target_true) == ("English", "French")
    with pytest.raises(ValidationError):
        request.target_new = "German"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"prompt": "The mother tongue of X is"}, "no '{}'"),
        ({"prompt": "{} and {} speak"}, "2 '{}' placeholders"),
        ({"prompt": "{} speaks {0}"}, "brace"),
        ({"subject": "  "}, "subject is empty"),
        ({"target_new": " "}, "target_new is empty"),
        ({"target_true": ""}, "target is empty"),
        ({"target_new": 5}, "valid string"),
        ({"case_id": "3"}, "valid integer"),
        ({"case_id": True}, "valid integer"),
        ({"paraphrase_prompts": ["ok", 3]}, "valid string"),
        ({"colour": "red"}, "Extra inputs"),
    ],
)
def test_edit_request_validation(overrides: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment.replace("{", r"\{").replace("}", r"\}")):
        _request(**overrides)


# ---------------------------------------------------------------------------------------------
# Loading the fixtures
# ---------------------------------------------------------------------------------------------


def test_load_mcf_fixture() -> None:
    assert detect_format(MCF) == "mcf"
    requests = load_requests(MCF)
    assert requests == load_requests(MCF, format="mcf")
    assert [r.case_id for r in requests] == [0, 1, 4]
    first = requests[0]
    assert first.subject == "Marisol Vantrell"
    assert first.prompt == "The mother tongue of {} is"
    assert first.rewrite_prompt == "The mother tongue of Marisol Vantrell is"
    assert (first.target_new, first.target_true) == ("Finnish", "Portuguese")
    assert first.relation_id == "P103"
    assert first.paraphrase_prompts[1] == "Marisol Vantrell spoke the language"
    assert first.neighborhood_prompts == [
        "The mother tongue of Tiago Ferrinho is",
        "Lucinda Albergaria is a native speaker of",
    ]
    assert first.neighborhood_target is None
    assert len(first.attribute_prompts) == 2
    assert first.generation_prompts[0] == "Marisol Vantrell's mother tongue is"
    assert requests[2].paraphrase_prompts == []
    assert requests[2].rewrite_prompt == "Quillmark Roadster is a product of"


def test_load_zsre_fixture_maps_like_memit() -> None:
    assert detect_format(ZSRE) == "zsre"
    requests = load_requests(ZSRE)
    assert [r.case_id for r in requests] == [0, 1, 2]
    second = requests[1]
    assert second.subject == "The Copper Lanterns"
    assert second.prompt == "In which city was {} formed?"
    assert second.target_new == "Glasgow"  # answers[0], as MEMIT does (not alt)
    assert second.target_true is None
    assert second.relation_id is None
    assert second.paraphrase_prompts == ["Where did The Copper Lanterns form?"]
    assert second.neighborhood_prompts == ["nq question: how many bridges cross the river teal?"]
    assert second.neighborhood_target == "seven"
    assert second.attribute_prompts == [] and second.generation_prompts == []


def test_load_jsonl_fixture_skips_blank_lines() -> None:
    assert detect_format(JSONL) == "jsonl"
    requests = load_requests(JSONL)
    assert [r.case_id for r in requests] == [10, 11, 12]
    assert requests[0].relation_id == "P103"
    assert requests[0].attribute_prompts == ["Veikko Laaksonen, speaker of"]
    assert requests[1].target_true is None
    assert requests[1].neighborhood_target == "1931"
    assert requests[2].rewrite_prompt == "The Copper Lanterns, that was created in"
    assert requests[2].paraphrase_prompts == []


# ---------------------------------------------------------------------------------------------
# Bad files: each mutation must be located by file, record and field
# ---------------------------------------------------------------------------------------------

Mutation = Callable[[list[dict[str, Any]]], None]


def _del(record: dict[str, Any], *keys: str) -> None:
    for key in keys[:-1]:
        record = record[key]
    del record[keys[-1]]


def _set(record: dict[str, Any], value: Any, *keys: str) -> None:
    for key in keys[:-1]:
        record = record[key]
    record[keys[-1]] = value


MCF_CASES: list[tuple[str, Mutation, int, str, str]] = [
    (
        "relation prompt without answer",
        lambda d: _set(d[1], [{"prompt": "Where was X born?", "answer": " "}], "relation_prompts"),
        1,
        "relation_prompts.0.answer",
        "empty",
    ),
    (
        "relation prompt with an unknown key",
        lambda d: _set(d[0], [{"prompt": "p", "answer": "a", "weight": 1}], "relation_prompts"),
        0,
        "relation_prompts.0.weight",
        "unknown key",
    ),
    (
        "missing prompt",
        lambda d: _del(d[1], "requested_rewrite", "prompt"),
        1,
        "requested_rewrite.prompt",
        "missing",
    ),
    (
        "missing requested_rewrite",
        lambda d: _del(d[2], "requested_rewrite"),
        2,
        "requested_rewrite",
        "missing",
    ),
    (
        "missing target str",
        lambda d: _del(d[0], "requested_rewrite", "target_true", "str"),
        0,
        "requested_rewrite.target_true.str",
        "missing",
    ),
    (
        "missing prompt list",
        lambda d: _del(d[1], "neighborhood_prompts"),
        1,
        "neighborhood_prompts",
        "missing",
    ),
    (
        "prompt without placeholder",
        lambda d: _set(d[2], "Quillmark Roadster is a product of", "requested_rewrite", "prompt"),
        2,
        "requested_rewrite.prompt",
        "no '{}' placeholder",
    ),
    (
        "empty target",
        lambda d: _set(d[1], "  ", "requested_rewrite", "target_new", "str"),
        1,
        "requested_rewrite.target_new.str",
        "empty",
    ),
    (
        "empty subject",
        lambda d: _set(d[0], "", "requested_rewrite", "subject"),
        0,
        "requested_rewrite.subject",
        "empty",
    ),
    (
        "number as target",
        lambda d: _set(d[1], 42, "requested_rewrite", "target_new", "str"),
        1,
        "requested_rewrite.target_new.str",
        "expected a string, got number",
    ),
    (
        "target not an object",
        lambda d: _set(d[1], "Lisbon", "requested_rewrite", "target_new"),
        1,
        "requested_rewrite.target_new",
        "expected a JSON object",
    ),
    (
        "string case_id",
        lambda d: _set(d[2], "4", "case_id"),
        2,
        "case_id",
        "expected an integer, got string",
    ),
    (
        "number in a prompt list",
        lambda d: _set(d[0], ["fine", 7], "paraphrase_prompts"),
        0,
        "paraphrase_prompts.1",
        "expected a string",
    ),
    (
        "duplicate case_id",
        lambda d: _set(d[2], 0, "case_id"),
        2,
        "case_id",
        "duplicate case_id 0",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "record", "field", "fragment"),
    [case[1:] for case in MCF_CASES],
    ids=[case[0] for case in MCF_CASES],
)
def test_bad_mcf_records(
    tmp_path: Path, mutate: Mutation, record: int, field: str, fragment: str
) -> None:
    data = copy.deepcopy(_json(MCF))
    mutate(data)
    path = tmp_path / "multi_counterfact.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(RequestFileError) as info:
        load_requests(path)
    err = info.value
    assert (err.record, err.field) == (record, field)
    assert err.path == str(path)
    message = str(err)
    assert path.name in message
    assert f"record {record}" in message
    assert f"field '{field}'" in message
    assert fragment in message


ZSRE_CASES: list[tuple[str, Mutation, int, str, str]] = [
    ("missing loc_ans", lambda d: _del(d[1], "loc_ans"), 1, "loc_ans", "missing"),
    ("missing alt", lambda d: _del(d[0], "alt"), 0, "alt", "missing"),
    (
        "subject not in src",
        lambda d: _set(d[2], "Which company manufactures it?", "src"),
        2,
        "src",
        "does not occur in src",
    ),
    (
        "subject twice in src",
        lambda d: _set(d[0], "Marisol Vantrell or Marisol Vantrell?", "src"),
        0,
        "src",
        "occurs 2 times",
    ),
    ("no answers", lambda d: _set(d[1], [], "answers"), 1, "answers", "no answers"),
    ("empty answer", lambda d: _set(d[1], [" "], "answers"), 1, "answers.0", "empty"),
    (
        "number as answer",
        lambda d: _set(d[2], [1931], "answers"),
        2,
        "answers.0",
        "expected a string, got number",
    ),
    ("empty subject", lambda d: _set(d[0], " ", "subject"), 0, "subject", "empty"),
    (
        "brace in src",
        lambda d: _set(d[0], "What is {the} language of Marisol Vantrell?", "src"),
        0,
        "src",
        "brace",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "record", "field", "fragment"),
    [case[1:] for case in ZSRE_CASES],
    ids=[case[0] for case in ZSRE_CASES],
)
def test_bad_zsre_records(
    tmp_path: Path, mutate: Mutation, record: int, field: str, fragment: str
) -> None:
    data = copy.deepcopy(_json(ZSRE))
    mutate(data)
    path = tmp_path / "zsre_mem-eval.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(RequestFileError) as info:
        load_requests(path, format="zsre")
    err = info.value
    assert (err.record, err.field) == (record, field)
    assert path.name in str(err)
    assert f"record {record}" in str(err)
    assert f"field '{field}'" in str(err)
    assert fragment in str(err)


def _jsonl_lines() -> list[str]:
    return JSONL.read_text(encoding="utf-8").split("\n")


def _mutate_line(index: int, change: Callable[[dict[str, Any]], None]) -> list[str]:
    lines = _jsonl_lines()
    obj = json.loads(lines[index])
    change(obj)
    lines[index] = json.dumps(obj)
    return lines


JSONL_CASES: list[tuple[str, Callable[[], list[str]], int, str, str]] = [
    (
        "unknown key",
        lambda: _mutate_line(0, lambda o: o.update(colour="red")),
        0,
        "colour",
        "unknown key",
    ),
    (
        "missing target_new",
        lambda: _mutate_line(3, lambda o: o.pop("target_new")),
        3,
        "target_new",
        "missing",
    ),
    (
        "prompt without placeholder",
        lambda: _mutate_line(2, lambda o: o.update(prompt="Which company?")),
        2,
        "prompt",
        "no '{}' placeholder",
    ),
    (
        "number as subject",
        lambda: _mutate_line(3, lambda o: o.update(subject=12)),
        3,
        "subject",
        "expected a string, got number",
    ),
    (
        "empty target",
        lambda: _mutate_line(0, lambda o: o.update(target_new="")),
        0,
        "target_new",
        "empty",
    ),
    (
        "duplicate case_id",
        lambda: _mutate_line(3, lambda o: o.update(case_id=11)),
        3,
        "case_id",
        "duplicate case_id 11 (already used by record 2)",
    ),
    (
        "number in neighbourhood list",
        lambda: _mutate_line(2, lambda o: o.update(neighborhood_prompts=[None])),
        2,
        "neighborhood_prompts.0",
        "expected a string, got null",
    ),
]


@pytest.mark.parametrize(
    ("make_lines", "record", "field", "fragment"),
    [case[1:] for case in JSONL_CASES],
    ids=[case[0] for case in JSONL_CASES],
)
def test_bad_jsonl_lines(
    tmp_path: Path, make_lines: Callable[[], list[str]], record: int, field: str, fragment: str
) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(make_lines()), encoding="utf-8")
    with pytest.raises(RequestFileError) as info:
        load_requests(path)
    err = info.value
    assert (err.record, err.field) == (record, field)
    assert path.name in str(err)
    assert f"record {record} (line {record + 1})" in str(err)
    assert f"field '{field}'" in str(err)
    assert fragment in str(err)


def test_invalid_json_names_line_column_and_record(tmp_path: Path) -> None:
    text = MCF.read_text(encoding="utf-8")
    # Break the second record: drop the colon after its "case_id" key.
    broken = text.replace('"case_id": 1,', '"case_id" 1,')
    assert broken != text
    path = tmp_path / "broken.json"
    path.write_text(broken, encoding="utf-8")
    with pytest.raises(RequestFileError) as info:
        load_requests(path)
    err = info.value
    line = broken.splitlines().index('    "case_id" 1,') + 1
    assert path.name in str(err)
    assert f"invalid JSON at line {line}, column 15" in str(err)
    assert err.record == 1 and err.field is None
    with pytest.raises(RequestFileError, match="invalid JSON"):
        detect_format(path)


def test_invalid_json_line_in_jsonl(tmp_path: Path) -> None:
    lines = _jsonl_lines()
    lines[2] = lines[2][:-5]
    path = tmp_path / "truncated.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(RequestFileError) as info:
        load_requests(path)
    assert (info.value.record, info.value.field) == (2, None)
    assert "truncated.jsonl: record 2 (line 3): invalid JSON at column" in str(info.value)


@pytest.mark.parametrize(
    ("content", "name", "fragment"),
    [
        ("[]", "empty.json", "no requests"),
        ("\n\n", "empty.jsonl", "no requests"),
        ('{"case_id": 0}', "object.json", "expected a JSON array"),
        ('[{"question": "Who?"}]', "unknown.json", "could not detect the format"),
        ("[1, 2]", "numbers.json", "could not detect the format"),
    ],
)
def test_file_level_errors(tmp_path: Path, content: str, name: str, fragment: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(RequestFileError, match=fragment) as info:
        load_requests(path)
    assert str(info.value).startswith(str(path))
    assert info.value.record is None and info.value.field is None


def test_record_that_is_not_an_object(tmp_path: Path) -> None:
    data = _json(MCF)
    data[1] = "oops"
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(RequestFileError, match="record 1: expected a JSON object, got string"):
        load_requests(path)


def test_unknown_format_argument() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        load_requests(MCF, format="csv")
    with pytest.raises(ValueError, match="unknown format"):
        save_requests(load_requests(MCF), "unused.json", format="auto")


# ---------------------------------------------------------------------------------------------
# Real published sample
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared reference data folder is absent")
def test_real_multi_counterfact_sample(tmp_path: Path) -> None:
    path = SHARED_DATA / "multi_counterfact-50.json"
    assert detect_format(path) == "mcf"
    requests = load_requests(path)
    assert len(requests) == 46
    assert len({r.case_id for r in requests}) == 46
    first = requests[0]
    assert first.subject == "Danielle Darrieux"
    assert first.rewrite_prompt == "The mother tongue of Danielle Darrieux is"
    assert (first.target_new, first.target_true, first.relation_id) == ("English", "French", "P103")
    assert len(first.neighborhood_prompts) == 10
    assert all(len(r.generation_prompts) > 0 for r in requests)
    # Our writer's layout must read back identically (ids and pararel_idx are not kept).
    out = tmp_path / "copy.json"
    save_requests(requests, out, "mcf")
    assert load_requests(out) == requests


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def test_saved_mcf_has_memit_layout(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    save_requests(load_requests(MCF), out, "mcf")
    written = _json(out)
    original = _json(MCF)
    for ours, theirs in zip(written, original, strict=True):
        assert set(ours) == set(theirs) - {"pararel_idx"}
        assert set(ours["requested_rewrite"]) == set(theirs["requested_rewrite"])
        assert ours["requested_rewrite"]["target_new"] == {
            "str": theirs["requested_rewrite"]["target_new"]["str"],
            "id": None,
        }
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left behind


def test_saved_zsre_has_memit_layout(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    requests = load_requests(ZSRE)
    save_requests(requests, out, "zsre")
    written = _json(out)
    original = _json(ZSRE)
    for ours, theirs in zip(written, original, strict=True):
        assert set(ours) == {"subject", "src", "rephrase", "alt", "answers", "loc", "loc_ans"}
        for key in ("subject", "src", "rephrase", "loc", "loc_ans"):
            assert ours[key] == theirs[key]
        assert ours["answers"] == [theirs["answers"][0]] and ours["alt"] == theirs["answers"][0]
    assert load_requests(out) == requests


def test_zsre_from_counterfact_uses_target_true_as_neighbourhood_answer(tmp_path: Path) -> None:
    out = tmp_path / "cf_as_zsre.json"
    save_requests(load_requests(MCF), out, "zsre")
    first = _json(out)[0]
    assert first["loc"] == "The mother tongue of Tiago Ferrinho is"
    assert first["loc_ans"] == "Portuguese"
    assert first["rephrase"] == "The harbour was quiet that year. Marisol Vantrell, a native"
    third = _json(out)[2]
    assert third["rephrase"] == third["src"] == "Quillmark Roadster is a product of"


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        (_request(), "neighbourhood prompt"),
        (
            _request(target_true=None, neighborhood_prompts=["Who is X?"]),
            "neighbourhood answer",
        ),
        (
            _request(subject="tongue", neighborhood_prompts=["Q?"]),
            "subject also occurs",
        ),
    ],
)
def test_zsre_writer_refuses_what_it_cannot_carry(
    tmp_path: Path, request_: EditRequest, fragment: str
) -> None:
    out = tmp_path / "z.json"
    out.write_text("previous", encoding="utf-8")
    with pytest.raises(ValueError, match=fragment):
        save_requests([request_], out, "zsre")
    assert out.read_text(encoding="utf-8") == "previous"  # untouched on failure
    assert [p.name for p in tmp_path.iterdir()] == ["z.json"]


def test_writer_refuses_unloadable_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="target_true"):
        save_requests([_request(target_true=None)], tmp_path / "a.json", "mcf")
    with pytest.raises(ValueError, match="duplicate case_id"):
        save_requests([_request(), _request()], tmp_path / "b.jsonl", "jsonl")
    with pytest.raises(ValueError, match="no requests"):
        save_requests([], tmp_path / "c.jsonl", "jsonl")
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "requests.jsonl"
    out.write_text("old content that is not JSON\n", encoding="utf-8")
    requests = load_requests(JSONL)
    save_requests(requests, out, "jsonl")
    assert load_requests(out) == requests


# ---------------------------------------------------------------------------------------------
# Round trip property
# ---------------------------------------------------------------------------------------------

_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="{}"),
    max_size=20,
)
_NONBLANK = _TEXT.filter(lambda s: bool(s.strip()))
_PROMPTS = st.lists(_TEXT, max_size=3)


@st.composite
def edit_requests(draw: st.DrawFn, case_id: int = 0) -> EditRequest:
    before = draw(_TEXT)
    after = draw(_TEXT)
    return EditRequest(
        case_id=case_id,
        subject=draw(_NONBLANK),
        prompt=before + "{}" + after,
        target_new=draw(_NONBLANK),
        target_true=draw(_NONBLANK),
        relation_id=draw(st.none() | _TEXT),
        paraphrase_prompts=draw(_PROMPTS),
        neighborhood_prompts=draw(_PROMPTS),
        neighborhood_target=draw(st.none() | _NONBLANK),
        attribute_prompts=draw(_PROMPTS),
        generation_prompts=draw(_PROMPTS),
        relation_prompts=draw(
            st.lists(st.builds(RelationPrompt, prompt=_TEXT, answer=_NONBLANK), max_size=2)
        ),
    )


@st.composite
def request_lists(draw: st.DrawFn) -> list[EditRequest]:
    case_ids = draw(st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=4, unique=True))
    return [draw(edit_requests(case_id=case_id)) for case_id in case_ids]


_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_SETTINGS
@given(requests=request_lists(), fmt=st.sampled_from(["mcf", "jsonl"]))
def test_round_trip_exact(tmp_path: Path, requests: list[EditRequest], fmt: str) -> None:
    path = tmp_path / f"round_trip.{'jsonl' if fmt == 'jsonl' else 'json'}"
    save_requests(requests, path, fmt)
    assert detect_format(path) == fmt
    assert load_requests(path) == requests


@_SETTINGS
@given(requests=request_lists(), neighbourhood=st.lists(_TEXT, min_size=1, max_size=4))
def test_round_trip_zsre_on_carried_fields(
    tmp_path: Path, requests: list[EditRequest], neighbourhood: list[str]
) -> None:
    requests = [
        r.model_copy(update={"neighborhood_prompts": [n + "?"]})
        for r, n in zip(requests, neighbourhood * len(requests), strict=False)
    ]
    assume(all(r.rewrite_prompt.replace(r.subject, "{}") == r.prompt for r in requests))
    path = tmp_path / "round_trip.json"
    save_requests(requests, path, "zsre")
    loaded = load_requests(path)
    assert detect_format(path) == "zsre"
    assert len(loaded) == len(requests)
    for index, (back, original) in enumerate(zip(loaded, requests, strict=True)):
        assert back.case_id == index
        assert back.subject == original.subject
        assert back.prompt == original.prompt
        assert back.target_new == original.target_new
        assert back.paraphrase_prompts == (
            original.paraphrase_prompts[:1] or [original.rewrite_prompt]
        )
        assert back.neighborhood_prompts == original.neighborhood_prompts[:1]
        assert back.neighborhood_target == (original.neighborhood_target or original.target_true)
        assert back.target_true is None and back.relation_id is None
        assert back.relation_prompts == []
