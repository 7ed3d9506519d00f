"""Shared test setup: one covariance-statistics cache for the whole run, never ~/.cache; and, when
the suite runs on several workers (pytest-xdist, `-n 2`), one torch thread per worker and every
test that starts Flower on one worker, one after another (two Ray clusters or loopback
deployments at once would compete for the same cores and time out)."""

from __future__ import annotations

import os

import pytest

# tests that start Flower's simulation engine or a loopback deployment
FLOWER_FILES = {"test_federation_flower.py", "test_round_paths.py"}
FLOWER_TESTS = {"test_ridge_runs_through_a_flower_simulation"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the group into the node ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in FLOWER_FILES or item.originalname in FLOWER_TESTS:
            item.add_marker(pytest.mark.xdist_group("flower"))


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_worker():
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session", autouse=True)
def _stats_cache(tmp_path_factory):
    previous = os.environ.get("COLLABEDIT_CACHE")
    # under xdist the workers' temporary folders share a parent: one cache for all of them
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    cache = root / "collabedit-cache"
    cache.mkdir(exist_ok=True)
    os.environ["COLLABEDIT_CACHE"] = str(cache)
    yield
    if previous is None:
        os.environ.pop("COLLABEDIT_CACHE", None)
    else:
        os.environ["COLLABEDIT_CACHE"] = previous
