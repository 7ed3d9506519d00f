"""How a world measures up as a testbed for editing (issue 17's targets).

* keys: is the input of an edited layer's MLP projection at the subject's last token contextual?
  Relative change under context prefixes (the world's lead-in sentences) for a prompt that opens
  with the subject and one that names it late, and between two subjects sharing a last name;
* covariance: eigenvalues of each edited layer's regulariser above 1e-6 / 1e-10 of the largest;
* trace: the causal trace at the subject's last token (hidden state and MLP output per layer);
* edits: MEMIT's Global-Edit of n CounterFact-form requests with the sequential and the frozen
  editor: ES / PS / NS / Score / RS, ||Delta||_F / ||W||_F per layer, and how far apart the two
  editors' deltas are.

`collabedit world measure` runs it and writes `measurements.json` into the world folder, which
`collabedit world info` shows.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence

import torch

from collabedit.bench.lab import CF_KEYS, Lab, Log
from collabedit.collab.protocol import apply_deltas
from collabedit.models import arch
from collabedit.models.tracing import capture_mlp_inputs, pad_batch, subject_last_index
from collabedit.world.generator import FILLERS
from collabedit.world.store import WorldBundle
from collabedit.world.train import subject_trace

MEASUREMENTS_FILE = "measurements.json"


@torch.no_grad()
def keys_at_subject(
    bundle: WorldBundle, pairs: Sequence[tuple[str, str]], layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """Keys (float64) at the subject's last token of each (template, subject)."""
    tok = bundle.tokenizer
    rows = [tok(t.format(s), add_special_tokens=False)["input_ids"] for t, s in pairs]
    index = torch.tensor([subject_last_index(tok, t, s) for t, s in pairs])
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(rows), 256):
        ids, mask = pad_batch(rows[start : start + 256], tok.pad_token_id)
        with capture_mlp_inputs(bundle.model, layers) as keys:
            bundle.model(input_ids=ids, attention_mask=mask)
        sel = index[start : start + 256]
        for layer in layers:
            out[layer].append(keys[layer][torch.arange(len(sel)), sel].double())
    return {layer: torch.cat(v) for layer, v in out.items()}


def _relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=-1) / ((a.norm(dim=-1) + b.norm(dim=-1)) / 2)


def key_contextuality(
    bundle: WorldBundle, layers: Sequence[int], n_subjects: int = 60, seed: int = 0
) -> dict[str, dict[str, float]]:
    world = bundle.world
    rng = random.Random(seed)
    subjects = rng.sample(world.subjects, min(n_subjects, len(world.subjects)))
    rel = world.relations[0]
    early = next(t for t in rel.statements if t.startswith("{}"))
    late = next(t for t in rel.statements if not t.startswith("{}"))
    out: dict[str, dict[str, float]] = {f"layer{layer}": {} for layer in layers}
    for name, prompt in (("prefix_subject_first", early), ("prefix_subject_late", late)):
        bare = keys_at_subject(bundle, [(prompt, s) for s in subjects], layers)
        lead = [(f"{rng.choice(FILLERS)} {prompt}", s) for s in subjects]
        led = keys_at_subject(bundle, lead, layers)
        for layer in layers:
            out[f"layer{layer}"][name] = float(_relative(led[layer], bare[layer]).mean())
    by_last: dict[str, list[str]] = {}
    for s in world.subjects:
        by_last.setdefault(s.split()[-1], []).append(s)
    shared = [names[:2] for names in by_last.values() if len(names) > 1][:n_subjects]
    if shared:
        a = keys_at_subject(bundle, [(early, p[0]) for p in shared], layers)
        b = keys_at_subject(bundle, [(early, p[1]) for p in shared], layers)
        for layer in layers:
            diff = _relative(a[layer], b[layer])
            out[f"layer{layer}"]["shared_last_name"] = float(diff.mean())
            out[f"layer{layer}"]["shared_last_name_min"] = float(diff.min())
    return out


def covariance_rank(regulariser: dict[int, torch.Tensor]) -> dict[str, dict[str, float]]:
    out = {}
    for layer, a0 in regulariser.items():
        eig = torch.linalg.eigvalsh(a0.double())
        top = float(eig.max())
        out[f"layer{layer}"] = {
            "width": int(eig.numel()),
            "eig_above_1e-6": int((eig > 1e-6 * top).sum()),
            "eig_above_1e-10": int((eig > 1e-10 * top).sum()),
        }
    return out


def output_change(delta: torch.Tensor, weight: torch.Tensor, second_moment: torch.Tensor) -> float:
    """||Delta k|| against ||W k|| in root mean square over the corpus keys k, whose second
    moment E[k k^T] is `second_moment` (any positive multiple of it gives the same ratio):
    sqrt(tr(Delta C Delta^T) / tr(W C W^T)). Unlike ||Delta||_F / ||W||_F it does not count
    weight placed on directions the corpus never uses (near-dead units), which cost the model
    nothing and can dominate the Frobenius norm. `delta`, `weight`: (d_out, d_in)."""
    c = second_moment.double()

    def size(m: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oi,ij,oj->", m.double(), c, m.double())

    return float((size(delta) / size(weight)).sqrt())


def low_variance_share(
    delta: torch.Tensor, second_moment: torch.Tensor, share: float = 0.01
) -> float:
    """Share of ||Delta||_F^2 in the ceil(share * d_in) directions of least corpus variance
    (eigenvectors of E[k k^T]): near 1 when the update's size is weight on near-dead units."""
    _, vectors = torch.linalg.eigh(second_moment.double())  # ascending eigenvalues
    energy = (delta.double() @ vectors).pow(2).sum(0)
    k = math.ceil(share * len(energy))
    return float(energy[:k].sum() / energy.sum())


def score_global_edit(lab: Lab, deltas: dict[int, torch.Tensor], requests) -> dict:
    """The lab's model scored (CounterFact keys and RS) with `deltas` applied, then the update's
    size per layer against the weight it changes: ||Delta||_F / ||W||_F, output_change and
    low_variance_share. The model is back to its base afterwards."""
    weights = {layer: arch.read_weight(lab.model, layer) for layer in deltas}
    apply_deltas(lab.model, deltas)
    try:
        scores = lab.score(requests, CF_KEYS)
    finally:
        lab.reset()
    a0 = lab.setup.regulariser
    return scores | {
        "delta_over_W": {
            str(la): float(d.double().norm() / weights[la].double().norm())
            for la, d in deltas.items()
        },
        "output_change": {
            str(la): output_change(d, weights[la], a0[la]) for la, d in deltas.items()
        },
        "low_variance_share": {str(la): low_variance_share(d, a0[la]) for la, d in deltas.items()},
    }


def edit_measurements(seq: Lab, frozen: Lab, n: int, seed: int = 0, log: Log = print) -> dict:
    """Global-Edit of `n` requests by the sequential and the frozen MEMIT (`seq`, `frozen`: labs
    of one world with those editors) from the same z."""
    requests = seq.requests(n, seed=seed)
    start = time.perf_counter()
    sessions = {"memit": seq.session(requests)}
    sessions["memit-frozen"] = frozen.setup.editor.session(
        frozen.model, frozen.tok, requests, frozen.cfg, reuse=sessions["memit"]
    )
    out: dict = {"n": n, "layers": seq.layers, "editor_config": seq.cfg.model_dump()}
    deltas = {}
    for name, lab in (("memit", seq), ("memit-frozen", frozen)):
        deltas[name] = lab.global_deltas(sessions[name])
        out[name] = score_global_edit(lab, deltas[name], requests)
        scores = {k: out[name][k] for k in CF_KEYS if k in out[name]}
        log(f"[{n} edits] {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in scores.items()))
    out["sequential_vs_frozen"] = {
        str(layer): float(
            (deltas["memit"][layer] - deltas["memit-frozen"][layer]).double().norm()
            / deltas["memit"][layer].double().norm()
        )
        for layer in seq.layers
    }
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def measure_world(
    bundle: WorldBundle,
    sizes: Sequence[int] = (100,),
    seed: int = 0,
    log: Log = print,
    trace_facts: int = 40,
    layers: Sequence[int] | None = None,
    settings: dict | None = None,
) -> dict:
    """Keys, covariance rank, causal trace and MEMIT at each of `sizes` on `bundle`, with the
    world's preset, or `layers` / `settings` (MEMIT config fields) over it to try others."""
    lab, frozen = (
        Lab.open(bundle, editor=name, layers=layers, settings=settings)
        for name in ("memit", "memit-frozen")
    )
    layers = lab.layers
    result: dict = {"layers": layers, "recall": bundle.build.get("recall")}
    result["keys"] = key_contextuality(bundle, layers, seed=seed)
    log("[keys] " + str(result["keys"]))
    result["covariance"] = covariance_rank(lab.setup.regulariser)
    result["trace"] = subject_trace(bundle.model, bundle.tokenizer, bundle.world, trace_facts)
    for part in ("hidden", "mlp"):
        log(f"[trace] {part} " + ", ".join(f"{v:.3f}" for v in result["trace"][part]))
    result["edits"] = []
    for n in sizes:
        if n > len(lab.eval_subjects()):
            log(f"[{n} edits] skipped: the world has {len(lab.eval_subjects())} subjects")
            continue
        result["edits"].append(edit_measurements(lab, frozen, n, seed, log))
    return result


def merge_measurements(old: dict | None, new: dict) -> dict:
    """`new` with the batch sizes `old` measured and `new` did not: a later `world measure
    --edits 1000` adds to an earlier `--edits 100` instead of dropping it. `old` is ignored when
    it measured other layers (a changed preset)."""
    if not isinstance(old, dict) or old.get("layers") != new["layers"]:
        return new
    sizes = {e["n"] for e in new["edits"]}
    earlier = old.get("edits")
    kept = [
        e
        for e in (earlier if isinstance(earlier, list) else [])
        if isinstance(e, dict) and isinstance(e.get("n"), int) and e["n"] not in sizes
    ]
    return new | {"edits": sorted(kept + new["edits"], key=lambda e: e["n"])}
