"""The `collabedit` command."""

from __future__ import annotations

import json
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

from collabedit import io
from collabedit.defaults import DEFAULT_EDITOR, DEFAULT_SINGLE_EDITOR
from collabedit.federation.cli import federate_app  # imports no Flower until a command runs
from collabedit.paths import SHIPPED_WORLD_NAMES

app = typer.Typer(
    help="Collaborative, non-destructive knowledge editing (CollabEdit) with registered editors.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
)
world_app = typer.Typer(
    help="The embedded fact world: build it, inspect it, draw requests.", no_args_is_help=True
)
requests_app = typer.Typer(
    help="Edit request files (CounterFact/MCF, zsRE, JSONL).", no_args_is_help=True
)
client_app = typer.Typer(help="A client's side of a collaborative round.", no_args_is_help=True)
server_app = typer.Typer(help="The server's side of a collaborative round.", no_args_is_help=True)
editors_app = typer.Typer(help="The registered knowledge-editing back-ends.", no_args_is_help=True)
malmen_app = typer.Typer(
    help="MALMEN: train the hypernetwork the `malmen` editor edits with.", no_args_is_help=True
)
app.add_typer(world_app, name="world")
app.add_typer(requests_app, name="requests")
app.add_typer(client_app, name="client")
app.add_typer(server_app, name="server")
app.add_typer(editors_app, name="editors")
app.add_typer(federate_app, name="federate")
app.add_typer(malmen_app, name="malmen")


@app.callback()
def _quiet_loading() -> None:
    """Our own progress bars are enough; transformers' weight-loading bars would clutter."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# markup off: file names, subjects and model names are user text; "[/]" in one must print as it
# is, never be read as a style tag (tables included)
console = Console(stderr=True, markup=False, soft_wrap=True)  # paths never broken mid-line
out = Console(soft_wrap=True, markup=False)

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help=f"HF model id, local model folder, or a shipped world: {SHIPPED_WORLD_NAMES}.",
    ),
]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON.")]
PresetOpt = Annotated[
    str | None,
    typer.Option("--preset", help="Editor preset, e.g. world, gpt2-xl, gpt-j (editors list)."),
]
HparamsOpt = Annotated[
    Path | None,
    typer.Option(
        help="Hyper-parameters in the editor's published format (MEMIT: EasyEdit YAML; "
        "MALMEN: a trained hypernetwork folder, or EasyEdit YAML)."
    ),
]
LayersOpt = Annotated[str | None, typer.Option(help="Comma-separated layers.")]


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


write_json = io.write_json  # atomic: a reader never sees half a file


def _fail(message: str) -> typer.Exit:
    """Print `message` (which may quote user text: never read as markup) and exit 1."""
    from rich.text import Text

    console.print(Text.assemble(("error: ", "red"), message))
    return typer.Exit(code=1)


def _load_requests_or_exit(path: Path, fmt: str):
    from collabedit.requests import RequestFileError, load_requests

    try:
        return load_requests(path, fmt)
    except (RequestFileError, OSError) as exc:
        raise _fail(str(exc)) from exc


def _metrics_table(title: str, rows: dict[str, dict]) -> Table:
    columns = ["ES", "PS", "NS", "Score", "EA", "PA", "NA", "zsRE_Score", "RS", "NE"]
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


def _method_params(items: list[str] | None, method: str | None = None) -> dict:
    """--param values: `key=value` for one method (server merge), or `method.key=value` (demo,
    bench); values read as JSON when they parse. Validated against the methods' declarations."""
    from collabedit.bench import parse_overrides
    from collabedit.collab.merge import get_method

    try:
        flat = parse_overrides(items or [])
        if method is not None:
            get_method(method).config(**flat)
            return flat
        nested: dict[str, dict] = {}
        for key, value in flat.items():
            name, dot, field = key.partition(".")
            if not dot:
                raise ValueError(f"--param {key}=...: write METHOD.NAME=VALUE, e.g. ties.top_k=0.2")
            nested.setdefault(name.replace("_", "-"), {})[field] = value
        for name, params in nested.items():
            get_method(name).config(**params)
        return nested
    except ValueError as exc:
        raise _fail(str(exc)) from exc


_WORLD_HELP = f"World folder, or a shipped world: {SHIPPED_WORLD_NAMES}."


def _editor_help() -> str:
    return "Registered editor (`collabedit editors list`)."


ParamOpt = Annotated[
    list[str] | None,
    typer.Option("--param", help="Merge-method parameter, repeatable (see `collabedit methods`)."),
]
EditorOpt = Annotated[str | None, typer.Option("--editor", help=_editor_help())]
EditorSetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Editor config field, e.g. --set mom2_update_weight=600 (repeatable)."
    ),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace an existing non-empty --out folder.")
]


@app.command()
def demo(
    clients: Annotated[
        int | None, typer.Option(help="Number of clients (default: 10; 8 for malmen).")
    ] = None,
    edits_per_client: Annotated[
        int | None, typer.Option(help="Private requests per client (default: 10; 25 for malmen).")
    ] = None,
    seed: int = 0,
    editor: Annotated[str, typer.Option(help=_editor_help())] = DEFAULT_EDITOR,
    preset_name: PresetOpt = None,
    hparams: HparamsOpt = None,
    settings: EditorSetOpt = None,
    params: Annotated[
        list[str] | None,
        typer.Option("--param", help="METHOD.NAME=VALUE, e.g. ties.top_k=0.2 (repeatable)."),
    ] = None,
    fidelity: Annotated[bool, typer.Option(help="Also measure one-shot/layer-sync.")] = True,
    world: Annotated[Path | None, typer.Option(help=_WORLD_HELP)] = None,
    json_out: JsonOpt = None,
) -> None:
    """Simulate collaborative editing on the embedded world (offline, CPU, minutes).

    N clients edit their private requests; the server merges with CollabEdit and the destructive
    baselines; prints the paper's Table 1 layout (Table 3 with --editor malmen, on subjects
    its hypernetwork was not trained on), plus relation specificity (RS: how many of the edited
    subjects' other facts survive), and the merge fidelity against Global-Edit. The editor's
    config is the world's preset unless --preset or --hparams names another (a MALMEN
    hypernetwork trained for a world built here, for instance); --set changes single fields.
    """
    from collabedit.bench.demo import run_demo
    from collabedit.editors import get_editor, make_config
    from collabedit.world.store import load_world

    method_params = _method_params(params)
    try:
        chosen = get_editor(editor)
        clients = chosen.demo_layout[0] if clients is None else clients
        edits_per_client = chosen.demo_layout[1] if edits_per_client is None else edits_per_client
        bundle = load_world(world)
        fields = _parse_settings(settings)
        cfg = (
            make_config(chosen, bundle.model, preset_name, hparams, overrides=fields)
            if preset_name or hparams or fields
            else None
        )
        result = run_demo(
            bundle,
            clients,
            edits_per_client,
            cfg=cfg,
            seed=seed,
            editor=editor,
            method_params=method_params,
            fidelity=fidelity,
            log=lambda m: console.print(m, style="dim", markup=False),
        )
    except (ValueError, OSError) as exc:
        raise _fail(str(exc)) from exc
    setting = f"{clients} clients x {edits_per_client} edits on the world, {editor}"
    forms = {
        "CounterFact-style": ["NS", "PS", "ES", "Score", "RS"],
        "zsRE-style": ["NA", "PA", "EA", "zsRE_Score", "zsRE_RS"],
    }
    for form, columns in forms.items():
        table = Table(
            title=f"{setting}: {form}, percent",
            caption="RS: share of the edited subjects' other relations that keep their answers",
        )
        table.add_column("method")
        for c in columns:
            table.add_column(c.removeprefix("zsRE_"), justify="right")
        for row, m in result["methods"].items():
            table.add_row(row, *("-" if m.get(c) is None else f"{m[c]:.1f}" for c in columns))
        out.print(table)
    fid = result["fidelity"]
    if fid:
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
    name: Annotated[
        str, typer.Argument(help="scale, clients, forgetting, overlap, conflict or privacy.")
    ],
    settings: Annotated[
        list[str] | None, typer.Option("--set", help="key=value (JSON values), repeatable.")
    ] = None,
    world: Annotated[Path | None, typer.Option(help=_WORLD_HELP)] = None,
    editor: Annotated[str, typer.Option(help=_editor_help())] = DEFAULT_EDITOR,
    preset_name: PresetOpt = None,
    hparams: HparamsOpt = None,
    params: Annotated[
        list[str] | None,
        typer.Option("--param", help="METHOD.NAME=VALUE, e.g. ties.top_k=0.2 (repeatable)."),
    ] = None,
    show_config: Annotated[bool, typer.Option(help="Print the settings and stop.")] = False,
    json_out: JsonOpt = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG figure.")] = None,
) -> None:
    """Run one of the paper's experiments in-process on the embedded world. The editor's config
    is the world's preset unless --preset or --hparams names another."""
    from pydantic import ValidationError

    from collabedit.bench import BENCHES, make_config, run_bench
    from collabedit.bench.lab import Lab
    from collabedit.editors import get_editor
    from collabedit.editors import make_config as make_editor_config
    from collabedit.world.store import load_world

    try:
        cfg = make_config(name, _parse_settings(settings))
    except (ValueError, ValidationError) as exc:
        raise _fail(str(exc)) from exc
    if show_config:
        out.print(json.dumps(cfg.model_dump(), indent=1), markup=False)
        return
    method_params = _method_params(params)
    try:
        bundle = load_world(world)
        editor_cfg = (
            make_editor_config(get_editor(editor), bundle.model, preset_name, hparams)
            if preset_name or hparams
            else None
        )
        lab = Lab.open(bundle, editor_cfg, editor=editor, method_params=method_params)
    except (OSError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    log = lambda m: console.print(m, style="dim", markup=False)  # noqa: E731
    result = run_bench(name, lab, cfg, log=log)
    out.print(
        json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1), markup=False
    )
    if json_out:
        write_json(json_out, result)
    if plot:
        BENCHES[name].plot(result, cfg, plot)
        out.print(f"figure written to {plot}", markup=False)


def _parse_settings(items: list[str] | None) -> dict:
    """--set key=value items as a dict; a malformed item exits with its text."""
    from collabedit.bench import parse_overrides

    try:
        return parse_overrides(items or [])
    except ValueError as exc:
        raise _fail(f"--set: {exc}") from exc


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
    editor: Annotated[
        str, typer.Option(help="Editor whose preset picks the defaults.")
    ] = DEFAULT_SINGLE_EDITOR,
    cache: Annotated[Path | None, typer.Option(help="Cache folder.")] = None,
    carry: Annotated[
        bool,
        typer.Option(
            help="Also write them into the model's folder (stats/, float32), where every later "
            "load of that folder finds them (a local folder only)."
        ),
    ] = False,
    json_out: JsonOpt = None,
) -> None:
    """Collect (or reuse) covariance statistics C = E(k k^T) of the edited layers."""
    from collabedit.editors import get_editor, make_config
    from collabedit.models.loading import load_model, resolve_model_path
    from collabedit.stats import carry_stats, layer_stats

    folder = Path(resolve_model_path(model))
    if carry and not (folder / "config.json").is_file():
        raise _fail(f"--carry writes into a local model folder; {model} is not one")
    lm, tok = load_model(model)
    try:
        cfg = make_config(get_editor(editor), lm, layers=_layers_opt(layers))
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    chosen = cfg.layers
    corpus = corpus or getattr(cfg, "mom2_dataset", None) or "world"
    samples = samples or getattr(cfg, "mom2_n_samples", None) or 100_000
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
    if carry:
        for path in carry_stats(folder, result, corpus, samples):
            out.print(f"carried: {path}")
    if json_out:
        write_json(json_out, {"model": model, "layers": rows})


def _bar_progress(bar: Progress):
    tasks: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return progress


def _open_setup(model, editor, preset_name, hparams, layers, bar, origin=None, overrides=None):
    from collabedit.collab.setup import EditingSetup

    try:
        return EditingSetup.open(
            model,
            editor,
            preset=preset_name,
            hparams=hparams,
            layers=_layers_opt(layers),
            overrides=overrides,
            origin_fingerprint=origin,
            progress=_bar_progress(bar),
        )
    except (ValueError, OSError) as exc:
        raise _fail(str(exc)) from exc


@app.command("edit")
def edit_cmd(
    model: ModelOpt,
    requests: Annotated[Path, typer.Option("--requests", "-r", help="Request file.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder (model) or file (--delta).")],
    editor: Annotated[str, typer.Option(help=_editor_help())] = DEFAULT_SINGLE_EDITOR,
    preset_name: PresetOpt = None,
    hparams: HparamsOpt = None,
    layers: LayersOpt = None,
    settings: EditorSetOpt = None,
    delta: Annotated[bool, typer.Option(help="Write only the per-layer deltas.")] = False,
    format: Annotated[str, typer.Option(help="auto, mcf, zsre or jsonl.")] = "auto",
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = None,
) -> None:
    """Edit a model with one editor (one party, all requests: Global-Edit)."""

    from collabedit.deltas import save_deltas
    from collabedit.editors import closed_form_edit
    from collabedit.io import OutputError, check_output_file
    from collabedit.models import arch
    from collabedit.models.loading import check_output_dir, save_model

    try:
        if delta:
            check_output_file(out_dir, overwrite)
        else:
            check_output_dir(out_dir, model, overwrite)
    except OutputError as exc:
        raise _fail(str(exc)) from exc
    reqs = _load_requests_or_exit(requests, format)
    fields = _parse_settings(settings)
    with _progress() as bar:
        setup = _open_setup(model, editor, preset_name, hparams, layers, bar, overrides=fields)
        base_fp = arch.fingerprint(setup.model, setup.layers)
        try:
            session = setup.session(reqs, _bar_progress(bar))
            result = closed_form_edit(session, setup.regulariser, apply=True)
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
        save_model(
            setup.model,
            setup.tokenizer,
            out_dir,
            model,
            overwrite=overwrite,
            verify=arch.weight_names(setup.model, setup.layers),
        )
    out.print(
        f"{len(reqs)} requests edited with {editor} into layers {setup.layers} "
        f"in {result.timings['total']:.1f} s; written to {out_dir}",
        markup=False,
    )
    if json_out:
        write_json(json_out, info | {"layers": setup.layers, "out": str(out_dir)})


@client_app.command("edit")
def client_edit(
    model: ModelOpt,
    requests: Annotated[Path, typer.Option("--requests", "-r", help="Private request file.")],
    out_file: Annotated[Path, typer.Option("--out", help="Update file to write.")],
    round_state: Annotated[
        Path | None, typer.Option(help="The server's state folder (round, base model).")
    ] = None,
    client_id: Annotated[str, typer.Option(help="This client's id.")] = "client",
    editor: EditorOpt = None,
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
    cover_text: Annotated[
        Path | None,
        typer.Option(
            help="Privacy: a text file of the client's own unedited sentences (one per line) "
            "whose keys are added to S with zero residual (cover keys; docs/privacy.md)."
        ),
    ] = None,
    noise_scale: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Privacy: Gaussian noise on S and P, in units of A0's mean eigenvalue (the "
            "server must merge with --no-bounds and a floor; docs/privacy.md).",
        ),
    ] = 0.0,
    noise_seed: Annotated[
        int | None, typer.Option(help="Seed of the noise (default: fresh, unpredictable).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --out file.")
    ] = False,
    json_out: JsonOpt = None,
) -> None:
    """Edit private requests locally; write only P = R K^T, S = K K^T (and the local delta when
    the federation's merge method needs it). Default editor: the federation's, else
    memit-frozen."""
    from collabedit.collab.merge import get_method
    from collabedit.collab.rounds import NothingToEdit, RoundInfo, client_round
    from collabedit.collab.state import load_state
    from collabedit.io import OutputError, check_output_file

    try:
        check_output_file(out_file, overwrite)
        mitigation = _mitigation(cover_text, noise_scale, noise_seed)
    except (OutputError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    reqs = _load_requests_or_exit(requests, format)
    info, send_delta = None, True
    if round_state is not None:
        try:
            state, _ = load_state(round_state)
        except (OSError, ValueError) as exc:
            raise _fail(str(exc)) from exc
        info = RoundInfo.from_state(state)
        send_delta = "delta" in get_method(state.method).client_sends
        editor = editor or state.editor or None
    editor = editor or DEFAULT_EDITOR
    if info is not None and layers is None:
        layers = ",".join(map(str, info.layers))
    with _progress() as bar:
        origin = info.origin_fingerprint if info is not None else None
        setup = _open_setup(model, editor, preset_name, hparams, layers, bar, origin)
        try:
            cr = client_round(
                setup,
                reqs,
                client_id,
                info,
                overlap_threshold=overlap_threshold,
                send_delta=send_delta,
                progress=_bar_progress(bar),
                mitigation=mitigation,
            )
        except NothingToEdit as exc:
            raise _fail(str(exc)) from exc
        except ValueError as exc:
            raise _fail(str(exc)) from exc
    for r in cr.skipped:
        console.print(
            f"skipped case {r.case_id} ({r.subject!r} -> {r.target_new!r}): already known, "
            f"residual {cr.residuals[r.case_id]:.2e} < {overlap_threshold}",
            style="yellow",
            markup=False,
        )
    cr.update.save(out_file)
    round_no = cr.update.round
    out.print(
        f"{client_id}: {len(cr.edited)} requests -> {out_file} (round {round_no}, layers "
        f"{setup.layers}, editor {editor})",
        markup=False,
    )
    if json_out:
        report = {}
        if overlap_threshold > 0:
            report = {
                "residuals": cr.residuals,
                "skipped_case_ids": [r.case_id for r in cr.skipped],
            }
        write_json(
            json_out,
            {
                "client_id": client_id,
                "round": round_no,
                "edited": len(cr.edited),
                "update": str(out_file),
                **report,
            },
        )


def _mitigation(cover_text: Path | None, noise_scale: float, noise_seed: int | None):
    from collabedit.collab.mitigations import Mitigation, read_cover_texts

    texts = read_cover_texts(cover_text) if cover_text is not None else ()
    return Mitigation(texts, noise_scale, noise_seed)


@server_app.command("merge")
def server_merge(
    model: ModelOpt,
    updates: Annotated[list[Path], typer.Option("--updates", help="Client update files.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the merged model.")],
    method: Annotated[
        str, typer.Option(help="Merge method (`collabedit methods`).")
    ] = "collabedit",
    params: ParamOpt = None,
    state_dir: Annotated[Path | None, typer.Option("--state", help="Server state folder.")] = None,
    beta1: Annotated[
        float,
        typer.Option(
            help="Weight of earlier rounds' K K^T in the regulariser (1: dynamic, as new edits "
            "weigh; 0: immutable A0 = lambda C_0)."
        ),
    ] = 1.0,
    editor: EditorOpt = None,
    preset_name: PresetOpt = None,
    hparams: HparamsOpt = None,
    layers: LayersOpt = None,
    bounds: Annotated[
        bool,
        typer.Option(
            help="Check every update against sanity bounds from the base model (off only for "
            "noisy updates; docs/reliability.md)."
        ),
    ] = True,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = None,
) -> None:
    """Merge client updates into the global model; bad updates are rejected one by one.

    The merged model is written to a new folder (never over --model), verified, then the state
    is advanced; the state folder is locked for the whole round."""
    import contextlib

    from collabedit.collab.state import StaleStateError, StateBusyError, state_lock
    from collabedit.models.loading import OutputError, check_output_dir

    method_params = _method_params(params, method)
    try:
        check_output_dir(out_dir, model, overwrite)
        lock = state_lock(state_dir) if state_dir is not None else contextlib.nullcontext()
        with lock:
            _server_merge(
                model=model,
                updates=updates,
                out_dir=out_dir,
                method=method,
                method_params=method_params,
                state_dir=state_dir,
                beta1=beta1,
                editor=editor,
                preset_name=preset_name,
                hparams=hparams,
                layers=layers,
                json_out=json_out,
                overwrite=overwrite,
                bounds=bounds,
            )
    except (OutputError, StateBusyError, StaleStateError) as exc:
        raise _fail(str(exc)) from exc
    except PermissionError as exc:
        raise _fail(f"{exc.filename}: {exc.strerror}") from exc


def _server_merge(
    *,
    model: str,
    updates: list[Path],
    out_dir: Path,
    method: str,
    method_params: dict,
    state_dir: Path | None,
    beta1: float,
    editor: str | None,
    preset_name: str | None,
    hparams: Path | None,
    layers: str | None,
    json_out: Path | None,
    overwrite: bool,
    bounds: bool,
) -> None:
    """The round itself, under the state lock `server_merge` holds."""
    from collabedit.collab.rounds import commit_round, open_state, server_round
    from collabedit.collab.state import STATE_FILE, load_state

    origin = None
    if state_dir is not None and (state_dir / STATE_FILE).is_file():
        try:
            saved, _ = load_state(state_dir)
        except (OSError, ValueError) as exc:
            raise _fail(str(exc)) from exc
        origin = saved.origin_fingerprint
        editor = editor or saved.editor or None
        if layers is None:
            layers = ",".join(map(str, saved.layers))
    editor = editor or DEFAULT_EDITOR
    with _progress() as bar:
        setup = _open_setup(model, editor, preset_name, hparams, layers, bar, origin)
    try:
        state, sums = open_state(state_dir, setup, method, beta1)
        outcome = server_round(
            setup.model,
            updates,
            state,
            sums,
            setup.regulariser,
            method,
            method_params,
            bounds=setup.update_bounds() if bounds else None,
        )
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    for reason in outcome.rejected.values():
        console.print(f"rejected {reason}", style="yellow", markup=False)
    commit_round(setup, outcome, out_dir, state_dir, overwrite=overwrite)
    out.print(
        f"round {state.round}: merged {len(outcome.accepted)} update(s) with {method}, "
        f"rejected {len(outcome.rejected)}; model written to {out_dir}",
        markup=False,
    )
    if json_out:
        write_json(
            json_out,
            {
                "round": state.round,
                "accepted": outcome.accepted,
                "rejected": outcome.rejected,
                "method": method,
                "params": method_params,
                "state": outcome.state.model_dump(),
            },
        )


@editors_app.command("list")
def editors_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The registered knowledge-editing back-ends and their config fields."""
    from collabedit.editors import registry

    described = [e.describe() for e in registry().values()]
    if as_json:
        print(json.dumps(described, indent=1))
        return
    for d in described:
        table = Table(title=f"{d['name']}: {d['summary']}", title_justify="left")
        for c in ("field", "default", "description"):
            table.add_column(c)
        for k, f in d["config"].items():
            table.add_row(k, json.dumps(f["default"]), f["description"])
        out.print(table)
        out.print(f"presets: {', '.join(d['presets']) or 'none'}", markup=False)


@app.command("methods")
def methods_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The registered merge methods, what they need from clients, and their parameters."""
    from collabedit.collab.merge import METHODS

    described = [m.describe() for m in METHODS.values()]
    if as_json:
        print(json.dumps(described, indent=1))
        return
    table = Table(title="merge methods")
    for c in ("method", "clients send", "parameters", "summary"):
        table.add_column(c)
    for d in described:
        ps = ", ".join(f"{k}={v['default']}" for k, v in d["params"].items()) or "-"
        table.add_row(d["name"], ", ".join(d["needs"]), ps, d["summary"])
    out.print(table)


@world_app.command("info")
def world_info(
    path: Annotated[Path | None, typer.Option(help=_WORLD_HELP)] = None,
    measure: Annotated[bool, typer.Option(help="Re-measure recall now.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Size, architecture and recall of a world."""
    from collabedit.bench.world_check import MEASUREMENTS_FILE
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
    measured = b.path / MEASUREMENTS_FILE
    if measured.is_file():
        info |= _measurement_summary(json.loads(measured.read_text()))
    if as_json:
        print(json.dumps(info, indent=1))
        return
    table = Table(title=f"world at {b.path}", show_header=False)
    for k, v in info.items():
        table.add_row(k, json.dumps(v) if isinstance(v, dict) else str(v))
    out.print(table)


def _measurement_summary(m: dict) -> dict:
    """The lines of `world measure`'s results that `world info` shows."""
    out: dict = {
        "edited_layers": m["layers"],
        "key_change_under_a_prefix": {
            k: round(v["prefix_subject_first"], 3) for k, v in m["keys"].items()
        },
        "key_difference_shared_last_name": {
            k: round(v["shared_last_name"], 3) if "shared_last_name" in v else None
            for k, v in m["keys"].items()
        },
        "covariance_full_rank": all(
            v["eig_above_1e-10"] == v["width"] for v in m["covariance"].values()
        ),
    }
    for e in m["edits"]:
        seq = e["memit"]
        out[f"memit_{e['n']}_edits"] = {k: round(seq[k], 1) for k in ("ES", "PS", "NS", "RS")} | {
            "max_delta_over_W": round(max(seq["delta_over_W"].values()), 2),
            "sequential_vs_frozen": round(max(e["sequential_vs_frozen"].values()), 3),
        }
        if "output_change" in seq:  # measured since the realistic world's 1,000-edit runs
            out[f"memit_{e['n']}_edits"]["max_output_change"] = round(
                max(seq["output_change"].values()), 3
            )
    return out


@world_app.command("measure")
def world_measure(
    path: Annotated[Path | None, typer.Option(help=_WORLD_HELP)] = None,
    edits: Annotated[
        list[int] | None, typer.Option(help="Batch sizes to edit (repeatable; default 100).")
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(help="Edit these layers instead of the preset's, e.g. 2,3,4."),
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option("--set", help="MEMIT config field, e.g. --set clamp_norm_factor=4."),
    ] = None,
    seed: int = 0,
    json_out: JsonOpt = None,
) -> None:
    """Measure a world as a testbed: contextual keys, covariance rank, causal trace, MEMIT at
    each batch size (efficacy, relation specificity, update size against the weight, sequential
    against frozen). With the world's preset it writes measurements.json into the world folder
    (`world info` shows it), keeping the batch sizes earlier runs measured and this one did not;
    with --layers or --set it writes only --json."""
    from pydantic import ValidationError

    from collabedit.bench.world_check import MEASUREMENTS_FILE, measure_world, merge_measurements
    from collabedit.world.store import load_world

    layer_list = _layers_opt(layers)
    bundle = load_world(path)
    try:
        fields = _parse_settings(settings)
        result = measure_world(
            bundle,
            edits or [100],
            seed=seed,
            log=lambda m: console.print(m, style="dim", markup=False),
            layers=layer_list,
            settings=fields,
        )
    except (ValueError, ValidationError) as exc:
        raise _fail(str(exc)) from exc
    if not (layer_list or fields):
        target = bundle.path / MEASUREMENTS_FILE
        try:
            earlier = json.loads(target.read_text()) if target.is_file() else None
        except (OSError, ValueError) as exc:
            console.print(f"{target}: unreadable ({exc}); replacing it", markup=False)
            earlier = None
        write_json(target, merge_measurements(earlier, result))
    for k, v in _measurement_summary(result).items():
        out.print(f"{k}: {json.dumps(v)}", markup=False)
    if json_out:
        write_json(json_out, result)


@world_app.command("build")
def world_build(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the world to.")],
    subjects: Annotated[
        int, typer.Option(help="Number of subjects (world-v1 has 400, the default world 2,400).")
    ] = 400,
    recipe: Annotated[
        str,
        typer.Option(
            help="shipped: world-v1's recipe (one-token keys, one edited layer); realistic: the "
            "default world's (contextual keys over three edited layers; with --subjects 2400 it "
            "rebuilds the default world, docs/realistic-world.md)."
        ),
    ] = "shipped",
    max_epochs: Annotated[int | None, typer.Option(help="Epoch budget (default: recipe).")] = None,
    mlp_width: Annotated[
        int | None,
        typer.Option(
            help="MLP inner width (default: 1024 shipped; realistic: about one unit per two "
            "subjects)."
        ),
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option("--set", help="Recipe field, e.g. --set lr=0.001 (repeatable)."),
    ] = None,
    trace: Annotated[
        int,
        typer.Option(
            help="Realistic recipe: after each epoch, causal-trace this many facts and print "
            "each layer's MLP effect at the subject (where the facts are being written; about "
            "12 s for 40 facts on the default world). 0: off."
        ),
    ] = 0,
    seed: int = 0,
    json_out: JsonOpt = None,
) -> None:
    """Generate a world and train its model until it recalls the facts (seeded, resumable:
    a checkpoint is written after every epoch and the same command continues from it)."""
    from pydantic import ValidationError

    from collabedit.world import realistic
    from collabedit.world.generator import WorldSpec
    from collabedit.world.store import build_world, checkpoint_path
    from collabedit.world.train import TrainConfig

    fields = _parse_settings(settings)
    if max_epochs:
        fields["max_epochs"] = max_epochs
    if mlp_width:
        fields["n_inner"] = mlp_width
    try:
        if recipe == "shipped":
            spec = WorldSpec(seed=seed, n_subjects=subjects)
            train = TrainConfig(**({"seed": seed} | fields))
        elif recipe == "realistic":
            spec = realistic.realistic_spec(subjects, seed)
            train = realistic.realistic_config(subjects, seed, fields)
        else:
            raise _fail(f"unknown recipe {recipe!r}; known: shipped, realistic")
    except ValidationError as exc:
        raise _fail(f"--set: {exc}") from exc
    if trace and recipe != "realistic":
        raise _fail("--trace: only the realistic recipe traces its epochs")
    if trace < 0:
        raise _fail(f"--trace: {trace} facts; give 0 (off) or more")
    if checkpoint_path(out_dir).is_file():
        console.print(f"continuing from the checkpoint {checkpoint_path(out_dir)}", markup=False)
    with _progress() as bar:
        task = bar.add_task("training", total=None)

        def on_step(epoch: int, step: int, total: int, loss: float) -> None:
            bar.update(
                task, completed=step, total=total, description=f"epoch {epoch}, loss {loss:.3f}"
            )

        def on_epoch(epoch: int, entry: dict) -> None:
            per_layer = entry.get("readout_losses") or {}
            readouts = "".join(
                f"readout loss {value:.4f}"
                + (f" (layer {layer})" if len(per_layer) > 1 else "")
                + ", "
                for layer, value in per_layer.items()
            )
            console.print(
                f"epoch {epoch}: loss {entry['loss']:.4f}, {readouts}"
                f"sample recall {entry['sample_recall']:.4f}, {entry['seconds']:.0f} s",
                markup=False,
            )
            if entry.get("mlp_trace"):
                effects = " / ".join(f"{v:.3f}" for v in entry["mlp_trace"])
                console.print(
                    f"  MLP effect at the subject by layer (causal trace): {effects}", markup=False
                )

        if isinstance(train, realistic.RealisticConfig):
            bundle = realistic.build_realistic_world(
                out_dir, spec, train, on_epoch, on_step=on_step, trace_facts=trace
            )
        else:
            bundle = build_world(out_dir, spec, train, on_step, on_epoch)
    b = bundle.build
    out.print(
        f"world written to {out_dir}: recall {b['recall']:.4f} "
        f"(worst phrasing {b['min_phrasing_recall']:.4f}), {b['train_seconds']:.0f} s",
        markup=False,
    )
    if json_out:
        write_json(json_out, b)


@world_app.command("requests")
def world_requests_cmd(
    out_file: Annotated[Path, typer.Option("--out", help="Output request file.")],
    n: Annotated[
        int | None, typer.Option("--n", help="Number of requests (distinct subjects).")
    ] = None,
    format: Annotated[str, typer.Option(help="mcf (CounterFact form), zsre, or jsonl.")] = "mcf",
    split: Annotated[
        str,
        typer.Option(
            help="Subjects to draw from: all, train (the half a learned editor may train on) "
            "or held-out (the other half)."
        ),
    ] = "all",
    per_subject: Annotated[
        int | None,
        typer.Option(
            help="Instead of --n: this many requests on every subject of the split, CounterFact "
            "and zsRE form alternating (training data; written as jsonl)."
        ),
    ] = None,
    seed: int = 0,
    path: Annotated[Path | None, typer.Option(help=_WORLD_HELP)] = None,
) -> None:
    """Export requests of the world in a published layout."""
    from collabedit.paths import resolve_world
    from collabedit.requests import FORMATS, save_requests
    from collabedit.world.edit_requests import subject_split, training_requests, world_requests
    from collabedit.world.generator import World
    from collabedit.world.store import WORLD_FILE

    if format not in FORMATS:
        raise _fail(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    if (n is None) == (per_subject is None):
        raise _fail("give exactly one of --n and --per-subject")
    if per_subject is not None and format != "jsonl":
        raise _fail("--per-subject mixes CounterFact and zsRE forms: use --format jsonl")
    world = World.load(resolve_world(path) / WORLD_FILE)
    try:
        subjects = subject_split(world, split, seed=0)  # type: ignore[arg-type]
        if per_subject is not None:
            reqs = training_requests(world, subjects, per_subject, seed=seed)
        else:
            form = "zsre" if format == "zsre" else "counterfact"
            reqs = world_requests(world, n or 0, seed=seed, form=form, subjects=subjects)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    save_requests(reqs, out_file, format)
    out.print(f"{len(reqs)} requests written to {out_file} ({format})")


@malmen_app.command("train")
def malmen_train(
    model: ModelOpt,
    requests: Annotated[
        Path, typer.Option("--requests", "-r", help="Training requests (with neighbourhoods).")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the hypernetwork.")],
    preset_name: PresetOpt = None,
    hparams: HparamsOpt = None,
    layers: LayersOpt = None,
    settings: Annotated[
        list[str] | None,
        typer.Option("--set", help="Config field, e.g. --set n_steps=200 (repeatable)."),
    ] = None,
    valid_share: Annotated[
        float, typer.Option(help="Share of subjects held out for validation.")
    ] = 0.1,
    resume: Annotated[bool, typer.Option(help="Continue from --out's checkpoint.")] = False,
    init: Annotated[
        Path | None, typer.Option(help="Start from this trained hypernetwork's weights.")
    ] = None,
    format: Annotated[str, typer.Option(help="auto, mcf, zsre or jsonl.")] = "auto",
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = None,
) -> None:
    """Meta-train MALMEN's hypernetwork for a model (checkpoints, validation, curves).

    Writes to --out: hypernet.safetensors and malmen.json (the best network by validation, tied
    to the model's fingerprint), curves.json and curves.png, and checkpoint/ for --resume. Edit
    with it: `collabedit edit --editor malmen --hparams OUT ...`.
    """
    from collabedit.editors import get_editor, make_config
    from collabedit.editors.malmen.train import plot_curves, train_hypernet
    from collabedit.models.loading import load_model

    if out_dir.exists() and not out_dir.is_dir():
        raise _fail(f"{out_dir} is a file, not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not (resume or overwrite):
        raise _fail(f"{out_dir} is not empty: pass --resume to continue or --overwrite")
    reqs = _load_requests_or_exit(requests, format)
    try:
        lm, tok = load_model(model)
        editor = get_editor("malmen")
        cfg = make_config(
            editor, lm, preset_name, hparams, _layers_opt(layers), _parse_settings(settings)
        )
    except (ValueError, OSError) as exc:
        raise _fail(str(exc)) from exc
    with _progress() as bar:
        task = bar.add_task("meta-training", total=cfg.n_steps)

        def progress(step: int, total: int, losses: dict) -> None:
            bar.update(
                task,
                completed=step,
                description=f"meta-training, paraphrase loss {losses['gen_loss']:.3f}",
            )

        try:
            curves = train_hypernet(
                lm,
                tok,
                reqs,
                cfg,
                out_dir,
                valid_share=valid_share,
                resume=resume,
                init=init,
                progress=progress,
                log=lambda m: console.print(m, style="dim", markup=False),
            )
        except ValueError as exc:
            raise _fail(str(exc)) from exc
    plot_curves(curves, out_dir / "curves.png")
    best = curves["best"] or {}
    out.print(
        f"hypernetwork written to {out_dir} (best at step {best.get('step')}: "
        + ", ".join(f"{k} {best[k]:.1f}" for k in ("ES", "GS", "LS") if k in best)
        + f"; {curves['seconds']:.0f} s)",
        markup=False,
    )
    if json_out:
        write_json(json_out, curves)


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
