"""The engine survives a broker restart: workers reconnect, pull again, and nothing is lost."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from engine.embedded import EmbeddedServer
from tests.support import HANDLERS, App, Engine, count, expected_pong_ids, pings, publish, read, settled, wait_for


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_processing_resumes_after_a_broker_restart_with_the_same_store(
        make_config: Callable[..., App], engine: Callable[..., Engine], private_server: EmbeddedServer,
        how: str) -> None:
    # Slow handlers and a small window: the restart lands while work is in flight, whose acks are lost
    # with the connection, so those inputs must come back after ack_wait_s.
    service = {"workers": 2, "ack_wait_s": 5, "batch": 8, "max_in_flight": 16,
               "routes": {"Ping": f"{HANDLERS}:slow_echo"}}
    app = make_config({"echo": service}, url=private_server.url)
    run = engine(app)
    before = pings(300, sleep_s=0.3)
    publish(app, before)
    wait_for(lambda: count(app, "Pong") >= 30, 60, "the first Pongs", detail=run.tail)
    assert count(app, "Pong") < 300  # still busy when the broker goes away

    old_pid = private_server.pid
    if how == "sigterm":
        private_server.restart()  # SIGTERM by PID, then the same port and store dir
    else:
        private_server.kill()  # SIGKILL by PID: a broker crash
        private_server.start()
    assert private_server.pid != old_pid

    after = pings(300, sleep_s=0.01)
    publish(app, after)
    wait_for(lambda: len(run.records("nats.reconnected")) >= 2, 60, "both workers to reconnect", detail=run.tail)
    wait_for(lambda: count(app, "Pong") >= 600, 120, "600 Pongs", detail=run.tail)
    wait_for(lambda: settled(app, "echo"), 60, "the consumer to settle", detail=run.tail)

    pongs = read(app, "Pong")
    assert len(pongs) == 600
    assert {p.id for p in pongs} == expected_pong_ids(before + after)
    assert count(app, "Ping") == 600  # the restarted store kept every input
    assert run.proc is not None and run.proc.poll() is None  # no worker or supervisor gave up
    assert len(run.records("worker.started")) == 2  # reconnected, not restarted


def test_worker_past_its_reconnect_budget_exits_and_is_restarted(
        make_config: Callable[..., App], engine: Callable[..., Engine], private_server: EmbeddedServer) -> None:
    # A tiny reconnect budget stands in for nats-py's ~2 minutes: the worker must not sit on a closed
    # connection; it exits non-zero, the supervisor restarts it, and it connects once the broker is back.
    app = make_config({"echo": {}}, url=private_server.url,
                      nats_options={"max_reconnect_attempts": 3, "reconnect_wait_s": 0.2},
                      supervisor={"restart_backoff_s": 0.2, "restart_backoff_max_s": 1.0, "max_restarts": 100})
    run = engine(app)
    first = pings(20)
    publish(app, first)
    wait_for(lambda: count(app, "Pong") >= 20, 60, "the first Pongs", detail=run.tail)

    private_server.kill()
    wait_for(lambda: run.records("nats.connection_lost"), 30, "the worker to give up its connection",
             detail=run.tail)
    wait_for(lambda: [r for r in run.records("worker.exited") if r["code"] == 1], 30, "a non-zero worker exit",
             detail=run.tail)
    private_server.start()

    second = pings(20)
    publish(app, second)
    wait_for(lambda: count(app, "Pong") >= 40, 60, "Pongs from the restarted worker", detail=run.tail)
    assert {p.id for p in read(app, "Pong")} == expected_pong_ids(first + second)
    assert len(run.records("worker.started")) >= 2
    assert run.proc is not None and run.proc.poll() is None
