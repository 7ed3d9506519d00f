"""The Flower ClientApp (Message API, `@app.train()`): one party's side of a round.

Declared as `clientapp = "collabedit.federation.client_app:app"`. Each SuperNode names its
private request file and state folder in its node config:
`flower-supernode ... --node-config 'requests="mine.jsonl" state="state/" client-id="alice"'`.

Errors are answered with the exception's type only; the details (which may quote a request)
stay in the client's own log and state folder.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

from collabedit.federation.config import ClientSettings, quiet_flower_env

quiet_flower_env()

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from collabedit.federation import codec  # noqa: E402
from collabedit.federation.engine import ClientWorker  # noqa: E402

log = logging.getLogger("collabedit.federation")


def _local_error_log(settings: ClientSettings | None, round: int | None) -> str:
    text = traceback.format_exc()
    if settings is not None:
        path = Path(settings.state) / "errors.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(f"--- {time.ctime()} round {round}\n{text}\n")
    log.error("client error (details stay on this machine):\n%s", text)
    return text


def handle_plain(msg: Message, settings: ClientSettings) -> Message:
    b = codec.parse_broadcast(msg.content)
    worker = ClientWorker(settings)
    kind, update, info = worker.handle(b)
    if kind == "idle":
        return Message(codec.reply_content("idle", settings.client_id), reply_to=msg)
    blob, sha = worker.update_bytes(update, b.round)
    worker.record_submission(b.round, info["case_ids"], sha)
    content = codec.reply_content("update", settings.client_id, info["n_edits"], blob)
    return Message(content, reply_to=msg)


def make_client_app(node_configs: dict[int, dict] | None = None) -> ClientApp:
    """A ClientApp; `node_configs` maps a simulation partition-id to that node's config (the
    simulation engine gives virtual nodes only partition-id and num-partitions)."""
    client = ClientApp()

    def settings_for(context: Context) -> ClientSettings:
        node_config = dict(context.node_config)
        if node_configs is not None:
            node_config = node_configs[int(node_config["partition-id"])] | node_config
        return ClientSettings.from_node_config(node_config, context.node_id)

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        settings, round = None, None
        try:
            settings = settings_for(context)
            if not codec.is_broadcast(msg.content):
                from collabedit.federation.secagg import handle_secagg

                return handle_secagg(msg, context, settings)
            round = int(msg.content.config_records[codec.ROUND]["round"])
            return handle_plain(msg, settings)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a sanitised reply
            _local_error_log(settings, round)
            cid = settings.client_id if settings is not None else f"node-{context.node_id}"
            return Message(
                codec.reply_content("error", cid, error=type(exc).__name__), reply_to=msg
            )

    @client.query()
    def query(msg: Message, context: Context) -> Message:
        """SecAgg+ with automatic bounds: this client's largest |P| and |S| entry."""
        settings, round = None, None
        try:
            settings = settings_for(context)
            round = int(msg.content.config_records[codec.ROUND]["round"])
            from collabedit.federation.secagg import handle_bounds_query

            return handle_bounds_query(msg, settings)
        except Exception as exc:  # noqa: BLE001
            _local_error_log(settings, round)
            cid = settings.client_id if settings is not None else f"node-{context.node_id}"
            return Message(
                codec.reply_content("error", cid, error=type(exc).__name__), reply_to=msg
            )

    return client


app = make_client_app()
