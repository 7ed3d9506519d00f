"""The Flower ServerApp: rounds of CollabEdit over a Grid (Message API, `@app.main()`).

Declared in a Flower app's pyproject as
`serverapp = "collabedit.federation.server_app:app"`; the run config is
`collabedit.federation.config.ServerSettings` with dashes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from collabedit.federation.config import ServerSettings, quiet_flower_env

quiet_flower_env()

from flwr.app import Context, Message  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from collabedit.federation import codec  # noqa: E402
from collabedit.federation.engine import Reply, RoundReport, ServerEngine  # noqa: E402

log = logging.getLogger("collabedit.federation")


def wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(nodes)} SuperNode(s) connected after {timeout:.0f} s; "
                f"min-clients is {n}"
            )
        time.sleep(0.5)


def _bytes_default(v):
    return v.hex() if isinstance(v, bytes) else repr(v)


def record_received(engine: ServerEngine, round: int, attempt: int, msgs: list[Message]) -> None:
    """Keep what the server received (statuses, shapes; update bytes are kept in incoming/)."""
    path = engine.state_dir / "received" / f"round-{round}-attempt-{attempt}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([codec.received_summary(m) for m in msgs], default=_bytes_default))


def plain_round(grid: Grid, engine: ServerEngine, attempt: int = 0) -> RoundReport:
    started = time.perf_counter()
    b = engine.broadcast()
    nodes = sorted(grid.get_node_ids())
    msgs = [
        Message(
            codec.broadcast_content(b), dst_node_id=n, message_type="train", group_id=str(b.round)
        )
        for n in nodes
    ]
    got = list(grid.send_and_receive(msgs, timeout=engine.settings.round_timeout))
    record_received(engine, b.round, attempt, got)
    replies = [codec.parse_reply(m) for m in got]
    answered = {r.node_id for r in replies}
    replies += [
        Reply(n, "missing", detail=f"no reply within {engine.settings.round_timeout:.0f} s")
        for n in nodes
        if n not in answered
    ]
    return engine.finish_round(replies, started)


def run_server(
    grid: Grid, settings: ServerSettings, context: Context | None = None
) -> ServerEngine:
    """All rounds of one Flower run; resumes from settings.state_dir."""
    engine = ServerEngine(settings)
    wait_for_nodes(grid, settings.min_clients, settings.connect_timeout)
    target = engine.state.round + settings.rounds
    failures = 0
    attempt = 0
    status = "done"
    while engine.state.round < target:
        if settings.secure_aggregation:
            from collabedit.federation.secagg import secagg_round

            report = secagg_round(grid, engine, attempt, context)
        else:
            report = plain_round(grid, engine, attempt)
        attempt += 1
        log.warning("round %s: %s %s", report.round, report.status, report.reason)
        engine.write_summary({"status": "running"})
        if report.status == "idle":
            break
        if report.status == "aborted":
            failures += 1
            if failures > settings.max_retries:
                status = "failed"
                break
        else:
            failures = 0
    engine.write_summary({"status": status})
    if settings.out_dir and status == "done":
        engine.save_model(Path(settings.out_dir))
    if status == "failed":
        raise RuntimeError(
            f"round {engine.state.round} did not merge after {settings.max_retries} retries: "
            f"{engine.reports[-1].reason}"
        )
    return engine


def make_server_app(settings: ServerSettings | None = None) -> ServerApp:
    """A ServerApp; with `settings` it ignores the run config (used by `federate simulate`)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, settings or ServerSettings.from_run_config(context.run_config), context)

    return server


app = make_server_app()
