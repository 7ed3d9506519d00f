"""What the server and a client do in a federated round, without Flower.

The Flower apps (server_app.py, client_app.py) only move what is here over the wire; the math and
the checks are collab/'s: a client builds its update with `rounds.client_round` (overlap check
included), the server validates and merges with `rounds.server_round` (ledger, rejections,
state) and writes its state atomically with `save_state`.

Round r:
1. The server broadcasts a `Broadcast`: the round, the fingerprint of the current global model,
   its edited layers' weights, the settings a client needs, and the ledger (which client's update
   was merged in which round). No request ever travels in this direction either.
2. Each client reconciles its state folder with the ledger (a submitted update that is in the
   ledger is done; one that is not goes back to pending), edits its pending requests on the
   global model and answers with its update file's bytes, or "idle" when nothing is pending.
3. The server applies the fault policy, then merges: it writes every received update verbatim to
   its state folder and calls `server_round`, which rejects bad updates one by one. It writes the
   next global layers, then the state (last, atomically), so a server killed at any point resumes
   from the last completed round and no update is merged twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from collabedit import io
from collabedit.federation.config import ClientSettings, ServerSettings

GLOBAL_DIR = "global"
INCOMING_DIR = "incoming"
CLIENT_STATE = "client_state.json"


# ---------------------------------------------------------------------------------------------
# shared pieces


@dataclass
class Broadcast:
    """What the server sends to every client at the start of a round."""

    round: int
    base_fingerprint: str
    weights: dict[int, torch.Tensor]  # layer -> (d_out, d_in), current global model
    ledger: list[dict]  # [{"round", "client_id", "update_sha256", "n_edits"}]
    settings: dict  # the ServerSettings fields a client needs (model, layers, ...)


CLIENT_KEYS = (
    "model",
    "layers",
    "preset",
    "mom2_samples",
    "editor",
    "editor_config",
    "method",
    "transport",
)


@dataclass
class Reply:
    """One client's answer as the server sees it."""

    node_id: int
    kind: str  # "update" | "idle" | "error" | "missing"
    blob: bytes | None = None
    client_id: str = ""
    detail: str = ""


@dataclass
class RoundReport:
    round: int
    status: str  # "merged" | "aborted" | "idle"
    merged: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    idle: list[str] = field(default_factory=list)
    reason: str = ""
    seconds: float = 0.0
    bytes_received: int = 0
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def party_setup(
    model_name: str,
    editor: str,
    layers: list[int] | None,
    preset: str,
    mom2_samples: int,
    role: str = "client",
    editor_config: dict | None = None,
):
    """The EditingSetup of a party (collab/setup.py) on the *unedited* base model, so every party
    of a federation uses the same A0 = lambda C_0 whatever round it joins in. Cached per
    process (a Flower simulation keeps its client actors alive between rounds); the edited
    layers are put back to the base weights on every call. `role` keeps a server's model apart
    from the clients' when both run in one process."""
    from collabedit.collab.setup import EditingSetup
    from collabedit.editors import get_editor

    extra = json.dumps(editor_config or {}, sort_keys=True)
    key = (role, model_name, editor, tuple(layers or ()), preset, mom2_samples, extra)
    if key not in _SETUP_CACHE:
        fields = get_editor(editor).config_type.model_fields
        overrides = dict(editor_config or {})
        if mom2_samples:
            if "mom2_n_samples" not in fields:
                raise ValueError(f"editor {editor!r} reads no corpus: mom2-samples does not apply")
            overrides["mom2_n_samples"] = mom2_samples
        _SETUP_CACHE[key] = EditingSetup.open(
            model_name, editor, preset=preset or None, layers=layers, overrides=overrides or None
        )
    setup = _SETUP_CACHE[key]
    setup.reset()
    return setup


_SETUP_CACHE: dict = {}


# ---------------------------------------------------------------------------------------------
# server


class ServerEngine:
    """The server's side of a federation, resumable from its state folder."""

    def __init__(self, settings: ServerSettings):
        from collabedit.collab.rounds import open_state
        from collabedit.models import arch

        self.settings = settings
        self.state_dir = Path(settings.state_dir)
        self.setup = party_setup(
            settings.model,
            settings.editor,
            settings.layer_list(),
            settings.preset,
            settings.mom2_samples,
            role="server",
            editor_config=settings.editor_config_dict(),
        )
        lm = self.model = self.setup.model
        self.tok = self.setup.tokenizer
        self.layers = self.setup.layers
        self.state, self.sum_s = open_state(
            self.state_dir, self.setup, settings.method, settings.beta1
        )
        if self.state.round > 0:  # resume: the global model of the saved round
            path = self.global_path(self.state.round)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: global layers of round {self.state.round}")
            saved = load_file(str(path))
            for layer in self.layers:
                arch.write_weight(lm, layer, saved[f"layer.{layer}.weight"])
        fp = arch.fingerprint(lm, self.layers)
        if fp != self.state.base_fingerprint:
            raise ValueError(
                f"{self.state_dir}: model {settings.model} with the saved layers has fingerprint "
                f"{fp}, the state expects {self.state.base_fingerprint}"
            )
        self.reports: list[RoundReport] = []

    def global_path(self, round: int) -> Path:
        return self.state_dir / GLOBAL_DIR / f"round-{round}.safetensors"

    def weights(self) -> dict[int, torch.Tensor]:
        from collabedit.models import arch

        return {layer: arch.read_weight(self.model, layer) for layer in self.layers}

    def broadcast(self) -> Broadcast:
        s = self.settings.model_dump()
        return Broadcast(
            round=self.state.round,
            base_fingerprint=self.state.base_fingerprint,
            weights=self.weights(),
            ledger=[
                {
                    "round": e.round,
                    "client_id": e.client_id,
                    "update_sha256": e.update_sha256,
                    "n_edits": e.n_edits,
                }
                for e in self.state.ledger
            ],
            settings={k: s[k] for k in CLIENT_KEYS} | {"layers": ",".join(map(str, self.layers))},
        )

    def finish_round(self, replies: list[Reply], started: float | None = None) -> RoundReport:
        """Apply the fault policy, merge what may be merged, persist. Never raises for a bad or
        missing client: the report says what happened."""
        started = started if started is not None else time.perf_counter()
        r = self.state.round
        report = RoundReport(round=r, status="aborted")
        # merged in client-id order, whatever order the network delivered them in: the same
        # inputs give the same bits (float sums depend on their order)
        updates = sorted(
            (x for x in replies if x.kind == "update"), key=lambda x: (x.client_id, x.node_id)
        )
        report.bytes_received = sum(len(x.blob or b"") for x in updates)
        report.idle = [x.client_id or f"node-{x.node_id}" for x in replies if x.kind == "idle"]
        report.failed = {
            x.client_id or f"node-{x.node_id}": f"{x.kind}: {x.detail}".rstrip(": ")
            for x in replies
            if x.kind in ("error", "missing")
        }
        policy, quorum = self.settings.fault_policy, self.settings.min_clients
        if report.failed and policy == "abort":
            report.reason = f"policy abort: {len(report.failed)} client(s) failed; nothing merged"
        elif not updates and not report.failed:
            report.status, report.reason = "idle", "no client has pending requests"
        elif policy == "quorum" and len(updates) + len(report.idle) < quorum:
            # clients with nothing pending count: in later rounds only a few have work left
            answered = len(updates) + len(report.idle)
            report.reason = (
                f"quorum not reached: {answered} client(s) answered < min-clients {quorum}"
            )
        elif not updates:
            report.reason = "no update received"
        else:
            paths, senders = [], {}
            for x in updates:
                name = f"node-{x.node_id}.safetensors"
                path = self.state_dir / INCOMING_DIR / f"round-{r}" / name
                io.write_bytes(path, x.blob)
                paths.append(path)
                senders[str(path)] = f"node-{x.node_id}"  # what Flower authenticated
            floor = self.settings.noise_floor
            params = {"floor": floor} if floor else {}
            self._merge(paths, report, params, senders=senders)
        report.seconds = round(time.perf_counter() - started, 3)
        self.reports.append(report)
        return report

    def merge_sums(
        self,
        sum_p: dict,
        sum_s: dict,
        members: dict[str, int],
        report: RoundReport,
        floor: float = 0.0,
    ):
        """Merge one round from the clients' summed P and S only (secure aggregation): the sums
        go through merge_round as one update whose ledger entry names every member. `floor`:
        the sums' noise level (see linalg.solve_update)."""
        from collabedit.collab.update import ClientUpdate, LayerUpdate

        r = self.state.round
        update = ClientUpdate(
            base_fingerprint=self.state.base_fingerprint,
            client_id=secagg_client_id(members),
            round=r,
            n_edits=sum(members.values()),
            layers={k: LayerUpdate(P=sum_p[k], S=sum_s[k]) for k in self.layers},
            editor=self.settings.editor,
            extra={"members": members},
        )
        path = self.state_dir / INCOMING_DIR / f"round-{r}" / "secagg-sum.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        update.save(path)
        # no per-update bounds: the sum carries masking noise of full rank, and no single
        # client's update is visible (docs/reliability.md)
        self._merge([path], report, {"floor": floor} if floor else {}, checked=False)

    def _merge(
        self,
        paths: list[Path],
        report: RoundReport,
        params: dict | None = None,
        senders: dict[str, str] | None = None,
        checked: bool = True,
    ) -> None:
        from collabedit.collab.rounds import server_round
        from collabedit.collab.state import save_state

        try:
            outcome = server_round(
                self.model,
                paths,
                self.state,
                self.sum_s,
                self.setup.regulariser,
                self.settings.method,
                params,
                bounds=self.setup.update_bounds()
                if checked and self.settings.update_bounds
                else None,
                senders=senders,
            )
        except ValueError as exc:  # every update rejected: nothing merged, model untouched
            report.reason = str(exc)
            report.rejected = {str(p): "rejected" for p in paths}
            return
        report.rejected = outcome.rejected
        # next round's base first, then the state (last, atomic): a crash in between re-runs
        # this round from the old state and the old global layers
        io.write_safetensors(
            self.global_path(outcome.state.round),
            {f"layer.{k}.weight": v for k, v in self.weights().items()},
        )
        save_state(self.state_dir, outcome.state, outcome.sum_s)
        merged_now = [e for e in outcome.state.ledger if e.round == self.state.round]
        self.state, self.sum_s = outcome.state, outcome.sum_s
        report.status = "merged"
        report.merged = [e.client_id for e in merged_now]

    def write_summary(self, extra: dict | None = None) -> Path:
        path = self.state_dir / "summary.json"
        payload = {
            "round": self.state.round,
            "base_fingerprint": self.state.base_fingerprint,
            "ledger": [e.model_dump() for e in self.state.ledger],
            "reports": [x.to_dict() for x in self.reports],
        } | (extra or {})
        io.write_json(path, payload)
        return path

    def save_model(self, out_dir: str | os.PathLike[str]) -> None:
        """The global model, with the files its base folder carried (as the CLI saves it)."""
        from collabedit.models.loading import save_model

        # the run's configured destination, replaced at the end of every run (never the base
        # model's own folder: save_model refuses that)
        save_model(self.model, self.tok, out_dir, self.setup.source, overwrite=True)


def secagg_client_id(members: dict[str, int]) -> str:
    return "secagg[" + ",".join(sorted(members)) + "]"


def ledger_members(client_id: str) -> list[str]:
    """The clients one ledger entry stands for (several for a securely aggregated round)."""
    if client_id.startswith("secagg[") and client_id.endswith("]"):
        return client_id[len("secagg[") : -1].split(",")
    return [client_id]


# ---------------------------------------------------------------------------------------------
# client


class ClientWorker:
    """A client's side: private requests and a state folder on its own machine."""

    def __init__(self, settings: ClientSettings):
        self.settings = settings
        self.state_path = Path(settings.state) / CLIENT_STATE

    def load_state(self) -> dict:
        if self.state_path.is_file():
            return json.loads(self.state_path.read_text())
        return {"client_id": self.settings.client_id, "done": {}, "submitted": None}

    def reconcile(self, ledger: list[dict], current_round: int) -> dict:
        """Move a submitted update to done when the ledger has it, back to pending when not."""
        st = self.load_state()
        sub = st.get("submitted")
        if sub is not None:
            hit = [
                e
                for e in ledger
                if e["round"] == sub["round"]
                and self.settings.client_id in ledger_members(e["client_id"])
            ]
            # a plain update is matched by its bytes' hash; a securely aggregated one by round
            exact = [e for e in hit if sub.get("sha256") in (None, e["update_sha256"])]
            if exact:
                for cid in sub["case_ids"]:
                    if str(cid) in st["done"]:
                        raise RuntimeError(f"request {cid} was merged twice")
                    st["done"][str(cid)] = sub["round"]
                st["submitted"] = None
            elif sub["round"] < current_round:
                st["submitted"] = None  # not merged (dropped or rejected): pending again
        io.write_json(self.state_path, st)
        return st

    def pending(self, st: dict):
        from collabedit.requests import load_requests

        reqs = load_requests(self.settings.requests, self.settings.format)
        known = st.get("known", {})
        return [r for r in reqs if str(r.case_id) not in st["done"] and str(r.case_id) not in known]

    def handle(self, b: Broadcast, secure: bool = False):
        """("idle", None, info) or ("update", ClientUpdate, info) for round b.round: the one
        client round (collab/rounds.py) on the broadcast global model, overlap check included."""
        from collabedit.collab.merge import get_method
        from collabedit.collab.mitigations import Mitigation, read_cover_texts
        from collabedit.collab.rounds import NothingToEdit, RoundInfo, client_round
        from collabedit.models import arch

        if b.round in self.settings.fail_rounds():
            raise RuntimeError(f"injected failure in round {b.round}")
        st = self.reconcile(b.ledger, b.round)
        todo = self.pending(st)
        if self.settings.per_round:
            todo = todo[: self.settings.per_round]
        if not todo:
            return "idle", None, {"n_edits": 0}
        s = b.settings
        layers = [int(x) for x in s["layers"].split(",")]
        extra = json.loads(s.get("editor_config") or "{}")
        setup = party_setup(
            s["model"], s["editor"], layers, s["preset"], s["mom2_samples"], editor_config=extra
        )
        for layer, w in b.weights.items():
            arch.write_weight(setup.model, layer, w)
        info = RoundInfo(b.round, b.base_fingerprint, tuple(layers), s["editor"])
        mitigation = Mitigation(
            read_cover_texts(self.settings.cover_text) if self.settings.cover_text else (),
            self.settings.noise_scale,
            self.settings.noise_seed,
        )
        form = "full" if secure or mitigation.active else s["transport"]
        # Delta_i goes out only when the merge method needs it: it exposes more than P and S
        send_delta = "delta" in get_method(s["method"]).client_sends
        try:
            cr = client_round(
                setup,
                todo,
                self.settings.client_id,
                info,
                overlap_threshold=self.settings.overlap_threshold,
                form=form,
                send_delta=send_delta,
                mitigation=mitigation,
            )
        except NothingToEdit:
            cr = None
        finally:
            setup.reset()
        skipped = todo if cr is None else cr.skipped
        if skipped:
            self.record_known([r.case_id for r in skipped], b.round)
        if cr is None:
            return "idle", None, {"n_edits": 0, "known": len(skipped)}
        update = cr.update
        self._inject_fault(update)
        return (
            "update",
            update,
            {"n_edits": len(cr.edited), "case_ids": [r.case_id for r in cr.edited]},
        )

    def record_known(self, case_ids: list, round: int) -> None:
        """Requests the global model already satisfies (overlap): never sent, not pending."""
        st = self.load_state()
        known = st.setdefault("known", {})
        for cid in case_ids:
            known[str(cid)] = round
        io.write_json(self.state_path, st)

    def record_submission(self, round: int, case_ids: list, sha256: str | None) -> None:
        st = self.load_state()
        st["submitted"] = {"round": round, "case_ids": [str(c) for c in case_ids], "sha256": sha256}
        io.write_json(self.state_path, st)

    def update_bytes(self, update, round: int) -> tuple[bytes, str]:
        path = Path(self.settings.state) / "outbox" / f"round-{round}.safetensors"
        update.save(path)
        blob = path.read_bytes()
        return blob, hashlib.sha256(blob).hexdigest()

    def _inject_fault(self, update) -> None:
        if self.settings.test_bad_update:
            corrupt(update, self.settings.test_bad_update)


def corrupt(update, bad: str) -> None:
    """Spoil an update the way a faulty or malicious client might (fault injection)."""
    lu = update.layers[min(update.layers)]
    if bad == "fingerprint":
        update.base_fingerprint = "0" * len(update.base_fingerprint)
        return
    for kind in ("S", "F"):
        t = getattr(lu, kind)
        if t is None:
            continue
        t = t.clone()
        if bad == "nan":
            t[0, 0] = float("nan")
        elif bad == "shape":
            t = t[:-1, :-1] if kind == "S" else t[:-1]
        elif bad == "asymmetric" and kind == "S":
            t[0, 1] += 1.0 + t.abs().max()
        else:
            raise ValueError(f"unknown fault {bad!r}")
        setattr(lu, kind, t)
