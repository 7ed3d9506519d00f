"""Shared test setup: one covariance-statistics cache for the whole session, never ~/.cache."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _stats_cache(tmp_path_factory):
    previous = os.environ.get("COLLABEDIT_CACHE")
    os.environ["COLLABEDIT_CACHE"] = str(tmp_path_factory.mktemp("collabedit-cache"))
    yield
    if previous is None:
        os.environ.pop("COLLABEDIT_CACHE", None)
    else:
        os.environ["COLLABEDIT_CACHE"] = previous
