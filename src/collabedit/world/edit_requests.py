"""Edit requests drawn from the world, in CounterFact and zsRE form.

CounterFact form: the rewrite prompt is one statement phrasing; paraphrases are two other
phrasings behind an unrelated lead-in sentence; neighbourhood prompts ask the same relation of other
subjects whose true object is the request's target_true (so the true object must stay); attribute
prompts ask subjects whose true object is target_new. zsRE form: the rewrite prompt and paraphrase
are the relation's two questions; the neighbourhood prompt is another subject's question, answered
by its true object. Both forms carry relation prompts: one prompt (a statement, or a question in
zsRE form) for each of the subject's other relations, expecting its true object.
"""

from __future__ import annotations

import random
from typing import Literal

from collabedit.conflict_requests import ConflictPair
from collabedit.requests import EditRequest, RelationPrompt
from collabedit.world.generator import FILLERS, World

RequestForm = Literal["counterfact", "zsre"]
Split = Literal["all", "train", "held-out"]

# the share of subjects a learned editor (MALMEN's hypernetwork) may train on; experiments with
# such an editor draw their requests from the rest
TRAIN_SHARE = 0.5


def subject_split(world: World, split: Split = "all", seed: int = 0) -> list[str]:
    """The world's subjects, or a fixed half of them ("train") or the other half ("held-out"),
    drawn by `seed` so every command that asks gets the same halves."""
    if split == "all":
        return list(world.subjects)
    if split not in ("train", "held-out"):
        raise ValueError(f"unknown split {split!r}; known: all, train, held-out")
    order = sorted(world.subjects)
    random.Random(seed).shuffle(order)
    n_train = round(TRAIN_SHARE * len(order))
    chosen = set(order[:n_train] if split == "train" else order[n_train:])
    return [s for s in world.subjects if s in chosen]


def training_requests(
    world: World, subjects: list[str], per_subject: int, seed: int = 0
) -> list[EditRequest]:
    """`per_subject` requests on each subject (a random relation and new object each time),
    alternating CounterFact and zsRE form; for training an editor, not for one batch of edits."""
    out: list[EditRequest] = []
    for k in range(per_subject):
        form: RequestForm = "counterfact" if k % 2 == 0 else "zsre"
        for r in world_requests(world, len(subjects), seed=seed + k, form=form, subjects=subjects):
            out.append(r.model_copy(update={"case_id": len(out)}))
    return out


def world_requests(
    world: World,
    n: int,
    seed: int = 0,
    form: RequestForm = "counterfact",
    n_neighborhood: int = 10,
    n_paraphrase: int = 2,
    subjects: list[str] | None = None,
) -> list[EditRequest]:
    """`n` requests on `n` distinct subjects (MEMIT's batches never edit one subject twice: the
    keys of one subject would coincide). `subjects` restricts the draw, e.g. to keep clients apart.
    """
    pool = list(world.subjects if subjects is None else subjects)
    if n > len(pool):
        raise ValueError(f"asked for {n} requests but the world has only {len(pool)} subjects")
    rng = random.Random(seed)
    # relation prompts draw from their own stream: the rest of the draw does not depend on them
    rel_rng = random.Random(f"relation prompts {seed}")
    chosen = rng.sample(pool, n)
    requests = []
    for case_id, subject in enumerate(chosen):
        rel = rng.choice(world.relations)
        relation_prompts = [
            RelationPrompt(
                prompt=rel_rng.choice(
                    other.statements if form == "counterfact" else other.questions
                ).format(subject),
                answer=world.facts[subject][other.id],
            )
            for other in world.relations
            if other.id != rel.id
        ]
        target_true = world.facts[subject][rel.id]
        target_new = rng.choice([o for o in rel.objects if o != target_true])
        others = [s for s in world.subjects_with(rel.id, target_true) if s != subject]
        neighbours = rng.sample(others, min(n_neighborhood, len(others)))
        if form == "counterfact":
            k = rng.randrange(len(rel.statements))
            rest = [t for i, t in enumerate(rel.statements) if i != k]
            paraphrases = [
                f"{rng.choice(FILLERS)} {t.format(subject)}"
                for t in rng.sample(rest, min(n_paraphrase, len(rest)))
            ]
            holders = [s for s in world.subjects_with(rel.id, target_new) if s != subject]
            other_rels = [r for r in world.relations if r.id != rel.id]
            requests.append(
                EditRequest(
                    case_id=case_id,
                    subject=subject,
                    prompt=rel.statements[k],
                    target_new=target_new,
                    target_true=target_true,
                    relation_id=rel.id,
                    paraphrase_prompts=paraphrases,
                    neighborhood_prompts=[rng.choice(rel.statements).format(s) for s in neighbours],
                    attribute_prompts=[
                        rng.choice(rel.statements).format(s)
                        for s in rng.sample(holders, min(n_neighborhood, len(holders)))
                    ],
                    generation_prompts=[
                        rng.choice(r.statements).format(subject) for r in rng.sample(other_rels, 2)
                    ],
                    relation_prompts=relation_prompts,
                )
            )
        else:
            neighbour = rng.choice([s for s in world.subjects if s != subject])
            loc_rel = rng.choice(world.relations)
            requests.append(
                EditRequest(
                    case_id=case_id,
                    subject=subject,
                    prompt=rel.questions[0],
                    target_new=target_new,
                    target_true=target_true,
                    relation_id=rel.id,
                    paraphrase_prompts=[rel.questions[1].format(subject)],
                    neighborhood_prompts=[rng.choice(loc_rel.questions).format(neighbour)],
                    neighborhood_target=world.facts[neighbour][loc_rel.id],
                    relation_prompts=relation_prompts,
                )
            )
    return requests


def world_conflict_pairs(
    world: World, n: int, seed: int = 0, form: RequestForm = "counterfact"
) -> list[ConflictPair]:
    """`n` conflicts on distinct subjects: the request `world_requests` makes, and a rival that
    edits the same subject and relation to another new object (neither the true one nor the
    first's). Case ids are 2i and 2i+1, as in the published conflict benchmark's loader."""
    rng = random.Random(seed + 7919)
    pairs = []
    for i, req in enumerate(world_requests(world, n, seed=seed, form=form)):
        rel = world.relation(req.relation_id or "")
        rival = rng.choice([o for o in rel.objects if o not in (req.target_true, req.target_new)])
        first = req.model_copy(update={"case_id": 2 * i})
        pairs.append(
            ConflictPair(first, req.model_copy(update={"case_id": 2 * i + 1, "target_new": rival}))
        )
    return pairs
