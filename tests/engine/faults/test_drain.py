"""Shutdown by signal: SIGTERM drains in-flight work and exits 0; a second signal stops at once with 130.

These tests run a real supervisor, real worker processes and a real nats-server; signals are sent
to the supervisor's PID the way Kubernetes or a terminal would.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

from tests.support import (
    HANDLERS,
    App,
    Engine,
    consumer_info,
    count,
    expected_pong_ids,
    pings,
    publish,
    read,
    settled,
    wait_for,
)

DRAIN_TIMEOUT_S = 10
DRAIN_MARGIN_S = 5  # the supervisor's grace on top of drain_timeout_s before it kills
SLACK_S = 15  # scheduling noise on a busy 2-core machine; the bound is still far below "hung"

StartEngine = Callable[..., Engine]


def test_sigterm_under_load_drains_exits_0_and_a_restart_finishes_the_work(
        make_config: Callable[..., App], engine: StartEngine) -> None:
    total = 3000
    service = {"workers": 2, "batch": 16, "max_in_flight": 32, "ack_wait_s": 10,
               "drain_timeout_s": DRAIN_TIMEOUT_S, "routes": {"Ping": f"{HANDLERS}:slow_echo"}}
    app = make_config({"echo": service})
    first = engine(app)
    sent = pings(total, sleep_s=0.05)
    publish(app, sent)

    wait_for(lambda: count(app, "Pong") >= 300, 120, "the first 300 Pongs", detail=first.tail)
    tree = [first.pid, *(p.pid for p in first.workers())]
    assert len(tree) == 3
    started = time.monotonic()
    first.send(signal.SIGTERM)
    code = first.wait_exit(DRAIN_TIMEOUT_S + DRAIN_MARGIN_S + SLACK_S)
    elapsed = time.monotonic() - started
    done_at_stop = count(app, "Pong")

    assert code == 0, first.tail()
    assert done_at_stop < total, "the signal landed after all the work was done; nothing was drained"
    assert elapsed < DRAIN_TIMEOUT_S + DRAIN_MARGIN_S + SLACK_S
    wait_for(lambda: not first.alive(), 10, "the whole process tree to be gone",
             detail=lambda: f"alive: {first.alive()} of {tree}")
    drained = first.records("consumer.drained")
    assert sorted(r["worker"] for r in drained) == [0, 1]
    assert sorted(r["worker"] for r in first.records("worker.stopped")) == [0, 1]
    assert first.records("supervisor.stopped")[-1]["exit_code"] == 0
    assert first.records("nats.disconnected") == []  # a worker's own close is not reported as a disconnect

    second = engine(app)
    wait_for(lambda: count(app, "Pong") >= total, 180, f"{total} Pongs", detail=second.tail)
    wait_for(lambda: settled(app, "echo"), 60, "the consumer to settle", detail=second.tail)
    pongs = read(app, "Pong")
    ids = [p.id for p in pongs]
    assert len(ids) == total  # exactly one Pong per Ping: no duplicate stored across the restart
    assert set(ids) == expected_pong_ids(sent)  # and none missing
    info = consumer_info(app, "echo")
    assert (info.num_pending, info.num_ack_pending) == (0, 0)


@pytest.mark.parametrize("second_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_second_signal_during_drain_stops_at_once_with_130(
        make_config: Callable[..., App], engine: StartEngine, second_signal: signal.Signals) -> None:
    service = {"workers": 2, "drain_timeout_s": 120, "ack_wait_s": 60, "handler_timeout_s": 120,
               "routes": {"Ping": f"{HANDLERS}:slow_echo"}}
    app = make_config({"echo": service})
    run = engine(app)
    sent = pings(10, sleep_s=300)  # these handlers would keep a drain busy for minutes
    publish(app, sent)
    wait_for(lambda: consumer_info(app, "echo").num_ack_pending == len(sent), 60, "all 10 Pings in flight",
             detail=run.tail)
    tree = [run.pid, *(p.pid for p in run.workers())]
    assert len(tree) == 3

    run.send(signal.SIGTERM)
    draining = wait_for(lambda: run.records("worker.draining") if len(run.records("worker.draining")) == 2 else None,
                        30, "both workers to start draining", detail=run.tail)
    assert sum(r["in_flight"] for r in draining) == len(sent)
    assert run.proc is not None and run.proc.poll() is None  # still draining

    started = time.monotonic()
    run.send(second_signal)
    code = run.wait_exit(30)
    assert code == 130, run.tail()
    assert time.monotonic() - started < 30
    wait_for(lambda: not run.alive(), 10, "the whole process tree to be gone",
             detail=lambda: f"alive: {run.alive()} of {tree}")
    actions = [r["action"] for r in run.records("supervisor.signal")]
    assert actions == ["drain", "kill"]
    assert count(app, "Pong") == 0
    # Nothing was acked: the inputs stay in the stream and are redelivered after ack_wait.
    info = consumer_info(app, "echo")
    assert info.num_pending + info.num_ack_pending == len(sent)


def test_drain_deadline_releases_in_flight_work_for_redelivery(
        make_config: Callable[..., App], engine: StartEngine) -> None:
    """Handlers longer than drain_timeout_s are cancelled and their messages handed back: the worker
    still exits cleanly (0) well before the handlers would have finished, and the next run processes
    every released message exactly once."""
    service = {"workers": 1, "drain_timeout_s": 1, "ack_wait_s": 5, "max_deliver": 100,
               "handler_timeout_s": 300, "routes": {"Ping": f"{HANDLERS}:slow_echo"}}
    app = make_config({"echo": service})
    run = engine(app)
    slow = pings(5, sleep_s=300)
    publish(app, slow)
    wait_for(lambda: consumer_info(app, "echo").num_ack_pending == 5, 60, "5 Pings in flight", detail=run.tail)
    run.send(signal.SIGTERM)
    assert run.wait_exit(1 + DRAIN_MARGIN_S + SLACK_S) == 0, run.tail()
    drained = run.records("consumer.drained")
    assert len(drained) == 1 and drained[0]["released"] >= 5
    assert count(app, "Pong") == 0

    fast = make_config({"echo": {**service, "routes": {"Ping": "handlers.examples:echo"}}}, same_names_as=app)
    rerun = engine(fast)
    wait_for(lambda: count(app, "Pong") >= 5, 60, "5 Pongs from the next run", detail=rerun.tail)
    wait_for(lambda: settled(app, "echo"), 60, "the consumer to settle", detail=rerun.tail)
    pongs = read(app, "Pong")
    assert sorted(p.id for p in pongs) == sorted(expected_pong_ids(slow))


def test_a_worker_that_cannot_drain_is_killed_at_the_deadline(
        make_config: Callable[..., App], engine: StartEngine) -> None:
    service = {"workers": 1, "drain_timeout_s": 1, "ack_wait_s": 60, "handler_timeout_s": 300,
               "routes": {"Ping": f"{HANDLERS}:blocking_sleep"}}
    app = make_config({"echo": service})
    run = engine(app)
    worker = run.workers()
    publish(app, pings(1, sleep_s=120))  # blocks the worker's event loop: it cannot even see the signal
    wait_for(lambda: consumer_info(app, "echo").num_ack_pending == 1, 60, "the Ping in flight", detail=run.tail)
    started = time.monotonic()
    run.send(signal.SIGTERM)
    assert run.wait_exit(1 + DRAIN_MARGIN_S + SLACK_S) == 1, run.tail()
    assert time.monotonic() - started >= 1 + DRAIN_MARGIN_S - 0.5  # it did wait for the deadline
    assert [r["killing"] for r in run.records("supervisor.drain_deadline")] == [[w.pid for w in worker]]
    wait_for(lambda: not run.alive(), 10, "the whole process tree to be gone")


def test_sighup_to_the_whole_group_drains_however_often_it_comes(make_config: Callable[..., App],
                                                                 engine: StartEngine) -> None:
    """A closed terminal sends SIGHUP to every process of the group; a dying `jetpool demo` has the
    kernel send it to the supervisor once per thread. Workers ignore it, the supervisor drains on the
    first and never takes a repeat as the second signal that kills."""
    service = {"workers": 2, "drain_timeout_s": 60, "ack_wait_s": 60, "routes": {"Ping": f"{HANDLERS}:slow_echo"}}
    app = make_config({"echo": service})
    run = engine(app)
    sent = pings(10, sleep_s=2)
    publish(app, sent)
    wait_for(lambda: consumer_info(app, "echo").num_ack_pending == len(sent), 60, "all 10 Pings in flight",
             detail=run.tail)
    tree = [run.pid, *(p.pid for p in run.workers())]

    for _ in range(3):
        os.killpg(run.pid, signal.SIGHUP)  # the engine leads its own session and process group
        time.sleep(0.1)
    assert run.wait_exit(60) == 0, run.tail()
    wait_for(lambda: not run.alive(), 10, "the whole process tree to be gone",
             detail=lambda: f"alive: {run.alive()} of {tree}")
    assert [(r["signal"], r["action"]) for r in run.records("supervisor.signal")] == [("SIGHUP", "drain")]
    assert sorted(r["worker"] for r in run.records("worker.stopped")) == [0, 1]
    assert {p.id for p in read(app, "Pong")} == expected_pong_ids(sent)  # in-flight work finished, not dropped
