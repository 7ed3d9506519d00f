"""Global-Edit quality of MEMIT on the shipped world: ES/PS/NS/Score (and EA) vs number of edits.

    python benchmarks/memit_quality.py --counts 100 500 1000 2000 --editors memit memit-frozen \
        --json results/memit_quality.json --plot results/memit_quality.png \
        --z-cache results/zcache --z-block 250

The request sets are nested (each count takes the first n requests of one draw of the largest
count), so the target vectors z are optimised once, on the unedited model, and each count edits
with its slice: MEMIT optimises every z before it writes any layer, so this is the same edit as
a separate run, at the z cost of the largest count only.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from collabedit.editors import apply_edits, preset  # noqa: E402
from collabedit.editors.memit.compute import (  # noqa: E402
    ZResult,
    context_templates,
    optimise_z,
    z_cache_key,
)
from collabedit.evaluate.metrics import (  # noqa: E402
    counterfact_case_metrics,
    evaluate_requests,
    summarise_counterfact,
    summarise_zsre,
    zsre_case_metrics,
)
from collabedit.models import arch  # noqa: E402
from collabedit.requests import EditRequest  # noqa: E402
from collabedit.world.edit_requests import world_requests  # noqa: E402
from collabedit.world.generator import World  # noqa: E402
from collabedit.world.store import load_world  # noqa: E402


def unedited_neighbourhoods(world: World, reqs: list[EditRequest]) -> list[EditRequest]:
    """The requests with only the neighbourhood prompts whose subject none of `reqs` edits.

    Once many subjects are edited, a neighbour is often an edited subject itself (on another
    relation, or on this one, where its answer is meant to change); this separates collateral
    damage to untouched subjects from that."""
    edited = {r.subject for r in reqs}
    patterns = {
        rel.id: [
            re.compile(re.escape(a) + "(.+)" + re.escape(b) + "$")
            for a, b in (t.split("{}") for t in rel.statements)
        ]
        for rel in world.relations
    }

    def subject_of(req: EditRequest, prompt: str) -> str:
        for pattern in patterns[req.relation_id]:
            m = pattern.match(prompt)
            if m and m.group(1) in world.facts:
                return m.group(1)
        raise ValueError(f"case {req.case_id}: no subject found in {prompt!r}")

    return [
        r.model_copy(
            update={
                "paraphrase_prompts": [],
                "neighborhood_prompts": [
                    p for p in r.neighborhood_prompts if subject_of(r, p) not in edited
                ],
            }
        )
        for r in reqs
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 500, 1000, 2000])
    parser.add_argument("--editors", nargs="+", default=["memit", "memit-frozen"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--draw",
        type=int,
        default=None,
        help="draw the requests as for this many edits (default: the largest count); each count"
        " is a prefix of that draw, so a run of the smaller counts reads z blocks a later run"
        " of all counts reuses",
    )
    parser.add_argument(
        "--layer-sets",
        nargs="+",
        default=None,
        help="edited layers, one comma-separated set per run, e.g. 1 0,1 (default: the preset's);"
        " every set must end at the same layer, where z is read",
    )
    parser.add_argument(
        "--lams", type=float, nargs="+", default=None, help="mom2_update_weight(s) to run"
    )
    parser.add_argument(
        "--z-cache",
        type=Path,
        default=None,
        help="folder of z blocks (safetensors named by what they were computed from): a block"
        " computed before for the same model, requests and z settings is read, not optimised",
    )
    parser.add_argument(
        "--z-block",
        type=int,
        default=None,
        help="optimise z in blocks of this many requests, each cached as soon as it is done, so"
        " an interrupted run continues at the next block (z of a request does not depend on the"
        " other requests in its batch)",
    )
    parser.add_argument(
        "--z-part",
        default=None,
        metavar="I/N",
        help="only optimise and cache z blocks number I, I+N, I+2N, ... and stop: N runs with"
        " one thread each fill the cache side by side, then a run without it reads every block",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--world", type=Path, default=None, help="world folder (default: shipped)")
    args = parser.parse_args()

    part_index, part_count = 0, 1
    if args.z_part:
        if not (args.z_cache and args.z_block):
            parser.error("--z-part needs --z-cache and --z-block")
        try:
            part_index, part_count = map(int, args.z_part.split("/"))
        except ValueError:
            parser.error(f"--z-part takes I/N, e.g. 0/2, not {args.z_part!r}")
        if not 0 <= part_index < part_count:
            parser.error(f"--z-part {args.z_part}: I must be in 0..N-1")
    cfg = preset("world")
    rows = []
    bundle = load_world(args.world)
    layer_sets = [
        arch.check_layers(bundle.model, [int(x) for x in spec.split(",")])
        for spec in (args.layer_sets or [",".join(map(str, cfg.layers or []))])
    ]
    if len({ls[-1] for ls in layer_sets}) != 1:
        parser.error("--layer-sets must all end at the same layer (z is read there)")
    lams = args.lams or [cfg.mom2_update_weight]
    # one request per subject: the largest count the world supports is its number of subjects
    counts = sorted({min(n, len(bundle.world.subjects)) for n in args.counts})
    draw = min(max(args.draw or 0, counts[-1]), len(bundle.world.subjects))
    # z is needed for the largest count only
    drawn = world_requests(bundle.world, draw, seed=args.seed)[: counts[-1]]
    z_layer = layer_sets[0][-1]
    start = time.perf_counter()
    templates = context_templates(bundle.model, bundle.tokenizer, cfg)
    block = args.z_block or len(drawn)
    parts, z_cached = [], True
    for number, lo in enumerate(range(0, len(drawn), block)):
        if number % part_count != part_index:
            continue
        reqs = drawn[lo : lo + block]
        key = z_cache_key(bundle.model, reqs, z_layer, templates, cfg)
        path = args.z_cache / f"z-{key[:32]}.safetensors" if args.z_cache else None
        part = ZResult.load(path, key) if path else None
        if part is None:
            z_cached = False
            part = optimise_z(bundle.model, bundle.tokenizer, reqs, z_layer, templates, cfg)
            if path:
                part.save(path, key)
        parts.append(part)
        print(
            json.dumps(
                {"z_block": [lo, lo + len(reqs)], "seconds": round(time.perf_counter() - start, 1)}
            ),
            flush=True,
        )
    if args.z_part:
        return
    z_all = ZResult.cat(parts)
    z_seconds = time.perf_counter() - start
    print(
        json.dumps(
            {"z_requests": len(drawn), "z_seconds": round(z_seconds, 1), "z_cached": z_cached}
        ),
        flush=True,
    )
    runs = [
        (e, ls, lam, n) for e in args.editors for ls in layer_sets for lam in lams for n in counts
    ]
    for editor, layers, lam, n in runs:
        run_cfg = cfg.model_copy(update={"layers": list(layers), "mom2_update_weight": lam})
        bundle = load_world(args.world)  # fresh, unedited model each time
        reqs = drawn[:n]
        start = time.perf_counter()
        result = apply_edits(
            bundle.model,
            bundle.tokenizer,
            reqs,
            editor=editor,
            config=run_cfg,
            z=z_all.select(range(n)),
        )
        seconds = time.perf_counter() - start
        metrics = evaluate_requests(bundle.model, bundle.tokenizer, reqs)
        row = {
            "editor": editor,
            "layers": list(layers),
            "lambda": lam,
            "n": n,
            "edit_seconds_without_z": round(seconds, 2),
            "timings": {k: round(v, 2) for k, v in result.timings.items()},
            "unmet_residual": {
                str(e.layer): round(e.unmet.mean().item(), 4) for e in result.layers
            },
        }
        row |= {k: round(v, 2) for k, v in metrics.items() if isinstance(v, float)}
        untouched = unedited_neighbourhoods(bundle.world, reqs)
        row["neighbours_unedited"] = round(
            sum(len(r.neighborhood_prompts) for r in untouched)
            / max(1, sum(len(r.neighborhood_prompts) for r in reqs)),
            3,
        )
        if row["neighbours_unedited"] > 0:
            ns = summarise_counterfact(
                counterfact_case_metrics(bundle.model, bundle.tokenizer, untouched)
            )["NS"]
            na = summarise_zsre(zsre_case_metrics(bundle.model, bundle.tokenizer, untouched))["NA"]
            row |= {"NS_unedited": round(ns, 2), "NA_unedited": round(na, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    payload = {
        # the preset; each row says the layers and lambda it ran with instead
        "config": cfg.model_dump(),
        "seed": args.seed,
        "draw": draw,
        "world": str(bundle.path),
        "z_requests": len(drawn),
        "z_seconds": round(z_seconds, 1),
        "z_cached": z_cached,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    if args.plot:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for editor, layers, lam in dict.fromkeys((e, tuple(ls), lam) for e, ls, lam, _ in runs):
            pts = [
                r
                for r in rows
                if (r["editor"], tuple(r["layers"]), r["lambda"]) == (editor, layers, lam)
            ]
            name = f"{editor} L{','.join(map(str, layers))} λ{lam:g}"
            for key, style in (("ES", "-o"), ("PS", "--s"), ("NS", ":^")):
                ax.plot([r["n"] for r in pts], [r[key] for r in pts], style, label=f"{name} {key}")
        # Layer keys of the world's one-token-window layers depend on the token only: the
        # edited subjects' keys and the other words' keys must share the MLP's key width.
        room = bundle.model.config.intermediate_size - (
            len(bundle.tokenizer) - len(bundle.world.subjects)
        )
        if counts[0] <= room <= counts[-1]:
            ax.axvline(room, color="grey", lw=0.8, ls="--")
            ax.annotate("key width − other words", (room, 3), fontsize=7, color="grey", rotation=90)
        ax.set_xscale("log")
        ax.set_xlabel("edits (Global-Edit, one party)")
        ax.set_ylabel("percent")
        ax.set_ylim(0, 101)
        ax.legend(fontsize=7)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
