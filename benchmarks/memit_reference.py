"""Throughput of our batched MEMIT against a faithful one-request-at-a-time reference, one run.

    OMP_NUM_THREADS=1 python benchmarks/memit_reference.py --gpt2-n 30 300 --world-n 100 \
        --json results/speed/memit_reference.json

The reference is MEMIT's own loop (Meng et al. 2023, `memit/compute_z.py` and
`memit/memit_main.py`): for each request in turn, its rewrite prompts (every context template
with the prompt and the target's tokens but the last) and its KL prompt go through the whole
model together, with the block-L output shifted by delta at each prompt's subject position;
logits for every position; the loss is the mean NLL of the target tokens over the rewrite
prompts + kl_factor * KL(current || initial) on the KL prompt + v_weight_decay *
||delta|| / ||z0||^2; Adam, stop below `early_stop_loss`, clamp ||delta|| to clamp_norm_factor *
||z0||. No batching across requests, no caching. Then the same closed-form update as ours (keys
of all requests, the residual spread over the layers, `Delta = R K^T (lambda C + K K^T)^-1`,
layers written one after another). Deviation from MEMIT's code: the rewrite prompts are built
from token ids (prompt + target[:-1]) rather than decoded text, so both sides see the same tokens.

Compared in the same process, on the same model, requests, context templates and covariance:
  reference   the loop above, then the update (`edit(..., z=reference z)`)
  full        our batched editor, the full forward at every z step (`optimise_z(fast=False)`)
  collabedit  our batched editor as shipped (`optimise_z(fast=True)`: only the blocks above
              the z layer, only from the subject on, at each step)
Covariance statistics are collected once, outside the timings (identical for all three).

Setups: (a) GPT-2, 6 layers x 128, random weights (seed 0), the world's word-level tokenizer and
requests, edited layers 2-4, MEMIT's published z settings (20 steps, lr 0.5, clamp 0.75, KL
0.0625, weight decay 0.5); (b) the shipped world model with its preset (200 steps, lr 5).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerBase

from collabedit.editors.memit import MemitConfig, edit, preset
from collabedit.editors.memit.compute import ZResult, context_templates, optimise_z
from collabedit.models import arch
from collabedit.models.tracing import encode_pair, pad_batch, subject_last_index
from collabedit.requests import EditRequest
from collabedit.stats import collect_stats, iter_corpus
from collabedit.world.edit_requests import world_requests
from collabedit.world.store import load_world


def reference_z_one(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    req: EditRequest,
    layer: int,
    templates: list[list[str]],
    cfg: MemitConfig,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """MEMIT's compute_z for one request: (z, z_init, optimiser steps taken)."""
    prompts, targets, lookups = [], [], []
    target_ids: list[int] = []
    for context in [c for group in templates for c in group]:
        template = context.replace("{}", req.prompt)
        prompt_ids, target_ids = encode_pair(tok, template.format(req.subject), req.target_new)
        prompts.append(prompt_ids + target_ids[:-1])
        targets.append(target_ids)
        lookups.append(subject_last_index(tok, template, req.subject))
    n_rewrite = len(prompts)
    prompts.append(tok(cfg.kl_prompt.format(req.subject), add_special_tokens=False)["input_ids"])
    lookups.append(subject_last_index(tok, cfg.kl_prompt, req.subject))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = next(model.parameters()).device
    ids, mask = pad_batch(prompts, pad)
    ids, mask = ids.to(device), mask.to(device)
    rewriting_targets = torch.full((n_rewrite, ids.shape[1]), -100, dtype=torch.long)
    for i in range(n_rewrite):
        ex_len = int(mask[i].sum())
        rewriting_targets[i, ex_len - len(target_ids) : ex_len] = torch.tensor(targets[i])
    rewriting_targets = rewriting_targets.to(device)
    d = getattr(model.config, arch.arch_of(model).hidden_size_attr)
    delta = torch.zeros(d, requires_grad=True, device=device)
    target_init: torch.Tensor | None = None
    kl_init: torch.Tensor | None = None

    def edit_output_fn(module, args, output):
        nonlocal target_init
        h = output[0] if isinstance(output, tuple) else output
        if target_init is None:
            target_init = h[0, lookups[0]].detach().clone()
        h = h.clone()
        for i, idx in enumerate(lookups):
            h[i, idx, :] = h[i, idx, :] + delta
        return (h, *output[1:]) if isinstance(output, tuple) else h

    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    steps = 0
    handle = arch.block(model, layer).register_forward_hook(edit_output_fn)
    try:
        for it in range(cfg.v_num_grad_steps):
            opt.zero_grad()
            logits = model(input_ids=ids, attention_mask=mask).logits
            kl_log_probs = torch.log_softmax(logits[n_rewrite, lookups[n_rewrite]][None], dim=1)
            if kl_init is None:
                kl_init = kl_log_probs.detach().clone()
            log_probs = torch.log_softmax(logits[:n_rewrite], dim=2)
            loss = torch.gather(
                log_probs,
                2,
                torch.where(rewriting_targets != -100, rewriting_targets, 0)[..., None],
            ).squeeze(2)
            loss_mask = (rewriting_targets != -100).float()
            nll_loss = (-(loss * loss_mask).sum(1) / len(target_ids)).mean()
            kl_loss = cfg.kl_factor * torch.nn.functional.kl_div(
                kl_init, kl_log_probs, log_target=True, reduction="batchmean"
            )
            weight_decay = cfg.v_weight_decay * (torch.norm(delta) / torch.norm(target_init) ** 2)
            total = nll_loss + kl_loss + weight_decay
            if total < cfg.early_stop_loss or it == cfg.v_num_grad_steps - 1:
                break
            total.backward()
            opt.step()
            steps += 1
            max_norm = cfg.clamp_norm_factor * target_init.norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta[...] = delta * max_norm / delta.norm()
    finally:
        handle.remove()
    assert target_init is not None
    return (target_init + delta).detach(), target_init, steps


def reference_z(model, tok, requests, layer, templates, cfg) -> ZResult:
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        out = [reference_z_one(model, tok, r, layer, templates, cfg) for r in requests]
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    z = torch.stack([o[0] for o in out]).double().cpu()
    z_init = torch.stack([o[1] for o in out]).double().cpu()
    steps = torch.tensor([o[2] for o in out])
    return ZResult(z, z_init, torch.zeros(len(requests), dtype=torch.float64), steps)


def compare(
    name: str,
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    cfg: MemitConfig,
    cov: dict[int, torch.Tensor],
    methods: Sequence[str],
) -> dict:
    """Time each method on the same inputs: z, then the closed-form update (not applied)."""
    templates = context_templates(model, tok, cfg)
    layer = cfg.layers[-1]
    row: dict = {"setup": name, "n_requests": len(requests), "methods": {}}
    zs: dict[str, ZResult] = {}
    for method in methods:
        t0 = time.perf_counter()
        if method == "reference":
            z = reference_z(model, tok, requests, layer, templates, cfg)
        else:
            z = optimise_z(model, tok, requests, layer, templates, cfg, fast=method == "collabedit")
        t_z = time.perf_counter() - t0
        edit(model, tok, requests, cfg, cov, apply=False, z=z)
        total = time.perf_counter() - t0
        zs[method] = z
        row["methods"][method] = {
            "z_s": round(t_z, 2),
            "update_s": round(total - t_z, 2),
            "total_s": round(total, 2),
            "requests_per_s": round(len(requests) / total, 3),
            "mean_steps": round(float(z.steps_taken.double().mean()), 1),
        }
        print(f"  {name} n={len(requests)} {method}: {total:.1f} s", flush=True)
    base = zs.get("reference")
    for method, z in zs.items():
        m = row["methods"][method]
        if base is not None:
            ref = row["methods"]["reference"]
            m["speedup_vs_reference"] = round(ref["total_s"] / m["total_s"], 2)
            rel = (z.z - base.z).norm(dim=1) / base.z.norm(dim=1)
            m["z_rel_diff_vs_reference_max"] = float(rel.max())
            m["z_rel_diff_vs_reference_median"] = float(rel.median())
    if "full" in zs and "collabedit" in zs:
        rel = (zs["collabedit"].z - zs["full"].z).norm(dim=1) / zs["full"].z.norm(dim=1)
        row["z_rel_diff_collabedit_vs_full_max"] = float(rel.max())
    return row


def gpt2_setup(world_dir: Path | None, n_stats: int):
    """(a): a GPT-2 of 6 layers x 128 with random weights and the world's word-level tokenizer."""
    b = load_world(world_dir)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(b.tokenizer),
            n_positions=128,
            n_embd=128,
            n_layer=6,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=b.tokenizer.bos_token_id,
            eos_token_id=b.tokenizer.eos_token_id,
            pad_token_id=b.tokenizer.pad_token_id,
        )
    ).eval()
    cfg = MemitConfig(
        layers=[2, 3, 4],
        mom2_update_weight=15000.0,
        v_num_grad_steps=20,
        v_lr=0.5,
        clamp_norm_factor=0.75,
        kl_factor=0.0625,
        v_weight_decay=0.5,
    )
    texts = list(iter_corpus("world", n_stats, model_dir=b.path))
    stats = collect_stats(model, b.tokenizer, texts, cfg.layers)
    return b, model, cfg, {layer: s.mom2 for layer, s in stats.items()}


def world_setup(world_dir: Path | None, n_stats: int):
    """(b): the shipped world model and its preset."""
    b = load_world(world_dir)
    cfg = preset("world")
    texts = list(iter_corpus("world", n_stats, model_dir=b.path))
    stats = collect_stats(b.model, b.tokenizer, texts, cfg.layers)
    return b, b.model.eval(), cfg, {layer: s.mom2 for layer, s in stats.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpt2-n", type=int, nargs="*", default=[30, 300])
    parser.add_argument("--world-n", type=int, nargs="*", default=[100])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["reference", "full", "collabedit"],
        choices=["reference", "full", "collabedit"],
    )
    parser.add_argument("--world-methods", nargs="+", default=None, help="default: --methods")
    parser.add_argument("--stats-texts", type=int, default=5000)
    parser.add_argument("--world", type=Path, default=None, help="world folder (default: shipped)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--note", default="", help="e.g. 'machine shared with other jobs'")
    args = parser.parse_args()

    rows = []
    if args.gpt2_n:
        b, model, cfg, cov = gpt2_setup(args.world, args.stats_texts)
        for n in args.gpt2_n:
            reqs = world_requests(b.world, n, seed=0)
            rows.append(
                compare("gpt2-6x128-random", model, b.tokenizer, reqs, cfg, cov, args.methods)
            )
    if args.world_n:
        b, model, cfg, cov = world_setup(args.world, args.stats_texts)
        for n in args.world_n:
            reqs = world_requests(b.world, n, seed=0)
            methods = args.world_methods or args.methods
            rows.append(compare("world-preset", model, b.tokenizer, reqs, cfg, cov, methods))

    print(
        f"\n{'setup':20} {'n':>5} {'method':11} {'z s':>8} {'update s':>8} {'req/s':>8} "
        f"{'x ref':>6} {'steps':>6} {'z vs ref (max rel)':>18}"
    )
    for row in rows:
        for method, m in row["methods"].items():
            print(
                f"{row['setup']:20} {row['n_requests']:5d} {method:11} {m['z_s']:8.1f} "
                f"{m['update_s']:8.1f} {m['requests_per_s']:8.2f} "
                f"{m.get('speedup_vs_reference', float('nan')):6.1f} {m['mean_steps']:6.1f} "
                f"{m.get('z_rel_diff_vs_reference_max', float('nan')):18.2e}"
            )
    result = {
        "command": "benchmarks/memit_reference.py",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "note": args.note,
        "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
