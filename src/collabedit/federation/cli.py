"""`collabedit federate ...`: write a Flower app folder, run a simulated federation."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from collabedit.defaults import DEFAULT_EDITOR
from collabedit.paths import SHIPPED_WORLD_NAMES

federate_app = typer.Typer(
    help="Real federation on Flower (needs collabedit's `flower` extra).",
    no_args_is_help=True,
)


def _settings(model: str, layers: str, **kw):
    from collabedit.federation.config import ServerSettings

    try:
        return ServerSettings(model=model, layers=layers, **kw)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@federate_app.command("init")
def init_cmd(
    folder: Annotated[Path, typer.Argument(help="Folder to write the Flower app into.")],
    model: Annotated[
        str, typer.Option(help=f"HF id, local folder, or a shipped world: {SHIPPED_WORLD_NAMES}.")
    ] = "world",
    layers: Annotated[str, typer.Option(help="Comma-separated layers ('' = preset's).")] = "",
    editor: Annotated[
        str, typer.Option(help="Registered editor (collabedit editors list).")
    ] = DEFAULT_EDITOR,
    editor_config: Annotated[
        str, typer.Option(help='Editor config fields as JSON, e.g. {"v_num_grad_steps": 20}.')
    ] = "",
    method: Annotated[str, typer.Option(help="Merge method (collabedit methods).")] = "collabedit",
    rounds: Annotated[int, typer.Option(help="Rounds per Flower run.")] = 1,
    min_clients: Annotated[int, typer.Option(help="Clients needed per round.")] = 2,
    secure_aggregation: Annotated[bool, typer.Option(help="SecAgg+ (experimental).")] = False,
    transport: Annotated[str, typer.Option(help="full or factor.")] = "full",
    fault_policy: Annotated[str, typer.Option(help="abort or quorum.")] = "abort",
    state_dir: Annotated[str, typer.Option(help="Server state folder.")] = "collabedit-server",
    force: Annotated[bool, typer.Option(help="Overwrite an existing pyproject.toml.")] = False,
) -> None:
    """Write a ready Flower app folder (pyproject.toml with components and run config, README)."""
    from collabedit.federation.scaffold import write_app

    if (folder / "pyproject.toml").exists() and not force:
        typer.echo(f"error: {folder / 'pyproject.toml'} exists (use --force)", err=True)
        raise typer.Exit(2)
    settings = _settings(
        model,
        layers,
        editor=editor,
        editor_config=editor_config,
        method=method,
        rounds=rounds,
        min_clients=min_clients,
        secure_aggregation=secure_aggregation,
        transport=transport,
        fault_policy=fault_policy,
        state_dir=state_dir,
    )
    path = write_app(folder, settings)
    typer.echo(f"wrote {path} and {folder / 'README.md'}")


@federate_app.command("simulate")
def simulate_cmd(
    clients: Annotated[int, typer.Option("--clients", help="Number of clients.")] = 3,
    edits_per_client: Annotated[int, typer.Option(help="World requests per client.")] = 4,
    model: Annotated[
        str, typer.Option(help=f"A world folder, or a shipped world: {SHIPPED_WORLD_NAMES}.")
    ] = "world",
    layers: Annotated[str, typer.Option(help="Comma-separated layers ('' = preset's).")] = "",
    editor: Annotated[
        str, typer.Option(help="Registered editor (collabedit editors list).")
    ] = DEFAULT_EDITOR,
    editor_config: Annotated[
        str, typer.Option(help='Editor config fields as JSON, e.g. {"v_num_grad_steps": 20}.')
    ] = "",
    method: Annotated[str, typer.Option(help="Merge method (collabedit methods).")] = "collabedit",
    mom2_samples: Annotated[int, typer.Option(help="Texts for C (0 = preset's).")] = 0,
    transport: Annotated[str, typer.Option(help="full or factor.")] = "full",
    secure_aggregation: Annotated[bool, typer.Option(help="SecAgg+ (experimental).")] = False,
    rounds: Annotated[int, typer.Option(help="Rounds at most.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the drawn requests.")] = 0,
    work: Annotated[
        Path | None, typer.Option(help="Folder for client files and server state (default: temp).")
    ] = None,
    evaluate: Annotated[bool, typer.Option(help="Score the federated model.")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results as JSON.")] = None,
) -> None:
    """Run N clients and the server on Flower's simulation engine; compare with in-process."""
    from collabedit.federation.simulation import simulate

    settings = _settings(
        model,
        layers,
        editor=editor,
        editor_config=editor_config,
        method=method,
        mom2_samples=mom2_samples,
        transport=transport,
        secure_aggregation=secure_aggregation,
        rounds=rounds,
        min_clients=clients,
    )
    with tempfile.TemporaryDirectory(prefix="collabedit-federate-") as tmp:
        folder = work or Path(tmp)
        result = simulate(
            clients,
            edits_per_client,
            folder,
            settings,
            seed=seed,
            evaluate=evaluate,
            log=lambda m: typer.echo(m, err=True),
        )
    text = json.dumps(result, indent=1)
    typer.echo(text)
    if json_out:
        from collabedit import io

        io.write_text(json_out, text + "\n")
    if result["status"] != "done":
        raise typer.Exit(1)
