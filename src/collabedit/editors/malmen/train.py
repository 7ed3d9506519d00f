"""MALMEN's meta-training, written from the paper's description.

One step on a batch of edits:

1. read every edit's keys and value gradients on the unedited model (compute.token_rows) and
   add them to the hypernetwork's input statistics;
2. predict each layer's shift Delta = D^T U (kappa I + U^T U)^-1 without building a graph;
3. apply the shifts and take the gradient G of the meta loss with respect to the edited weights:
   the edit loss on paraphrases (generalisation) plus `loc_coef` times the KL divergence from the
   unedited model on unrelated prompts (locality); then restore the weights bit for bit;
4. carry G back through the solve in closed form — dL/dD = U (kappa I + U^T U)^-1 G^T and
   dL/dlog(kappa) = -kappa <(kappa I + U^T U)^-1 G^T, Delta^T> — and through the hypernetwork
   a slice of tokens at a time.

Steps 3 and 4 are MALMEN's decoupled backward: the language model's graph and the hypernetwork's
are never alive together, so memory grows with neither the number of edits nor the model's size
times the number of edits.

Validation edits held-out requests with exactly the editor's inference path (closed_form_edit on a
MalmenSession) and reports MALMEN's ES / GS / LS: token accuracy of the new target on the edit
prompt, on paraphrases, and of the unrelated prompts' answers.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from collabedit import io
from collabedit.editors.base import closed_form_edit
from collabedit.editors.malmen.compute import answer_logits, encode, per_pair_nll, token_rows
from collabedit.editors.malmen.config import MalmenConfig
from collabedit.editors.malmen.editor import Malmen, kappa_regulariser
from collabedit.editors.malmen.hypernet import INFO_FILE, HypernetInfo, MalmenNets, load_hypernet
from collabedit.evaluate.scoring import score_targets
from collabedit.models import arch
from collabedit.requests import EditRequest

CURVES_FILE = "curves.json"
CHECKPOINT_DIR = "checkpoint"

Pair = tuple[str, str]


@dataclass(frozen=True)
class TrainingItem:
    """What one training request contributes: the edit, its paraphrases, unrelated prompts."""

    subject: str
    edit: Pair
    equiv: tuple[Pair, ...]
    unrel: tuple[Pair, ...]


def training_items(requests: Sequence[EditRequest]) -> list[TrainingItem]:
    """The generalisation loss draws from the edit prompt and its paraphrases (the authors' draws
    from paraphrases alone; the edit prompt itself is what ES measures); unrelated prompts are
    the neighbourhood prompts with their expected answer (neighborhood_target, else
    target_true). A request without any is refused, naming it: locality could not be trained
    on it."""
    items = []
    for r in requests:
        answer = r.neighborhood_target or r.target_true
        if not r.neighborhood_prompts or not answer:
            raise ValueError(
                f"request case_id={r.case_id}: MALMEN training needs neighborhood_prompts with "
                "an expected answer (neighborhood_target or target_true) for its locality loss"
            )
        edit = (r.rewrite_prompt, r.target_new)
        equiv = (edit, *((p, r.target_new) for p in r.paraphrase_prompts))
        unrel = tuple((p, answer) for p in r.neighborhood_prompts)
        items.append(TrainingItem(r.subject, edit, equiv, unrel))
    return items


def split_by_subject(
    requests: Sequence[EditRequest], valid_share: float, seed: int
) -> tuple[list[EditRequest], list[EditRequest]]:
    """Training and validation requests with disjoint subjects."""
    subjects = sorted({r.subject for r in requests})
    random.Random(seed).shuffle(subjects)
    n_valid = round(valid_share * len(subjects))
    if valid_share > 0 and (n_valid == 0 or n_valid == len(subjects)):
        raise ValueError(
            f"cannot hold out {valid_share:.0%} of {len(subjects)} subjects for validation"
        )
    held = set(subjects[:n_valid])
    return (
        [r for r in requests if r.subject not in held],
        [r for r in requests if r.subject in held],
    )


@contextlib.contextmanager
def _weights_with_grad(model: PreTrainedModel, layers: Sequence[int]) -> Iterator[None]:
    """Only the edited weights require grad while active; every flag is restored after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers:
            arch.mlp_out(model, layer).weight.requires_grad_(True)
            arch.mlp_out(model, layer).weight.grad = None
        yield
    finally:
        for layer in layers:
            arch.mlp_out(model, layer).weight.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _weight_grad(model: PreTrainedModel, layer: int) -> torch.Tensor:
    g = arch.mlp_out(model, layer).weight.grad
    if g is None:
        raise RuntimeError(f"layer {layer}: the meta loss did not reach the edited weight")
    return (g.T if arch.arch_of(model).transposed else g).double()


def _chunks(seq: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def _kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || edited), summed over answer tokens."""
    return F.kl_div(
        logits.float().log_softmax(-1),
        ref_logits.float().log_softmax(-1),
        reduction="sum",
        log_target=True,
    )


class Ridge:
    """One layer's solve Delta = D^T U (kappa I + U^T U)^-1 and its backward, through whichever
    Gram matrix is smaller: kappa I + U^T U (d_in x d_in) or, by the push-through identity
    U (kappa I + U^T U)^-1 = (kappa I + U U^T)^-1 U, kappa I + U U^T (rows x rows) — the
    cheaper one when a batch has fewer answer tokens than the layer has inputs."""

    def __init__(self, U: torch.Tensor, kappa: float, D: torch.Tensor) -> None:
        self.U, self.kappa, self.D = U, kappa, D
        self.by_rows = U.shape[0] < U.shape[1]
        gram = U @ U.T if self.by_rows else U.T @ U
        eye = torch.eye(gram.shape[0], dtype=gram.dtype)
        self.chol = torch.linalg.cholesky(gram + kappa * eye)

    def _solve(self, X: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(X, self.chol)

    def delta(self) -> torch.Tensor:
        if self.by_rows:
            return (self._solve(self.D).T @ self.U).contiguous()
        return self._solve(self.U.T @ self.D).T.contiguous()

    def backward(self, G: torch.Tensor) -> tuple[torch.Tensor, float]:
        """From G = dL/dDelta (d_out x d_in): dL/dD = U (kappa I + U^T U)^-1 G^T and
        dL/dlog(kappa) = -kappa tr(G^T Delta (kappa I + U^T U)^-1)."""
        if self.by_rows:
            dD = self._solve(self.U @ G.T)
            return dD, -self.kappa * float((self._solve(self.D) * dD).sum())
        X = self._solve(G.T)
        return self.U @ X, -self.kappa * float((X * self.delta().T).sum())


@dataclass
class Trainer:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    cfg: MalmenConfig
    nets: MalmenNets
    layers: list[int]
    opt: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        self.nets.train()
        self.nets.requires_grad_(True)
        self.opt = torch.optim.Adam(self.nets.parameters(), lr=self.cfg.meta_lr)

    # -- one meta-training step -------------------------------------------------------------

    def _shifts(self, rows) -> tuple[dict, dict]:
        """Per layer: the ridge solve and Delta (d_out x d_in, float64)."""
        solves, deltas = {}, {}
        with torch.no_grad():
            for layer in self.layers:
                D = self.nets.value_diffs(
                    layer, rows.keys[layer], rows.grads[layer], self.cfg.editor_batch_size
                ).double()
                kappa = float(self.nets.kappa(layer).detach())
                solves[layer] = Ridge(rows.keys[layer].double(), kappa, D)
                deltas[layer] = solves[layer].delta()
        return solves, deltas

    @contextlib.contextmanager
    def _edited(self, deltas: dict[int, torch.Tensor]) -> Iterator[None]:
        original = arch.snapshot(self.model, self.layers)
        try:
            for layer, d in deltas.items():
                arch.add_to_weight(self.model, layer, d)
            yield
        finally:
            arch.restore(self.model, original)

    def step(self, items: Sequence[TrainingItem], rng: random.Random) -> dict[str, float]:
        """One meta-training step: the meta-gradients, clipped, and Adam's update."""
        losses = self.meta_gradients(items, rng)
        norm = torch.nn.utils.clip_grad_norm_(self.nets.parameters(), self.cfg.max_grad_norm)
        self.opt.step()
        return losses | {"grad_norm": float(norm)}

    def meta_gradients(self, items: Sequence[TrainingItem], rng: random.Random) -> dict[str, float]:
        """Fill the hypernetwork's .grad with the meta loss's gradient (decoupled backward);
        the input statistics take in the batch's tokens first."""
        cfg, model = self.cfg, self.model
        edit_pairs = [it.edit for it in items]
        rows = token_rows(model, self.tokenizer, edit_pairs, self.layers, cfg.batch_size)
        for layer in self.layers:
            self.nets.observe(layer, rows.keys[layer], rows.grads[layer])
        solves, deltas = self._shifts(rows)
        equiv = [rng.choice(it.equiv) for it in items]
        unrel = [rng.choice(it.unrel) for it in items]
        gen_total, loc_total = 0.0, 0.0
        unrel_batches = [encode(self.tokenizer, c) for c in _chunks(unrel, cfg.batch_size)]
        n_unrel_tokens = sum(len(b.labels) for b in unrel_batches)
        model.eval()
        with _weights_with_grad(model, self.layers):
            with self._edited(deltas):
                # generalisation: mean over requests of each one's mean target NLL
                for chunk in _chunks(equiv, cfg.batch_size):
                    batch = encode(self.tokenizer, chunk)
                    nll = per_pair_nll(answer_logits(model, batch), batch)
                    loss = nll.sum() / len(equiv)
                    loss.backward()
                    gen_total += float(loss.detach())
            # locality: KL from the unedited model, mean over all unrelated answer tokens
            for batch in unrel_batches:
                with torch.no_grad():
                    ref = answer_logits(model, batch)
                with self._edited(deltas):
                    loss = _kl(ref, answer_logits(model, batch)) / n_unrel_tokens
                    (cfg.loc_coef * loss).backward()
                    loc_total += float(loss.detach())
            grads = {layer: _weight_grad(model, layer) for layer in self.layers}
        self.nets.zero_grad(set_to_none=True)
        for layer in self.layers:
            dD, dlog_kappa = solves[layer].backward(grads[layer])
            U = rows.keys[layer]
            dD = dD.to(U.dtype)
            net, module = self.nets.net(layer)
            if net.log_kappa.grad is None:
                net.log_kappa.grad = torch.zeros_like(net.log_kappa)
            net.log_kappa.grad[module] += dlog_kappa
            for i in range(0, U.shape[0], cfg.editor_batch_size):
                j = i + cfg.editor_batch_size
                D = net(U[i:j], rows.grads[layer][i:j], module)
                (dD[i:j] * D).sum().backward()
        return {"gen_loss": gen_total, "loc_loss": loc_total, "edit_loss": float(rows.nll.mean())}

    # -- validation --------------------------------------------------------------------------

    def _accuracy(self, pairs: Sequence[Pair]) -> list[float]:
        """Per pair, the top-1 accuracy of its target tokens (MALMEN's success ratio)."""
        scores = score_targets(self.model, self.tokenizer, pairs, self.cfg.batch_size)
        return [s.token_accuracy for s in scores]

    def validate(self, requests: Sequence[EditRequest]) -> dict[str, float]:
        """ES / GS / LS (percent) of editing `requests` in groups of up to n_edits with distinct
        subjects, with the editor's own inference path; the model is restored after each."""
        self.nets.eval()
        editor = Malmen()
        regulariser = kappa_regulariser(self.nets, self.layers)
        es, gs, ls = [], [], []
        original = arch.snapshot(self.model, self.layers)
        try:
            for part in distinct_subject_groups(requests, self.cfg.n_edits):
                its = training_items(part)
                session = editor.session(self.model, self.tokenizer, part, self.cfg, nets=self.nets)
                closed_form_edit(session, regulariser, apply=True)
                es += self._accuracy([it.edit for it in its])
                gs += self._accuracy([p for it in its for p in it.equiv])
                ls += self._accuracy([p for it in its for p in it.unrel])
                arch.restore(self.model, original)
        finally:
            arch.restore(self.model, original)
            self.nets.train()
        mean = lambda v: 100.0 * sum(v) / max(len(v), 1)  # noqa: E731
        return {"ES": mean(es), "GS": mean(gs), "LS": mean(ls)}

    # -- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self, folder: Path, progress: dict) -> None:
        """Hypernetwork, optimiser moments and progress, as safetensors and JSON (no pickle)."""
        folder.mkdir(parents=True, exist_ok=True)
        params = dict(self.nets.named_parameters())
        index = {id(p): name for name, p in params.items()}
        tensors = {f"net.{k}": v.detach().contiguous() for k, v in self.nets.state_dict().items()}
        for group in self.opt.param_groups:
            for p in group["params"]:
                for k, v in self.opt.state.get(p, {}).items():
                    tensors[f"opt.{index[id(p)]}.{k}"] = torch.as_tensor(v).detach().contiguous()
        io.write_safetensors(folder / "state.safetensors", tensors)
        io.write_json(folder / "progress.json", progress)

    def load_checkpoint(self, folder: Path) -> dict:
        tensors = load_file(folder / "state.safetensors")
        self.nets.load_state_dict(
            {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, strict=True
        )
        params = dict(self.nets.named_parameters())
        for key, value in tensors.items():
            if key.startswith("opt."):
                name, _, slot = key[4:].rpartition(".")
                self.opt.state[params[name]][slot] = value
        return json.loads((folder / "progress.json").read_text())


def distinct_subject_groups(
    requests: Sequence[EditRequest], size: int
) -> list[list[EditRequest]]:
    """The requests in order, in groups of at most `size` with no subject twice in a group (as
    in an evaluation batch)."""
    groups: list[list[EditRequest]] = []
    subjects: list[set[str]] = []
    for r in requests:
        for g, seen in zip(groups, subjects, strict=True):
            if len(g) < size and r.subject not in seen:
                g.append(r)
                seen.add(r.subject)
                break
        else:
            groups.append([r])
            subjects.append({r.subject})
    return groups


def _batches(items: Sequence[TrainingItem], n: int, rng: random.Random) -> list[TrainingItem]:
    """Up to n items with distinct subjects (two edits of one subject in one batch would
    compete for the same keys)."""
    order = list(range(len(items)))
    rng.shuffle(order)
    seen, out = set(), []
    for i in order:
        if items[i].subject not in seen:
            seen.add(items[i].subject)
            out.append(items[i])
            if len(out) == n:
                break
    return out


def train_hypernet(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    cfg: MalmenConfig,
    out: Path,
    valid_share: float = 0.1,
    resume: bool = False,
    init: Path | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Meta-train a hypernetwork on `requests` for `model` and save the best one (by the mean of
    ES, GS and LS on subjects held out of training) to `out`. Checkpoints every validation;
    `resume` continues from the last one; `init` starts from a trained hypernetwork's weights
    instead of a fresh one (the config's own `hypernet` is what editing uses, not a start).
    Returns the curves."""
    out = Path(out)
    editor = Malmen()
    layers = editor.layers(model, cfg.model_copy(update={"hypernet": None}))
    cfg = cfg.model_copy(update={"layers": layers})
    train_reqs, valid_reqs = split_by_subject(requests, valid_share, cfg.seed)
    train_items = training_items(train_reqs)
    training_items(valid_reqs)  # refuse bad validation requests before any work
    torch.manual_seed(cfg.seed)
    if init is not None:
        start_nets, _ = load_hypernet(init)
        nets = MalmenNets(start_nets.shapes(), start_nets.rank, start_nets.n_blocks, cfg.lr)
        nets.load_state_dict(start_nets.state_dict())
    else:
        nets = MalmenNets.for_model(model, layers, cfg.rank, cfg.n_blocks, cfg.lr)
    trainer = Trainer(model, tokenizer, cfg, nets, layers)
    fingerprint = arch.fingerprint(model)
    ckpt = out / CHECKPOINT_DIR
    curves: dict = {"train": [], "valid": [], "seconds": 0.0, "best": None}
    step0 = 0
    if resume and (ckpt / "progress.json").is_file():
        state = trainer.load_checkpoint(ckpt)
        if state.get("base_fingerprint") != fingerprint:
            raise ValueError(f"{ckpt} is a checkpoint for another model; remove it to start over")
        curves, step0 = state["curves"], int(state["step"])
        log(f"resuming at step {step0}")
    best = curves["best"]["score"] if curves["best"] else -math.inf
    t0 = time.perf_counter() - curves["seconds"]
    info = HypernetInfo(
        layers=layers,
        rank=nets.rank,
        n_blocks=nets.n_blocks,
        lr=nets.lr0,
        base_fingerprint=fingerprint,
        trained_subjects=sorted({r.subject for r in requests}),
    )
    for step in range(step0, cfg.n_steps):
        rng = random.Random(cfg.seed * 1_000_003 + step)
        losses = trainer.step(_batches(train_items, cfg.n_edits, rng), rng)
        curves["train"].append({"step": step + 1, **losses})
        last = step + 1 == cfg.n_steps
        if (step + 1) % cfg.val_interval == 0 or last:
            scores = trainer.validate(valid_reqs) if valid_reqs else {}
            score = sum(scores.values()) / len(scores) if scores else -float(losses["gen_loss"])
            curves["valid"].append({"step": step + 1, **scores})
            curves["seconds"] = time.perf_counter() - t0
            log(
                f"step {step + 1}: gen {losses['gen_loss']:.3f} loc {losses['loc_loss']:.4f}"
                + "".join(f" {k} {v:.1f}" for k, v in scores.items())
            )
            if score > best:
                best = score
                curves["best"] = {"step": step + 1, "score": score, **scores}
                info.training = _summary(cfg, curves, len(train_reqs), len(valid_reqs))
                nets.save(out, info)
            trainer.save_checkpoint(
                ckpt, {"step": step + 1, "curves": curves, "base_fingerprint": fingerprint}
            )
            io.write_json(out / CURVES_FILE, curves)
        if progress is not None:
            progress(step + 1, cfg.n_steps, losses)
    # the saved (best) network's description gets the whole run's summary
    data = json.loads((out / INFO_FILE).read_text())
    data["training"] = _summary(cfg, curves, len(train_reqs), len(valid_reqs))
    io.write_json(out / INFO_FILE, data)
    return curves


def _summary(cfg: MalmenConfig, curves: dict, n_train: int, n_valid: int) -> dict:
    return {
        "config": cfg.model_dump(exclude={"hypernet"}),
        "train_requests": n_train,
        "valid_requests": n_valid,
        "steps": len(curves["train"]),
        "seconds": round(curves["seconds"], 1),
        "best": curves["best"],
    }


def plot_curves(curves: dict, path: Path) -> None:
    """Training losses and validation scores against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [r["step"] for r in curves["train"]]
    for key in ("edit_loss", "gen_loss", "loc_loss"):
        a.plot(steps, [r[key] for r in curves["train"]], label=key, lw=0.8)
    a.set_yscale("log")
    a.set_xlabel("step")
    a.set_title("training losses (nats)")
    a.legend()
    vsteps = [r["step"] for r in curves["valid"]]
    for key in ("ES", "GS", "LS"):
        if curves["valid"] and key in curves["valid"][0]:
            b.plot(vsteps, [r[key] for r in curves["valid"]], marker="o", label=key)
    b.set_xlabel("step")
    b.set_title("validation, held-out subjects (%)")
    b.legend()
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
