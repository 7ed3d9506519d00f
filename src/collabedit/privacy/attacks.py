"""What a curious server can read from one client's (or one secure-aggregation group's) P and S.

The dictionary attack (membership, then the new object)
------------------------------------------------------
The attacker is the server: it holds the base model, the editor's configuration (every party
needs it) and the public regulariser A0 = lambda C. It also holds a candidate list of
(subject, relation, prompt) triples: for the world every subject x relation phrasing; in
practice an entity list (Wikidata names, a customer list, a staff directory) times the
relations of interest. It computes every candidate's key exactly as a client would (the
editor's own key code, including MEMIT's seeded context prefixes, which are a function of the
model and the public config) and then:

1. Membership. S = K K^T is compared in the coordinates whitened by the public covariance
   (k -> Lambda^-1/2 V^T k over the eigen-directions of A0 that are not zero). In raw coordinates
   every MLP key shares a large common component, so any key has most of its norm in the span
   of S (0.96 on average for non-members at 64 edits on the world); whitened, an unrelated key is
   spread over all d_eff directions and keeps about rank/d_eff of its norm there, while a key
   that is a column of K keeps all of it. The score of a candidate is the share of its
   whitened key's squared norm inside the dominant eigenspace of the whitened S (eigenvalues
   above `rel_cut` of the largest and above the noise edge |lambda_min|, which a symmetric noise
   matrix makes visible through its negative eigenvalues). A candidate is flagged when its score
   is at least (1 + rank/d_eff) / 2, halfway between the two expectations; the rank is read from
   S, so the attacker needs no knowledge of how many requests the client had.
2. The edit. For a flagged candidate key k, r = P S^+ k (pseudo-inverse on the same eigenspace)
   is exactly the residual the client asked for when its keys are linearly independent:
   P S^+ K = R K^T (K K^T)^+ K = R. The attacker adds r to the hidden state at the subject's last
   token of the candidate's prompt at the edited layer (what the edit does for that key) and
   compares the log-probabilities of every object of each relation with those of the unedited
   model. The relation is one whose most probable object changes under the shift (the others
   keep answering with the subject's old facts), the most confident such one; its new top object
   is the guessed new object. Subjects whose guessed object gains less than `gain_threshold`
   nats over the unedited model are dropped: this filter is what makes zero-residual cover
   keys useless against an attacker who reads P (their r is 0).

Numbers are reported for (subject, relation) pairs: one guess per flagged subject (MEMIT batches
never edit one subject twice).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from collabedit.models.tracing import (
    encode_pair,
    pad_batch,
    shift_block_output,
    subject_last_index,
)
from collabedit.requests import EditRequest

KeyFn = Callable[[Sequence[EditRequest]], dict[int, torch.Tensor]]


@dataclass(frozen=True)
class Candidate:
    """One entry of the attacker's dictionary: a subject in one relation phrasing."""

    subject: str
    relation_id: str
    prompt: str  # holds "{}" for the subject

    def as_request(self, case_id: int = 0) -> EditRequest:
        """The key code takes edit requests; the target plays no part in a key."""
        return EditRequest(
            case_id=case_id, subject=self.subject, prompt=self.prompt, target_new="-"
        )

    @property
    def text(self) -> str:
        return self.prompt.format(self.subject)


def candidates_from(
    subjects: Sequence[str], relations: dict[str, Sequence[str]], phrasings: int = 1
) -> list[Candidate]:
    """Every subject x relation x the first `phrasings` phrasings of the relation."""
    return [
        Candidate(s, rel, prompt)
        for s in subjects
        for rel, prompts in relations.items()
        for prompt in list(prompts)[:phrasings]
    ]


def memit_key_fn(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg,
    layers: Sequence[int],
) -> KeyFn:
    """Keys as MEMIT computes them (same seeded context prefixes, same averaging): what a
    server holding the base model and the federation's editor config can compute for any text.
    """
    from collabedit.editors.memit.compute import compute_keys, context_templates

    templates = context_templates(model, tokenizer, cfg)

    def keys(requests: Sequence[EditRequest]) -> dict[int, torch.Tensor]:
        return compute_keys(model, tokenizer, requests, list(layers), templates, cfg.batch_rows)

    return keys


def candidate_keys(key_fn: KeyFn, candidates: Sequence[Candidate]) -> dict[int, torch.Tensor]:
    return key_fn([c.as_request(i) for i, c in enumerate(candidates)])


# ---------------------------------------------------------------------------------------------
# spectral tools


class Whitener:
    """k -> Lambda^-1/2 V^T k over the eigen-directions of the public regulariser A0 whose
    eigenvalue is above `rtol` of the largest (the corpus never excites the others)."""

    def __init__(self, a0: torch.Tensor, rtol: float = 1e-10) -> None:
        w, V = torch.linalg.eigh(a0.double())
        keep = w > rtol * w.max()
        self.W = V[:, keep] / w[keep].sqrt()  # d_in x d_eff

    @property
    def d_eff(self) -> int:
        return self.W.shape[1]

    def keys(self, keys: torch.Tensor) -> torch.Tensor:
        """(n, d_in) -> (n, d_eff)."""
        return keys.double() @ self.W

    def gram(self, s: torch.Tensor) -> torch.Tensor:
        """S -> W^T S W (symmetrised)."""
        out = self.W.T @ s.double() @ self.W
        return (out + out.T) / 2


def identity_whitener(d: int) -> Whitener:
    w = Whitener.__new__(Whitener)
    w.W = torch.eye(d, dtype=torch.float64)
    return w


@dataclass
class Spectrum:
    basis: torch.Tensor  # d x rank, orthonormal
    values: torch.Tensor  # rank eigenvalues kept
    cut: float
    noise_edge: float  # |most negative eigenvalue| (0 when none)

    @property
    def rank(self) -> int:
        return self.basis.shape[1]


def dominant(s: torch.Tensor, rel_cut: float = 1e-6) -> Spectrum:
    """Eigen-directions of a symmetric matrix above `rel_cut` of its largest eigenvalue and
    above the edge of its noise: a PSD S = K K^T has no eigenvalue below ~-1e-12 x the largest,
    so a clearly negative one is a symmetric noise matrix's, whose spectrum is symmetric about 0;
    everything not above its magnitude may be noise."""
    w, V = torch.linalg.eigh((s.double() + s.double().T) / 2)
    top = float(w.max())
    edge = max(0.0, -float(w.min()))
    cut = max(rel_cut * max(top, 0.0), 1.5 * edge if edge > 1e-9 * max(top, 1e-300) else 0.0)
    keep = w > cut
    return Spectrum(V[:, keep], w[keep], cut, edge)


def span_scores(spectrum: Spectrum, keys: torch.Tensor) -> torch.Tensor:
    """Share of each key's squared norm inside the spectrum's basis, (n,) in [0, 1]."""
    k = keys.double()
    inside = (k @ spectrum.basis).pow(2).sum(dim=1)
    return inside / k.pow(2).sum(dim=1).clamp_min(1e-300)


def residual_estimates(
    p: torch.Tensor, spectrum: Spectrum, whitener: Whitener, keys: torch.Tensor
) -> torch.Tensor:
    """r = P S^+ k for each key, computed in whitened coordinates (equal to the raw-coordinate
    value when the keys lie in A0's range): P W (W^T S W)^+ W^T k. (n, d_out)."""
    kw = whitener.keys(keys)  # n x d_eff
    U, lam = spectrum.basis, spectrum.values
    coeff = (kw @ U) / lam  # n x rank
    pw = p.double() @ whitener.W  # d_out x d_eff
    return coeff @ (pw @ U).T


# ---------------------------------------------------------------------------------------------
# probing the model with a residual shift


ProbeItem = tuple[Candidate, str]


@torch.no_grad()
def object_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layer: int,
    items: Sequence[ProbeItem],
    shifts: torch.Tensor | None = None,
    owner: Sequence[int] | torch.Tensor | None = None,
    batch_rows: int = 1024,
) -> torch.Tensor:
    """Mean log-probability of each object after its candidate's prompt, (n,). `shifts`: added
    to the block output of `layer` at the subject's last token (None: the unedited model); item
    i gets `shifts[owner[i]]` (`owner` None: `shifts` has one row per item).

    Items that need the same forward pass share it: a row is the prompt plus the object's tokens
    but its last, so every one-token object of a prompt is read from the same row (its last
    position's distribution), and multi-token objects with a common first token share theirs
    too. Only the positions the objects are read from go through the log-softmax.
    """
    if shifts is not None and owner is None:
        owner = range(len(items))
    owners = [-1] * len(items) if owner is None else [int(o) for o in owner]
    prompt_cache: dict[tuple[str, str], tuple[list[int], int]] = {}
    object_cache: dict[str, list[int]] = {}
    row_index: dict[tuple, int] = {}
    rows: list[list[int]] = []
    row_subj: list[int] = []
    row_owner: list[int] = []
    reads: list[tuple[int, int, int, int]] = []  # (item, row, position, token)
    for i, ((cand, obj), own) in enumerate(zip(items, owners, strict=True)):
        key = (cand.prompt, cand.subject)
        if key not in prompt_cache:
            prompt_ids, _ = encode_pair(tokenizer, cand.text, obj)
            prompt_cache[key] = (prompt_ids, subject_last_index(tokenizer, *key))
        prompt_ids, subj = prompt_cache[key]
        if obj not in object_cache:
            object_cache[obj] = encode_pair(tokenizer, cand.text, obj)[1]
        target_ids = object_cache[obj]
        row = prompt_ids + target_ids[:-1]
        rkey = (own, subj, tuple(row))
        if rkey not in row_index:
            row_index[rkey] = len(rows)
            rows.append(row)
            row_subj.append(subj)
            row_owner.append(own)
        r = row_index[rkey]
        for j, t in enumerate(target_ids):
            reads.append((i, r, len(prompt_ids) - 1 + j, t))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    sums = torch.zeros(len(items), dtype=torch.float64)
    counts = torch.zeros(len(items), dtype=torch.float64)
    reads_t = torch.tensor(reads, dtype=torch.long).view(-1, 4)
    for start in range(0, len(rows), batch_rows):
        stop = min(start + batch_rows, len(rows))
        ids, mask = pad_batch(rows[start:stop], pad)
        ids, mask = ids.to(device), mask.to(device)
        if shifts is not None:
            idx = torch.tensor(row_subj[start:stop])
            shift_rows = shifts[torch.tensor(row_owner[start:stop])].to(device)

            def shift(h, idx=idx, shift_rows=shift_rows):
                h = h.clone()
                h[torch.arange(len(idx)), idx] += shift_rows.to(h.dtype)
                return h

            with shift_block_output(model, layer, shift):
                logits = model(input_ids=ids, attention_mask=mask).logits
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits
        sel = reads_t[(reads_t[:, 1] >= start) & (reads_t[:, 1] < stop)]
        lp = torch.log_softmax(logits[sel[:, 1] - start, sel[:, 2]].double().cpu(), dim=-1)
        sums.index_add_(0, sel[:, 0], lp.gather(1, sel[:, 3:4]).squeeze(1))
        counts.index_add_(0, sel[:, 0], torch.ones(len(sel), dtype=torch.float64))
    return sums / counts


# ---------------------------------------------------------------------------------------------
# the attack


@dataclass
class Guess:
    subject: str
    relation_id: str
    target_new: str | None  # None: membership only (no P used)
    score: float  # span share of the subject's best candidate key
    gain: float | None = None  # nats the guessed relation's best object gains under r


@dataclass
class AttackResult:
    guesses: list[Guess]
    scores: torch.Tensor  # per candidate
    threshold: float
    rank: int
    d_eff: int
    flagged_subjects: int
    info: dict = field(default_factory=dict)


def dictionary_attack(
    p: torch.Tensor | None,
    s: torch.Tensor,
    a0: torch.Tensor,
    candidates: Sequence[Candidate],
    keys: torch.Tensor,
    *,
    objects: dict[str, Sequence[str]] | None = None,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    layer: int | None = None,
    whiten: bool = True,
    rel_cut: float = 1e-6,
    gain_threshold: float = 1.0,
    max_probe_subjects: int | None = None,
    base_cache: dict[ProbeItem, float] | None = None,
) -> AttackResult:
    """Membership from S (and the edit from P when `p`, `objects`, `model` are given).

    `keys`: the candidates' keys at the attacked layer (n, d_in), computed with the editor's key
    code on the base model. `objects`: relation id -> its objects (the attacker's guess space).
    `base_cache`: the unedited model's log-probabilities of (candidate, object) items, filled
    and reused across attacks with the same model (they do not depend on P or S).
    """
    wh = Whitener(a0) if whiten else identity_whitener(s.shape[0])
    spec = dominant(wh.gram(s), rel_cut)
    scores = span_scores(spec, wh.keys(keys))
    score_list = scores.tolist()
    threshold = 0.5 * (1.0 + spec.rank / wh.d_eff)
    # best candidate per subject (in the world every relation of a subject has the same key)
    best: dict[str, int] = {}
    for i, c in enumerate(candidates):
        if c.subject not in best or score_list[i] > score_list[best[c.subject]]:
            best[c.subject] = i
    flagged = [s_ for s_, i in best.items() if score_list[i] >= threshold]
    flagged.sort(key=lambda s_: -score_list[best[s_]])
    if max_probe_subjects is not None:
        flagged = flagged[:max_probe_subjects]
    info = {"noise_edge": spec.noise_edge, "cut": spec.cut}
    if p is None or objects is None or model is None or tokenizer is None or layer is None:
        guesses = [
            Guess(s_, candidates[best[s_]].relation_id, None, score_list[best[s_]])
            for s_ in flagged
        ]
        return AttackResult(guesses, scores, threshold, spec.rank, wh.d_eff, len(flagged), info)

    # one probe candidate per (flagged subject, relation): the relation's first phrasing in the list
    probe: list[int] = []
    seen: set[tuple[str, str]] = set()
    flagged_set = set(flagged)
    for i, c in enumerate(candidates):
        if c.subject in flagged_set and (c.subject, c.relation_id) not in seen:
            seen.add((c.subject, c.relation_id))
            probe.append(i)
    r_hat = residual_estimates(p, spec, wh, keys[probe]) if probe else torch.zeros(0)
    items: list[ProbeItem] = []
    owner: list[int] = []
    spans: list[tuple[int, int]] = []  # each probe's items are items[a:b]
    for j, i in enumerate(probe):
        a = len(items)
        for obj in objects[candidates[i].relation_id]:
            items.append((candidates[i], obj))
            owner.append(j)
        spans.append((a, len(items)))
    guesses = []
    if items:
        base = _base_logprobs(model, tokenizer, layer, items, base_cache)
        edited = object_logprobs(model, tokenizer, layer, items, r_hat, owner)
        gain = edited - base
        # per (subject, relation): how confidently the shifted model names one of the
        # relation's objects; the edit was fitted on one relation, the shift garbles the others
        per_subject: dict[str, tuple[tuple[bool, float], float, str, str]] = {}
        for (a, b), i in zip(spans, probe, strict=True):
            if a == b:
                continue
            top = a + int(edited[a:b].argmax())
            changed = top != a + int(base[a:b].argmax())
            rank_key, g = (changed, float(edited[top])), float(gain[top])
            c = candidates[i]
            if c.subject not in per_subject or rank_key > per_subject[c.subject][0]:
                per_subject[c.subject] = (rank_key, g, c.relation_id, items[top][1])
        for s_ in flagged:
            _, g, rel, obj = per_subject[s_]
            if g >= gain_threshold:
                guesses.append(Guess(s_, rel, obj, score_list[best[s_]], g))
        info["dropped_by_gain"] = len(flagged) - len(guesses)
    return AttackResult(guesses, scores, threshold, spec.rank, wh.d_eff, len(flagged), info)


def _base_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layer: int,
    items: Sequence[ProbeItem],
    cache: dict[ProbeItem, float] | None,
) -> torch.Tensor:
    """The unedited model's `object_logprobs`, computed only for items not in `cache`."""
    if cache is None:
        return object_logprobs(model, tokenizer, layer, items)
    missing = list(dict.fromkeys(it for it in items if it not in cache))
    if missing:
        values = object_logprobs(model, tokenizer, layer, missing)
        cache.update(zip(missing, values.tolist(), strict=True))
    return torch.tensor([cache[it] for it in items], dtype=torch.float64)


def evaluate_attack(
    result: AttackResult,
    truth: Sequence[tuple[str, str, str]],
    candidates: Sequence[Candidate] | None = None,
) -> dict:
    """Precision and recall of the guessed edited (subject, relation) pairs, of the edited
    subjects, and the share of edits whose (subject, relation, new object) is guessed exactly.
    `truth`: (subject, relation id, new object) of every edit in the attacked S.
    With `candidates`, also the AUC of the span score separating edited subjects from the rest."""
    true_pairs = {(s, r) for s, r, _ in truth}
    true_subjects = {s for s, _, _ in truth}
    true_full = set(truth)
    pairs = {(g.subject, g.relation_id) for g in result.guesses}
    subjects = {g.subject for g in result.guesses}
    out = {
        "flagged_subjects": result.flagged_subjects,
        "guesses": len(result.guesses),
        "subject_precision": _ratio(len(subjects & true_subjects), len(subjects)),
        "subject_recall": _ratio(len(subjects & true_subjects), len(true_subjects)),
        "rank": result.rank,
        "threshold": round(result.threshold, 4),
    }
    if result.guesses and result.guesses[0].target_new is not None:
        full = {(g.subject, g.relation_id, g.target_new) for g in result.guesses}
        out |= {
            "pair_precision": _ratio(len(pairs & true_pairs), len(pairs)),
            "pair_recall": _ratio(len(pairs & true_pairs), len(true_pairs)),
            "object_accuracy": _ratio(len(full & true_full), len(true_full)),
        }
    elif result.guesses:  # membership only
        out |= {"pair_precision": None, "pair_recall": None, "object_accuracy": None}
    else:
        out |= {"pair_precision": None, "pair_recall": 0.0, "object_accuracy": 0.0}
    if candidates is not None:
        best: dict[str, float] = {}
        for c, sc in zip(candidates, result.scores.tolist(), strict=True):
            best[c.subject] = max(best.get(c.subject, 0.0), sc)
        pos = [v for k, v in best.items() if k in true_subjects]
        neg = [v for k, v in best.items() if k not in true_subjects]
        out["subject_auc"] = auc(pos, neg)
    return out


def _ratio(a: int, b: int) -> float | None:
    return None if b == 0 else round(a / b, 4)


def auc(pos: Sequence[float], neg: Sequence[float]) -> float | None:
    """Probability that a random positive scores above a random negative (ties count half)."""
    if not pos or not neg:
        return None
    p = torch.tensor(pos, dtype=torch.float64).view(-1, 1)
    n = torch.tensor(neg, dtype=torch.float64).view(1, -1)
    return round(float((p > n).double().mean() + 0.5 * (p == n).double().mean()), 4)
