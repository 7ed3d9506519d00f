"""Measure a world against issue 17's targets: keys, covariance, MEMIT edits, relation specificity.

    python benchmarks/world_probe.py --world results/world17/probe-a --layers 0 1 2 --n 50 \
        --lams 1000 10000 --json results/world17/probe-a.json

What it measures (one thread; every number on the world folder given, default the shipped one):

* recall over every fact and phrasing (bare and behind a filler), as `world info`;
* causal trace at the subject's last token (hidden state and MLP output per layer);
* key contextuality at each edited layer (the input of the MLP's output projection at the
  subject's last token): `prefix` = mean ||k(prefix + prompt) - k(prompt)|| / ||k(prompt)|| over
  MEMIT's generated context prefixes; `phrasing` = the same between two phrasings of one relation;
  `shared_last_name` = ||k(s1) - k(s2)|| / mean norm for subjects sharing a last name, in the
  same prompt (`other_last_name` for subjects that do not, for scale);
* key covariance C = E[k k^T] over the world's corpus (corpus.txt when the folder has one, else
  the fact sentences): eigenvalues above 1e-6 / 1e-10 of the largest and the condition number;
* MEMIT edits of `--n` requests (z optimised once, then each editor and lambda): ES/PS/NS and
  zsRE-like accuracies from `evaluate_requests`, ||Delta||_F against ||W||_F per layer, the
  relative difference between the sequential and frozen editors' deltas, and relation
  specificity: of each edited subject's other relations, in every statement phrasing, the share
  of prompts whose answer (all tokens argmax) is the same as before the edit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path

import torch

from collabedit.editors.memit import MemitConfig
from collabedit.editors.memit import edit as memit_edit
from collabedit.editors.memit.compute import context_templates
from collabedit.evaluate.metrics import evaluate_requests
from collabedit.evaluate.scoring import score_targets
from collabedit.evaluate.trace import average_trace
from collabedit.models import arch
from collabedit.models.tracing import (
    capture_mlp_inputs,
    pad_batch,
    subject_last_index,
)
from collabedit.stats import layer_stats
from collabedit.world.edit_requests import world_requests
from collabedit.world.store import load_world
from collabedit.world.train import measure_recall


@torch.no_grad()
def keys_at_subject(model, tok, texts_subjects, layers):
    """Keys (float64) at the subject's last token for (template, subject) pairs."""
    rows = [tok(t.format(s), add_special_tokens=False)["input_ids"] for t, s in texts_subjects]
    idx = torch.tensor([subject_last_index(tok, t, s) for t, s in texts_subjects])
    out = {layer: [] for layer in layers}
    for start in range(0, len(rows), 512):
        ids, mask = pad_batch(rows[start : start + 512], tok.pad_token_id)
        with capture_mlp_inputs(model, layers) as keys:
            model(input_ids=ids, attention_mask=mask)
        sel = idx[start : start + 512]
        for layer in layers:
            out[layer].append(keys[layer][torch.arange(len(sel)), sel].double())
    return {layer: torch.cat(v) for layer, v in out.items()}


def last_name(subject: str) -> str:
    return subject.split()[-1]


def contextuality(b, layers, templates, n_subjects=60, seed=0):
    world, model, tok = b.world, b.model, b.tokenizer
    rng = random.Random(seed)
    subjects = rng.sample(world.subjects, min(n_subjects, len(world.subjects)))
    rel = world.relation("P19")
    prefixed = [c for group in templates[1:] for c in group]
    res = {}
    # prefixes: subject-first phrasing ({} was born in) and subject-late phrasing
    for name, prompt in (("subject_first", rel.statements[0]), ("subject_late", rel.statements[1])):
        pairs = [(prompt, s) for s in subjects]
        pairs += [(c.replace("{}", prompt), s) for s in subjects for c in prefixed]
        k = keys_at_subject(model, tok, pairs, layers)
        for layer in layers:
            bare = k[layer][: len(subjects)]
            ctx = k[layer][len(subjects) :].view(len(subjects), len(prefixed), -1)
            rel_diff = (ctx - bare[:, None]).norm(dim=-1) / bare.norm(dim=-1)[:, None]
            res.setdefault(f"layer{layer}", {})[f"prefix_{name}"] = float(rel_diff.mean())
    # two phrasings of one relation
    pairs = [(rel.statements[0], s) for s in subjects] + [(rel.statements[2], s) for s in subjects]
    k = keys_at_subject(model, tok, pairs, layers)
    for layer in layers:
        a, c = k[layer][: len(subjects)], k[layer][len(subjects) :]
        res[f"layer{layer}"]["phrasing"] = float(((a - c).norm(dim=-1) / a.norm(dim=-1)).mean())
    # subjects sharing a last name, same prompt
    by_last: dict[str, list[str]] = {}
    for s in world.subjects:
        by_last.setdefault(last_name(s), []).append(s)
    shared = [tuple(v[:2]) for v in by_last.values() if len(v) >= 2]
    rng.shuffle(shared)
    shared = shared[:60]
    others = [tuple(rng.sample(world.subjects, 2)) for _ in range(60)]
    others = [p for p in others if last_name(p[0]) != last_name(p[1])]
    for tag, plist in (("shared_last_name", shared), ("other_last_name", others)):
        if not plist:
            continue
        pairs = [(rel.statements[0], p[0]) for p in plist] + [
            (rel.statements[0], p[1]) for p in plist
        ]
        k = keys_at_subject(model, tok, pairs, layers)
        for layer in layers:
            a, c = k[layer][: len(plist)], k[layer][len(plist) :]
            mean_norm = (a.norm(dim=-1) + c.norm(dim=-1)) / 2
            res[f"layer{layer}"][tag] = float(((a - c).norm(dim=-1) / mean_norm).mean())
            if tag == "shared_last_name":
                res[f"layer{layer}"]["shared_last_name_min"] = float(
                    ((a - c).norm(dim=-1) / mean_norm).min()
                )
    res["n_shared_pairs"] = len(shared)
    return res


def conditioning(stats):
    out = {}
    for layer, st in stats.items():
        w = torch.linalg.eigvalsh(st.mom2.double())
        top = float(w.max())
        out[f"layer{layer}"] = {
            "width": int(w.numel()),
            "eig_above_1e-6": int((w > 1e-6 * top).sum()),
            "eig_above_1e-10": int((w > 1e-10 * top).sum()),
            "eig_min_over_max": float(w.min() / top),
            "tokens": st.count,
        }
    return out


def relation_prompts(world, req):
    """(prompt, expected) for every statement phrasing of the subject's other relations."""
    out = []
    for rel in world.relations:
        if rel.id == req.relation_id:
            continue
        for t in rel.statements:
            out.append((t.format(req.subject), world.facts[req.subject][rel.id]))
    return out


def answers_correct(model, tok, pairs):
    return [s.all_correct for s in score_targets(model, tok, pairs, batch_size=512)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=Path, default=None)
    p.add_argument("--layers", type=int, nargs="+", default=[1])
    p.add_argument("--n", type=int, default=50, help="edit requests (distinct subjects)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lams", type=float, nargs="+", default=[1000.0])
    p.add_argument("--editors", nargs="+", default=["memit", "memit-frozen"])
    p.add_argument("--z-steps", type=int, default=25)
    p.add_argument("--z-lr", type=float, default=0.5)
    p.add_argument("--clamp", type=float, default=0.75)
    p.add_argument("--stats-samples", type=int, default=20000)
    p.add_argument("--trace-facts", type=int, default=40)
    p.add_argument("--skip-recall", action="store_true")
    p.add_argument("--stats-cache", type=Path, default=Path("results/world17/stats-cache"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    b = load_world(args.world)
    model, tok, world = b.model, b.tokenizer, b.world
    layers = args.layers
    result: dict = {"world": str(b.path), "layers": layers, "args": vars(args) | {}}
    result["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if not args.skip_recall:
        r = measure_recall(model, tok, world)
        result["recall"] = {"recall": r["recall"], "min_phrasing": r["min_phrasing_recall"]}
        print("recall", result["recall"], flush=True)
    rng = random.Random(1)
    facts = []
    for s in rng.sample(world.subjects, min(args.trace_facts, len(world.subjects))):
        rel = rng.choice(world.relations)
        facts.append((rng.choice(rel.statements), s, world.facts[s][rel.id]))
    tr = average_trace(model, tok, facts, samples=5)
    result["trace"] = {k: tr[k] for k in ("hidden", "mlp", "clean", "corrupted")}
    print("trace", json.dumps(result["trace"]), flush=True)
    corpus_file = Path(b.path) / "corpus.txt"
    corpus = str(corpus_file) if corpus_file.is_file() else "world"
    cfg = MemitConfig(
        layers=layers,
        mom2_dataset=corpus,
        mom2_n_samples=args.stats_samples,
        v_num_grad_steps=args.z_steps,
        v_lr=args.z_lr,
        clamp_norm_factor=args.clamp,
        mom2_update_weight=args.lams[0],
    )
    templates = context_templates(model, tok, cfg)
    result["context_templates"] = templates
    result["keys"] = contextuality(b, layers, templates)
    print("keys", json.dumps(result["keys"]), flush=True)
    stats = layer_stats(model, tok, layers, corpus, args.stats_samples, cache_dir=args.stats_cache)
    result["covariance"] = conditioning(stats)
    print("cov", json.dumps(result["covariance"]), flush=True)
    covs = {layer: st.mom2 for layer, st in stats.items()}
    # hidden-state norm at the z layer, subject's last token, bare prompts
    reqs = world_requests(world, args.n, seed=args.seed)
    rel_pairs = [relation_prompts(world, r) for r in reqs]
    flat = [x for ps in rel_pairs for x in ps]
    before = answers_correct(model, tok, flat)
    t1 = time.perf_counter()
    base = memit_edit(model, tok, reqs, cfg, covs, frozen=True, apply=False)
    z = getattr(base, "z", None) or base.session.z  # refactor moved z into the session
    result["z"] = {
        "seconds": time.perf_counter() - t1,
        "final_loss_mean": float(z.final_loss.mean()),
        "final_loss_above_0.5": int((z.final_loss > 0.5).sum()),
        "relative_residual_mean": float(z.relative_residuals.mean()),
        "h_norm_mean": float(z.z_init.norm(dim=1).mean()),
        "steps_mean": float(z.steps_taken.float().mean()),
    }
    print("z", json.dumps(result["z"]), flush=True)
    w_norm = {layer: float(arch.read_weight(model, layer).double().norm()) for layer in layers}
    result["W_norm"] = w_norm
    runs = []
    for lam, editor in itertools.product(args.lams, args.editors):
        c = cfg.model_copy(update={"mom2_update_weight": lam})
        originals = {layer: arch.read_weight(model, layer) for layer in layers}
        res = memit_edit(model, tok, reqs, c, covs, frozen=editor == "memit-frozen", z=z)
        m = evaluate_requests(model, tok, reqs)
        after = answers_correct(model, tok, flat)
        kept = sum(a and bb for a, bb in zip(after, before, strict=True))
        run = {
            "lambda": lam,
            "editor": editor,
            "metrics": {k: v for k, v in m.items() if isinstance(v, (int, float))},
            "delta_norm": {e.layer: float(e.delta.norm()) for e in res.layers},
            "delta_over_W": {e.layer: float(e.delta.norm()) / w_norm[e.layer] for e in res.layers},
            "unmet": {e.layer: float(e.unmet.mean()) for e in res.layers},
            "relation_specificity": kept / max(1, sum(before)),
            "deltas": {e.layer: e.delta for e in res.layers},
        }
        for layer, w in originals.items():
            arch.write_weight(model, layer, w)
        runs.append(run)
        print(
            json.dumps({k: v for k, v in run.items() if k != "deltas"}, default=float), flush=True
        )
    # sequential vs frozen deltas
    for lam in args.lams:
        pair = [r for r in runs if r["lambda"] == lam]
        if len(pair) == 2:
            a, c = pair[0]["deltas"], pair[1]["deltas"]
            pair[0]["seq_vs_frozen_rel"] = {
                layer: float((a[layer] - c[layer]).norm() / a[layer].norm()) for layer in a
            }
            print("seq vs frozen", lam, pair[0]["seq_vs_frozen_rel"], flush=True)
    for r in runs:
        r.pop("deltas")
    result["runs"] = runs
    result["relation_prompts_correct_before"] = sum(before) / len(before)
    result["seconds"] = time.perf_counter() - t0
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print("seconds", result["seconds"])


if __name__ == "__main__":
    main()
