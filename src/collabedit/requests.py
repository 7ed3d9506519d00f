"""Edit requests and the published file formats they come in.

An edit request asks a model to change one fact: in "The mother tongue of {} is" the subject
"Danielle Darrieux" should now be completed by "English" instead of "French". The editing
algorithm only needs the subject, the prompt template and the new target; the evaluation also
needs the prompts that test generalisation (paraphrases) and specificity (neighbourhood).

Three layouts are read and written:

* ``mcf``: MEMIT's ``multi_counterfact.json`` (a JSON list of CounterFact records),
* ``zsre``: MEMIT's ``zsre_mem-eval.json`` (a JSON list of question records), mapped the way
  MEMIT's ``dsets/zsre.py`` maps them, so our numbers stay comparable with the paper's,
* ``jsonl``: our own layout, one :class:`EditRequest` object per line, which carries every field.

Loading is all-or-nothing: a single bad record makes the whole file fail with a
:class:`RequestFileError` that names the file, the record and the field, because silently
editing a model with a partial request set would give results that look valid but are not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from collabedit import io

__all__ = [
    "FORMATS",
    "EditRequest",
    "RelationPrompt",
    "RequestFileError",
    "detect_format",
    "load_requests",
    "save_requests",
]

RequestFormat = Literal["mcf", "zsre", "jsonl"]
FORMATS: tuple[str, ...] = ("mcf", "zsre", "jsonl")
"""The concrete file layouts; ``load_requests`` also accepts ``"auto"``."""


class RelationPrompt(BaseModel):
    """A prompt about the edited subject's other relation, with the answer it must keep."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    prompt: str
    """Complete text, the subject already filled in."""
    answer: str

    @field_validator("answer")
    @classmethod
    def _answer_not_blank(cls, value: str) -> str:
        return _strip_nonempty(value, "answer")


class EditRequest(BaseModel):
    """One requested fact change, independent of the file layout it came from.

    Strict mode is on so that a number where a string belongs (a common symptom of a mangled
    export) is reported instead of being silently converted to text. Targets are stored
    without surrounding whitespace: the scoring code adds the single leading space that BPE
    tokenizers need, as MEMIT does, and a second space would change the tokens.
    """

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    case_id: int
    subject: str
    prompt: str
    target_new: str
    target_true: str | None = None
    relation_id: str | None = None
    paraphrase_prompts: list[str] = Field(default_factory=list)
    """Complete texts (the subject already filled in) that should also yield ``target_new``."""
    neighborhood_prompts: list[str] = Field(default_factory=list)
    """Complete texts about other subjects whose answer must not change."""
    neighborhood_target: str | None = None
    """Expected answer of the neighbourhood prompts (zsRE's ``loc_ans``); None means
    ``target_true``, which is the CounterFact convention."""
    attribute_prompts: list[str] = Field(default_factory=list)
    generation_prompts: list[str] = Field(default_factory=list)
    relation_prompts: list[RelationPrompt] = Field(default_factory=list)
    """Prompts about the edited subject's other relations and their answers, which the edit
    must not change (relation specificity, RippleEdits). The world's requests carry them; the
    published layouts have none (our ``mcf`` writer keeps them in an extension key)."""

    @field_validator("subject")
    @classmethod
    def _subject_not_blank(cls, value: str) -> str:
        # The subject is where the edit is located (its last token); a blank one has no tokens.
        if not value.strip():
            raise ValueError("subject is empty")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_has_one_placeholder(cls, value: str) -> str:
        # The rewrite prompt is filled with str.format, so any other brace would be misread
        # (or raise) and two placeholders would put the subject in twice.
        count = value.count("{}")
        if count == 0:
            raise ValueError("prompt has no '{}' placeholder")
        if count > 1:
            raise ValueError(f"prompt has {count} '{{}}' placeholders; exactly one is required")
        if "{" in value.replace("{}", "", 1) or "}" in value.replace("{}", "", 1):
            raise ValueError("prompt contains a brace besides its '{}' placeholder")
        return value

    @field_validator("target_new")
    @classmethod
    def _target_new_not_blank(cls, value: str) -> str:
        return _strip_nonempty(value, "target_new")

    @field_validator("target_true", "neighborhood_target")
    @classmethod
    def _optional_target_not_blank(cls, value: str | None) -> str | None:
        return None if value is None else _strip_nonempty(value, "target")

    @property
    def rewrite_prompt(self) -> str:
        """The prompt with the subject filled in: the text the edit is computed on."""
        return self.prompt.format(self.subject)


def _strip_nonempty(value: str, what: str) -> str:
    stripped = value.strip()
    if not stripped:
        raise ValueError(f"{what} is empty")
    return stripped


_MODEL_FIELDS: tuple[str, ...] = tuple(EditRequest.model_fields)


class RequestFileError(ValueError):
    """A request file that cannot be used, located as precisely as the problem allows.

    ``record`` is the 0-based index of the record in a JSON list, or the 0-based line index in
    a JSONL file (blank lines count, so it points at the line); ``field`` is the dotted path of
    the field in the file's own layout (``requested_rewrite.target_new.str``, ``answers.0``).
    Either is None when the problem is not tied to one record or field (e.g. invalid JSON).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        message: str,
        *,
        record: int | None = None,
        field: str | None = None,
        line: int | None = None,
    ) -> None:
        self.path = str(path)
        self.record = record
        self.field = field
        self.line = line
        self.reason = message
        parts = [self.path]
        if record is not None:
            parts.append(f"record {record}" + (f" (line {line})" if line is not None else ""))
        if field is not None:
            parts.append(f"field '{field}'")
        parts.append(message)
        super().__init__(": ".join(parts))


class _FieldError(Exception):
    """Internal: a problem in one field of one record, before the record index is attached."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


# --------------------------------------------------------------------------------------------
# Reading helpers
# --------------------------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    """The JSON name of a value's type, for error messages that users of JSON understand."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _join(prefix: str, key: str | int) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _required(obj: Mapping[str, Any], key: str, prefix: str = "") -> Any:
    if key not in obj:
        raise _FieldError(_join(prefix, key), "missing required field")
    return obj[key]


def _expect_object(value: Any, field: str | None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _FieldError(field, f"expected a JSON object, got {_json_type(value)}")
    return value


def _expect_str(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _FieldError(field, f"expected a string, got {_json_type(value)}")
    return value


def _optional_str(obj: Mapping[str, Any], key: str, prefix: str = "") -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise _FieldError(_join(prefix, key), f"expected a string or null, got {_json_type(value)}")
    return value


_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "list_type": "an array",
}


def _build(data: dict[str, Any], field_name: Callable[[tuple[str | int, ...]], str]) -> EditRequest:
    """Validate ``data`` as an EditRequest, turning the first pydantic error into a _FieldError.

    ``field_name`` translates the model's error location into the file layout's field path,
    so the user is pointed at what to fix in *their* file, not at our internal names.
    """
    try:
        return EditRequest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        kind = err["type"]
        if kind in _EXPECTED:
            message = f"expected {_EXPECTED[kind]}, got {_json_type(err['input'])}"
        elif kind == "missing":
            message = "missing required field"
        elif kind == "extra_forbidden":
            message = "unknown key"
        else:
            message = str(err["msg"]).removeprefix("Value error, ")
        raise _FieldError(field_name(loc), message) from None


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig: tolerate a byte-order mark, which some editors on Windows add.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RequestFileError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _locate_bad_record(text: str) -> int | None:
    """Index of the list element whose text fails to parse, if the file is a JSON list.

    A line/column alone is hard to act on in a file of thousands of records; the record index
    matches how every other error is reported. Returns None when it cannot be attributed.
    """
    decoder = json.JSONDecoder()
    ws = " \t\n\r"
    pos = len(text) - len(text.lstrip(ws))
    if not text.startswith("[", pos):
        return None
    pos += 1
    index = 0
    while True:
        while pos < len(text) and text[pos] in ws:
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return None  # truncated after a comma, or a trailing comma: no record to blame
        try:
            _, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return index
        while pos < len(text) and text[pos] in ws:
            pos += 1
        if pos < len(text) and text[pos] == ",":
            pos += 1
            index += 1
            continue
        return None


def _read_json(path: Path) -> list[Any]:
    """Parse a whole-file JSON list of records, with errors that locate the problem."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestFileError(
            path,
            f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
            record=_locate_bad_record(text),
        ) from None
    if not isinstance(data, list):
        raise RequestFileError(path, f"expected a JSON array of records, got {_json_type(data)}")
    if not data:
        raise RequestFileError(path, "no requests (the array is empty)")
    return data


def _format_of(data: list[Any], path: Path) -> RequestFormat:
    first = data[0]
    if isinstance(first, dict):
        if "requested_rewrite" in first:
            return "mcf"
        if "src" in first and "answers" in first:
            return "zsre"
    raise RequestFileError(
        path,
        "could not detect the format: the first record has neither 'requested_rewrite' "
        "(CounterFact) nor 'src' and 'answers' (zsRE); pass format= explicitly",
    )


# --------------------------------------------------------------------------------------------
# Per-layout record parsers
# --------------------------------------------------------------------------------------------

_MCF_REWRITE_FIELDS = {
    "subject": "requested_rewrite.subject",
    "prompt": "requested_rewrite.prompt",
    "target_new": "requested_rewrite.target_new.str",
    "target_true": "requested_rewrite.target_true.str",
    "relation_id": "requested_rewrite.relation_id",
}
_MCF_PROMPT_LISTS = (
    "paraphrase_prompts",
    "neighborhood_prompts",
    "attribute_prompts",
    "generation_prompts",
)


def _dotted(loc: tuple[str | int, ...], names: Mapping[str, str]) -> str:
    """Dotted field path for a pydantic location, renaming the top-level model field."""
    head = names.get(str(loc[0]), str(loc[0])) if loc else ""
    return ".".join([head, *(str(part) for part in loc[1:])])


def _parse_mcf(record: Any, index: int) -> EditRequest:
    """One MEMIT ``multi_counterfact.json`` record.

    The Wikidata ids of the targets and ``pararel_idx`` are checked but not kept: nothing in
    editing or evaluation uses them. ``neighborhood_target`` and ``relation_prompts`` are optional
    extension keys that our writer adds only when they carry something (``neighborhood_target``
    when the neighbourhood answer differs from ``target_true``; MEMIT ignores unknown keys), so
    that such requests survive a round trip.
    """
    record = _expect_object(record, None)
    rewrite = _expect_object(_required(record, "requested_rewrite"), "requested_rewrite")
    targets: dict[str, Any] = {}
    for key in ("target_new", "target_true"):
        field = f"requested_rewrite.{key}"
        target = _expect_object(_required(rewrite, key, "requested_rewrite"), field)
        targets[key] = _required(target, "str", field)
        _optional_str(target, "id", field)
    pararel_idx = record.get("pararel_idx")
    if pararel_idx is not None and (
        isinstance(pararel_idx, bool) or not isinstance(pararel_idx, int)
    ):
        raise _FieldError("pararel_idx", f"expected an integer, got {_json_type(pararel_idx)}")
    data: dict[str, Any] = {
        "case_id": _required(record, "case_id"),
        "subject": _required(rewrite, "subject", "requested_rewrite"),
        "prompt": _required(rewrite, "prompt", "requested_rewrite"),
        "relation_id": rewrite.get("relation_id"),
        **targets,
        **{key: _required(record, key) for key in _MCF_PROMPT_LISTS},
        "neighborhood_target": record.get("neighborhood_target"),
        "relation_prompts": record.get("relation_prompts", []),
    }
    return _build(data, lambda loc: _dotted(loc, _MCF_REWRITE_FIELDS))


_ZSRE_FIELDS = {
    "prompt": "src",
    "target_new": "answers.0",
    "paraphrase_prompts": "rephrase",
    "neighborhood_prompts": "loc",
    "neighborhood_target": "loc_ans",
}


def _parse_zsre(record: Any, index: int) -> EditRequest:
    """One zsRE record, mapped exactly as MEMIT's ``dsets/zsre.py`` does.

    MEMIT edits towards ``answers[0]`` (not ``alt``) and tests specificity with ``loc + "?"``
    whose expected answer is ``loc_ans``; it has no true target for the edited fact, hence
    ``target_true`` is None. ``case_id`` is the record index, as in MEMIT.
    """
    record = _expect_object(record, None)
    subject = _expect_str(_required(record, "subject"), "subject")
    src = _expect_str(_required(record, "src"), "src")
    rephrase = _expect_str(_required(record, "rephrase"), "rephrase")
    _expect_str(_required(record, "alt"), "alt")
    answers = _required(record, "answers")
    if not isinstance(answers, list):
        raise _FieldError("answers", f"expected an array, got {_json_type(answers)}")
    if not answers:
        raise _FieldError("answers", "no answers (the edit target is answers[0])")
    for i, answer in enumerate(answers):
        _expect_str(answer, f"answers.{i}")
    loc = _expect_str(_required(record, "loc"), "loc")
    loc_ans = _expect_str(_required(record, "loc_ans"), "loc_ans")
    if not subject.strip():
        raise _FieldError("subject", "subject is empty")
    occurrences = src.count(subject)
    if occurrences == 0:
        raise _FieldError("src", f"subject {subject!r} does not occur in src")
    if occurrences > 1:
        raise _FieldError(
            "src", f"subject {subject!r} occurs {occurrences} times in src; it must occur once"
        )
    data = {
        "case_id": index,
        "subject": subject,
        "prompt": src.replace(subject, "{}"),
        "target_new": answers[0],
        "target_true": None,
        "relation_id": None,
        "paraphrase_prompts": [rephrase],
        "neighborhood_prompts": [loc + "?"],
        "neighborhood_target": loc_ans,
    }
    return _build(data, lambda loc_: _ZSRE_FIELDS.get(str(loc_[0]), str(loc_[0])))


def _parse_jsonl_object(record: Any, index: int) -> EditRequest:
    record = _expect_object(record, None)
    for key in record:
        if key not in _MODEL_FIELDS:
            raise _FieldError(key, f"unknown key (allowed: {', '.join(_MODEL_FIELDS)})")
    return _build(record, lambda loc: _dotted(loc, {}))


_PARSERS: dict[str, Callable[[Any, int], EditRequest]] = {
    "mcf": _parse_mcf,
    "zsre": _parse_zsre,
}


def _check_unique_case_ids(
    requests: Sequence[EditRequest], indices: Sequence[int], path: Path, lines: bool
) -> None:
    first: dict[int, int] = {}
    for request, index in zip(requests, indices, strict=True):
        if request.case_id in first:
            raise RequestFileError(
                path,
                f"duplicate case_id {request.case_id} "
                f"(already used by record {first[request.case_id]})",
                record=index,
                field="case_id",
                line=index + 1 if lines else None,
            )
        first[request.case_id] = index


def _load_json_records(path: Path, data: list[Any], fmt: str) -> list[EditRequest]:
    parse = _PARSERS[fmt]
    requests: list[EditRequest] = []
    for index, record in enumerate(data):
        try:
            requests.append(parse(record, index))
        except _FieldError as exc:
            raise RequestFileError(path, exc.message, record=index, field=exc.field) from None
    _check_unique_case_ids(requests, range(len(requests)), path, lines=False)
    return requests


def _load_jsonl(path: Path) -> list[EditRequest]:
    text = _read_text(path)
    requests: list[EditRequest] = []
    indices: list[int] = []
    # Split on "\n" only: str.splitlines would also break inside strings at U+2028 and similar,
    # which JSON allows unescaped.
    for index, raw in enumerate(text.split("\n")):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        try:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _FieldError(None, f"invalid JSON at column {exc.colno}: {exc.msg}") from None
            requests.append(_parse_jsonl_object(record, index))
        except _FieldError as exc:
            raise RequestFileError(
                path, exc.message, record=index, field=exc.field, line=index + 1
            ) from None
        indices.append(index)
    if not requests:
        raise RequestFileError(path, "no requests (the file has no non-blank lines)")
    _check_unique_case_ids(requests, indices, path, lines=True)
    return requests


# --------------------------------------------------------------------------------------------
# Public loading API
# --------------------------------------------------------------------------------------------


def detect_format(path: str | os.PathLike[str]) -> str:
    """The layout of a request file: ``"mcf"``, ``"zsre"`` or ``"jsonl"``.

    A ``.jsonl`` suffix decides on its own (a JSONL file is not one JSON document); otherwise
    the first record's keys decide. Raises RequestFileError if the file is not valid JSON,
    holds no records, or matches no layout.
    """
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        return "jsonl"
    return _format_of(_read_json(path), path)


def load_requests(path: str | os.PathLike[str], format: str = "auto") -> list[EditRequest]:
    """Read every edit request of a file, or raise RequestFileError for the first bad record.

    ``format`` is ``"auto"`` (see :func:`detect_format`), ``"mcf"``, ``"zsre"`` or ``"jsonl"``.
    Duplicate ``case_id`` values are an error because results are keyed by them.
    """
    if format not in ("auto", *FORMATS):
        raise ValueError(f"unknown format {format!r}; expected 'auto' or one of {FORMATS}")
    path = Path(path)
    if format == "jsonl" or (format == "auto" and path.suffix.lower() == ".jsonl"):
        return _load_jsonl(path)
    data = _read_json(path)
    fmt = _format_of(data, path) if format == "auto" else format
    return _load_json_records(path, data, fmt)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _mcf_record(request: EditRequest) -> dict[str, Any]:
    if request.target_true is None:
        raise ValueError(
            f"case {request.case_id}: the CounterFact layout needs target_true, which is None"
        )
    record: dict[str, Any] = {
        "case_id": request.case_id,
        "requested_rewrite": {
            "prompt": request.prompt,
            "relation_id": request.relation_id,
            "target_new": {"str": request.target_new, "id": None},
            "target_true": {"str": request.target_true, "id": None},
            "subject": request.subject,
        },
        **{key: list(getattr(request, key)) for key in _MCF_PROMPT_LISTS},
    }
    if request.neighborhood_target is not None:
        record["neighborhood_target"] = request.neighborhood_target
    if request.relation_prompts:
        record["relation_prompts"] = [r.model_dump() for r in request.relation_prompts]
    return record


def _zsre_record(request: EditRequest) -> dict[str, Any]:
    src = request.rewrite_prompt
    if src.replace(request.subject, "{}") != request.prompt:
        raise ValueError(
            f"case {request.case_id}: the subject also occurs outside the placeholder of the "
            "prompt, so zsRE's src.replace(subject, '{}') would not give the prompt back"
        )
    if not request.neighborhood_prompts:
        raise ValueError(f"case {request.case_id}: zsRE needs a neighbourhood prompt (loc)")
    loc_ans = request.neighborhood_target or request.target_true
    if loc_ans is None:
        raise ValueError(
            f"case {request.case_id}: zsRE needs a neighbourhood answer (loc_ans); "
            "neighborhood_target and target_true are both None"
        )
    loc = request.neighborhood_prompts[0]
    return {
        "subject": request.subject,
        "src": src,
        "rephrase": request.paraphrase_prompts[0] if request.paraphrase_prompts else src,
        "alt": request.target_new,
        "answers": [request.target_new],
        "loc": loc.removesuffix("?"),
        "loc_ans": loc_ans,
    }


def save_requests(
    requests: Iterable[EditRequest], path: str | os.PathLike[str], format: str
) -> None:
    """Write requests in one of the layouts ``load_requests`` reads, atomically.

    Everything is converted before the file is touched, so a request the layout cannot carry
    raises ValueError and leaves any existing file intact. ``mcf`` and ``jsonl`` round-trip
    exactly; ``zsre`` keeps only what zsRE carries (first paraphrase, first neighbourhood prompt,
    no target_true/relation_id/attribute, generation or relation prompts; case_id becomes the
    index).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    items = list(requests)
    if not items:
        raise ValueError("no requests to write (an empty file could not be loaded back)")
    if format != "zsre":
        seen: set[int] = set()
        for request in items:
            if request.case_id in seen:
                raise ValueError(f"duplicate case_id {request.case_id}")
            seen.add(request.case_id)
    if format == "jsonl":
        text = "".join(
            json.dumps(r.model_dump(mode="json"), ensure_ascii=False) + "\n" for r in items
        )
    else:
        convert = _mcf_record if format == "mcf" else _zsre_record
        text = json.dumps([convert(r) for r in items], ensure_ascii=False, indent=2) + "\n"
    io.write_text(Path(path), text)
