"""A 3-node JetStream cluster on loopback for one test, and helpers to talk to whichever nodes are up.

tests/conftest.py registers the fixture for both trees; a test asks for ``cluster``. Teardown
SIGKILLs every node by its PID, also when the test failed; the store dirs stay for inspection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.embedded import EmbeddedCluster
from tests.support import App


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmbeddedCluster]:
    """Three nats-server processes with JetStream, routed to each other, each with its own store."""
    nodes = EmbeddedCluster(base_dir=tmp_path / "cluster")
    try:
        nodes.start()
        yield nodes
    finally:
        for node in nodes.nodes:
            proc = node.process
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def via_live_node(app: App, cluster: EmbeddedCluster) -> App:
    """``app`` with ``url`` set to one running node: the test helpers take a single URL."""
    for i, node in enumerate(cluster.nodes):
        if cluster.running(i):
            return dataclasses.replace(app, url=node.url)
    raise AssertionError("no cluster node is running")
