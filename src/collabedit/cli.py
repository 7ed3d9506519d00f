"""The `collabedit` command."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from collabedit.federation.cli import federate_app  # imports no Flower until a command runs

app = typer.Typer(
    help="Collaborative, non-destructive knowledge editing (CollabEdit) on MEMIT-style editors.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
world_app = typer.Typer(
    help="The embedded fact world: build it, inspect it, draw requests.", no_args_is_help=True
)
requests_app = typer.Typer(
    help="Edit request files (CounterFact/MCF, zsRE, JSONL).", no_args_is_help=True
)
client_app = typer.Typer(help="A client's side of a collaborative round.", no_args_is_help=True)
server_app = typer.Typer(help="The server's side of a collaborative round.", no_args_is_help=True)
app.add_typer(world_app, name="world")
app.add_typer(requests_app, name="requests")
app.add_typer(client_app, name="client")
app.add_typer(server_app, name="server")
app.add_typer(federate_app, name="federate")


@app.callback()
def _quiet_loading() -> None:
    """Our own progress bars are enough; transformers' weight-loading bars would clutter."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


console = Console(stderr=True)
out = Console(soft_wrap=True)

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="HF model id, local model folder, or 'world'.")
]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON.")]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="world, gpt2-xl, gpt-j.")]
HparamsOpt = Annotated[Path | None, typer.Option(help="EasyEdit MEMIT YAML.")]
LayersOpt = Annotated[str | None, typer.Option(help="Comma-separated layers.")]


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def write_json(path: Path, payload: dict) -> None:
    """Atomic: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=1)


def _load_requests_or_exit(path: Path, fmt: str):
    from collabedit.requests import RequestFileError, load_requests

    try:
        return load_requests(path, fmt)
    except (RequestFileError, OSError) as exc:
        raise _fail(str(exc)) from exc


def _metrics_table(title: str, rows: dict[str, dict]) -> Table:
    columns = ["ES", "PS", "NS", "Score", "EA", "PA", "NA", "zsRE_Score", "NE"]
    present = [c for c in columns if any(r.get(c) is not None for r in rows.values())]
    table = Table(title=title)
    table.add_column("model")
    for c in present:
        table.add_column(c, justify="right")
    for name, r in rows.items():
        table.add_row(name, *("-" if r.get(c) is None else f"{r[c]:.1f}" for c in present))
    return table


def _evaluate(model, tokenizer, requests, description: str, generation: bool = False) -> dict:
    from collabedit.evaluate.metrics import evaluate_requests

    with _progress() as bar:
        # Each request is scored in several passes (one per metric family); count prompts.
        task = bar.add_task(description, total=None)
        result = evaluate_requests(
            model,
            tokenizer,
            requests,
            generation=generation,
            progress=lambda n: bar.advance(task, n),
        )
    return result


@app.command("eval")
def eval_cmd(
    model: ModelOpt,
    requests: Annotated[Path, typer.Option("--requests", "-r", help="Request file.")],
    format: Annotated[str, typer.Option(help="auto, mcf, zsre or jsonl.")] = "auto",
    generation: Annotated[bool, typer.Option(help="Also sample generations for NE.")] = False,
    json_out: JsonOpt = None,
) -> None:
    """Evaluate a model on edit requests: ES/PS/NS/Score, EA/PA/NA/Score (percent), NE."""
    from collabedit.models.loading import load_model

    reqs = _load_requests_or_exit(requests, format)
    lm, tok = load_model(model)
    start = time.perf_counter()
    result = _evaluate(lm, tok, reqs, f"scoring {len(reqs)} requests", generation)
    result["seconds"] = time.perf_counter() - start
    out.print(_metrics_table(f"{len(reqs)} requests from {requests.name}", {model: result}))
    if json_out:
        write_json(json_out, {"model": model, "requests": str(requests), "metrics": result})


@app.command()
def demo(
    clients: Annotated[int, typer.Option(help="Number of clients.")] = 10,
    edits_per_client: Annotated[int, typer.Option(help="Private requests per client.")] = 10,
    seed: int = 0,
    fidelity: Annotated[bool, typer.Option(help="Also measure one-shot/layer-sync.")] = True,
    json_out: JsonOpt = None,
) -> None:
    """Simulate collaborative editing on the embedded world (offline, CPU, minutes).

    N clients edit their private requests; the server merges with CollabEdit and the destructive
    baselines; prints the paper's Table 1 layout and the merge fidelity against Global-Edit.
    """
    from collabedit.collab.simulate import METHOD_ROWS, run_demo
    from collabedit.world.store import load_world

    result = run_demo(
        load_world(),
        clients,
        edits_per_client,
        seed=seed,
        fidelity=fidelity,
        log=lambda m: console.print(m, style="dim"),
    )
    table = Table(
        title=f"{clients} clients x {edits_per_client} edits on the embedded world "
        "(CounterFact-style | zsRE-style), percent"
    )
    table.add_column("method")
    columns = ["NS", "PS", "ES", "Score", "NA", "PA", "EA", "zsRE_Score"]
    for c in columns:
        table.add_column(c if c != "zsRE_Score" else "Score", justify="right")
    for row in METHOD_ROWS:
        m = result["methods"][row]
        table.add_row(row, *(f"{m[c]:.1f}" for c in columns))
    out.print(table)
    fid = result["fidelity"]
    out.print(
        "fidelity, max over layers of ||D_collab - D_global|| / ||D_global||: "
        + ", ".join(f"{k} {v:.1e}" for k, v in fid.items())
    )
    if json_out:
        write_json(json_out, result)


@app.command(
    context_settings={"help_option_names": ["--help", "-h"]},
    epilog="Experiments: scale (Fig. 1), clients (Fig. 6), forgetting (Table 5), overlap "
    "(Fig. 3), conflict (Tables 6 and 4). Settings with --set, e.g. --set counts=[50,200] "
    "--set clients=5; `collabedit bench NAME --show-config` lists them.",
)
def bench(
    name: Annotated[str, typer.Argument(help="scale, clients, forgetting, overlap or conflict.")],
    settings: Annotated[
        list[str] | None, typer.Option("--set", help="key=value (JSON values), repeatable.")
    ] = None,
    world: Annotated[Path | None, typer.Option(help="World folder (default: shipped).")] = None,
    show_config: Annotated[bool, typer.Option(help="Print the settings and stop.")] = False,
    json_out: JsonOpt = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG figure.")] = None,
) -> None:
    """Run one of the paper's experiments in-process on the embedded world."""
    from pydantic import ValidationError

    from collabedit.bench import BENCHES, make_config, parse_overrides, run_bench
    from collabedit.bench.lab import Lab
    from collabedit.world.store import load_world

    try:
        cfg = make_config(name, parse_overrides(settings or []))
    except (ValueError, ValidationError) as exc:
        raise _fail(str(exc)) from exc
    if show_config:
        out.print(json.dumps(cfg.model_dump(), indent=1))
        return
    try:
        bundle = load_world(world)
    except FileNotFoundError as exc:
        raise _fail(str(exc)) from exc
    result = run_bench(name, Lab.open(bundle), cfg, log=lambda m: console.print(m, style="dim"))
    out.print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1))
    if json_out:
        write_json(json_out, result)
    if plot:
        BENCHES[name].plot(result, cfg, plot)
        out.print(f"figure written to {plot}")


def _layers_opt(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as exc:
        raise typer.BadParameter(f"--layers takes comma-separated integers, not {text!r}") from exc


@app.command()
def stats(
    model: ModelOpt,
    layers: Annotated[
        str | None, typer.Option(help="Comma-separated layers (default: preset).")
    ] = None,
    corpus: Annotated[
        str | None, typer.Option(help="'world', a text file, or an HF dataset id.")
    ] = None,
    samples: Annotated[int | None, typer.Option(help="Texts to read.")] = None,
    cache: Annotated[Path | None, typer.Option(help="Cache folder.")] = None,
    json_out: JsonOpt = None,
) -> None:
    """Collect (or reuse) covariance statistics C = E(k k^T) of the edited layers."""
    from collabedit.editors import default_config
    from collabedit.models import arch
    from collabedit.models.loading import load_model
    from collabedit.stats import layer_stats

    lm, tok = load_model(model)
    cfg = default_config(lm)
    chosen = arch.check_layers(lm, _layers_opt(layers) or cfg.layers or arch.default_layers(lm))
    corpus = corpus or cfg.mom2_dataset
    samples = samples or cfg.mom2_n_samples
    start = time.perf_counter()
    with _progress() as bar:
        task = bar.add_task("statistics", total=samples)

        def progress(texts: int, tokens: int) -> None:
            rate = tokens / max(time.perf_counter() - start, 1e-9)
            bar.update(task, completed=texts, description=f"statistics, {rate:,.0f} tokens/s")

        result = layer_stats(lm, tok, chosen, corpus, samples, cache_dir=cache, progress=progress)
    rows = {
        str(layer): {
            "count": s.count,
            "trace": float(s.mom2.trace()),
            "seconds": s.meta.get("seconds"),
            "corpus": s.meta.get("corpus"),
        }
        for layer, s in result.items()
    }
    table = Table(title=f"covariance statistics ({corpus}, {samples} texts)")
    for c in ("layer", "tokens", "trace(C)"):
        table.add_column(c, justify="right")
    for layer, r in rows.items():
        table.add_row(layer, f"{r['count']:,}", f"{r['trace']:.3g}")
    out.print(table)
    if json_out:
        write_json(json_out, {"model": model, "layers": rows})


@app.command("edit")
def edit_cmd(
    model: ModelOpt,
    requests: Annotated[Path, typer.Option("--requests", "-r", help="Request file.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder (model) or file (--delta).")],
    editor: Annotated[str, typer.Option(help="memit or memit-frozen.")] = "memit",
    preset_name: PresetOpt = None,
    hparams: HparamsOpt = None,
    layers: LayersOpt = None,
    delta: Annotated[bool, typer.Option(help="Write only the per-layer deltas.")] = False,
    format: Annotated[str, typer.Option(help="auto, mcf, zsre or jsonl.")] = "auto",
    json_out: JsonOpt = None,
) -> None:
    """Edit a model with MEMIT (one party, all requests: Global-Edit)."""

    from collabedit.deltas import save_deltas
    from collabedit.editors import apply_edits
    from collabedit.models import arch
    from collabedit.models.loading import load_model

    reqs = _load_requests_or_exit(requests, format)
    lm, tok = load_model(model)
    cfg = _memit_config(lm, preset_name, hparams, layers)
    chosen = cfg.layers
    base_fp = arch.fingerprint(lm, chosen)
    with _progress() as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        try:
            result = apply_edits(lm, tok, reqs, editor=editor, config=cfg, progress=progress)
        except ValueError as exc:
            raise _fail(str(exc)) from exc
    info = {
        "editor": editor,
        "n_edits": len(reqs),
        "requests": str(requests),
        "timings": result.timings,
        # mean share of each request's residual the layer's update leaves undelivered
        "unmet_residual": {str(e.layer): round(e.unmet.mean().item(), 4) for e in result.layers},
    }
    if delta:
        save_deltas(
            out_dir,
            base_fp,
            {e.layer: e.delta for e in result.layers},
            {e.layer: e.module for e in result.layers},
            info,
        )
    else:
        _save_model(lm, tok, model, out_dir)
    out.print(
        f"{len(reqs)} requests edited with {editor} into layers {list(chosen)} "
        f"in {result.timings['total']:.1f} s; written to {out_dir}"
    )
    if json_out:
        write_json(json_out, info | {"layers": list(chosen), "out": str(out_dir)})


def _save_model(lm, tok, source: str, out_dir: Path) -> None:
    """save_pretrained (safetensors); an edited world stays a world (its world.json comes too)."""
    import shutil

    from collabedit.models.loading import resolve_model_path

    lm.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    world_json = Path(resolve_model_path(source)) / "world.json"
    if world_json.is_file():
        shutil.copy(world_json, out_dir / "world.json")


def _memit_config(lm, preset_name: str | None, hparams: Path | None, layers: str | None):
    """Preset (or the model's default), then an EasyEdit YAML, then --layers; validated."""
    from collabedit.editors import default_config, preset
    from collabedit.editors.memit import from_easyedit_yaml
    from collabedit.models import arch

    try:
        cfg = preset(preset_name) if preset_name else default_config(lm)
        if hparams:
            cfg = from_easyedit_yaml(hparams, cfg)
        if layers:
            cfg = cfg.model_copy(update={"layers": _layers_opt(layers)})
        chosen = arch.check_layers(lm, cfg.layers or arch.default_layers(lm))
    except (ValueError, OSError) as exc:
        raise _fail(str(exc)) from exc
    return cfg.model_copy(update={"layers": list(chosen)})


@client_app.command("edit")
def client_edit(
    model: ModelOpt,
    requests: Annotated[Path, typer.Option("--requests", "-r", help="Private request file.")],
    out_file: Annotated[Path, typer.Option("--out", help="Update file to write.")],
    round_state: Annotated[
        Path | None, typer.Option(help="The server's state folder (round, base model).")
    ] = None,
    client_id: Annotated[str, typer.Option(help="This client's id.")] = "client",
    editor: Annotated[str, typer.Option(help="memit-frozen or memit.")] = "memit-frozen",
    preset_name: PresetOpt = None,
    hparams: HparamsOpt = None,
    layers: LayersOpt = None,
    format: Annotated[str, typer.Option(help="auto, mcf, zsre or jsonl.")] = "auto",
    overlap_threshold: Annotated[
        float,
        typer.Option(
            help="Skip requests whose relative residual ||z - z0|| / ||z0|| is below this: the "
            "model already knows them (0 edits everything)."
        ),
    ] = 0.01,
    json_out: JsonOpt = None,
) -> None:
    """Edit private requests locally; write only P = R K^T, S = K K^T and the local delta."""
    from collabedit.collab.protocol import Client, check_overlap, client_update
    from collabedit.collab.state import load_state
    from collabedit.models import arch
    from collabedit.models.loading import load_model
    from collabedit.stats import layer_stats

    reqs = _load_requests_or_exit(requests, format)
    lm, tok = load_model(model)
    cfg = _memit_config(lm, preset_name, hparams, layers)
    round_no = 0
    if round_state is not None:
        try:
            state, _ = load_state(round_state)
        except (OSError, ValueError) as exc:
            raise _fail(str(exc)) from exc
        if state.layers != cfg.layers:
            raise _fail(f"the server edits layers {state.layers}, not {cfg.layers}")
        if arch.fingerprint(lm, state.layers) != state.base_fingerprint:
            raise _fail(f"{model} is not the global model of round {state.round}")
        round_no = state.round
    covs = {
        k: s.mom2
        for k, s in layer_stats(lm, tok, cfg.layers, cfg.mom2_dataset, cfg.mom2_n_samples).items()
    }
    try:
        z = None
        report = {}
        if overlap_threshold > 0:
            check = check_overlap(lm, tok, reqs, cfg, overlap_threshold)
            report = {
                "residuals": check.residuals,
                "skipped_case_ids": [r.case_id for r in check.skipped],
            }
            for r in check.skipped:
                console.print(
                    f"[yellow]skipped[/yellow] case {r.case_id} ({r.subject!r} -> "
                    f"{r.target_new!r}): already known, residual "
                    f"{check.residuals[r.case_id]:.2e} < {overlap_threshold}"
                )
            if not check.keep:
                raise ValueError("every request is already known to the model: nothing to send")
            reqs, z = check.keep, check.z_keep
        update = client_update(lm, tok, Client(client_id, reqs), cfg, covs, editor, round_no, z=z)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    update.save(out_file)
    out.print(
        f"{client_id}: {len(reqs)} requests -> {out_file} (round {round_no}, layers "
        f"{cfg.layers}, editor {editor})"
    )
    if json_out:
        write_json(
            json_out,
            {
                "client_id": client_id,
                "round": round_no,
                "edited": len(reqs),
                "update": str(out_file),
                **report,
            },
        )


@server_app.command("merge")
def server_merge(
    model: ModelOpt,
    updates: Annotated[list[Path], typer.Option("--updates", help="Client update files.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the merged model.")],
    method: Annotated[
        str, typer.Option(help="collabedit, ties, task-arithmetic, simple-average.")
    ] = "collabedit",
    state_dir: Annotated[Path | None, typer.Option("--state", help="Server state folder.")] = None,
    lam: Annotated[float, typer.Option(help="Scale for ties / task-arithmetic.")] = 1.0,
    top_k: Annotated[float, typer.Option(help="Share kept by ties.")] = 0.2,
    beta1: Annotated[
        float,
        typer.Option(
            help="Weight of earlier rounds' K K^T in the covariance (1: dynamic, as new edits "
            "weigh; 0: immutable lambda C_0)."
        ),
    ] = 1.0,
    preset_name: PresetOpt = None,
    hparams: HparamsOpt = None,
    layers: LayersOpt = None,
    json_out: JsonOpt = None,
) -> None:
    """Merge client updates into the global model; bad updates are rejected one by one."""

    from collabedit.collab.merge import METHODS
    from collabedit.collab.server import merge_round, open_state
    from collabedit.collab.state import save_state
    from collabedit.models.loading import load_model
    from collabedit.stats import layer_stats

    if method not in METHODS:
        raise _fail(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    lm, tok = load_model(model)
    cfg = _memit_config(lm, preset_name, hparams, layers)
    beta0 = cfg.mom2_update_weight
    state, sums = open_state(state_dir, lm, cfg.layers, method, beta0, beta1)
    covs = {
        k: s.mom2
        for k, s in layer_stats(lm, tok, cfg.layers, cfg.mom2_dataset, cfg.mom2_n_samples).items()
    }
    params = {"ties": {"lam": lam, "top_k": top_k}, "task-arithmetic": {"lam": lam}}
    try:
        outcome = merge_round(lm, updates, state, sums, covs, method, **params.get(method, {}))
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    for reason in outcome.rejected.values():
        console.print(f"[yellow]rejected[/yellow] {reason}")
    _save_model(lm, tok, model, out_dir)
    if state_dir is not None:
        save_state(state_dir, outcome.state, outcome.sum_s)  # last: a crash before reruns
    out.print(
        f"round {state.round}: merged {len(outcome.accepted)} update(s) with {method}, "
        f"rejected {len(outcome.rejected)}; model written to {out_dir}"
    )
    if json_out:
        write_json(
            json_out,
            {
                "round": state.round,
                "accepted": outcome.accepted,
                "rejected": outcome.rejected,
                "method": method,
                "state": outcome.state.model_dump(),
            },
        )


@world_app.command("info")
def world_info(
    path: Annotated[Path | None, typer.Option(help="World folder (default: shipped).")] = None,
    measure: Annotated[bool, typer.Option(help="Re-measure recall now.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Size, architecture and recall of a world."""
    from collabedit.world.store import load_world
    from collabedit.world.train import measure_recall

    b = load_world(path)
    cfg = b.model.config
    info = {
        "path": str(b.path),
        "n_subjects": len(b.world.subjects),
        "n_relations": len(b.world.relations),
        "n_facts": b.world.n_facts(),
        "phrasings_per_relation": {r.id: len(r.phrasings) for r in b.world.relations},
        "vocab_size": len(b.tokenizer),
        "architecture": {"model_type": cfg.model_type}
        | {
            k: v
            for k, v in b.build.get("train", {}).items()
            if k in ("local_layers", "window_size", "n_layer", "n_embd", "n_inner", "n_head")
        },
        "n_parameters": sum(p.numel() for p in b.model.parameters()),
        "recall": b.build.get("recall"),
        "min_phrasing_recall": b.build.get("min_phrasing_recall"),
        "train_seconds": b.build.get("train_seconds"),
    }
    if measure:
        r = measure_recall(b.model, b.tokenizer, b.world)
        info |= {"recall": r["recall"], "min_phrasing_recall": r["min_phrasing_recall"]}
    if as_json:
        print(json.dumps(info, indent=1))
        return
    table = Table(title=f"world at {b.path}", show_header=False)
    for k, v in info.items():
        table.add_row(k, json.dumps(v) if isinstance(v, dict) else str(v))
    out.print(table)


@world_app.command("build")
def world_build(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the world to.")],
    subjects: Annotated[
        int, typer.Option(help="Number of subjects (the shipped world has 400).")
    ] = 400,
    max_epochs: Annotated[int | None, typer.Option(help="Epoch budget (default: recipe).")] = None,
    mlp_width: Annotated[
        int,
        typer.Option(
            help="MLP inner width. It bounds how many subjects one edited layer can hold: "
            "keep it above the vocabulary (about subjects + 380 words)."
        ),
    ] = 1024,
    seed: int = 0,
    json_out: JsonOpt = None,
) -> None:
    """Generate a world and train its model until it recalls the facts (seeded, resumable)."""
    from collabedit.world.generator import WorldSpec
    from collabedit.world.store import build_world, checkpoint_path
    from collabedit.world.train import TrainConfig

    spec = WorldSpec(seed=seed, n_subjects=subjects)
    train = TrainConfig(
        seed=seed, n_inner=mlp_width, **({"max_epochs": max_epochs} if max_epochs else {})
    )
    if checkpoint_path(out_dir).is_file():
        console.print(f"continuing from the checkpoint {checkpoint_path(out_dir)}")
    with _progress() as bar:
        task = bar.add_task("training", total=None)

        def on_step(epoch: int, step: int, total: int, loss: float) -> None:
            bar.update(
                task, completed=step, total=total, description=f"epoch {epoch}, loss {loss:.3f}"
            )

        def on_epoch(epoch: int, entry: dict) -> None:
            console.print(
                f"epoch {epoch}: loss {entry['loss']:.4f}, "
                f"sample recall {entry['sample_recall']:.4f}"
            )

        bundle = build_world(out_dir, spec, train, on_step, on_epoch)
    b = bundle.build
    out.print(
        f"world written to {out_dir}: recall {b['recall']:.4f} "
        f"(worst phrasing {b['min_phrasing_recall']:.4f}), {b['train_seconds']:.0f} s"
    )
    if json_out:
        write_json(json_out, b)


@world_app.command("requests")
def world_requests_cmd(
    n: Annotated[int, typer.Option("--n", help="Number of requests (distinct subjects).")],
    out_file: Annotated[Path, typer.Option("--out", help="Output request file.")],
    format: Annotated[str, typer.Option(help="mcf (CounterFact form), zsre, or jsonl.")] = "mcf",
    seed: int = 0,
    path: Annotated[Path | None, typer.Option(help="World folder (default: shipped).")] = None,
) -> None:
    """Export requests of the world in a published layout."""
    from collabedit.requests import FORMATS, save_requests
    from collabedit.world.edit_requests import world_requests
    from collabedit.world.generator import World
    from collabedit.world.store import DEFAULT_WORLD_DIR, WORLD_FILE

    if format not in FORMATS:
        raise _fail(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    world = World.load((path or DEFAULT_WORLD_DIR) / WORLD_FILE)
    try:
        reqs = world_requests(
            world, n, seed=seed, form="zsre" if format == "zsre" else "counterfact"
        )
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    save_requests(reqs, out_file, format)
    out.print(f"{len(reqs)} requests written to {out_file} ({format})")


@requests_app.command("validate")
def requests_validate(
    file: Annotated[Path, typer.Argument(help="Request file.")],
    format: Annotated[str, typer.Option(help="auto, mcf, zsre or jsonl.")] = "auto",
) -> None:
    """Load a request file; print its format and size, or the file/record/field error."""
    from collabedit.requests import RequestFileError, detect_format

    reqs = _load_requests_or_exit(file, format)
    try:
        fmt = detect_format(file) if format == "auto" else format
    except RequestFileError as exc:
        raise _fail(str(exc)) from exc
    out.print(f"{file}: format {fmt}, {len(reqs)} requests")


if __name__ == "__main__":
    app()
