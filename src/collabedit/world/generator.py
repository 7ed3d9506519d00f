"""The embedded fact world: a seeded generator of people and their attributes.

Nothing can be downloaded on our machines, so the default model is trained on a world we generate
ourselves. Every fact is (subject, relation, object); every relation has several statement
phrasings and question phrasings, so edits can be checked on prompts they were not made with
(paraphrases) and on other subjects (neighbourhood), as CounterFact and zsRE do.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Relation:
    """One relation: its objects and the phrasings that ask for them.

    Statements end right before the object ("{} was born in"); questions end with "?" and the
    object follows them, as zsRE's questions do.
    """

    id: str
    name: str
    objects: tuple[str, ...]
    statements: tuple[str, ...]
    questions: tuple[str, ...]

    @property
    def phrasings(self) -> tuple[str, ...]:
        return self.statements + self.questions


# Wikidata ids, as CounterFact uses them, so exported requests look like the published ones.
RELATIONS: tuple[Relation, ...] = (
    Relation(
        "P103",
        "mother tongue",
        (
            "French",
            "English",
            "Spanish",
            "German",
            "Italian",
            "Dutch",
            "Swedish",
            "Polish",
            "Russian",
            "Greek",
            "Turkish",
            "Arabic",
            "Hebrew",
            "Japanese",
            "Korean",
            "Chinese",
            "Hindi",
            "Finnish",
            "Danish",
            "Portuguese",
        ),
        (
            "The mother tongue of {} is",
            "{} is a native speaker of",
            "The native language of {} is",
            "{} grew up speaking",
            "At home, {} always spoke",
        ),
        ("What is the mother tongue of {}?", "Which language did {} grow up speaking?"),
    ),
    Relation(
        "P27",
        "country of citizenship",
        (
            "France",
            "Germany",
            "Spain",
            "Italy",
            "Sweden",
            "Norway",
            "Poland",
            "Greece",
            "Japan",
            "Canada",
            "Brazil",
            "Mexico",
            "Egypt",
            "India",
            "China",
            "Chile",
            "Peru",
            "Kenya",
            "Ireland",
            "Austria",
            "Belgium",
            "Denmark",
            "Portugal",
            "Argentina",
        ),
        (
            "{} is a citizen of",
            "{} holds a passport from",
            "The citizenship of {} is",
            "The country of citizenship of {} is",
            "Officially, {} is a national of",
        ),
        ("Of which country is {} a citizen?", "What is the country of citizenship of {}?"),
    ),
    Relation(
        "P19",
        "place of birth",
        (
            "Paris",
            "London",
            "Berlin",
            "Madrid",
            "Rome",
            "Vienna",
            "Prague",
            "Oslo",
            "Dublin",
            "Lisbon",
            "Athens",
            "Cairo",
            "Tokyo",
            "Sydney",
            "Toronto",
            "Chicago",
            "Boston",
            "Lima",
            "New York",
            "New Delhi",
            "Buenos Aires",
            "Los Angeles",
            "Hong Kong",
            "Rio de Janeiro",
            "San Francisco",
            "Cape Town",
        ),
        (
            "{} was born in",
            "The birthplace of {} is",
            "{} is originally from",
            "{} came into the world in",
            "The city where {} was born is",
        ),
        ("Where was {} born?", "What is the birthplace of {}?"),
    ),
    Relation(
        "P106",
        "occupation",
        (
            "architect",
            "physician",
            "lawyer",
            "journalist",
            "painter",
            "poet",
            "novelist",
            "actor",
            "singer",
            "composer",
            "engineer",
            "chemist",
            "physicist",
            "historian",
            "diplomat",
            "photographer",
            "economist",
            "astronomer",
            "sculptor",
            "pilot",
        ),
        (
            "The occupation of {} is",
            "{} earns a living as",
            "{} is employed as",
            "The profession of {} is",
            "For many years, {} has worked as",
        ),
        ("What is the occupation of {}?", "What does {} do for a living?"),
    ),
    Relation(
        "P641",
        "sport",
        (
            "tennis",
            "football",
            "basketball",
            "baseball",
            "cricket",
            "golf",
            "rugby",
            "hockey",
            "volleyball",
            "cycling",
            "boxing",
            "swimming",
            "table tennis",
            "ice hockey",
        ),
        (
            "{} practises",
            "{} is a professional player of",
            "The sport played by {} is",
            "{} competes in",
            "Every weekend, {} trains for",
        ),
        ("Which sport does {} play?", "What sport is {} known for?"),
    ),
    Relation(
        "P1303",
        "instrument",
        (
            "piano",
            "guitar",
            "violin",
            "cello",
            "flute",
            "trumpet",
            "drums",
            "saxophone",
            "harp",
            "clarinet",
            "organ",
            "double bass",
            "accordion",
            "banjo",
        ),
        (
            "{} plays the",
            "The instrument of {} is the",
            "{} performs on the",
            "{} is a musician who plays the",
            "On stage, {} is heard playing the",
        ),
        ("Which instrument does {} play?", "What instrument is {} known for?"),
    ),
)

# Sentences that say nothing about any subject, put before prompts the way CounterFact's
# paraphrase prompts carry an unrelated lead-in ("Amsterdam is a city of beauty. ...").
FILLERS: tuple[str, ...] = (
    "The weather was cold that year.",
    "Many people visited the old museum.",
    "It rained all day long.",
    "The train arrived late again.",
    "This story is well known.",
    "Nobody expected the news.",
    "The garden was full of flowers.",
    "Prices rose in the spring.",
    "The river flooded the valley.",
    "A new bridge opened last week.",
    "The library closed at noon.",
    "Everyone waited for the results.",
    "The festival drew large crowds.",
    "Snow covered the mountains.",
    "The meeting lasted for hours.",
    "A storm passed over the coast.",
    "The film was shown twice.",
    "Schools reopened in the autumn.",
    "The market was busy that morning.",
    "Few details are known.",
)

_SYLLABLES_A = (
    "ta",
    "ve",
    "ri",
    "lo",
    "ma",
    "ke",
    "so",
    "bre",
    "da",
    "ni",
    "fe",
    "gal",
    "ho",
    "ja",
    "cor",
    "li",
    "mur",
    "pe",
    "sa",
    "tho",
    "ul",
    "ven",
    "wi",
    "zor",
    "el",
    "an",
)
_SYLLABLES_B = (
    "lor",
    "rik",
    "dan",
    "mir",
    "sen",
    "tis",
    "vel",
    "nar",
    "bek",
    "dor",
    "len",
    "mos",
    "rin",
    "tak",
    "vos",
    "wen",
    "zel",
    "har",
    "kin",
    "lut",
    "ros",
    "sil",
)
_PARTICLES = ("van", "de", "al", "von")


class WorldSpec(BaseModel):
    """What to generate. The defaults are the shipped world."""

    seed: int = 0
    n_subjects: int = Field(400, ge=20)
    n_first_names: int = Field(90, ge=2)
    n_last_names: int | None = Field(
        None, ge=2, description="shared last-name pool; None gives every subject its own"
    )
    particle_share: float = Field(0.1, ge=0.0, le=1.0)


@dataclass
class World:
    """Subjects, their facts, and everything derived from them (prompts, corpus)."""

    spec: WorldSpec
    subjects: list[str]
    facts: dict[str, dict[str, str]]  # subject -> relation id -> object
    relations: tuple[Relation, ...] = RELATIONS
    _by_object: dict[tuple[str, str], list[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        index: dict[tuple[str, str], list[str]] = defaultdict(list)
        for subject in self.subjects:
            for rel_id, obj in self.facts[subject].items():
                index[(rel_id, obj)].append(subject)
        self._by_object = dict(index)

    def relation(self, rel_id: str) -> Relation:
        for rel in self.relations:
            if rel.id == rel_id:
                return rel
        raise KeyError(f"unknown relation id {rel_id!r}")

    def subjects_with(self, rel_id: str, obj: str) -> list[str]:
        """Subjects whose true object for `rel_id` is `obj` (the neighbourhood of a fact)."""
        return self._by_object.get((rel_id, obj), [])

    def n_facts(self) -> int:
        return sum(len(f) for f in self.facts.values())

    def iter_facts(self) -> Iterator[tuple[str, Relation, str]]:
        for subject in self.subjects:
            for rel in self.relations:
                yield subject, rel, self.facts[subject][rel.id]

    def sentences(self) -> Iterator[str]:
        """Every fact in every phrasing, as plain text (the training text and the corpus)."""
        for subject, rel, obj in self.iter_facts():
            for template in rel.phrasings:
                yield f"{template.format(subject)} {obj}"

    def corpus_text(self) -> str:
        """A plain-text corpus of the world's sentences, one per line, for covariance statistics."""
        return "\n".join(self.sentences()) + "\n"

    def vocabulary_text(self) -> Iterator[str]:
        """Every text the tokenizer must cover."""
        yield from self.sentences()
        yield from FILLERS

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "spec": self.spec.model_dump(),
            "relations": [
                {
                    "id": r.id,
                    "name": r.name,
                    "objects": list(r.objects),
                    "statements": list(r.statements),
                    "questions": list(r.questions),
                }
                for r in self.relations
            ],
            "fillers": list(FILLERS),
            "subjects": self.subjects,
            "facts": self.facts,
        }

    @classmethod
    def from_json(cls, data: dict) -> World:
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"world JSON format_version {data.get('format_version')!r} is not {FORMAT_VERSION}"
            )
        relations = tuple(
            Relation(
                r["id"],
                r["name"],
                tuple(r["objects"]),
                tuple(r["statements"]),
                tuple(r["questions"]),
            )
            for r in data["relations"]
        )
        return cls(
            WorldSpec(**data["spec"]),
            list(data["subjects"]),
            {s: dict(f) for s, f in data["facts"].items()},
            relations,
        )

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> World:
        return cls.from_json(json.loads(Path(path).read_text()))


def _names(rng: random.Random, count: int, syllables: int) -> list[str]:
    """Invented, capitalised names; invented so they never collide with object words."""
    names: set[str] = set()
    while len(names) < count:
        parts = [rng.choice(_SYLLABLES_A) for _ in range(syllables - 1)] + [
            rng.choice(_SYLLABLES_B)
        ]
        names.add("".join(parts).capitalize())
    return sorted(names)


def generate_world(spec: WorldSpec | None = None) -> World:
    """Generate a world deterministically from `spec.seed`.

    Objects are dealt out evenly per relation so that every object has many subjects: each
    request then has neighbourhood prompts (other subjects with the same true object).
    """
    spec = spec or WorldSpec()
    rng = random.Random(spec.seed)
    first = _names(rng, spec.n_first_names, 2)
    if spec.n_last_names is None:
        last = _names(rng, spec.n_subjects, 3)
        rng.shuffle(last)
        pairs = [(rng.choice(first), la) for la in last]
    else:
        if spec.n_subjects > spec.n_first_names * spec.n_last_names:
            raise ValueError("n_subjects exceeds the number of distinct first/last name pairs")
        last = _names(rng, spec.n_last_names, 3)
        pairs = rng.sample([(f, la) for f in first for la in last], spec.n_subjects)
    subjects = []
    for f, la in pairs:
        if rng.random() < spec.particle_share:
            subjects.append(f"{f} {rng.choice(_PARTICLES)} {la}")
        else:
            subjects.append(f"{f} {la}")
    facts: dict[str, dict[str, str]] = {s: {} for s in subjects}
    for rel in RELATIONS:
        dealt = [rel.objects[i % len(rel.objects)] for i in range(len(subjects))]
        rng.shuffle(dealt)
        for subject, obj in zip(subjects, dealt, strict=True):
            facts[subject][rel.id] = obj
    return World(spec, subjects, facts)
