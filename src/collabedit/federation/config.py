"""Settings of a federation: the server's run config and a client's node config.

Flower passes both as flat dicts with dashed keys (`[tool.flwr.app.config]` in the app's
pyproject, `flwr run --run-config`, `flower-supernode --node-config`). This module turns them into
validated objects; it imports nothing from Flower.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from collabedit.defaults import DEFAULT_EDITOR

# Set in every process we start and before Flower is imported: no telemetry, no update check, no
# `uv sync` of app dependencies at run time.
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def quiet_flower_env() -> None:
    """Put FLOWER_ENV into this process's environment (children inherit it)."""
    os.environ.update(FLOWER_ENV)


class ServerSettings(BaseModel):
    """The server's run config (`[tool.flwr.app.config]`, dashes instead of underscores)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("world", description="HF id, local folder or 'world' (the shipped one)")
    layers: str = Field("", description="comma-separated edited layers; '' = the preset's")
    preset: str = Field("", description="MEMIT preset (world, gpt2-xl, gpt-j); '' = by model")
    mom2_samples: int = Field(0, ge=0, description="texts for the covariance C; 0 = preset's")
    editor_config: str = Field(
        "", description='JSON object of editor config fields, e.g. {"v_num_grad_steps": 20}'
    )
    editor: str = Field(DEFAULT_EDITOR, description="registered editor (collabedit editors list)")
    method: str = Field("collabedit", description="merge method (collabedit methods)")
    protocol: Literal["one-shot"] = "one-shot"
    rounds: int = Field(1, ge=1, description="merged rounds to run in this Flower run")
    min_clients: int = Field(2, ge=1, description="clients needed to start and to merge a round")
    connect_timeout: float = Field(120.0, gt=0, description="seconds to wait for min-clients")
    round_timeout: float = Field(600.0, gt=0, description="seconds to wait for replies")
    max_retries: int = Field(2, ge=0, description="retries of a round that did not merge")
    secure_aggregation: bool = False
    secagg_bound_p: float = Field(
        0.0, ge=0, description="public bound on |P| entries for SecAgg+ (0 = ask the clients)"
    )
    secagg_bound_s: float = Field(
        0.0, ge=0, description="public bound on |S| entries for SecAgg+ (0 = ask the clients)"
    )
    transport: Literal["full", "factor"] = "full"
    update_bounds: bool = Field(
        True, description="check each update against sanity bounds (off for noisy clients)"
    )
    noise_floor: float = Field(
        0.0, ge=0, description="eigenvalue floor of the solve for noisy clients' updates"
    )
    fault_policy: Literal["abort", "quorum"] = "abort"
    beta1: float = Field(1.0, ge=0, description="weight of earlier rounds' S in C_t")
    state_dir: str = Field("collabedit-server", description="server state folder")
    out_dir: str = Field("", description="write the final global model here ('' = don't)")

    @field_validator("editor")
    @classmethod
    def _editor(cls, v: str) -> str:
        from collabedit.editors import get_editor

        get_editor(v)  # ValueError naming the registered editors
        return v

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from collabedit.collab.merge import get_method

        get_method(v)
        return v

    @field_validator("editor_config")
    @classmethod
    def _editor_config(cls, v: str) -> str:
        if v.strip() and not isinstance(json.loads(v), dict):
            raise ValueError("editor-config must be a JSON object")
        return v.strip()

    def editor_config_dict(self) -> dict:
        return json.loads(self.editor_config) if self.editor_config else {}

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: str) -> str:
        if v.strip():
            [int(x) for x in v.split(",")]
        return v.strip()

    @model_validator(mode="after")
    def _secure_needs_sums(self) -> ServerSettings:
        from collabedit.collab.merge import get_method

        if self.secure_aggregation and not get_method(self.method).streams:
            raise ValueError(
                f"secure aggregation delivers only sums; merge method {self.method!r} needs "
                "each client's own update"
            )
        return self

    def layer_list(self) -> list[int] | None:
        return [int(x) for x in self.layers.split(",")] if self.layers else None

    @classmethod
    def from_run_config(cls, run_config: dict) -> ServerSettings:
        return cls(**{k.replace("-", "_"): v for k, v in dict(run_config).items()})

    def to_run_config(self) -> dict:
        return {k.replace("_", "-"): v for k, v in self.model_dump().items()}


class ClientSettings(BaseModel):
    """A SuperNode's node config: where this party's private requests and state live."""

    model_config = ConfigDict(extra="ignore")

    requests: Path = Field(..., description="the private request file (never leaves the node)")
    state: Path = Field(..., description="this client's state folder")
    client_id: str = Field(..., min_length=1)
    format: str = "auto"
    per_round: int = Field(0, ge=0, description="requests sent per round at most (0: all)")
    overlap_threshold: float = Field(
        0.01, ge=0, description="requests with a smaller relative residual are already known"
    )
    # privacy (collab/mitigations.py, docs/privacy.md)
    cover_text: Path | None = Field(
        None, description="own unedited sentences whose keys join S with zero residual"
    )
    noise_scale: float = Field(0.0, ge=0, description="Gaussian noise on S and P (A0 units)")
    noise_seed: int | None = Field(None, description="seed of the noise (None: fresh)")
    # Fault injection for tests and drills: fail in these rounds ("0,2"), or send a bad update.
    test_fail_rounds: str = ""
    test_bad_update: Literal["", "nan", "fingerprint", "shape", "asymmetric"] = ""

    @classmethod
    def from_node_config(cls, node_config: dict, node_id: int | None = None) -> ClientSettings:
        cfg = {k.replace("-", "_"): v for k, v in dict(node_config).items()}
        if "client_id" not in cfg and node_id is not None:
            cfg["client_id"] = f"node-{node_id}"
        missing = [k for k in ("requests", "state") if k not in cfg]
        if missing:
            raise ValueError(
                "this SuperNode's --node-config lacks "
                + ", ".join(missing)
                + ' (e.g. --node-config \'requests="mine.jsonl" state="client-state"\')'
            )
        return cls(**cfg)

    def fail_rounds(self) -> set[int]:
        return {int(x) for x in self.test_fail_rounds.split(",") if x.strip()}
