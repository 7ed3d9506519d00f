"""Conflicting edit requests: two parties ask for different new objects of the same fact.

The CollabEdit authors' conflict benchmark (``easy_conflict_*.json``) stores one record per
conflict: the edit (subject, relation prompt, ``new_object``) and the ``conflict_object`` another
party asks for instead. Each record becomes a :class:`ConflictPair` of two :class:`EditRequest`
objects that differ only in their target, so the collaborative code can hand them to different
clients. Errors name the file, the record and the field, as for every other request file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collabedit.requests import (
    EditRequest,
    RequestFileError,
    _build,
    _expect_object,
    _expect_str,
    _FieldError,
    _read_json,
    _required,
)

__all__ = ["ConflictPair", "load_conflict_pairs"]


@dataclass(frozen=True)
class ConflictPair:
    """The same (subject, relation) edited to two different objects."""

    first: EditRequest
    second: EditRequest
    kind: str = ""

    def __post_init__(self) -> None:
        a, b = self.first, self.second
        if (a.subject, a.prompt) != (b.subject, b.prompt):
            raise ValueError("a conflict pair must edit one subject with one prompt")

    @property
    def is_overlap(self) -> bool:
        """Both parties ask for the same object: an overlap, not a conflict. The published
        ``easy_conflict_1000_p1.json`` has 66 such records (71 ignoring case); they are kept so
        that the file loads as published, and callers can set them apart."""
        return self.first.target_new.casefold() == self.second.target_new.casefold()


def _label(obj: dict[str, Any], key: str, prefix: str) -> str:
    field = f"{prefix}.{key}"
    return _expect_str(
        _required(_expect_object(_required(obj, key, prefix), field), "label", field),
        f"{field}.label",
    )


def _parse_record(record: Any, index: int) -> ConflictPair:
    record = _expect_object(record, None)
    edit = _expect_object(_required(record, "edit"), "edit")
    relation = _expect_object(_required(edit, "relation", "edit"), "edit.relation")
    prompt = _expect_str(_required(relation, "prompt", "edit.relation"), "edit.relation.prompt")
    query = relation.get("query")
    subject = _label(edit, "subject", "edit")
    new_object = _expect_str(_required(edit, "new_object", "edit"), "edit.new_object")
    true_object = _label(edit, "object", "edit")
    conflict_object = _label(edit, "conflict_object", "edit")
    relation_id = relation.get("id")
    paraphrases = []
    if isinstance(query, str) and query.count("{}") == 1:
        paraphrases = [query.format(subject)]

    def request(case_id: int, target: str, target_field: str) -> EditRequest:
        names = {
            "prompt": "edit.relation.prompt",
            "subject": "edit.subject.label",
            "target_new": target_field,
            "target_true": "edit.object.label",
        }
        data = {
            "case_id": case_id,
            "subject": subject,
            "prompt": prompt,
            "target_new": target,
            "target_true": true_object,
            "relation_id": relation_id if isinstance(relation_id, str) else None,
            "paraphrase_prompts": paraphrases,
        }
        return _build(data, lambda loc: names.get(str(loc[0]), str(loc[0])) if loc else "")

    first = request(2 * index, new_object, "edit.new_object")
    second = request(2 * index + 1, conflict_object, "edit.conflict_object.label")
    kind = record.get("type")
    return ConflictPair(first, second, kind if isinstance(kind, str) else "")


def load_conflict_pairs(path: str | os.PathLike[str]) -> list[ConflictPair]:
    """Read a conflict benchmark file (the ``easy_conflict_*.json`` layout).

    Case ids are 2i for record i's edit and 2i+1 for its conflicting edit, so both sides of every
    pair can be edited in one batch and still be told apart in results.
    """
    path = Path(path)
    pairs = []
    for index, record in enumerate(_read_json(path)):
        try:
            pairs.append(_parse_record(record, index))
        except _FieldError as exc:
            raise RequestFileError(path, exc.message, record=index, field=exc.field) from None
    return pairs
