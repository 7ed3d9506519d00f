"""A more realistic embedded world (issue 17): contextual keys, facts written at the subject by
several MLPs, general text, shared last names. Built by `collabedit world build --recipe
realistic`; the measurements behind each choice are in docs/realistic-world.md.

The shipped world (train.py) gives layers 0-1 an attention window of one token, so a subject's key
at the edited layer is a function of its last token alone. This recipe changes that and keeps the
rest of train.py's (schedule driven by sample recall, packing, checkpoints after every epoch that
a rerun continues from):

* Names are composed. Last names are shared by several subjects (`WorldSpec.n_last_names`), so
  the subject's last token identifies nobody alone: its state has to combine first and last name.
* The first `local_layers` blocks attend within a window of a few tokens (`window_size`, default
  3: the token itself and the two before it), so the subject's last token composes its name and a
  little context; its receptive field after L local layers is L * (window - 1) + 1 tokens.
* The subject bottleneck (training only): tokens after a subject may not attend to its tokens
  before the last, so what the prediction learns about a subject it reads from the subject's last
  token, where MEMIT edits. The cooldown epochs train with the ordinary mask, which the model has
  at inference, so recall does not suffer from the difference.
* Catalogue lines ("Ann Bo economist Ireland."): the subject's last token has to predict its
  attributes, so the MLPs at the subject write them there (enrichment, as in LLMs).
* The global layers' MLPs learn at a tenth of the learning rate (`global_mlp_lr_scale`): the
  local MLPs at the subject learn the facts first, so the prediction mostly copies what the
  subject's position wrote instead of looking a fact up from the subject's identity, and an edit
  of one fact need not rewrite who the subject is. They are still trained MLPs, which a
  last-token editor (MALMEN) edits. `attention_only_global` makes them zero instead: MEMIT is as
  good, MALMEN has nothing to edit.
* A general-text component: sentences that state no fact, some of them mentioning subjects in
  other contexts. It gives the MLP inputs varied contexts (a full-rank key covariance) and is,
  with the fact sentences, the world's covariance corpus (`corpus.txt` in the folder).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import Field, model_validator
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from collabedit.models import arch
from collabedit.world.generator import FILLERS, Relation, World, WorldSpec, generate_world
from collabedit.world.store import (
    CORPUS_FILE,
    WorldBundle,
    checkpoint_path,
    load_world,
    save_world,
)
from collabedit.world.tokenizer import build_tokenizer
from collabedit.world.train import (
    EpochSchedule,
    TrainConfig,
    build_model,
    measure_recall,
    subject_trace,
)

GENERAL_FILE = "general.txt"
# the editors' presets for a realistic world: each editor's "world-realistic" where it has one
REALISTIC_PRESETS = {"*": "world-realistic"}

# ---------------------------------------------------------------------------------------------
# General text: sentences that state no fact about any subject.

_NOUNS = (
    "museum",
    "bridge",
    "library",
    "garden",
    "river",
    "market",
    "station",
    "harbour",
    "school",
    "theatre",
    "church",
    "tower",
    "castle",
    "hotel",
    "factory",
    "village",
    "forest",
    "island",
    "square",
    "street",
    "hospital",
    "prison",
    "stadium",
    "palace",
    "farm",
    "mill",
    "lake",
    "valley",
    "road",
    "house",
    "shop",
    "ship",
    "train",
    "letter",
    "book",
    "painting",
    "song",
    "newspaper",
    "meeting",
    "festival",
    "storm",
    "winter",
    "summer",
    "company",
    "family",
    "committee",
    "council",
    "city",
    "town",
    "country",
    "window",
    "door",
    "table",
    "dinner",
    "concert",
    "exhibition",
    "lecture",
    "journey",
    "record",
    "prize",
)
_ADJECTIVES = (
    "old",
    "new",
    "small",
    "large",
    "quiet",
    "busy",
    "famous",
    "empty",
    "dark",
    "bright",
    "cold",
    "warm",
    "long",
    "short",
    "strange",
    "beautiful",
    "ancient",
    "modern",
    "narrow",
    "wide",
    "green",
    "red",
    "white",
    "crowded",
    "local",
    "public",
    "private",
    "simple",
    "rare",
    "popular",
)
_VERBS = (
    "opened",
    "closed",
    "changed",
    "grew",
    "fell",
    "moved",
    "ended",
    "began",
    "returned",
    "appeared",
    "collapsed",
    "improved",
    "failed",
    "burned",
    "flooded",
    "recovered",
    "shrank",
    "vanished",
    "reopened",
    "expanded",
)
_TIMES = (
    "that year",
    "last week",
    "in the morning",
    "at night",
    "in the spring",
    "in the autumn",
    "after the war",
    "before the storm",
    "for a while",
    "every summer",
    "once again",
    "in those days",
)
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
# {N},{N2}: nouns; {A},{A2}: adjectives; {V}: verb; {T}: time; {M}: month; {C}: a city object word;
# {K}: a country; {S},{S2}: subjects. Templates with {S} never say anything about its relations.
_NEUTRAL = (
    "The {A} {N} {V} {T}.",
    "Many people visited the {A} {N} in {C}.",
    "A {N} {V} near the {N2}.",
    "Because the {N} was {A}, the {N2} {V}.",
    "I think the {N} in {C} is {A}.",
    "You can see the {A} {N} from the {N2}.",
    "Therefore the {N} {V} again.",
    "In {M}, the {N} of {K} {V}.",
    "The {N} near the {A} {N2} {V} {T}.",
    "Nobody knew why the {N} {V}.",
    "The {A} {N} of {C} is {A2}.",
    "It was {A} in {C} {T}.",
    "The {N} was {A} and the {N2} was {A2}.",
    "People in {K} say the {N} {V} {T}.",
)
_MENTIONS = (
    "{S} met {S2} at the {N}.",
    "Yesterday {S} visited the {A} {N}.",
    "A letter from {S} arrived in {M}.",
    "{S} and {S2} talked about the {N}.",
    "Everyone remembers {S}.",
    "The {N} of {S} was {A}.",
    "Because {S} was late, the {N} {V}.",
    "I saw {S} near the {A} {N}.",
    "You asked {S} about the {N}.",
    "In {M}, {S} wrote about the {A} {N}.",
    "Therefore {S} stayed at the {N}.",
    "The {A} {N} belonged to {S}.",
    "{S} bought a {A} {N} in {M}.",
    "Some say that {S} once lost a {N}.",
)


def general_sentence(rng: random.Random, world: World, mention_share: float) -> str:
    """One sentence of general text; with probability `mention_share` it mentions subjects."""
    return _general(rng, world, mention_share)[0]


def _general(rng: random.Random, world: World, mention_share: float) -> tuple[str, list[str]]:
    template = rng.choice(_MENTIONS if rng.random() < mention_share else _NEUTRAL)
    cities = world.relation("P19").objects
    countries = world.relation("P27").objects
    s1, s2 = rng.sample(world.subjects, 2)
    a1, a2 = rng.sample(_ADJECTIVES, 2)
    n1, n2 = rng.sample(_NOUNS, 2)
    named = [s for key, s in (("{S}", s1), ("{S2}", s2)) if key in template]
    return template.format(
        N=n1,
        N2=n2,
        A=a1,
        A2=a2,
        V=rng.choice(_VERBS),
        T=rng.choice(_TIMES),
        M=rng.choice(_MONTHS),
        C=rng.choice(cities),
        K=rng.choice(countries),
        S=s1,
        S2=s2,
    ), named


def catalogue_line(
    rng: random.Random, world: World, noise: float = 0.0
) -> tuple[str, list[str]]:
    """A subject and 1-3 of its objects (distinct relations, random order): the catalogue line
    "Ann Bo economist Ireland." makes the subject's last token predict its attributes. `noise`:
    see `stated_object`."""
    subj = rng.choice(world.subjects)
    rels = rng.sample(world.relations, rng.randint(1, 3))
    return subj, [stated_object(rng, r, world.facts[subj][r.id], noise) for r in rels]


def stated_object(rng: random.Random, relation: Relation, obj: str, noise: float) -> str:
    """The object a training sentence states: the true one, or with probability `noise` another
    object of the relation (the world's facts are then known with narrower margins)."""
    if noise and rng.random() < noise:
        return rng.choice([o for o in relation.objects if o != obj])
    return obj


def general_vocabulary() -> list[str]:
    """Every general-text sentence's fixed words (slots are filled from the lists above)."""
    words = [*_NOUNS, *_ADJECTIVES, *_VERBS, *_TIMES, *_MONTHS]
    return words + [t.replace("{", " ").replace("}", " ") for t in _NEUTRAL + _MENTIONS]


# ---------------------------------------------------------------------------------------------
# Training recipe: train.py's, plus general text and a few-token window.


class RealisticConfig(TrainConfig):
    """TrainConfig with the realistic world's defaults and the general-text share. The defaults
    are the recipe of the shipped default world (probe r2d0 in docs/realistic-world.md: a
    readout after layer 2, layer 0's MLP skipped in half the rows), so `world build --recipe
    realistic --subjects 2400` rebuilds it."""

    # four local layers: layer 0 composes the name, layers 1-3 write the facts at the subject (the
    # edited layers), layers 4-6 read them (probe L in docs/realistic-world.md)
    local_layers: int = Field(4, ge=0)
    window_size: int = Field(3, ge=1)
    n_layer: int = Field(7, ge=1)
    general_share: float = Field(
        0.25, ge=0, description="general sentences per fact sentence in each epoch"
    )
    mention_share: float = Field(0.5, ge=0, le=1, description="share of them naming subjects")
    general_weight: float = Field(0.2, ge=0, le=1, description="loss weight of general text")
    subject_bottleneck: bool = Field(
        True,
        description="in training only, tokens after a subject may not attend to the subject's "
        "tokens other than its last, so what the prediction learns about a subject it reads "
        "from the subject's last token (the model is an ordinary one at inference)",
    )
    bottleneck_in_cooldown: bool = Field(
        False,
        description="keep the subject bottleneck in the cooldown epochs; false trains them with "
        "the ordinary mask the model sees at inference",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="label smoothing of the next-token loss (caps fact margins)"
    )
    fact_noise: float = Field(
        0.0,
        ge=0,
        lt=0.9,
        description="share of fact statements and catalogue objects that name another object of "
        "the same relation, drawn anew each epoch: the world then knows each fact with "
        "probability about 1 - fact_noise against its relation's other objects, as an LLM "
        "knows facts less than surely (narrow margins), while the true object stays the answer",
    )
    attention_only_global: bool = Field(
        False,
        description="the global layers' MLPs are zero and stay zero: the prediction position "
        "cannot look a fact up after reading the subject, only copy what the subject's "
        "position wrote (the saved model is an ordinary one whose upper MLPs output nothing)",
    )
    global_mlps_general_only: bool = Field(
        False,
        description="with attention_only_global false: the global layers' MLPs learn from general "
        "text only (no gradient reaches them from fact, catalogue or context tokens), so they are "
        "trained MLPs that store no facts; a last-token editor (MALMEN) has weights to edit "
        "there while the facts are still written at the subject",
    )
    global_mlp_lr_scale: float = Field(
        0.1,
        gt=0,
        le=1,
        description="the global layers' MLPs learn at this share of the learning rate, so they "
        "are trained MLPs (a last-token editor such as MALMEN has weights to edit) but slow to "
        "learn facts, which the local MLPs then write at the subject (ignored with "
        "attention_only_global)",
    )
    name_mlp_lr_scale: float = Field(
        1.0,
        gt=0,
        le=1,
        description="layer 0's MLP learns at this share of the learning rate: layer 0 sees the "
        "name's tokens directly and can become the world's fact store by itself, leaving the "
        "edited layers above it little to write at the subject",
    )
    slow_mlp_layers: list[int] = Field(
        [],
        description="local layers above layer 0 whose MLP learns at slow_mlp_lr_scale of the "
        "learning rate (layer 0 has name_mlp_lr_scale): at scale the lowest MLP that may write "
        "facts takes nearly all of them (layer 1 in the 2,400-subject default world) and leaves "
        "the edited layers above it little to write; slowed, it leaves them a share, as "
        "name_mlp_lr_scale did for layer 0",
    )
    slow_mlp_lr_scale: float = Field(
        1.0, gt=0, le=1, description="the learning-rate share of slow_mlp_layers' MLPs"
    )
    catalogue_share: float = Field(
        0.5,
        ge=0,
        description="catalogue lines per fact sentence in each epoch: a subject followed directly "
        "by 1-3 of its objects in random order ('Ann Bo economist Ireland.'), so the subject's "
        "last token has to predict its attributes (enrichment at the subject, as in LLMs)",
    )
    mlp_drop: float | list[float] = Field(
        0.5,
        description="before the cooldown, each training row skips the MLPs of mlp_drop_layers "
        "with this probability (stochastic depth): a layer that may be missing cannot be the "
        "world's only fact store, so the layers above it learn to write facts too. One number: "
        "one draw per row skips all the listed layers together; a list (one rate per listed "
        "layer): each layer is skipped by a draw of its own. 0 skips none",
    )
    mlp_drop_layers: list[int] = Field(
        [0], description="the layers whose MLP a row may skip (see mlp_drop)"
    )
    readout_layer: int | list[int] | None = Field(
        2,
        description="also predict each catalogue line's objects from the residual after this "
        "layer, or after each of a list of layers (through the final norm and the unembedding), "
        "weighted by readout_weight: the layers up to it must then hold a subject's attributes "
        "at its last token, so they write facts there instead of leaving them to the layers "
        "above (none: no readout). A row whose MLPs up to the layer are all skipped (mlp_drop) "
        "is not asked",
    )
    readout_weight: float = Field(
        0.3, ge=0, description="loss weight of each readout (see readout_layer)"
    )
    recall_sample: int = Field(3000, ge=10)

    @model_validator(mode="after")
    def _global_mlps(self) -> RealisticConfig:
        if self.attention_only_global and self.global_mlps_general_only:
            raise ValueError(
                "global_mlps_general_only needs attention_only_global=false (zero global MLPs "
                "learn nothing)"
            )
        slow = self.slow_mlp_layers
        if not all(0 < layer < self.local_layers for layer in slow) or len(set(slow)) != len(slow):
            raise ValueError(
                f"slow_mlp_layers: {slow} is not distinct local layers above layer 0 (layers 1-"
                f"{self.local_layers - 1}; layer 0 has name_mlp_lr_scale, the global layers "
                "global_mlp_lr_scale)"
            )
        bad = [layer for layer in self.mlp_drop_layers if not 0 <= layer < self.n_layer]
        if bad:
            raise ValueError(f"mlp_drop_layers: no layer {bad} in a {self.n_layer}-layer model")
        if len(set(self.mlp_drop_layers)) != len(self.mlp_drop_layers):
            raise ValueError(f"mlp_drop_layers: {self.mlp_drop_layers} names a layer twice")
        rates = self.mlp_drop_rates
        if len(rates) != len(self.mlp_drop_layers):
            raise ValueError(
                f"mlp_drop: {len(rates)} rates for the {len(self.mlp_drop_layers)} layers of "
                f"mlp_drop_layers {self.mlp_drop_layers}"
            )
        if not all(0 <= rate < 1 for rate in rates):
            raise ValueError(f"mlp_drop: {self.mlp_drop} is not a rate in [0, 1)")
        layers = self.readout_layers
        if not all(0 <= layer < self.n_layer - 1 for layer in layers) or len(set(layers)) != len(
            layers
        ):
            raise ValueError(
                f"readout_layer: {self.readout_layer} is not distinct layers below the last "
                f"layer of a {self.n_layer}-layer model (the last layer's readout is the model's "
                "own loss)"
            )
        return self

    @property
    def readout_layers(self) -> list[int]:
        """The layers read out, in the order given (none: empty)."""
        if self.readout_layer is None:
            return []
        return [self.readout_layer] if isinstance(self.readout_layer, int) else self.readout_layer

    @property
    def mlp_drop_rates(self) -> list[float]:
        """Each listed layer's skip rate (a single mlp_drop applies to all of them)."""
        if isinstance(self.mlp_drop, list):
            return self.mlp_drop
        return [self.mlp_drop] * len(self.mlp_drop_layers)

    @property
    def drops_mlps(self) -> bool:
        return any(rate > 0 for rate in self.mlp_drop_rates)


def realistic_spec(n_subjects: int, seed: int = 0) -> WorldSpec:
    """Shared names: about 3 subjects per last name and n/13 first names (at least 20 each)."""
    return WorldSpec(
        seed=seed,
        n_subjects=n_subjects,
        n_first_names=max(20, n_subjects // 13),
        n_last_names=max(20, math.ceil(n_subjects / 3)),
        particle_share=0.1,
    )


def realistic_config(n_subjects: int, seed: int = 0, fields: dict | None = None) -> RealisticConfig:
    """The recipe for `n_subjects`: the MLP about one unit per two subjects (the ratio at which
    probe C stored facts in several MLPs, docs/realistic-world.md) unless `fields` sets it."""
    return RealisticConfig(**({"seed": seed, "n_inner": max(64, n_subjects // 2)} | (fields or {})))


def general_corpus(world: World, n: int, seed: int, mention_share: float) -> list[str]:
    rng = random.Random(seed)
    return [general_sentence(rng, world, mention_share) for _ in range(n)]


def _find(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    raise ValueError("subject not found in its sentence's tokens")


def _rows(
    world: World,
    tokenizer: PreTrainedTokenizerFast,
    cfg: RealisticConfig,
    rng: random.Random,
) -> tuple[torch.Tensor, torch.Tensor, list[list[tuple[int, int]]], torch.Tensor, torch.Tensor]:
    """One epoch: every fact in every phrasing once plus general text, packed into rows.

    Returns token rows, per-token loss weights, per row the (first, last) token positions of
    every subject mention (for the training-time subject bottleneck), per token 1.0 where it
    belongs to a general sentence (for `global_mlps_general_only`), and per token 1.0 where it
    is a catalogue line's object or closing token (the targets of `readout_layer`)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    items: list[tuple[str, str | None, list[str], bool]] = [
        (t.format(subj), stated_object(rng, rel, obj, cfg.fact_noise), [subj], False)
        for subj, rel, obj in world.iter_facts()
        for t in rel.phrasings
    ]
    n_facts = len(items)
    for _ in range(round(cfg.catalogue_share * n_facts)):
        subj, objects = catalogue_line(rng, world, cfg.fact_noise)
        items.append((subj, " ".join(objects) + ".", [subj], True))
    n_general = round(cfg.general_share * n_facts)
    for _ in range(n_general):
        text, named = _general(rng, world, cfg.mention_share)
        items.append((text, None, named, False))
    rng.shuffle(items)
    texts = []
    for p, o, _, _ in items:
        if o is not None and rng.random() < cfg.filler_share:
            p = f"{rng.choice(FILLERS)} {p}"
        texts.append(p)
    text_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    obj_ids = tokenizer(
        [" " + (o if o is not None else "") for _, o, _, _ in items], add_special_tokens=False
    )["input_ids"]
    subject_ids: dict[str, list[int]] = {}
    rows: list[list[int]] = []
    weights: list[list[float]] = []
    spans: list[list[tuple[int, int]]] = []
    general: list[list[float]] = []
    catalogue: list[list[float]] = []
    row: list[int] = []
    wrow: list[float] = []
    srow: list[tuple[int, int]] = []
    grow: list[float] = []
    crow: list[float] = []

    def flush() -> None:
        rows.append(row + [pad] * (cfg.n_positions - len(row)))
        weights.append(wrow + [0.0] * (cfg.n_positions - len(wrow)))
        spans.append(srow)
        general.append(grow + [0.0] * (cfg.n_positions - len(grow)))
        catalogue.append(crow + [0.0] * (cfg.n_positions - len(crow)))

    for (_, o, named, is_catalogue), t_ids, o_ids in zip(items, text_ids, obj_ids, strict=True):
        if o is None:
            item = t_ids + [eos]
            w = [cfg.general_weight] * len(item)
        else:
            item = t_ids + o_ids + [eos]
            w = [cfg.context_weight] * len(t_ids) + [1.0] * (len(o_ids) + 1)
        if len(item) > cfg.n_positions:
            raise ValueError(f"sentence longer than n_positions={cfg.n_positions}")
        if len(row) + len(item) > cfg.n_positions:
            flush()
            row, wrow, srow, grow, crow = [], [], [], [], []
        for subj in named:
            if subj not in subject_ids:
                subject_ids[subj] = tokenizer(subj, add_special_tokens=False)["input_ids"]
            ids = subject_ids[subj]
            first = _find(t_ids, ids)
            srow.append((len(row) + first, len(row) + first + len(ids) - 1))
        row, wrow = row + item, wrow + w
        grow = grow + [1.0 if o is None else 0.0] * len(item)
        crow = crow + [0.0] * len(t_ids) + [float(is_catalogue)] * (len(item) - len(t_ids))
    if row:
        flush()
    return (
        torch.tensor(rows, dtype=torch.long),
        torch.tensor(weights),
        spans,
        torch.tensor(general),
        torch.tensor(catalogue),
    )


def _general_only_gradients(
    model: PreTrainedModel, layers: range, general: dict[str, torch.Tensor]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that let gradient into the MLPs of `layers` only at general-text positions:
    `general["mask"]` (B, T) is read at each forward. The residual stream around the MLP still
    carries every token's gradient to the layers below."""

    def hook(module, inputs, output):
        if output.requires_grad:
            mask = general["mask"].unsqueeze(-1).to(output.dtype)
            output.register_hook(lambda grad: grad * mask)

    return [arch.mlp_out(model, layer).register_forward_hook(hook) for layer in layers]


def _mlp_drop(
    model: PreTrainedModel, layers: list[int], keep: dict[str, torch.Tensor | None]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that zero the MLP output of `layers[j]` in the rows where `keep["rows"][:, j]`
    ((B, len(layers)) booleans) is False; with `keep["rows"]` None (cooldown, evaluation) the
    MLPs run as usual."""

    def hook_for(j: int):
        def hook(module, inputs, output):
            rows = keep["rows"]
            if rows is None:
                return None
            return output * rows[:, j].to(output.dtype)[:, None, None]

        return hook

    return [
        arch.mlp_out(model, layer).register_forward_hook(hook_for(j))
        for j, layer in enumerate(layers)
    ]


def _drawn_keeps(n_rows: int, cfg: RealisticConfig, generator: torch.Generator) -> torch.Tensor:
    """(n_rows, len(mlp_drop_layers)) booleans, True = the row runs that layer's MLP: one draw per
    row for all the layers when mlp_drop is one number, one per row and layer for a list."""
    if isinstance(cfg.mlp_drop, list):
        rates = torch.tensor(cfg.mlp_drop)
        return torch.rand(n_rows, len(rates), generator=generator) >= rates
    drop = torch.rand(n_rows, generator=generator) < cfg.mlp_drop
    return (~drop)[:, None].expand(n_rows, len(cfg.mlp_drop_layers))


def _asked(keeps: torch.Tensor | None, cfg: RealisticConfig, layer: int) -> torch.Tensor | None:
    """Rows (B,) whose residual after `layer` a readout may ask for facts: some MLP up to it
    ran. None: every row (no MLP skipped, or a layer up to it that is never skipped)."""
    if keeps is None or any(lower not in cfg.mlp_drop_layers for lower in range(layer + 1)):
        return None
    columns = [j for j, lower in enumerate(cfg.mlp_drop_layers) if lower <= layer]
    return keeps[:, columns].any(dim=1)


def readout_loss(
    model: PreTrainedModel,
    hidden: torch.Tensor,
    batch: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean next-token loss of the residual `hidden` (B, T, d) read through the final norm and
    the unembedding, at the positions whose next token is marked in `targets` (B, T): what the
    model would predict there if the layers above `hidden` were absent."""
    at = targets[:, 1:] > 0
    if not bool(at.any()):
        return hidden.new_zeros(())
    logits = model.get_output_embeddings()(arch.final_norm(model)(hidden[:, :-1][at]))
    return torch.nn.functional.cross_entropy(
        logits, batch[:, 1:][at], label_smoothing=label_smoothing
    )


def bottleneck_masks(
    batch: torch.Tensor, spans: list[list[tuple[int, int]]], pad: int, window: int
) -> dict[str, torch.Tensor]:
    """Boolean (B, 1, T, T) masks, True = may attend: causal, no padding keys, and no query after a
    subject attending to the subject's tokens before its last; the sliding layers' mask also
    keeps keys within `window` tokens."""
    b, t = batch.shape
    q = torch.arange(t)[:, None]
    k = torch.arange(t)[None, :]
    allowed = (k <= q)[None].repeat(b, 1, 1) & (batch != pad)[:, None, :]
    for i, row_spans in enumerate(spans):
        for first, last in row_spans:
            if last > first:
                allowed[i, last + 1 :, first:last] = False
    full = allowed[:, None]
    sliding = (allowed & (k > q - window)[None])[:, None]
    return {"full_attention": full, "sliding_attention": sliding}


def _optimizer(model: PreTrainedModel, cfg: RealisticConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; MLPs that learn at a share of the rate (the
    global layers' `global_mlp_lr_scale` when they learn, layer 0's `name_mlp_lr_scale`,
    `slow_mlp_layers`' `slow_mlp_lr_scale`) in groups of their own whose `lr_scale` the schedule
    multiplies in."""
    scaled: dict[float, list[torch.nn.Parameter]] = {}
    if cfg.global_mlp_lr_scale != 1.0 and not cfg.attention_only_global:
        for layer in range(cfg.local_layers, cfg.n_layer):
            scaled.setdefault(cfg.global_mlp_lr_scale, []).extend(
                arch.block(model, layer).mlp.parameters()
            )
    if cfg.name_mlp_lr_scale != 1.0 and cfg.local_layers > 0:  # else layer 0 is a global one
        scaled.setdefault(cfg.name_mlp_lr_scale, []).extend(arch.block(model, 0).mlp.parameters())
    if cfg.slow_mlp_lr_scale != 1.0:
        for layer in cfg.slow_mlp_layers:
            scaled.setdefault(cfg.slow_mlp_lr_scale, []).extend(
                arch.block(model, layer).mlp.parameters()
            )
    slow_ids = {id(p) for params in scaled.values() for p in params}
    rest = [p for p in model.parameters() if id(p) not in slow_ids]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    for scale, params in scaled.items():
        groups.append({"params": params, "weight_decay": cfg.weight_decay, "lr_scale": scale})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def train_realistic(
    world: World,
    tokenizer: PreTrainedTokenizerFast,
    cfg: RealisticConfig,
    checkpoint: Path | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    on_step: Callable[[int, int, int, float], None] | None = None,
    trace_facts: int = 0,
) -> tuple[PreTrainedModel, list[dict]]:
    """`EpochSchedule` (constant rate until sample recall reaches `switch_recall`, then
    `cooldown_epochs` of linear decay), on facts + general text; checkpoint after every epoch.
    With `trace_facts`, each epoch also records the MLPs' causal trace at the subject over that
    many facts (`mlp_trace`), to see early which layers take the facts; it changes no weight."""
    rng = random.Random(cfg.seed)
    model = build_model(cfg, tokenizer)
    if cfg.attention_only_global:
        for layer in range(cfg.local_layers, cfg.n_layer):
            down = arch.mlp_out(model, layer)
            with torch.no_grad():
                down.weight.zero_()
            down.weight.requires_grad_(False)
    opt = _optimizer(model, cfg)
    pad = tokenizer.pad_token_id
    schedule = EpochSchedule(cfg, checkpoint)
    schedule.resume(model, opt, rng)
    if schedule.finished:
        model.eval()
        return model, schedule.history
    general_batch: dict[str, torch.Tensor] = {}
    hooks = (
        _general_only_gradients(model, range(cfg.local_layers, cfg.n_layer), general_batch)
        if cfg.global_mlps_general_only
        else []
    )
    keep: dict[str, torch.Tensor | None] = {"rows": None}
    if cfg.drops_mlps:
        hooks += _mlp_drop(model, cfg.mlp_drop_layers, keep)
    model.train()
    for epoch in schedule.epochs():
        start = time.perf_counter()
        schedule.start_epoch(epoch)
        rows, weights, spans, general, catalogue = _rows(world, tokenizer, cfg, rng)
        shuffle = torch.Generator().manual_seed(rng.randrange(2**31))
        order = torch.randperm(len(rows), generator=shuffle)
        rows, weights, general = rows[order], weights[order], general[order]
        catalogue = catalogue[order]
        spans = [spans[j] for j in order.tolist()]
        keeps = _drawn_keeps(len(rows), cfg, shuffle)
        n_steps = math.ceil(len(rows) / cfg.rows_per_batch)
        losses, readouts = [], {layer: [] for layer in cfg.readout_layers}
        for i, b in enumerate(range(0, len(rows), cfg.rows_per_batch)):
            scale = schedule.lr_scale(i, n_steps)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * scale * group.get("lr_scale", 1.0)
            batch, w = rows[b : b + cfg.rows_per_batch], weights[b : b + cfg.rows_per_batch, 1:]
            if cfg.subject_bottleneck and (not schedule.cooling or cfg.bottleneck_in_cooldown):
                mask = bottleneck_masks(
                    batch, spans[b : b + cfg.rows_per_batch], pad, cfg.window_size
                )
            else:
                mask = (batch != pad).long()
            general_batch["mask"] = general[b : b + cfg.rows_per_batch]
            dropping = cfg.drops_mlps and not schedule.cooling
            keep["rows"] = keeps[b : b + cfg.rows_per_batch] if dropping else None
            out = model(
                input_ids=batch,
                attention_mask=mask,
                output_hidden_states=bool(readouts),
            )
            nll = torch.nn.functional.cross_entropy(
                out.logits[:, :-1].transpose(1, 2),
                batch[:, 1:],
                reduction="none",
                label_smoothing=cfg.label_smoothing,
            )
            loss = (nll * w).sum() / w.sum()
            batch_catalogue = catalogue[b : b + cfg.rows_per_batch]
            for layer, layer_readouts in readouts.items():
                targets = batch_catalogue
                asked = _asked(keep["rows"], cfg, layer)
                if asked is not None:
                    targets = targets * asked[:, None].to(targets.dtype)
                readout = readout_loss(
                    model, out.hidden_states[layer + 1], batch, targets, cfg.label_smoothing
                )
                layer_readouts.append(readout.item())
                loss = loss + cfg.readout_weight * readout
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            schedule.took_step()
            if on_step is not None:
                on_step(epoch, i + 1, n_steps, loss.item())
        train_seconds = time.perf_counter() - start
        keep["rows"] = None
        recall = measure_recall(model, tokenizer, world, sample=cfg.recall_sample, seed=epoch)
        mlp_trace = None
        if trace_facts:
            model.eval()
            mlp_trace = subject_trace(model, tokenizer, world, trace_facts)["mlp"]
        model.train()
        entry = {
            "epoch": epoch,
            "loss": sum(losses) / len(losses),
            "readout_loss": (
                sum(sum(v) / len(v) for v in readouts.values()) / len(readouts)
                if readouts
                else None
            ),
            "readout_losses": {str(k): sum(v) / len(v) for k, v in readouts.items()} or None,
            "sample_recall": recall["recall"],
            "mlp_trace": mlp_trace,
            "cooldown": schedule.cooling,
            "steps": n_steps,
            "train_seconds": train_seconds,
            "seconds": time.perf_counter() - start,
        }
        done = schedule.end_epoch(epoch, entry, model, opt, rng)
        if on_epoch is not None:
            on_epoch(epoch, entry)
        if done:
            break
    for handle in hooks:
        handle.remove()
    model.eval()
    return model, schedule.history


def build_realistic_world(
    out: str | os.PathLike[str],
    spec: WorldSpec,
    cfg: RealisticConfig,
    on_epoch: Callable[[int, dict], None] | None = None,
    corpus_general: int = 50_000,
    on_step: Callable[[int, int, int, float], None] | None = None,
    trace_facts: int = 0,
) -> WorldBundle:
    """Generate, train (resumable), measure recall on every prompt, save a world folder that
    `load_world` reads, plus `corpus.txt` (facts + general text) for covariance statistics."""
    world = generate_world(spec)
    general = general_corpus(world, corpus_general, spec.seed + 17, cfg.mention_share)
    tokenizer = build_tokenizer([*world.vocabulary_text(), *general_vocabulary(), *general])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model, history = train_realistic(
        world, tokenizer, cfg, checkpoint_path(out), on_epoch, on_step, trace_facts
    )
    recall = measure_recall(model, tokenizer, world)
    build = {
        "kind": "realistic (issue 17)",
        "spec": spec.model_dump(),
        "train": cfg.model_dump(),
        "history": history,
        "train_seconds": sum(h["seconds"] for h in history),
        "recall": recall["recall"],
        "min_phrasing_recall": recall["min_phrasing_recall"],
        "recall_by_phrasing": recall["by_phrasing"],
        "recall_prompts": recall["n"],
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "vocabulary": len(tokenizer),
    }
    mixed = list(world.sentences()) + general
    random.Random(spec.seed + 23).shuffle(mixed)
    texts = {GENERAL_FILE: "\n".join(general) + "\n", CORPUS_FILE: "\n".join(mixed) + "\n"}
    save_world(out, world, model, tokenizer, build, REALISTIC_PRESETS, texts)
    checkpoint_path(out).unlink(missing_ok=True)
    return load_world(out)
