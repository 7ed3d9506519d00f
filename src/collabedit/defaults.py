"""Default names every entry point uses (no heavy imports: the CLI reads them at start-up).

The frozen MEMIT variant for collaboration (its merge is exact per layer); the published,
sequential MEMIT for one party's edit; and the pair whose merge fidelity the demo reports (exact
by construction, and what the layer-synchronous protocol is for).
"""

DEFAULT_EDITOR = "memit-frozen"
DEFAULT_SINGLE_EDITOR = "memit"
FIDELITY_EDITORS = ("memit-frozen", "memit")
DEFAULT_METHOD = "collabedit"
