"""Table 5 of the paper: do edits of early rounds survive later rounds?

Each round, clients edit new requests on the current global model and the server merges with
CollabEdit. With an immutable covariance (lambda C_0) later rounds may overwrite earlier edits; the
dynamic covariance lambda C_0 + beta1 * sum of earlier rounds' S (K K^T) protects the keys already
written. Reported: the first round's edits after every round, and all edits at the end, against a
single Global-Edit of everything as the reference.

Besides the (coarse) success rates, two continuous measures of the first round's edits:

* ``first_round_margin``: mean log p(new object) - log p(true object) on their edit prompts;
* ``first_round_drift``: how far later rounds moved the outputs at the first round's keys,
  ||(sum of later deltas) K_1^T|| / ||Delta_1 K_1^T||. The dynamic covariance adds beta1 K_1 K_1^T
  to the regulariser, i.e. penalises exactly this quantity, so in round 2 (same targets in both
  modes) it can only be smaller than with the immutable covariance.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from pydantic import Field

from collabedit.bench.common import BenchConfig, save_figure
from collabedit.bench.lab import Lab, Log
from collabedit.collab.protocol import apply_deltas
from collabedit.editors.base import EditSession
from collabedit.evaluate.scoring import score_targets
from collabedit.models import arch


class ForgettingConfig(BenchConfig):
    rounds: int = Field(5, ge=2)
    edits_per_round: int = Field(40, ge=1)
    clients: int = Field(5, ge=1)
    beta1: float = Field(1.0, gt=0, description="weight of earlier rounds' S in the dynamic C")


def _margin(lab: Lab, requests) -> float:
    """Mean log p(new) - log p(true) on the requests' edit prompts."""
    pairs = [(r.rewrite_prompt, t) for r in requests for t in (r.target_new, r.target_true)]
    lp = torch.tensor([s.mean_logprob for s in score_targets(lab.model, lab.tok, pairs)])
    return float((lp[0::2] - lp[1::2]).double().mean())


def _moved(deltas: dict, keys: dict) -> float:
    """||Delta K^T||_F over all layers."""
    return sum(float((deltas[layer] @ keys[layer].T).norm() ** 2) for layer in keys) ** 0.5


def _rounds(
    lab: Lab,
    cfg: ForgettingConfig,
    beta1: float,
    chunks,
    log: Log,
    known: dict[tuple[int, str], EditSession],
) -> list[dict]:
    """The rounds in one covariance mode. `known`: the sessions computed so far, by round and
    fingerprint of the edited weights the round starts from; a round that starts from the same
    weights in another mode has the same z, the costly part, and reuses them. Round 1 always
    does (the base model); so does round 2, since both modes solve round 1 alike."""
    lab.reset()
    sum_s: dict = {}
    rows = []
    keys1: dict = {}
    first_delta: dict = {}
    later: dict = {}
    for t, requests in enumerate(chunks):
        start = (t, arch.fingerprint(lab.model, lab.layers))
        if start not in known:
            known[start] = lab.session(requests)  # on the global model of this round
        session = known[start]
        updates = lab.client_updates(session, min(cfg.clients, len(requests)), round=t)
        deltas = lab.merge(updates, "collabedit", lab.weighted(sum_s, beta1))
        if t == 0:
            keys1 = {k: v.keys.double() for k, v in session.inputs(lab.layers).items()}
            first_delta = {k: d.double() for k, d in deltas.items()}
        else:
            later = {k: later.get(k, 0) + d.double() for k, d in deltas.items()}
        apply_deltas(lab.model, deltas)
        for layer in lab.layers:
            s = sum(u.layers[layer].S.double() for u in updates)
            sum_s[layer] = sum_s[layer] + s if layer in sum_s else s
        first = lab.score(chunks[0], cfg.keys)
        so_far = lab.score([r for c in chunks[: t + 1] for r in c], cfg.keys)
        drift = _moved(later, keys1) / _moved(first_delta, keys1) if later else 0.0
        rows.append(
            {
                "round": t + 1,
                "first_round": first,
                "all_so_far": so_far,
                "first_round_margin": _margin(lab, chunks[0]),
                "first_round_drift": drift,
            }
        )
        log(
            f"[forgetting] beta1={beta1:g} round {t + 1}: first-round edits "
            f"{cfg.score_key} {first[cfg.score_key]:.1f} "
            f"(margin {rows[-1]['first_round_margin']:.3f} nats, drift {drift:.3g}), "
            f"all so far {so_far[cfg.score_key]:.1f}"
        )
    lab.reset()
    return rows


def run(lab: Lab, cfg: ForgettingConfig, log: Log) -> dict:
    n = cfg.rounds * cfg.edits_per_round
    requests = lab.requests(n, seed=cfg.seed, form=cfg.form)
    chunks = [requests[i : i + cfg.edits_per_round] for i in range(0, n, cfg.edits_per_round)]
    known: dict[tuple[int, str], EditSession] = {}
    immutable = _rounds(lab, cfg, 0.0, chunks, log, known)
    dynamic = _rounds(lab, cfg, cfg.beta1, chunks, log, known)
    result = {"immutable": immutable, "dynamic": dynamic}
    log("[forgetting] reference: one Global-Edit of all requests")
    result["global_all_at_once"] = lab.compare(requests, 1, ["global"], cfg.keys)["global"]
    return result


def plot(result: dict, cfg: ForgettingConfig, path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    key = cfg.score_key
    for mode, style in (("immutable", "--s"), ("dynamic", "-o")):
        rows = result[mode]
        ax.plot(
            [r["round"] for r in rows],
            [r["first_round"][key] for r in rows],
            style,
            label=f"round-1 edits, {mode} C",
        )
        ax.plot(
            [r["round"] for r in rows],
            [r["all_so_far"][key] for r in rows],
            style,
            alpha=0.4,
            label=f"all edits so far, {mode} C",
        )
    ax.axhline(
        result["global_all_at_once"][key], color="gray", lw=0.8, label="Global-Edit of all, at once"
    )
    ax.set_ylim(0, 101)
    ax.set_xticks([r["round"] for r in result["immutable"]])
    ax.set_xlabel(f"round ({cfg.edits_per_round} new edits per round)")
    ax.set_ylabel(key)
    ax.set_title("Forgetting across rounds (paper Table 5)")
    ax.legend(fontsize=7)
    save_figure(fig, path)
