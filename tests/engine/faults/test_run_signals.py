"""Signals before the workers start: `jetpool run` stops at once on SIGTERM while it still connects or
provisions (as a container's PID 1 an unhandled SIGTERM is ignored until the grace period ends)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from engine.ports import free_port
from tests.support import App, Engine, wait_for


def test_sigterm_while_connecting_stops_jetpool_run_at_once(make_config: Callable[..., App],
                                                           engine: Callable[..., Engine]) -> None:
    """Nothing listens at the broker's address: the run would keep trying to connect for 1,000 s; a
    SIGTERM ends it (within the 30 s the test waits), with exit code 0 and the reason logged."""
    app = make_config(url=f"nats://127.0.0.1:{free_port()}",
                      nats_options={"connect_attempts": 1000, "reconnect_wait_s": 1})
    run = engine(app, workers=0)
    time.sleep(1.5)  # well inside the connection attempts
    assert run.proc is not None and run.proc.poll() is None, run.tail()
    run.send(signal.SIGTERM)
    assert run.wait_exit(30) == 0, run.tail()
    assert run.records("run.stopped"), run.tail()
    wait_for(lambda: not run.alive(), 10, "every process of the tree to be gone")
