"""Our recipe for teaching a small language model every fact of the world, in every phrasing.

Sentences ("Talor Venrik was born in Oslo") are packed whole into fixed-length rows; the sentences
before one in its row act as the unrelated lead-in CounterFact's paraphrases have, and a share of
items get an explicit filler sentence too. The MLP is made wide relative to the residual stream
(n_inner = 8 x n_embd) because MEMIT writes facts into the MLP output projection, whose input
width bounds how many edits a layer can hold. With the one-token windows below, a layer's keys
are a function of the token, so one layer holds about n_inner - (vocabulary - subjects) edits
(measured on a 1,000-subject world, docs/benchmarks.md): a world meant for N edits needs
n_inner above N + the ~380 other words.

Why the first layers attend only to their own token. MEMIT assumes that a model recalls a fact
by enriching the subject's last token in its early MLPs, and that later layers read that token.
A small model trained on short fact sentences does not learn this by itself: it moves the
subject's name to the prediction position and looks the fact up there, where MEMIT cannot reach
it (docs/history.md has the measurements). So the world model is a Qwen2 whose first
`local_layers` blocks use a sliding window of `window_size` = 1 token: in those layers no
information moves between positions, the only way a fact reaches the prediction is through the
subject's own position, and MEMIT's premise holds by construction (the causal trace of the
shipped model is in docs/benchmarks.md).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from collabedit import io
from collabedit.evaluate.scoring import score_targets
from collabedit.evaluate.trace import average_trace
from collabedit.world.generator import FILLERS, World


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt --set field must not be ignored

    seed: int = 0
    architecture: Literal["gpt2", "gpt_neo", "qwen2"] = "qwen2"
    # GPT-Neo and Qwen2: the first `local_layers` blocks attend within `window_size` tokens (1: each
    # token only to itself), the rest globally. See the module note for why.
    local_layers: int = Field(2, ge=0)
    window_size: int = Field(1, ge=1)
    n_layer: int = Field(6, ge=1)
    n_embd: int = Field(128, ge=8)
    n_inner: int = Field(1024, ge=8)
    n_head: int = Field(4, ge=1)
    n_positions: int = Field(64, ge=16)
    max_epochs: int = Field(40, ge=1)
    # At constant rate recall plateaus in the low 90s (measured on 2,400 subjects: 0.93, 0.936,
    # 0.940 in epochs 9-11); the decay is what takes it to 99%+, so it starts early and is long.
    switch_recall: float = Field(0.85, gt=0, le=1, description="recall that starts the cooldown")
    cooldown_epochs: int = Field(5, ge=1)
    rows_per_batch: int = Field(4, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    filler_share: float = Field(0.15, ge=0, le=1)
    context_weight: float = Field(0.2, ge=0, le=1)
    recall_sample: int = Field(3000, ge=10, description="facts checked after each epoch")


def build_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    torch.manual_seed(cfg.seed)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if cfg.local_layers > cfg.n_layer:
        raise ValueError(f"local_layers={cfg.local_layers} exceeds n_layer={cfg.n_layer}")
    if cfg.architecture == "qwen2":
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=cfg.n_embd,
            intermediate_size=cfg.n_inner,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_head,
            max_position_embeddings=cfg.n_positions,
            use_sliding_window=cfg.local_layers > 0,
            sliding_window=cfg.window_size,
            layer_types=["sliding_attention"] * cfg.local_layers
            + ["full_attention"] * (cfg.n_layer - cfg.local_layers),
            tie_word_embeddings=True,
            **special,
        )
        return Qwen2ForCausalLM(config)
    if cfg.architecture == "gpt_neo":
        types = [["local"], cfg.local_layers], [["global"], cfg.n_layer - cfg.local_layers]
        config = GPTNeoConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=cfg.n_positions,
            hidden_size=cfg.n_embd,
            num_layers=cfg.n_layer,
            num_heads=cfg.n_head,
            intermediate_size=cfg.n_inner,
            attention_types=[t for t in types if t[1] > 0],
            window_size=cfg.window_size,
            resid_dropout=0.0,
            embed_dropout=0.0,
            attention_dropout=0.0,
            **special,
        )
        return GPTNeoForCausalLM(config)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.n_inner,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **special,
    )
    return GPT2LMHeadModel(config)


def fact_prompts(world: World, with_fillers: bool = False) -> list[tuple[str, str, str]]:
    """(phrasing id, prompt, object) for every fact and phrasing; optionally behind a filler."""
    items = []
    rng = random.Random(world.spec.seed + 1)
    for subject, rel, obj in world.iter_facts():
        for k, template in enumerate(rel.phrasings):
            prompt = template.format(subject)
            if with_fillers:
                prompt = f"{rng.choice(FILLERS)} {prompt}"
            items.append((f"{rel.id}/{k}", prompt, obj))
    return items


def subject_trace(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    world: World,
    n_facts: int = 40,
    seed: int = 1,
) -> dict:
    """The causal trace at the subject's last token, averaged over `n_facts` facts drawn with
    `seed` (one relation and phrasing each): which layers' MLPs write the facts there, the ones
    MEMIT should edit. Uses no global random state, so it can run between training epochs."""
    rng = random.Random(seed)
    facts = []
    for s in rng.sample(world.subjects, min(n_facts, len(world.subjects))):
        rel = rng.choice(world.relations)
        facts.append((rng.choice(rel.statements), s, world.facts[s][rel.id]))
    trace = average_trace(model, tokenizer, facts, samples=5)
    return {k: trace[k] for k in ("hidden", "mlp", "clean", "corrupted", "n_facts")}


def measure_recall(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    world: World,
    sample: int | None = None,
    seed: int = 0,
    with_fillers: bool = True,
) -> dict:
    """Share of facts whose object the model produces greedily (every token), per phrasing.

    Returns {"recall": overall fraction, "min_phrasing_recall": worst phrasing, "by_phrasing":
    {...}, "n": prompts checked}. Phrasings are counted bare and, with `with_fillers`, again
    behind a filler sentence.
    """
    items = fact_prompts(world)
    if with_fillers:
        items += [(f"{k}+filler", p, o) for k, p, o in fact_prompts(world, with_fillers=True)]
    if sample is not None and sample < len(items):
        items = random.Random(seed).sample(items, sample)
    scores = score_targets(model, tokenizer, [(p, o) for _, p, o in items], batch_size=512)
    hits: dict[str, list[bool]] = defaultdict(list)
    for (key, _, _), score in zip(items, scores, strict=True):
        hits[key].append(score.all_correct)
    by = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    total = sum(sum(v) for v in hits.values()) / len(items)
    return {
        "recall": total,
        "min_phrasing_recall": min(by.values()),
        "by_phrasing": by,
        "n": len(items),
    }


def _packed_rows(
    world: World, tokenizer: PreTrainedTokenizerFast, cfg: TrainConfig, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch: every fact in every phrasing once, whole sentences packed into rows.

    Returns token rows and per-token loss weights: object tokens and the end-of-text token weigh
    1, the rest `context_weight`. Subject names after a relation phrase are unpredictable by
    construction; at full weight their loss would drown the facts' gradient.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    items = [(p, o) for _, p, o in fact_prompts(world)]
    rng.shuffle(items)
    prompts = [
        f"{rng.choice(FILLERS)} {p}" if rng.random() < cfg.filler_share else p for p, _ in items
    ]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    object_ids = tokenizer([" " + o for _, o in items], add_special_tokens=False)["input_ids"]
    rows: list[list[int]] = []
    weights: list[list[float]] = []
    row: list[int] = []
    wrow: list[float] = []

    def flush() -> None:
        rows.append(row + [pad] * (cfg.n_positions - len(row)))
        weights.append(wrow + [0.0] * (cfg.n_positions - len(wrow)))

    for p_ids, o_ids in zip(prompt_ids, object_ids, strict=True):
        item = p_ids + o_ids + [eos]
        if len(item) > cfg.n_positions:
            raise ValueError(f"sentence longer than n_positions={cfg.n_positions}: {item}")
        if len(row) + len(item) > cfg.n_positions:
            flush()
            row, wrow = [], []
        row = row + item
        # weights[t] applies to predicting token t from the tokens before it
        wrow = wrow + [cfg.context_weight] * len(p_ids) + [1.0] * (len(o_ids) + 1)
    if row:
        flush()
    return torch.tensor(rows, dtype=torch.long), torch.tensor(weights)


def _save_checkpoint(path: Path, model, opt, rng: random.Random, state: dict) -> None:
    """Everything needed to continue after the epoch just finished (atomic replace)."""
    version, internal, gauss = rng.getstate()
    payload = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng_internal": torch.tensor(internal, dtype=torch.int64),
        "rng_version": version,
        "rng_gauss": gauss,
        "state": json.dumps(state),
    }
    with io.atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(path: Path, model, opt, rng: random.Random, check) -> dict:
    """Restore the saved state after `check(state)` accepted it (it raises otherwise)."""
    payload = torch.load(path, weights_only=True)  # plain tensors and numbers only
    state = json.loads(payload["state"])
    check(state)
    model.load_state_dict(payload["model"])
    opt.load_state_dict(payload["optimizer"])
    internal = tuple(int(x) for x in payload["rng_internal"].tolist())
    rng.setstate((payload["rng_version"], internal, payload["rng_gauss"]))
    return state


class EpochSchedule:
    """The learning-rate schedule and per-epoch bookkeeping both recipes share: linear warm-up
    over `warmup_steps`, the constant rate until a sample of facts is recalled at
    `switch_recall` (or the epoch budget runs low), then `cooldown_epochs` of linear decay to 5%
    of it. With `checkpoint` (a file), the state after every epoch is saved there atomically, and
    a schedule that finds the file continues from it with the same result as an uninterrupted run.
    """

    def __init__(self, cfg: TrainConfig, checkpoint: Path | None) -> None:
        self.cfg = cfg
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.history: list[dict] = []
        self.step = 0
        self.cooldown_left: int | None = None
        self.first_epoch = 1
        self.finished = False

    def resume(self, model, opt, rng: random.Random) -> None:
        """Load the checkpoint's weights, optimizer and random state, if there is one."""
        if self.checkpoint is None or not self.checkpoint.is_file():
            return
        saved = _load_checkpoint(self.checkpoint, model, opt, rng, self._check_resumable)
        self.history, self.step = saved["history"], saved["step"]
        self.cooldown_left = saved["cooldown_left"]
        self.first_epoch = saved["epoch"] + 1
        self.finished = saved["done"]

    def _check_resumable(self, saved: dict) -> None:
        """Accept a checkpoint of this config, or of one that differs only in when the cooldown
        starts (`RESCHEDULABLE`) where, given the sample recalls recorded so far, both schedules
        train every saved epoch alike; the state then continues as this config's schedule would
        (the cooldown may start with the next epoch), so the build is the one this config gives
        from scratch and the config it records stays true."""
        old, new = saved.get("config") or {}, self.cfg.model_dump()
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        where = f"{self.checkpoint}: checkpoint of another training config"
        if set(changed) - RESCHEDULABLE:
            raise ValueError(f"{where} ({', '.join(changed)} changed); delete it to restart")
        if not changed:
            return
        trace, cooldown_left = _replay(self.cfg, saved)
        if trace != _replay(type(self.cfg).model_validate(old), saved)[0]:
            raise ValueError(
                f"{where}: with the new {', '.join(changed)} the epochs already trained would "
                "have been trained differently (cooldown or end at another epoch); keep the old "
                "value, or delete the checkpoint to restart"
            )
        saved["cooldown_left"] = cooldown_left

    def epochs(self) -> range:
        return range(self.first_epoch, self.cfg.max_epochs + 1)

    def start_epoch(self, epoch: int) -> None:
        """Start the decay early enough to finish it within `max_epochs`."""
        cfg = self.cfg
        if self.cooldown_left is None and epoch > cfg.max_epochs - cfg.cooldown_epochs:
            self.cooldown_left = cfg.max_epochs - epoch + 1

    @property
    def cooling(self) -> bool:
        return self.cooldown_left is not None

    def lr_scale(self, step_in_epoch: int, steps_per_epoch: int) -> float:
        """The share of `lr` for the next step (then call `took_step`)."""
        cfg = self.cfg
        if self.step < cfg.warmup_steps:
            return (self.step + 1) / cfg.warmup_steps
        if self.cooldown_left is None:
            return 1.0
        elapsed = cfg.cooldown_epochs - self.cooldown_left + step_in_epoch / steps_per_epoch
        return 1.0 - 0.95 * min(1.0, elapsed / cfg.cooldown_epochs)

    def took_step(self) -> None:
        self.step += 1

    def end_epoch(self, epoch: int, entry: dict, model, opt, rng: random.Random) -> bool:
        """Record the epoch, advance the schedule on its sample recall, checkpoint; True when
        training is done."""
        cfg = self.cfg
        self.history.append(entry)
        done = epoch == cfg.max_epochs
        if self.cooldown_left is not None:
            self.cooldown_left -= 1
            done = done or self.cooldown_left == 0
        elif entry["sample_recall"] >= cfg.switch_recall:
            self.cooldown_left = cfg.cooldown_epochs
        if self.checkpoint is not None:
            state = {
                "config": cfg.model_dump(),
                "epoch": epoch,
                "step": self.step,
                "history": self.history,
                "cooldown_left": self.cooldown_left,
                "done": done,
            }
            _save_checkpoint(self.checkpoint, model, opt, rng, state)
        return done


# The fields that only decide at which epoch the cooldown starts (and so where training ends).
RESCHEDULABLE = frozenset({"max_epochs", "switch_recall"})


def _replay(cfg: TrainConfig, saved: dict) -> tuple[list[tuple[int, int | None, bool]], int | None]:
    """`cfg`'s schedule run over a checkpoint's recorded epochs: for each, the cooldown epochs
    left as it started (which sets its learning rates) and whether training ended with it; and
    the cooldown epochs left after the last."""
    schedule = EpochSchedule(cfg, None)
    trace: list[tuple[int, int | None, bool]] = []
    for entry in saved["history"]:
        epoch = entry["epoch"]
        if epoch > cfg.max_epochs:  # beyond this budget: not this schedule's epoch
            return [*trace, (epoch, None, True)], None
        schedule.start_epoch(epoch)
        left = schedule.cooldown_left
        trace.append((epoch, left, schedule.end_epoch(epoch, entry, None, None, None)))
    return trace, schedule.cooldown_left


def train_world_model(
    world: World,
    tokenizer: PreTrainedTokenizerFast,
    cfg: TrainConfig,
    on_step: Callable[[int, int, int, float], None] | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    checkpoint: Path | None = None,
) -> tuple[PreTrainedModel, list[dict]]:
    """Train from scratch; returns the model and one history entry per epoch.

    Memorisation speed varies with the world's size, so the schedule is driven by recall rather
    than a fixed epoch count: constant learning rate until a sample of facts is recalled at
    `switch_recall` (or the epoch budget runs low), then `cooldown_epochs` of linear decay.
    on_step(epoch, step_in_epoch, steps_per_epoch, loss) reports progress. With `checkpoint`
    (a file), the state after every epoch is saved there and a run finding it continues from it
    with the same result as an uninterrupted run.
    """
    rng = random.Random(cfg.seed)
    model = build_model(cfg, tokenizer)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    pad = tokenizer.pad_token_id
    schedule = EpochSchedule(cfg, checkpoint)
    schedule.resume(model, opt, rng)
    if schedule.finished:
        model.eval()
        return model, schedule.history
    model.train()
    for epoch in schedule.epochs():
        start = time.perf_counter()
        schedule.start_epoch(epoch)
        rows, weights = _packed_rows(world, tokenizer, cfg, rng)
        shuffle = torch.Generator().manual_seed(rng.randrange(2**31))
        order = torch.randperm(len(rows), generator=shuffle)
        rows, weights = rows[order], weights[order]
        n_steps = math.ceil(len(rows) / cfg.rows_per_batch)
        losses = []
        for i, b in enumerate(range(0, len(rows), cfg.rows_per_batch)):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * schedule.lr_scale(i, n_steps)
            batch, w = rows[b : b + cfg.rows_per_batch], weights[b : b + cfg.rows_per_batch, 1:]
            logits = model(input_ids=batch, attention_mask=(batch != pad).long()).logits
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none"
            )
            loss = (nll * w).sum() / w.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            schedule.took_step()
            if on_step is not None:
                on_step(epoch, i + 1, n_steps, loss.item())
        recall = measure_recall(model, tokenizer, world, sample=cfg.recall_sample, seed=epoch)
        model.train()
        entry = {
            "epoch": epoch,
            "loss": sum(losses) / len(losses),
            "sample_recall": recall["recall"],
            "cooldown": schedule.cooling,
            "seconds": time.perf_counter() - start,
        }
        done = schedule.end_epoch(epoch, entry, model, opt, rng)
        if on_epoch is not None:
            on_epoch(epoch, entry)
        if done:
            break
    model.eval()
    return model, schedule.history
