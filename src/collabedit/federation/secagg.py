"""Secure aggregation (SecAgg+) mode: the server learns sum_i P_i and sum_i S_i, not one client's.

CollabEdit needs only these two sums, so SecAgg+ fits it exactly. Flower 1.42 offers SecAgg+ only
on its legacy API: the server runs `SecAggPlusWorkflow` on a `LegacyContext` with a Strategy, the
client answers through `secaggplus_mod` around a `NumPyClient`. The protocol quantises each value
to an integer after clipping it to [-clipping_range, clipping_range] (silently, upstream), sums
the masked integers modulo 2^32 and returns the weighted *mean*. We therefore:

* pre-scale: a client divides P by a public bound B_P and S by B_S, so every value lies in
  [-1, 1] = the clipping range; a value beyond the bound makes the client fail loudly instead of
  being clipped. With the default bounds (0 = auto) the server first asks each client for its
  largest |P| and |S| entry (a "query" message; this reveals one number per matrix) and uses the
  maxima, so nothing can clip;
* weigh every client 1 (max_weight 1), so the mean times the number of clients is the sum, and
  pick the quantisation range q <= 2^32 / (n + 1) so the modular sum of n values cannot wrap;
* check that the round happened: the workflow halts silently when too few clients remain; we
  record whether the strategy's aggregate_fit ran and with how many clients, and treat anything
  else as a failed round (abort or quorum policy as usual).

The result carries quantisation error (stochastic rounding, ~B / q per value and client) and S
is symmetrised after summing. Caveats (see docs/federation.md): experimental upstream, the mask
generator is seeded with 32-bit seeds (Flower issue #7522), no protection against a malicious
server that drops clients on purpose; a bad update cannot be rejected alone (the server never
sees it), so a non-finite or wrong-fingerprint contribution fails the whole round.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client import NumPyClient
from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype
from flwr.client.mod import make_ffn, secaggplus_mod
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from collabedit.federation import codec
from collabedit.federation.config import ClientSettings
from collabedit.federation.engine import Broadcast, ClientWorker, RoundReport, ServerEngine

MODULUS = 2**32


def quantization_range(n_clients: int) -> int:
    """Largest q (at most 2^30) with n * q < 2^32: the modular sum of n values never wraps."""
    return min(2**30, (MODULUS - 1) // (n_clients + 1))


def noise_floor(bound_s: float, n_clients: int, q: int, d_in: int) -> float:
    """Spectral size of the quantisation noise in sum S, below which lambda*C + sum S is not
    inverted. Each client's value is rounded (stochastically, independently) to a grid of step
    2 B_S / q; the sum of n such errors has standard deviation at most sqrt(n) * B_S / q, and a
    symmetric d x d matrix of independent errors of standard deviation sigma has spectral norm
    about 2 sigma sqrt(d). The floor is four times that: a bound that holds with room, far below
    the worst case d * n * 2 B_S / q that would also cut directions the data determines."""
    return 8.0 * bound_s * (n_clients * d_in) ** 0.5 / q


# ---------------------------------------------------------------------------------------------
# server


class _SumStrategy(Strategy):
    """Hands the broadcast to every client and keeps what SecAgg+ returns (their mean)."""

    def __init__(self, b: Broadcast, bounds: tuple[float, float], min_clients: int):
        self.b, self.bounds, self.min_clients = b, bounds, min_clients
        self.results: list | None = None
        self.failures: list = []
        self.sampled = 0

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        n = client_manager.num_available()
        clients = client_manager.sample(num_clients=n, min_num_clients=self.min_clients)
        self.sampled = len(clients)
        layers = sorted(self.b.weights)
        params = ndarrays_to_parameters([self.b.weights[k].double().numpy() for k in layers])
        config = {
            "round": self.b.round,
            "base-fingerprint": self.b.base_fingerprint,
            "ledger": json.dumps(self.b.ledger),
            "settings": json.dumps(self.b.settings),
            "layers": json.dumps(layers),
            "bound-p": float(self.bounds[0]),
            "bound-s": float(self.bounds[1]),
        }
        return [(c, FitIns(params, dict(config))) for c in clients]

    def aggregate_fit(self, server_round, results, failures):
        self.results, self.failures = list(results), list(failures)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def _query_bounds(grid: Grid, engine: ServerEngine, b: Broadcast, report: RoundReport):
    """Ask every client for its largest |P| and |S| entry; None when the round cannot go on."""
    nodes = sorted(grid.get_node_ids())
    msgs = [
        Message(
            codec.broadcast_content(b),
            dst_node_id=n,
            message_type="query",
            group_id=f"{b.round}-bounds",
        )
        for n in nodes
    ]
    got = list(grid.send_and_receive(msgs, timeout=engine.settings.round_timeout))
    max_p = max_s = 0.0
    answered = set()
    for m in got:
        answered.add(m.metadata.src_node_id)
        rep = codec.parse_reply(m)
        if rep.kind == "error":
            report.failed[rep.client_id or f"node-{rep.node_id}"] = f"error: {rep.detail}"
            continue
        st = m.content.config_records[codec.STATUS]
        if rep.kind == "idle":
            report.idle.append(rep.client_id)
            continue
        max_p, max_s = max(max_p, float(st["max-p"])), max(max_s, float(st["max-s"]))
    for n in nodes:
        if n not in answered:
            report.failed[f"node-{n}"] = "missing: no reply to the bounds query"
    if report.failed and engine.settings.fault_policy == "abort":
        report.reason = "policy abort: a client failed the bounds query; nothing merged"
        return None
    if max_p == 0.0 and max_s == 0.0:
        report.status, report.reason = "idle", "no client has pending requests"
        return None
    # a little headroom: the largest value maps inside the clipping range, not onto its edge
    return max_p * 1.001 or 1.0, max_s * 1.001 or 1.0


def secagg_round(
    grid: Grid, engine: ServerEngine, attempt: int = 0, context: Context | None = None
) -> RoundReport:
    started = time.perf_counter()
    s = engine.settings
    b = engine.broadcast()
    report = RoundReport(round=b.round, status="aborted")
    if s.secagg_bound_p > 0 and s.secagg_bound_s > 0:
        bounds = (s.secagg_bound_p, s.secagg_bound_s)
    else:
        bounds = _query_bounds(grid, engine, b, report)
        if bounds is None:
            return _done(engine, report, started)
    n_nodes = len(list(grid.get_node_ids()))
    q = quantization_range(n_nodes)
    strategy = _SumStrategy(b, bounds, s.min_clients)
    base = context or Context(
        run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}
    )
    ctx = LegacyContext(base, config=ServerConfig(num_rounds=1), strategy=strategy)
    thread, f_stop, c_done = start_update_client_manager_thread(grid, ctx.client_manager)
    c_done.wait()
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: b.round})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,
        reconstruction_threshold=1.0 if s.fault_policy == "abort" else 0.5,
        max_weight=1.0,
        clipping_range=1.0,
        quantization_range=q,
        modulus_range=MODULUS,
        timeout=s.round_timeout,
    )
    try:
        workflow(grid, ctx)
    finally:
        f_stop.set()
    results = strategy.results
    if results is None:  # the workflow halted: SecAgg+ says so only in its log
        report.reason = (
            f"SecAgg+ halted before aggregation (sampled {strategy.sampled} of {n_nodes} "
            "node(s)): a client failed or too few remained; the round was skipped"
        )
        return _done(engine, report, started)
    members = {}
    for _, fit in results:
        m = fit.metrics
        if m.get("fingerprint") != b.base_fingerprint or int(m.get("round", -1)) != b.round:
            report.reason = f"a client answered for another model or round ({m}); nothing merged"
            return _done(engine, report, started)
        if int(m["n-edits"]) > 0:
            members[str(m["client-id"])] = int(m["n-edits"])
        else:
            report.idle.append(str(m["client-id"]))
    missing = strategy.sampled - len(results)
    if missing and s.fault_policy == "abort":
        report.failed["secagg"] = f"{missing} client(s) dropped during SecAgg+"
        report.reason = "policy abort: a client dropped; nothing merged"
        return _done(engine, report, started)
    if s.fault_policy == "quorum" and len(results) < s.min_clients:
        report.reason = f"quorum not reached: {len(results)} < min-clients {s.min_clients}"
        return _done(engine, report, started)
    if not members:
        report.status, report.reason = "idle", "no client has pending requests"
        return _done(engine, report, started)
    mean = parameters_to_ndarrays(results[0][1].parameters)
    n = len(results)
    layers = sorted(b.weights)
    sum_p, sum_s = {}, {}
    for i, layer in enumerate(layers):
        p = torch.from_numpy(np.asarray(mean[2 * i], dtype=np.float64)) * (n * bounds[0])
        sq = torch.from_numpy(np.asarray(mean[2 * i + 1], dtype=np.float64)) * (n * bounds[1])
        sum_p[layer], sum_s[layer] = p, (sq + sq.T) / 2
    # what arrived: one masked int64 vector per client, as many values as P and S (+1 weight)
    values = sum(x.size for x in mean) + 1
    report.bytes_received = n * values * 8
    d_in = next(iter(sum_s.values())).shape[0]
    # the sums' quantisation noise: solved above it, when the method takes a noise floor
    floor = noise_floor(bounds[1], n, q, d_in) if _takes_floor(engine.settings.method) else 0.0
    engine.merge_sums(sum_p, sum_s, members, report, floor=floor)
    report.info = {"secagg_bounds": list(bounds), "secagg_clients": n, "noise_floor": floor}
    return _done(engine, report, started)


def _takes_floor(method: str) -> bool:
    from collabedit.collab.merge import get_method

    return "floor" in get_method(method).config_type.model_fields


def _done(engine: ServerEngine, report: RoundReport, started: float) -> RoundReport:
    report.seconds = round(time.perf_counter() - started, 3)
    engine.reports.append(report)
    return report


# ---------------------------------------------------------------------------------------------
# client


def _outbox(settings: ClientSettings, round: int):
    from pathlib import Path

    return Path(settings.state) / "outbox" / f"round-{round}-secagg.safetensors"


def client_update_for_round(settings: ClientSettings, b: Broadcast):
    """This client's full-form update for the round, computed once (the bounds query and the
    SecAgg+ fit both need it)."""
    from collabedit.collab.update import load_update

    path = _outbox(settings, b.round)
    worker = ClientWorker(settings)
    if path.is_file():
        u = load_update(path)
        if u.base_fingerprint == b.base_fingerprint and u.round == b.round:
            st = worker.reconcile(b.ledger, b.round)
            return worker, u, [str(c) for c in u.extra.get("case_ids", [])], st
    kind, update, info = worker.handle(b, secure=True)
    if kind == "idle":
        return worker, None, [], None
    update.extra = {"case_ids": [str(c) for c in info["case_ids"]]}
    update.save(path)
    return worker, update, update.extra["case_ids"], None


def handle_bounds_query(msg: Message, settings: ClientSettings) -> Message:
    b = codec.parse_broadcast(msg.content)
    _, update, case_ids, _ = client_update_for_round(settings, b)
    if update is None:
        return Message(codec.reply_content("idle", settings.client_id), reply_to=msg)
    max_p = max(float(lu.P.abs().max()) for lu in update.layers.values())
    max_s = max(float(lu.S.abs().max()) for lu in update.layers.values())
    content = codec.reply_content("bounds", settings.client_id, len(case_ids))
    content.config_records[codec.STATUS]["max-p"] = max_p
    content.config_records[codec.STATUS]["max-s"] = max_s
    return Message(content, reply_to=msg)


class _SecAggClient(NumPyClient):
    def __init__(self, settings: ClientSettings):
        self.settings = settings

    def fit(self, parameters, config):
        layers = json.loads(str(config["layers"]))
        weights = {
            k: torch.from_numpy(np.array(a)) for k, a in zip(layers, parameters, strict=True)
        }
        b = Broadcast(
            round=int(config["round"]),
            base_fingerprint=str(config["base-fingerprint"]),
            weights=weights,
            ledger=json.loads(str(config["ledger"])),
            settings=json.loads(str(config["settings"])),
        )
        bound_p, bound_s = float(config["bound-p"]), float(config["bound-s"])
        worker, update, case_ids, _ = client_update_for_round(self.settings, b)
        out = []
        for k in layers:
            d_out, d_in = weights[k].shape
            if update is None:
                out += [np.zeros((d_out, d_in)), np.zeros((d_in, d_in))]
                continue
            lu = update.layers[k]
            for name, t, bound in (("P", lu.P, bound_p), ("S", lu.S, bound_s)):
                peak = float(t.abs().max())
                if not np.isfinite(peak):
                    raise ValueError(f"layer {k} {name}: non-finite values")
                if peak > bound:
                    raise ValueError(
                        f"layer {k} {name}: largest |value| {peak:.6g} exceeds the public bound "
                        f"{bound:.6g}; it would be clipped. Raise secagg-bound-{name.lower()} "
                        "(or set it to 0 for automatic bounds)."
                    )
                out.append((t.double() / bound).numpy())
        if update is not None:
            worker.record_submission(b.round, case_ids, None)
        metrics = {
            "client-id": self.settings.client_id,
            "n-edits": len(case_ids),
            "fingerprint": b.base_fingerprint,
            "round": b.round,
        }
        return out, 1, metrics


def handle_secagg(msg: Message, context: Context, settings: ClientSettings) -> Message:
    """One SecAgg+ stage message, through Flower's secaggplus_mod."""

    def inner(m: Message, ctx: Context) -> Message:
        return handle_legacy_message_from_msgtype(
            lambda _ctx: _SecAggClient(settings).to_client(), m, ctx
        )

    return make_ffn(inner, [secaggplus_mod])(msg, context)
