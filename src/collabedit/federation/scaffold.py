"""`collabedit federate init DIR`: a ready Flower app folder for a CollabEdit federation.

The folder holds a pyproject.toml that declares our ServerApp and ClientApp as the app's
components (they live in the installed collabedit package, so the folder carries no code) and the
run config with its defaults, and a README with the commands for every machine. No Flower import.
"""

from __future__ import annotations

import json
from pathlib import Path

from collabedit.federation.config import ServerSettings

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "Collaborative knowledge editing (CollabEdit on MEMIT) as a Flower app"
license = "MIT"
dependencies = ["collabedit[flower]", "flwr[simulation]==1.42.0"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "collabedit"

[tool.flwr.app.components]
serverapp = "collabedit.federation.server_app:app"
clientapp = "collabedit.federation.client_app:app"

# The server's run config; override one value with `flwr run . CONN --run-config 'rounds=3'`.
[tool.flwr.app.config]
{config}
"""

README = """\
# {name}: a CollabEdit federation on Flower

Every machine installs the same collabedit (`pip install "collabedit[flower]"`) and sets
FLWR_TELEMETRY_ENABLED=0, FLWR_DISABLE_UPDATE_CHECK=1 and
FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1. The SuperLink serves its Fleet, Control and
Runtime APIs over HTTP on one port (8000 by default). Use `--insecure` only on a closed test
network; see collabedit's docs/federation.md for TLS certificates and SuperNode authentication.

Server machine (SuperLink):

    flower-superlink --host 0.0.0.0 --port 8000 \\
        --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key

Each client machine (SuperNode) with its own private request file, which never leaves it:

    flower-supernode --superlink SERVER:8000 --root-certificates ca.crt \\
        --node-config 'requests="my_requests.jsonl" state="client-state" client-id="alice"'

Start a run from a machine that reaches the SuperLink, with a connection in
`$FLWR_HOME/config.toml` (`[superlink.NAME]`, address = "SERVER:8000", root-certificates = ...):

    flwr run . NAME --run-config 'rounds=1 min-clients=3 state-dir="/srv/collabedit-state"'

Run config (pyproject.toml, `[tool.flwr.app.config]`):

{keys}
"""


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))


def write_app(folder: str | Path, settings: ServerSettings | None = None, name: str = "") -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = settings or ServerSettings()
    name = name or "collabedit-federation"
    cfg = settings.to_run_config()
    lines = "\n".join(f"{k} = {toml_value(v)}" for k, v in cfg.items())
    (folder / "pyproject.toml").write_text(PYPROJECT.format(name=name, config=lines))
    described = "\n".join(
        f"* `{k.replace('_', '-')}` ({toml_value(getattr(settings, k))}): {f.description or ''}"
        for k, f in ServerSettings.model_fields.items()
    )
    (folder / "README.md").write_text(README.format(name=name, keys=described))
    return folder / "pyproject.toml"
