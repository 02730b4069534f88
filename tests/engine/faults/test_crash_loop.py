"""The restart policy with real processes: a worker that cannot boot is a crash loop (exit 3, nothing
left behind); a worker that dies while serving is replaced for as long as the supervisor runs."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import nats
import yaml

from engine.config import load_config
from engine.dlq import list_entries
from tests.support import HANDLERS, App, Engine, pings, publish, wait_for

SUPERVISOR = {"restart_backoff_s": 0.1, "restart_backoff_max_s": 0.2, "max_restarts": 3, "restart_window_s": 120}


def test_worker_dying_at_start_is_a_crash_loop(make_config: Callable[..., App],
                                               engine: Callable[..., Engine]) -> None:
    app = make_config({"echo": {"routes": {"Ping": "tests.engine.crash_fixture:never_runs"}}}, supervisor=SUPERVISOR)
    run = engine(app, env={"CRASH_FIXTURE_EXIT_CODE": "7"}, workers=0)
    assert run.wait_exit(120) == 3, run.tail()
    exited = run.records("worker.exited")
    assert len(exited) == SUPERVISOR["max_restarts"] + 1  # the first start and max_restarts restarts
    assert [(e["code"], e["ready"]) for e in exited] == [(7, False)] * len(exited)
    assert [e["boot_failures"] for e in exited] == [1, 2, 3, 4]
    assert [e["restart_in_s"] is None for e in exited] == [False, False, False, True]
    [loop] = run.records("supervisor.crash_loop")
    assert (loop["service"], loop["boot_failures"]) == ("echo", 4)
    assert run.records("supervisor.stopped")[-1]["exit_code"] == 3
    assert run.records("worker.started") == []
    wait_for(lambda: not run.alive(), 10, "every process of the tree to be gone")


def test_a_poison_message_killing_every_worker_it_reaches_is_dead_lettered_and_the_supervisor_keeps_running(
        make_config: Callable[..., App], engine: Callable[..., Engine]) -> None:
    """Each worker was ready when the message killed it: replaced each time (more often than
    max_restarts), until max_deliver is spent and the MAX_DELIVERIES advisory dead-letters it."""
    app = make_config({"echo": {"routes": {"Ping": f"{HANDLERS}:die"}, "ack_wait_s": 1, "max_deliver": 6}},
                      supervisor=SUPERVISOR)
    raw = {**app.raw, "dead_letter": {"stream": f"DLQ{app.stream}", "subject_prefix": f"dlq{app.prefix}"}}
    app.path.write_text(yaml.safe_dump(raw, sort_keys=False))
    app = dataclasses.replace(app, raw=raw)
    run = engine(app)
    publish(app, pings(1, code=5))

    def entries() -> int:
        async def work() -> int:
            nc = await nats.connect(app.url)
            try:
                return len(await list_entries(nc.jetstream(), load_config(app.path)))
            finally:
                await nc.close()

        return asyncio.run(work())

    wait_for(lambda: entries() == 1, 90, "the poison message dead-lettered", detail=run.tail)
    exited = run.records("worker.exited")
    assert len(exited) == 6 > SUPERVISOR["max_restarts"]
    assert all(e["code"] == 5 and e["ready"] and e["restart_in_s"] is not None for e in exited)
    assert run.records("supervisor.crash_loop") == []
    run.wait_workers(len(exited) + 1)  # and a worker serves again
    assert run.proc is not None and run.proc.poll() is None
