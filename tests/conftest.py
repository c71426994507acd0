"""Shared test set-up.

HIVE_RELAY_NO_SKIP=1 (set by .ci/run) turns every skip into a failure, so a
missing tool in CI can never silently stop a test from running.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
NO_SKIP = os.environ.get("HIVE_RELAY_NO_SKIP", "") not in ("", "0", "false")


def require_tool(name: str) -> str:
    """The path of a tool on PATH, or skip (fail in CI) naming it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install it to run this test)")
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if NO_SKIP and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped in CI (HIVE_RELAY_NO_SKIP=1): {reason}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_cluster():  # type: ignore[no-untyped-def]
    """A private 3-primary Redis Cluster shared by the session's tests (tests/redisproc.py);
    each test that uses it flushes it first. Skips (fails in CI) without redis-server."""
    pytest.importorskip("redis", reason="the redis extra is not installed")
    from tests.redisproc import RedisCluster

    with RedisCluster(primaries=3) as cluster:
        yield cluster
