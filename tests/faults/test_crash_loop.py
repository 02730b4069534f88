"""Workers that keep dying make the supervisor give up with exit code 3 and leave nothing behind."""

from __future__ import annotations

from collections.abc import Callable

from tests.support import HANDLERS, App, Engine, consumer_info, pings, publish, wait_for

SUPERVISOR = {"restart_backoff_s": 0.1, "restart_backoff_max_s": 0.2, "max_restarts": 3, "restart_window_s": 120}


def assert_crash_loop(run: Engine, code: int) -> None:
    assert run.wait_exit(120) == 3, run.tail()
    spawned = run.records("worker.spawned")
    exited = run.records("worker.exited")
    assert len(spawned) == SUPERVISOR["max_restarts"] + 1  # the first start and max_restarts restarts
    assert [e["code"] for e in exited] == [code] * len(spawned)
    assert len(run.records("supervisor.crash_loop")) == 1
    assert run.records("supervisor.stopped")[-1]["exit_code"] == 3
    wait_for(lambda: not run.alive(), 10, "every process of the tree to be gone")


def test_worker_dying_at_start_is_a_crash_loop(make_config: Callable[..., App],
                                               engine: Callable[..., Engine]) -> None:
    app = make_config({"echo": {"routes": {"Ping": "tests.crash_fixture:never_runs"}}}, supervisor=SUPERVISOR)
    run = engine(app, env={"CRASH_FIXTURE_EXIT_CODE": "7"}, workers=0)
    assert_crash_loop(run, code=7)
    assert run.records("worker.started") == []


def test_poison_message_killing_its_worker_is_a_crash_loop(make_config: Callable[..., App],
                                                           engine: Callable[..., Engine]) -> None:
    app = make_config({"echo": {"routes": {"Ping": f"{HANDLERS}:die"}, "ack_wait_s": 1, "max_deliver": 10}},
                      supervisor=SUPERVISOR)
    run = engine(app)
    poison = pings(1, code=5)
    publish(app, poison)
    assert_crash_loop(run, code=5)
    # Each restarted worker received the same unacked message again once its ack_wait ran out.
    assert len(run.records("worker.started")) == SUPERVISOR["max_restarts"] + 1
    assert consumer_info(app, "echo").delivered.consumer_seq == SUPERVISOR["max_restarts"] + 1
