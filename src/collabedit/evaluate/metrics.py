"""Editing metrics, following MEMIT's definitions (Meng et al. 2023) exactly.

CounterFact (per request, then averaged over requests; values in percent):
  ES  share of rewrite prompts where target_new is more probable than target_true,
  PS  the same on paraphrase prompts,
  NS  share of neighbourhood prompts where target_true stays more probable than target_new,
  Score = harmonic mean of ES, PS, NS.
  "More probable" compares mean token log-probabilities, so multi-token objects are comparable.
zsRE (teacher-forced top-1 accuracy over the target's tokens, per request then averaged):
  EA on the rewrite prompt, PA on the paraphrase, NA on the neighbourhood prompt against its answer
  (loc_ans; for the world's requests that is the unedited model's answer), Score = harmonic mean.
RS (relation specificity, RippleEdits' term; not in the papers' Scores): top-1 token accuracy of
  the expected answers of the request's relation prompts, questions about the edited subject's
  other relations, which an edit of one fact should leave alone. Only requests that carry such
  prompts count (the world's do; the published datasets have none), so it is absent otherwise.
NE: n-gram entropy of sampled generations (MEMIT's weights 2/3 and 4/3 for 2- and 3-grams).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from statistics import fmean

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from collabedit.evaluate.scoring import TargetScore, score_targets
from collabedit.requests import EditRequest

Progress = Callable[[int], None] | None


def harmonic_mean(values: Sequence[float]) -> float:
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


KINDS = ("rewrite", "paraphrase", "neighborhood", "relation")


def _per_case(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    pairs_of: Callable[[EditRequest], list[tuple[str, str, str]]],
    outcomes: Callable[[str, list[TargetScore]], list[float]],
    batch_size: int,
    progress: Progress,
) -> list[dict]:
    """Score every request's (kind, prompt, target) pairs in one batched pass, then reduce each
    request's scores per kind with `outcomes` and average them (MEMIT averages per request
    first, then over requests)."""
    per_request = [pairs_of(r) for r in requests]
    flat = [(p, t) for pairs in per_request for _, p, t in pairs]
    scores = score_targets(model, tokenizer, flat, batch_size, progress)
    cases, i = [], 0
    for req, pairs in zip(requests, per_request, strict=True):
        by_kind: dict[str, list[TargetScore]] = {k: [] for k in KINDS}
        for kind, _, _ in pairs:
            by_kind[kind].append(scores[i])
            i += 1
        values = {k: outcomes(k, v) for k, v in by_kind.items()}
        cases.append(
            {"case_id": req.case_id} | {k: (fmean(v) if v else None) for k, v in values.items()}
        )
    return cases


def _counterfact_pairs(req: EditRequest) -> list[tuple[str, str, str]]:
    """Every prompt scored for target_new, then target_true."""
    prompts = {
        "rewrite": [req.rewrite_prompt],
        "paraphrase": req.paraphrase_prompts,
        "neighborhood": req.neighborhood_prompts,
    }
    return [
        (kind, p, t)
        for kind in prompts
        for p in prompts[kind]
        for t in (req.target_new, req.target_true)
    ]


def _counterfact_outcomes(kind: str, scores: list[TargetScore]) -> list[float]:
    pairs = zip(scores[::2], scores[1::2], strict=True)
    if kind == "neighborhood":  # the true object must stay ahead
        return [float(true.mean_logprob > new.mean_logprob) for new, true in pairs]
    return [float(new.mean_logprob > true.mean_logprob) for new, true in pairs]


def counterfact_case_metrics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    batch_size: int = 256,
    progress: Progress = None,
) -> list[dict]:
    """Per request: success rates of rewrite, paraphrase and neighbourhood prompts (fractions)."""
    missing = [r.case_id for r in requests if r.target_true is None]
    if missing:
        raise ValueError(
            f"CounterFact metrics need target_true; case_id(s) {missing[:5]} have none"
        )
    return _per_case(
        model, tokenizer, requests, _counterfact_pairs, _counterfact_outcomes, batch_size, progress
    )


def _zsre_pairs(req: EditRequest) -> list[tuple[str, str, str]]:
    answer = req.neighborhood_target or req.target_true
    pairs = [("rewrite", req.rewrite_prompt, req.target_new)]
    pairs += [("paraphrase", p, req.target_new) for p in req.paraphrase_prompts]
    if answer is not None:
        pairs += [("neighborhood", p, answer) for p in req.neighborhood_prompts]
    pairs += [("relation", r.prompt, r.answer) for r in req.relation_prompts]
    return pairs


def _zsre_outcomes(kind: str, scores: list[TargetScore]) -> list[float]:
    """Token-level accuracy: every target token of every prompt counts once."""
    return [float(c) for s in scores for c in s.token_correct]


def zsre_case_metrics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    batch_size: int = 256,
    progress: Progress = None,
) -> list[dict]:
    """Per request: top-1 token accuracy of target_new (rewrite, paraphrase), of the
    neighbourhood answer on neighbourhood prompts and of the relation prompts' answers
    (fractions; scored in the same batched pass)."""
    return _per_case(model, tokenizer, requests, _zsre_pairs, _zsre_outcomes, batch_size, progress)


def _summarise(cases: list[dict], names: dict[str, str], score_key: str) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for kind, name in names.items():
        values = [c[kind] for c in cases if c[kind] is not None]
        out[name] = 100.0 * fmean(values) if values else None
    present = [v for v in out.values() if v is not None]
    out[score_key] = harmonic_mean(present) if len(present) == len(names) else None
    return out


def summarise_counterfact(cases: list[dict]) -> dict[str, float | None]:
    return _summarise(cases, {"rewrite": "ES", "paraphrase": "PS", "neighborhood": "NS"}, "Score")


def summarise_zsre(cases: list[dict]) -> dict[str, float | None]:
    return _summarise(
        cases, {"rewrite": "EA", "paraphrase": "PA", "neighborhood": "NA"}, "zsRE_Score"
    )


def summarise_relation(cases: list[dict]) -> dict[str, float]:
    """{"RS": percent} over the requests that have relation prompts, or {} when none has."""
    values = [c["relation"] for c in cases if c.get("relation") is not None]
    return {"RS": 100.0 * fmean(values)} if values else {}


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy_of_text(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """MEMIT's compute_n_gram_entropy: weighted mean of the n-gram entropies (bits).

    MEMIT tokenises words with nltk; a regex word/punctuation split gives the same tokens for our
    texts without pulling in nltk and its data download.
    """
    tokens = _WORD.findall(text)
    entropies = []
    for n, w in zip(ns, weights, strict=True):
        grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        entropies.append(h * w)
    return fmean(entropies)


def ngram_entropy(texts: Sequence[str]) -> float:
    """Arithmetic mean over texts, as MEMIT's n_gram_entropy."""
    return fmean(ngram_entropy_of_text(t) for t in texts)


@torch.no_grad()
def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 100,
    top_k: int = 5,
    seed: int = 0,
) -> list[str]:
    """Top-k sampling as MEMIT's generate_fast (k=5), bounded by the model's context length."""
    torch.manual_seed(seed)
    n_positions = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", 2048
    )
    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        budget = min(max_new_tokens, n_positions - ids.shape[1])
        if budget <= 0:
            texts.append(prompt)
            continue
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            top_k=top_k,
            max_new_tokens=budget,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
        texts.append(tokenizer.decode(out[0], skip_special_tokens=True))
    return texts


def evaluate_requests(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    batch_size: int = 256,
    generation: bool = False,
    progress: Progress = None,
) -> dict:
    """Every metric that applies: CounterFact metrics when all requests have target_true, zsRE
    metrics always, RS when requests have relation prompts, NE when `generation` and the
    requests have generation prompts."""
    result: dict = {"n_requests": len(requests)}
    if all(r.target_true is not None for r in requests):
        result |= summarise_counterfact(
            counterfact_case_metrics(model, tokenizer, requests, batch_size, progress)
        )
    zsre_cases = zsre_case_metrics(model, tokenizer, requests, batch_size, progress)
    result |= summarise_zsre(zsre_cases) | summarise_relation(zsre_cases)
    if generation:
        prompts = [p for r in requests for p in r.generation_prompts]
        if prompts:
            result["NE"] = ngram_entropy(generate_texts(model, tokenizer, prompts))
    return result
