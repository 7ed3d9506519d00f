"""The demo experiment (the paper's Table 1 layout), simulated in one process on the world.

N clients each hold M private requests. Rows: the unedited model, Global-Edit (one party edits
all N*M), and every registered merge method (CollabEdit and the destructive baselines TIES,
Task-Arithmetic, Simple-Average, merged from the clients' local deltas); with a sequential editor
also CollabEdit under the layer-synchronous protocol. CounterFact-form requests give
NS/PS/ES/Score, zsRE-form requests NA/PA/EA/Score. Fidelity: max over layers of
||Delta_collab - Delta_global|| / ||Delta_global|| per editor and protocol.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

from collabedit.bench.lab import CF_KEYS, ZSRE_KEYS, Lab, Log, score_line, split_evenly
from collabedit.collab.merge import METHODS
from collabedit.collab.protocol import layer_sync_round, merge_updates, relative_gap
from collabedit.collab.rounds import client_round
from collabedit.collab.setup import EditingSetup
from collabedit.editors import DEFAULT_EDITOR, FIDELITY_EDITORS, EditSession, closed_form_edit
from collabedit.editors.base import EditorConfig
from collabedit.models import arch
from collabedit.world.store import WorldBundle

LAYER_SYNC_ROW = "collabedit layer-sync"


def method_rows(sequential: bool = False) -> tuple[str, ...]:
    """The table's rows. A sequential editor's one-shot merge is not Global-Edit (each client's
    later layers see only its own earlier writes), so for one the CollabEdit merge under the
    layer-synchronous protocol follows it: the row that equals Global-Edit."""
    rows = ["unedited", "global", *METHODS]
    if sequential:
        rows.insert(rows.index("collabedit") + 1, LAYER_SYNC_ROW)
    return tuple(rows)


def _layer_sync_scores(
    lab: Lab, session: EditSession, n_clients: int, keys: Sequence[str]
) -> dict:
    """Scores of CollabEdit run layer by layer: each layer merged from the clients' sums of P
    and S read on the model with the layers below already merged; then undone."""
    start = lab.snapshot()
    clients = [session.select(idx) for idx in split_evenly(len(session.requests), n_clients)]
    try:
        layer_sync_round(lab.model, clients, lab.setup.regulariser)
        return lab.score(session.requests, keys)
    finally:
        arch.restore(lab.model, start)


def _fidelity(
    lab: Lab, session: EditSession, n_clients: int, editors: Sequence[str], log: Log
) -> dict:
    """Merge fidelity of each editor's one-shot merge (and, for sequential editors, of the
    layer-synchronous protocol) against that editor's Global-Edit, on a float64 copy of the
    model so that it shows the method's error, not float32 rounding.

    The protocols differ only when several layers are edited; a one-layer config is measured on
    the layer below it too (the targets stay at the same, last, layer)."""
    m64 = copy.deepcopy(lab.model).double()
    layers = lab.layers if len(lab.layers) > 1 else [max(lab.layers[0] - 1, 0), *lab.layers]
    layers = sorted(set(layers))
    log(f"[fidelity] one-shot and layer-sync against Global-Edit, layers {layers}")
    parts = split_evenly(len(session.requests), n_clients)
    original = arch.snapshot(m64, layers)
    fid = {}
    for editor in editors:
        # the regulariser of the float32 model (as every other row uses), sessions on m64
        setup = EditingSetup.open(
            (lab.model, lab.tok), editor, overrides=lab.cfg.model_dump() | {"layers": layers}
        )
        full = setup.editor.session(m64, lab.tok, session.requests, setup.cfg, reuse=session)
        glob = closed_form_edit(full, setup.regulariser, apply=False)
        reference = {e.layer: e.delta for e in glob.layers}
        clients = [full.select(idx) for idx in parts]
        updates = [
            client_round(setup, c.requests, f"client-{i}", session=c).update
            for i, c in enumerate(clients)
        ]
        merged = merge_updates(updates, setup.regulariser, "collabedit")
        fid[f"{editor} one-shot"] = relative_gap(merged, reference)
        if not full.frozen:
            synced = layer_sync_round(m64, clients, setup.regulariser)
            fid[f"{editor} layer-sync"] = relative_gap(synced, reference)
            arch.restore(m64, original)
    log("[fidelity] " + ", ".join(f"{k} {v:.2e}" for k, v in fid.items()))
    return fid


def _named(form: str, metrics: dict) -> dict:
    """The demo keeps both forms' metrics in one row per method: RS of the zsRE-form requests
    becomes zsRE_RS (the other metrics already have distinct names)."""
    if form == "counterfact":
        return metrics
    return {("zsRE_RS" if k == "RS" else k): v for k, v in metrics.items()}


def run_demo(
    bundle: WorldBundle,
    n_clients: int = 10,
    edits_per_client: int = 10,
    cfg: EditorConfig | None = None,
    seed: int = 0,
    editor: str = DEFAULT_EDITOR,
    method_params: dict[str, dict] | None = None,
    fidelity: bool = True,
    fidelity_editors: Sequence[str] | None = None,
    log: Log = print,
) -> dict:
    start = time.perf_counter()
    lab = Lab.open(bundle, cfg, editor=editor, method_params=method_params)
    if fidelity_editors is None:
        fidelity_editors = FIDELITY_EDITORS if editor == DEFAULT_EDITOR else (editor,)
    n = n_clients * edits_per_client
    methods: dict[str, dict] = {}
    fid: dict[str, float] = {}
    for form, keys in (("counterfact", CF_KEYS), ("zsre", ZSRE_KEYS)):
        requests = lab.requests(n, seed=seed, form=form)
        log(f"[{form}] {editor}: preparing {n} requests")
        session = lab.session(requests)
        methods = methods or {row: {} for row in method_rows(sequential=not session.frozen)}
        methods["unedited"] |= _named(form, lab.score(requests, keys))
        scores = lab.compare(
            requests,
            n_clients,
            keys=keys,
            session=session,
            log=lambda m, f=form: log(f"[{f}] {m}"),
        )
        for row, m in scores.items():
            methods[row] |= _named(form, m)
        if LAYER_SYNC_ROW in methods:
            synced = _layer_sync_scores(lab, session, n_clients, keys)
            methods[LAYER_SYNC_ROW] |= _named(form, synced)
            log(f"[{form}] " + score_line(LAYER_SYNC_ROW, synced))
        if form == "counterfact" and fidelity:
            fid = _fidelity(lab, session, n_clients, fidelity_editors, log)
    return {
        "methods": methods,
        "fidelity": fid,
        "config": {
            "clients": n_clients,
            "edits_per_client": edits_per_client,
            "seed": seed,
            "editor": editor,
            "editor_config": lab.cfg.model_dump(),
            "layers": lab.layers,
            "method_params": {
                m: METHODS[m].config(**lab.method_params.get(m, {})).model_dump() for m in METHODS
            },
            "model": str(bundle.path),
            "seconds": round(time.perf_counter() - start, 1),
        },
    }
