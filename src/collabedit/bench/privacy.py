"""Privacy audit (issue 16): what a curious server learns from the clients' P = R K^T and S = K K^T.

Parts, each on the shipped world and on a GPT-2 with random weights (6 layers x 128, the world's
word-level tokenizer, full attention everywhere, so its keys depend on the context):

* ``dictionary``: the dictionary attack (privacy/attacks.py) on one client's P and S, against
  the number of requests M per client: precision/recall of the edited (subject, relation), of the
  edited subjects, and the share of edits whose new object is guessed exactly.
* ``secagg``: the same attack on sums of g clients' P and S (secure aggregation groups).
* ``inversion``: a GEIA-style decoder applied to K and to S = K K^T (paper Figure 5), with the
  sentence-encoder similarity of recovered and true text, exact subject recovery, baselines.
* ``mitigations`` (world): Gaussian noise on S and P (scale swept) and cover keys (count swept):
  attack numbers against the merged edit's Score.

The shipped world's edited layer sees one token: its keys are a function of the subject's last
token only, which favours the attacker (every relation phrasing of a subject has the same key).

Target vectors z are optimised with fewer steps than the world preset (`z_steps`) to keep the
bench within minutes; Scores are therefore lower than the preset's, alike for every row.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import matplotlib.pyplot as plt
from pydantic import Field

from collabedit.bench.common import BenchConfig, save_figure
from collabedit.bench.lab import Lab, Log, split_evenly
from collabedit.collab import mitigations
from collabedit.collab.protocol import apply_deltas, merge_updates
from collabedit.collab.update import ClientUpdate
from collabedit.evaluate.metrics import (
    counterfact_case_metrics,
    summarise_counterfact,
    summarise_zsre,
    zsre_case_metrics,
)
from collabedit.models import arch
from collabedit.privacy import attacks, inversion
from collabedit.world.edit_requests import world_requests
from collabedit.world.store import WorldBundle


class PrivacyConfig(BenchConfig):
    z_steps: int = Field(40, ge=1, description="optimiser steps for z (world preset: 200)")
    per_client: list[int] = Field([1, 4, 16, 64, 400], description="M swept (world)")
    secagg_groups: list[int] = Field([1, 3, 10], description="clients summed before the server")
    secagg_clients: int = Field(30, ge=1)
    secagg_per_client: int = Field(10, ge=1)
    phrasings: int = Field(1, ge=1, description="world dictionary: phrasings per relation")
    gain_threshold: float = Field(1.0, ge=0, description="nats a probed object must gain")
    inversion_m: list[int] = Field([1, 4, 8, 16, 64], description="M for the attack on S")
    inversion_victims: int = Field(100, ge=1, description="held-out subjects (world)")
    inversion_epochs: int = Field(30, ge=1)
    mitigation_clients: int = Field(5, ge=1)
    mitigation_per_client: int = Field(20, ge=1)
    noise_scales: list[float] = Field(
        [0.0, 1e-6, 1e-5, 1e-4, 1e-3], description="sigma_S in units of A0's mean eigenvalue"
    )
    cover_counts: list[int] = Field([0, 10, 30, 60], description="cover keys per client")
    random_gpt2: bool = Field(True, description="also run on a random-weight GPT-2")
    random_subjects: int = Field(100, ge=10, description="GPT-2 dictionary subjects")
    random_phrasings: int = Field(5, ge=1)
    random_per_client: list[int] = Field([1, 4, 16, 64])
    random_inversion_victims: int = Field(20, ge=1)
    random_inversion_m: list[int] = Field([1, 4, 16])


NOTE_WORLD = (
    "world: the edited layer sees one token, so keys are a function of the subject's last token "
    "only; this favours the attacker"
)


# ---------------------------------------------------------------------------------------------
# shared pieces


class Target:
    """One model under attack: its lab, the attacker's dictionary and the candidates' keys."""

    def __init__(self, name: str, lab: Lab, subjects: list[str], phrasings: int) -> None:
        self.name, self.lab = name, lab
        world = lab.bundle.world
        self.layer = lab.layers[-1]
        self.first_layer = lab.layers[0]
        rel_prompts = {r.id: r.statements for r in world.relations}
        self.objects = {r.id: list(r.objects) for r in world.relations}
        self.candidates = attacks.candidates_from(subjects, rel_prompts, phrasings)
        self.key_fn = attacks.memit_key_fn(lab.model, lab.tok, lab.cfg, [self.first_layer])
        self.keys = attacks.candidate_keys(self.key_fn, self.candidates)[self.first_layer]
        self.a0 = lab.setup.regulariser[self.first_layer].double()
        # the unedited model's log-probabilities of probed (candidate, object) items: they do
        # not depend on the attacked P and S, so every attack on this model shares them
        self.base_cache: dict = {}

    def attack(self, p, s, use_p: bool = True) -> attacks.AttackResult:
        return attacks.dictionary_attack(
            p if use_p else None,
            s,
            self.a0,
            self.candidates,
            self.keys,
            objects=self.objects,
            model=self.lab.model,
            tokenizer=self.lab.tok,
            layer=self.layer,
            base_cache=self.base_cache,
        )


def _truth(requests) -> list[tuple[str, str, str]]:
    return [(r.subject, r.relation_id or "", r.target_new) for r in requests]


def _inputs(session, layers):
    inp = session.inputs(layers)
    return {la: inp[la].keys for la in layers}, {la: inp[la].residuals for la in layers}


def _update(lab: Lab, keys: dict, residuals: dict, idx, client: str) -> ClientUpdate:
    """What client_round sends for CollabEdit (no local delta), built from its slice."""
    idx = list(idx)
    return ClientUpdate.from_keys_residuals(
        {la: k[idx] for la, k in keys.items()},
        {la: r[idx] for la, r in residuals.items()},
        base_fingerprint=arch.fingerprint(lab.model, lab.layers),
        client_id=client,
        round=0,
        editor=lab.setup.editor.name,
    )


def edit_score(lab: Lab, requests, cfg: BenchConfig) -> float | None:
    """`lab.score(requests, cfg.keys)[cfg.score_key]`, computing only the metric family the
    score is made of (CounterFact or zsRE, not both)."""
    if cfg.form == "counterfact":
        cases = counterfact_case_metrics(lab.model, lab.tok, requests)
        return summarise_counterfact(cases)["Score"]
    return summarise_zsre(zsre_case_metrics(lab.model, lab.tok, requests))["zsRE_Score"]


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def _summary(rows: list[dict]) -> dict:
    keys = (
        "subject_precision",
        "subject_recall",
        "pair_precision",
        "pair_recall",
        "object_accuracy",
        "subject_auc",
    )
    return {k: _mean(rows, k) for k in keys} | {"attacked": len(rows)}


def _attack_groups(target: Target, updates, truths, group: int, use_p: bool = True) -> dict:
    """Attack the sums of `group` consecutive clients' updates; mean over groups."""
    rows = []
    layer = target.first_layer
    for start in range(0, len(updates) - group + 1, group):
        ps = [updates[i].layers[layer].p_and_s() for i in range(start, start + group)]
        p = sum(x[0] for x in ps)
        s = sum(x[1] for x in ps)
        truth = [t for i in range(start, start + group) for t in truths[i]]
        res = target.attack(p, s, use_p)
        rows.append(attacks.evaluate_attack(res, truth, target.candidates))
    return _summary(rows)


# ---------------------------------------------------------------------------------------------
# parts


def dictionary_sweep(target: Target, keys, residuals, requests, ms, log: Log) -> list[dict]:
    out = []
    for m in ms:
        if m > len(requests):
            log(f"[privacy] {target.name}: M={m} skipped (only {len(requests)} requests)")
            continue
        n_clients = min(len(requests) // m, 5)
        updates = [
            _update(target.lab, keys, residuals, range(i * m, (i + 1) * m), f"c{i}")
            for i in range(n_clients)
        ]
        truths = [_truth(requests[i * m : (i + 1) * m]) for i in range(n_clients)]
        s_only = _attack_groups(target, updates, truths, 1, use_p=False)
        full = _attack_groups(target, updates, truths, 1)
        row = {"M": m, "clients_attacked": n_clients, "s_only": s_only, "with_p": full}
        out.append(row)
        log(
            f"[privacy] {target.name} M={m}: subject P/R {full['subject_precision']}/"
            f"{full['subject_recall']} (S only {s_only['subject_precision']}/"
            f"{s_only['subject_recall']}), pair P/R {full['pair_precision']}/"
            f"{full['pair_recall']}, new object {full['object_accuracy']}"
        )
    return out


def secagg_sweep(target: Target, keys, residuals, requests, cfg: PrivacyConfig, log) -> list[dict]:
    m = cfg.secagg_per_client
    n = min(cfg.secagg_clients, len(requests) // m)
    updates = [
        _update(target.lab, keys, residuals, range(i * m, (i + 1) * m), f"c{i}") for i in range(n)
    ]
    truths = [_truth(requests[i * m : (i + 1) * m]) for i in range(n)]
    out = []
    for g in cfg.secagg_groups:
        if g > n:
            continue
        row = {"group": g, "M": m, **_attack_groups(target, updates, truths, g)}
        row["owner_anonymity"] = g  # the server sees the union; each edit has g possible owners
        out.append(row)
        log(
            f"[privacy] {target.name} secure aggregation of {g}: pair P/R "
            f"{row['pair_precision']}/{row['pair_recall']}, new object {row['object_accuracy']}"
        )
    return out


def inversion_part(
    target: Target, victims, ms: list[int], epochs: int, seed: int, log: Log
) -> dict:
    """Train on candidates whose subject is not a victim; attack K and S of the victims."""
    t0 = time.perf_counter()
    victim_subjects = {r.subject for r in victims}
    train = [i for i, c in enumerate(target.candidates) if c.subject not in victim_subjects]
    texts = [target.candidates[i].text for i in train]
    inv = inversion.train_inverter(
        target.lab.model,
        target.lab.tok,
        target.a0,
        target.keys[train],
        texts,
        epochs=epochs,
        seed=seed,
    )
    log(
        f"[privacy] {target.name}: inverter trained on {len(train)} texts, "
        f"loss {inv.train_loss:.3f}"
    )
    vkeys = target.key_fn(victims)[target.first_layer]
    true_texts = [r.rewrite_prompt for r in victims]
    rng = random.Random(seed)
    # random-pair baseline: each victim text against another victim's (another subject's) text
    others = [
        true_texts[(i + rng.randrange(1, len(victims))) % len(victims)] for i in range(len(victims))
    ]
    random_pair = inversion.pair_similarity(true_texts, others)

    def recovered(subject: str, outs: list[str]) -> tuple[bool, bool]:
        last = subject.split()[-1]
        return (
            any(subject in o for o in outs),
            any(last in o.split() for o in outs),
        )

    direct = inv.decode(vkeys)
    sim_direct = inversion.pair_similarity(true_texts, direct)
    rec = [recovered(r.subject, [o]) for r, o in zip(victims, direct, strict=True)]
    rows = [
        {
            "input": "K",
            "M": 1,
            "similarity": round(sum(sim_direct) / len(sim_direct), 4),
            "subject_exact": round(sum(a for a, _ in rec) / len(rec), 4),
            "last_name": round(sum(b for _, b in rec) / len(rec), 4),
            "examples": [[t, o] for t, o in list(zip(true_texts, direct, strict=True))[:5]],
        }
    ]
    for m in ms:
        if m > len(victims):
            continue
        sims, subj, last, best_random = [], [], [], []
        for start in range(0, len(victims) - m + 1, m):
            k = vkeys[start : start + m]
            cand = inv.candidates_from_s(k.T @ k)
            outs = inv.decode_whitened(cand)
            truth = true_texts[start : start + m]
            sims += inversion.best_similarity(truth, outs)
            for r in victims[start : start + m]:
                a, b = recovered(r.subject, outs)
                subj.append(a)
                last.append(b)
            # the same max over as many random non-victim texts (a fair baseline for a max)
            pool = rng.sample(texts, min(len(outs), len(texts)))
            best_random += inversion.best_similarity(truth, pool)
        rows.append(
            {
                "input": "S",
                "M": m,
                "similarity": round(sum(sims) / len(sims), 4),
                "best_of_random": round(sum(best_random) / len(best_random), 4),
                "subject_exact": round(sum(subj) / len(subj), 4),
                "last_name": round(sum(last) / len(last), 4),
                "examples": [[true_texts[0], o] for o in outs[:4]] if m == ms[0] else [],
            }
        )
        log(
            f"[privacy] {target.name} inversion from S, M={m}: similarity {rows[-1]['similarity']}"
            f" (random pair {sum(random_pair) / len(random_pair):.3f}), subject exact "
            f"{rows[-1]['subject_exact']}, last name {rows[-1]['last_name']}"
        )
    log(
        f"[privacy] {target.name} inversion from K: similarity {rows[0]['similarity']}, subject "
        f"exact {rows[0]['subject_exact']}, last name {rows[0]['last_name']}"
    )
    return {
        "rows": rows,
        "random_pair": round(sum(random_pair) / len(random_pair), 4),
        "train_texts": len(train),
        "train_loss": round(inv.train_loss, 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def mitigation_part(target: Target, keys, residuals, requests, cfg: PrivacyConfig, log) -> dict:
    lab = target.lab
    m, n = cfg.mitigation_per_client, cfg.mitigation_clients
    edited = requests[: m * n]
    parts = split_evenly(len(edited), n)
    truths = [_truth([edited[i] for i in idx]) for idx in parts]
    base_updates = [_update(lab, keys, residuals, idx, f"c{i}") for i, idx in enumerate(parts)]
    a0 = {la: lab.setup.regulariser[la].double() for la in lab.layers}
    weighted = lab.weighted()

    def score(updates, floor: float = 0.0) -> float:
        deltas = merge_updates(updates, weighted, "collabedit", floor=floor)
        apply_deltas(lab.model, deltas)
        try:
            return edit_score(lab, edited, cfg)
        finally:
            lab.reset()

    # the unmitigated run (noise scale 0, no cover keys) is one merge, one Score, one attack
    plain: dict = {}

    def unmitigated() -> dict:
        if not plain:
            plain["Score"] = score(base_updates)
            plain["s_only"] = _attack_groups(target, base_updates, truths, 1, use_p=False)
            plain["with_p"] = _attack_groups(target, base_updates, truths, 1)
        return plain

    noise_rows = []
    for scale in cfg.noise_scales:
        if scale == 0:
            row = {"scale": 0.0, "sigma_s": 0.0, "floor": 0.0, "Score": unmitigated()["Score"]}
            row |= unmitigated()["with_p"]
            noise_rows.append(row)
            log(f"[privacy] noise scale 0: {cfg.score_key} {row['Score']}")
            continue
        noisy, sig_s = [], 0.0
        for i, (u, idx) in enumerate(zip(base_updates, parts, strict=True)):
            sig = {}
            for la in lab.layers:
                sig[la] = mitigations.relative_sigmas(
                    a0[la], keys[la][list(idx)], residuals[la][list(idx)], scale
                )
            sig_s = sig[lab.layers[0]][0]
            noisy.append(
                mitigations.add_noise(
                    u,
                    {la: v[0] for la, v in sig.items()},
                    {la: v[1] for la, v in sig.items()},
                    seed=cfg.seed * 1000 + i,
                )
            )
        floor = mitigations.noise_floor(sig_s, n, a0[lab.layers[0]].shape[0]) if scale else 0.0
        try:
            sc = score(noisy, floor)
        except ValueError as exc:  # an indefinite A the floor did not catch
            log(f"[privacy] noise {scale:g}: merge failed ({exc})")
            sc = None
        row = {"scale": scale, "sigma_s": sig_s, "floor": floor, "Score": sc}
        row |= _attack_groups(target, noisy, truths, 1)
        noise_rows.append(row)
        log(
            f"[privacy] noise scale {scale:g}: {cfg.score_key} {sc}, subject recall "
            f"{row['subject_recall']}, pair P/R {row['pair_precision']}/{row['pair_recall']}, "
            f"new object {row['object_accuracy']}"
        )

    cover_rows = []
    edited_subjects = {r.subject for r in edited}
    pool = [
        i
        for i, c in enumerate(target.candidates)
        if c.subject not in edited_subjects and c.relation_id == target.candidates[0].relation_id
    ]
    rng = random.Random(cfg.seed + 17)
    rng.shuffle(pool)
    for count in cfg.cover_counts:
        if count * n > len(pool):
            log(f"[privacy] cover {count}: not enough unedited subjects, skipped")
            continue
        if count == 0:
            row = {"cover": 0} | {k: unmitigated()[k] for k in ("Score", "s_only", "with_p")}
        else:
            covered = []
            for i, u in enumerate(base_updates):
                chosen = pool[i * count : (i + 1) * count]
                cover = {la: target.keys[chosen] for la in lab.layers}
                covered.append(mitigations.add_cover_keys(u, cover))
            row = {"cover": count, "Score": score(covered)}
            row["s_only"] = _attack_groups(target, covered, truths, 1, use_p=False)
            row["with_p"] = _attack_groups(target, covered, truths, 1)
        sc = row["Score"]
        cover_rows.append(row)
        log(
            f"[privacy] cover keys {count}/client: {cfg.score_key} {sc}, S-only subject precision "
            f"{row['s_only']['subject_precision']}, with P {row['with_p']['subject_precision']}"
        )
    return {"clients": n, "per_client": m, "noise": noise_rows, "cover": cover_rows}


# ---------------------------------------------------------------------------------------------
# the models


def random_gpt2_lab(world_lab: Lab, seed: int) -> Lab:
    """A GPT-2 with random weights, 6 layers x 128 (MLP 1024), the world's word-level tokenizer,
    edited with the world preset (layer 1). Its keys depend on the context."""
    from collabedit.world.train import TrainConfig, build_model

    tok = world_lab.tok
    model = build_model(TrainConfig(architecture="gpt2", seed=seed), tok).eval()
    model.config.collabedit_presets = {"*": "world"}
    b = world_lab.bundle
    bundle = WorldBundle(b.world, model, tok, {}, Path(f"random-gpt2-seed{seed}"))
    return Lab.open(bundle, editor=world_lab.setup.editor.name)


def _session(lab: Lab, requests, z_steps: int):
    return lab.session(requests, v_num_grad_steps=z_steps)


def run(lab: Lab, cfg: PrivacyConfig, log: Log) -> dict:
    world = lab.bundle.world
    result: dict = {"note": NOTE_WORLD, "timings": {}}
    t0 = time.perf_counter()

    # world: victims for the dictionary / secure aggregation / mitigations; held-out inversion
    # victims are the subjects no request touches (the inverter trains on the rest)
    n_pool = max(
        max(cfg.per_client),
        cfg.secagg_clients * cfg.secagg_per_client,
        cfg.mitigation_clients * cfg.mitigation_per_client,
    )
    n_pool = min(n_pool, len(world.subjects))
    requests = world_requests(world, n_pool, seed=cfg.seed, form=cfg.form)
    target = Target("world", lab, list(world.subjects), cfg.phrasings)
    result["timings"]["candidate_keys"] = round(time.perf_counter() - t0, 1)
    log(f"[privacy] world: {len(target.candidates)} candidates, {n_pool} requests")
    t1 = time.perf_counter()
    session = _session(lab, requests, cfg.z_steps)
    keys, residuals = _inputs(session, lab.layers)
    result["timings"]["z"] = round(time.perf_counter() - t1, 1)

    t1 = time.perf_counter()
    result["dictionary"] = dictionary_sweep(target, keys, residuals, requests, cfg.per_client, log)
    result["secagg"] = secagg_sweep(target, keys, residuals, requests, cfg, log)
    result["timings"]["dictionary"] = round(time.perf_counter() - t1, 1)

    t1 = time.perf_counter()
    result["mitigations"] = mitigation_part(target, keys, residuals, requests, cfg, log)
    result["timings"]["mitigations"] = round(time.perf_counter() - t1, 1)

    # inversion victims: subjects outside the first `inversion_victims`-free pool if possible
    rng = random.Random(cfg.seed + 3)
    held = rng.sample(list(world.subjects), min(cfg.inversion_victims, len(world.subjects) // 2))
    victims = world_requests(world, len(held), seed=cfg.seed + 5, form=cfg.form, subjects=held)
    result["inversion"] = inversion_part(
        target, victims, cfg.inversion_m, cfg.inversion_epochs, cfg.seed, log
    )

    if cfg.random_gpt2:
        t1 = time.perf_counter()
        result["random_gpt2"] = run_random_gpt2(lab, cfg, log)
        result["timings"]["random_gpt2"] = round(time.perf_counter() - t1, 1)
    return result


def run_random_gpt2(world_lab: Lab, cfg: PrivacyConfig, log: Log) -> dict:
    lab = random_gpt2_lab(world_lab, cfg.seed)
    world = lab.bundle.world
    rng = random.Random(cfg.seed + 11)
    subjects = rng.sample(list(world.subjects), cfg.random_subjects)
    target = Target("random-gpt2", lab, subjects, cfg.random_phrasings)
    n_victims = cfg.random_inversion_victims
    dict_subjects = subjects[n_victims:]
    n = min(max(cfg.random_per_client), len(dict_subjects))
    requests = world_requests(world, n, seed=cfg.seed, form=cfg.form, subjects=dict_subjects)
    session = _session(lab, requests, cfg.z_steps)
    keys, residuals = _inputs(session, lab.layers)
    out = {
        "model": "GPT-2, random weights, 6 layers x 128, world word-level tokenizer",
        "candidates": len(target.candidates),
        "dictionary": dictionary_sweep(
            target, keys, residuals, requests, cfg.random_per_client, log
        ),
    }
    # edit quality on this model (one party, all requests): context for the object numbers
    apply_deltas(
        lab.model, merge_updates([_update(lab, keys, residuals, range(n), "all")], lab.weighted())
    )
    out["edit_quality"] = lab.score(requests, cfg.keys)
    lab.reset()
    victims = world_requests(
        world, n_victims, seed=cfg.seed + 5, form=cfg.form, subjects=subjects[:n_victims]
    )
    out["inversion"] = inversion_part(
        target, victims, cfg.random_inversion_m, cfg.inversion_epochs, cfg.seed, log
    )
    return out


# ---------------------------------------------------------------------------------------------
# plot


def plot(result: dict, cfg: PrivacyConfig, path) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    ax = axes[0][0]
    for name, data, style in (
        ("world", result["dictionary"], "-"),
        ("random GPT-2", (result.get("random_gpt2") or {}).get("dictionary", []), ":"),
    ):
        if not data:
            continue
        ms = [r["M"] for r in data]
        ax.plot(
            ms,
            [r["s_only"]["subject_recall"] for r in data],
            "o" + style,
            label=f"{name}: subject recall (S alone)",
        )
        ax.plot(
            ms,
            [r["with_p"]["pair_precision"] or 0 for r in data],
            "s" + style,
            label=f"{name}: (subject, relation) precision",
        )
        ax.plot(
            ms,
            [r["with_p"]["object_accuracy"] for r in data],
            "^" + style,
            label=f"{name}: new object exact",
        )
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("requests per client M")
    ax.set_title("Dictionary attack on one client's P, S")
    ax.legend(fontsize=6)

    ax = axes[0][1]
    rows = result["secagg"]
    gs = [r["group"] for r in rows]
    for key, mk in (
        ("subject_recall", "o"),
        ("pair_precision", "s"),
        ("pair_recall", "d"),
        ("object_accuracy", "^"),
    ):
        ax.plot(gs, [r[key] or 0 for r in rows], mk + "-", label=key)
    ax.plot(gs, [1 / g for g in gs], "k--", lw=0.8, label="P(guess owner) = 1/g")
    ax.set_xscale("log")
    ax.set_xticks(gs, [str(g) for g in gs])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"clients summed by secure aggregation (M={cfg.secagg_per_client} each)")
    ax.set_title("What the union still reveals")
    ax.legend(fontsize=6)

    ax = axes[0][2]
    for name, inv, style in (
        ("world", result["inversion"], "-o"),
        ("random GPT-2", (result.get("random_gpt2") or {}).get("inversion"), ":s"),
    ):
        if not inv:
            continue
        s_rows = [r for r in inv["rows"] if r["input"] == "S"]
        k_row = next(r for r in inv["rows"] if r["input"] == "K")
        line = ax.plot(
            [r["M"] for r in s_rows],
            [r["similarity"] for r in s_rows],
            style,
            label=f"{name}: from S",
        )[0]
        ax.axhline(
            k_row["similarity"], color=line.get_color(), lw=0.8, ls="-.", label=f"{name}: from K"
        )
        ax.axhline(
            inv["random_pair"],
            color=line.get_color(),
            lw=0.8,
            ls="--",
            label=f"{name}: random pair",
        )
        ax.plot(
            [r["M"] for r in s_rows],
            [r["best_of_random"] for r in s_rows],
            style[:-1] + "x",
            alpha=0.5,
            label=f"{name}: best of as many random texts",
        )
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("requests in S (M)")
    ax.set_ylabel("MiniLM cosine, recovered vs true")
    ax.set_title("GEIA-style inversion (paper Fig. 5)")
    ax.legend(fontsize=6)

    mit = result["mitigations"]
    ax = axes[1][0]
    rows = [r for r in mit["noise"] if r["Score"] is not None]
    xs = [max(r["scale"], 1e-7) for r in rows]
    ax.plot(xs, [r["Score"] / 100 for r in rows], "k-o", label=f"{cfg.score_key} / 100")
    for key, mk in (("subject_recall", "s"), ("pair_recall", "d"), ("object_accuracy", "^")):
        ax.plot(xs, [r[key] or 0 for r in rows], mk + "--", label=key)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("noise scale (sigma_S / mean eigenvalue of A0; 1e-7 = none)")
    ax.set_title("Gaussian noise on S and P")
    ax.legend(fontsize=6)

    ax = axes[1][1]
    rows = mit["cover"]
    xs = [r["cover"] for r in rows]
    ax.plot(xs, [r["Score"] / 100 for r in rows], "k-o", label=f"{cfg.score_key} / 100")
    ax.plot(
        xs,
        [r["s_only"]["subject_precision"] or 0 for r in rows],
        "s--",
        label="S-only attacker: subject precision",
    )
    ax.plot(
        xs,
        [r["with_p"]["subject_precision"] or 0 for r in rows],
        "d--",
        label="S+P attacker: subject precision",
    )
    ax.plot(
        xs,
        [r["with_p"]["object_accuracy"] or 0 for r in rows],
        "^--",
        label="S+P attacker: new object exact",
    )
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"cover keys per client ({mit['per_client']} edits each)")
    ax.set_title("Cover keys (zero residual)")
    ax.legend(fontsize=6)

    ax = axes[1][2]
    pts = [
        (r["Score"], r["subject_recall"] or 0, f"noise {r['scale']:g}")
        for r in mit["noise"]
        if r["Score"] is not None
    ]
    pts += [
        (r["Score"], r["with_p"]["subject_recall"] or 0, f"cover {r['cover']}")
        for r in mit["cover"]
    ]
    for sc, pr, label in pts:
        ax.plot(sc, pr, "o")
        ax.annotate(label, (sc, pr), fontsize=6)
    ax.set_xlabel(cfg.score_key)
    ax.set_ylabel("attacker's edited-subject recall")
    ax.set_title("Trade-off: privacy vs edit quality")
    fig.suptitle("Privacy audit (world keys see one token: favours the attacker)", fontsize=10)
    save_figure(fig, path)
