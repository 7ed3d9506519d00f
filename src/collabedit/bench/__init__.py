"""The paper's experiments on the embedded world, one module each, chosen by name.

Each experiment has a config type (pydantic, defaults = what we report), `run(lab, cfg, log)`
returning JSON-ready results, and `plot(result, cfg, path)` writing a PNG.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from collabedit.bench import clients, conflict, forgetting, overlap, privacy, scale
from collabedit.bench.common import BenchConfig
from collabedit.bench.lab import Lab, Log


@dataclass(frozen=True)
class Bench:
    name: str
    config_type: type[BenchConfig]
    run: Callable[[Lab, BenchConfig, Log], dict]
    plot: Callable[[dict, BenchConfig, Path], None]
    summary: str


BENCHES: dict[str, Bench] = {
    b.name: b
    for b in (
        Bench("scale", scale.ScaleConfig, scale.run, scale.plot, scale.__doc__ or ""),
        Bench("clients", clients.ClientsConfig, clients.run, clients.plot, clients.__doc__ or ""),
        Bench(
            "forgetting",
            forgetting.ForgettingConfig,
            forgetting.run,
            forgetting.plot,
            forgetting.__doc__ or "",
        ),
        Bench("overlap", overlap.OverlapConfig, overlap.run, overlap.plot, overlap.__doc__ or ""),
        Bench(
            "conflict", conflict.ConflictConfig, conflict.run, conflict.plot, conflict.__doc__ or ""
        ),
        Bench("privacy", privacy.PrivacyConfig, privacy.run, privacy.plot, privacy.__doc__ or ""),
    )
}


def parse_overrides(items: list[str]) -> dict:
    """key=value pairs; values are read as JSON when they parse ("[50,100]", "3", "true")."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        try:
            out[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = value
    return out


def make_config(name: str, overrides: dict) -> BenchConfig:
    if name not in BENCHES:
        raise ValueError(f"unknown bench {name!r}; known: {', '.join(BENCHES)}")
    return BENCHES[name].config_type(**overrides)


def run_bench(name: str, lab: Lab, cfg: BenchConfig, log: Log = print) -> dict:
    start = time.perf_counter()
    result = BENCHES[name].run(lab, cfg, log)
    return {
        "bench": name,
        "config": cfg.model_dump(),
        "editor": lab.setup.editor.name,
        "editor_config": lab.cfg.model_dump(),
        "model": str(lab.bundle.path),
        "seconds": round(time.perf_counter() - start, 1),
        **result,
    }
