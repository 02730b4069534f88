"""Fixtures of both trees (tests/engine, tests/shop): one nats-server per session, per-test configs,
engine process trees, a 3-node cluster. The shop's own (its PostgreSQL) are in tests/shop/conftest.py.

Every process a fixture starts is stopped by its PID in teardown, also when the test failed:
the session's nats-server, any private nats-server a test asks for, and each engine's supervisor
together with all of its descendants.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.embedded import EmbeddedServer
from tests.cluster_fixture import cluster  # noqa: F401  (a 3-node cluster of the test's own)
from tests.support import App, Engine, write_config


def _kill_server(server: EmbeddedServer) -> None:
    """SIGKILL the server by PID and reap it; its store dir stays for inspection."""
    proc = server.process
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """One JetStream-enabled nats-server for the session: random port, temp store dir, killed by PID."""
    server = EmbeddedServer(store_dir=tmp_path_factory.mktemp("nats-store"))
    try:
        server.start()
        yield server
    finally:
        _kill_server(server)


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A nats-server of this test alone (to restart or kill it), with its own store dir."""
    server = EmbeddedServer(store_dir=tmp_path / "private-nats")
    try:
        server.start()
        yield server
    finally:
        _kill_server(server)


@pytest.fixture
def make_config(tmp_path: Path, nats_server: EmbeddedServer) -> Callable[..., App]:
    """Write a config for this test (unique stream and subject prefix, ``nats.url`` = the session server).

    Call it as ``make_config({"echo": {"workers": 2}}, supervisor={...}, url=other_server.url)``.
    """
    written = 0

    def make(services: dict[str, dict[str, Any]] | None = None, *, url: str | None = None, **kwargs: Any) -> App:
        nonlocal written
        written += 1
        return write_config(tmp_path, url or nats_server.url, services, name=f"jetpool-{written}.yaml", **kwargs)

    return make


@pytest.fixture
def engine(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Engine]]:
    """Start ``python -m engine run -c FILE`` process trees; teardown kills each tree by PID.

    ``engine(app, env={...}, args=[...], workers=N)`` starts one and, unless ``workers=0``, waits
    for ``N`` ``worker.started`` log lines (default: the config's total worker count).
    """
    started: list[Engine] = []

    def start(app: App, *, env: dict[str, str] | None = None, args: list[str] | None = None,
              workers: int | None = None, timeout_s: float = 60.0) -> Engine:
        log_path = tmp_path / f"engine-{len(started) + 1}.log"
        proc = Engine(app.path, log_path, env=dict(env or {}), args=list(args or []))
        started.append(proc)
        proc.start()
        wanted = workers if workers is not None else sum(s["workers"] for s in app.raw["services"].values())
        if wanted:
            proc.wait_workers(wanted, timeout_s)
            proc.descendants()  # remember the tree now, so teardown finds it even if orphaned
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.kill_tree()
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            for proc in started:
                print(f"\n=== {proc.log_path.name} ===\n{proc.tail(60)}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Expose each phase's report as ``item.rep_<phase>`` so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
