"""A worker killed with SIGKILL is replaced by the supervisor; its unacked work is redelivered."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import psutil

from tests.support import (
    HANDLERS,
    App,
    Engine,
    count,
    expected_pong_ids,
    pings,
    publish,
    read,
    settled,
    wait_for,
)


def test_killed_worker_is_restarted_on_its_cpu_and_events_keep_flowing(make_config: Callable[..., App],
                                                                        engine: Callable[..., Engine]) -> None:
    service = {"workers": 2, "batch": 8, "max_in_flight": 16, "ack_wait_s": 3,
               "routes": {"Ping": f"{HANDLERS}:slow_echo"}}
    app = make_config({"echo": service},
                      supervisor={"restart_backoff_s": 0.2, "restart_backoff_max_s": 1, "max_restarts": 5})
    run = engine(app)
    before = run.worker_pids()
    victim = before[("echo", 0)]
    survivor = before[("echo", 1)]
    assert {victim, survivor} == {p.pid for p in run.workers()}
    victim_cpus = os.sched_getaffinity(victim)

    first = pings(400, sleep_s=0.1)
    publish(app, first)
    wait_for(lambda: count(app, "Pong") >= 40, 60, "the first Pongs", detail=run.tail)
    logged_before = len(run.records())
    os.kill(victim, signal.SIGKILL)  # with work in flight: its deliveries are never acked

    def replaced() -> int | None:
        pid = run.worker_pids()[("echo", 0)]
        return pid if pid != victim else None

    new_pid = wait_for(replaced, 60, "a new worker 0", detail=run.tail)
    wait_for(lambda: not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE,
             10, "the killed worker to be gone")
    assert {p.pid for p in run.workers()} == {new_pid, survivor}
    assert run.worker_pids()[("echo", 1)] == survivor  # the other slot was left alone
    assert os.sched_getaffinity(new_pid) == victim_cpus  # the slot keeps its CPU across restarts
    exits = run.records("worker.exited")
    assert [(e["worker"], e["pid"], e["code"], e["signal"], e["ready"]) for e in exits] == [
        (0, victim, -signal.SIGKILL, "SIGKILL", True)]
    # The supervisor says it once, and nothing (no standard library traceback) says more.
    run.wait_workers(3)
    said = [r["event"] for r in run.records()[logged_before:] if r.get("pid") not in (new_pid, survivor)]
    assert said == ["worker.exited"], said
    assert "Traceback" not in run.log_text()

    second = pings(200)
    publish(app, second)
    wait_for(lambda: count(app, "Pong") >= 600, 120, "600 Pongs", detail=run.tail)
    wait_for(lambda: settled(app, "echo"), 60, "the consumer to settle", detail=run.tail)
    pongs = read(app, "Pong")
    assert len(pongs) == 600
    assert {p.id for p in pongs} == expected_pong_ids(first + second)
    assert run.proc is not None and run.proc.poll() is None
