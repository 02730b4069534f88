"""A dependency down for 20 s under load: its circuit breaker parks events instead of dead-lettering them.

The handler reaches the dependency through ``ctx.breaker("dependency")``; the dependency is down while
a control file exists. Pings are published at a steady rate before, during and after the outage.
Counted: dead-letter entries (none), Pongs by id (one per Ping), and deliveries beyond the first
(only the few failures that tripped each worker's breaker).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from engine.events import Event
from tests.support import (
    DEFAULT_SERVICE,
    FAILING,
    App,
    Engine,
    consumer_info,
    count,
    dlq,
    expected_pong_ids,
    pings,
    publish,
    read,
    settled,
    wait_for,
    with_dlq,
)

OUTAGE_S = 20.0
BATCH, EVERY_S = 10, 0.25  # 40 Pings/s offered throughout
WORKERS, FAIL_MAX, MAX_DELIVER = 2, 3, 3
PULL_EXPIRES_S = 2.0  # a pull request issued before the breaker opened is answered or gone after this


class Load:
    """Publishes Pings in batches from a thread until the ``with`` block ends; remembers what it sent."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.sent: list[Event] = []
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.wait(EVERY_S):
                batch = pings(BATCH)
                publish(self.app, batch)
                self.sent += batch
        except BaseException as exc:  # re-raised in the test's thread
            self._error = exc

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the load thread did not stop"
        if self._error is not None and exc is None:
            raise AssertionError("publishing the load failed") from self._error


def pids_logging(run: Engine, event: str) -> set[int]:
    return {r["pid"] for r in run.records(event) if r.get("breaker") == "dependency"}


def test_dependency_down_20s_under_load_dead_letters_nothing_and_all_complete_once(
        make_config: Callable[..., App], engine: Callable[..., Engine], tmp_path: Path) -> None:
    control = tmp_path / "outage"
    app = with_dlq(
        make_config({"echo": {"routes": {"Ping": f"{FAILING}:through_breaker"}, "workers": WORKERS,
                              "breakers": ["dependency"], "settings": {"control_file": str(control)},
                              "max_deliver": MAX_DELIVER, "retry": {"delays_s": [0.2]},
                              "pull_expires_s": PULL_EXPIRES_S}}),
        breakers={"dependency": {"fail_max": FAIL_MAX, "reset_timeout_s": 2.0}})
    run = engine(app)

    with Load(app) as load:
        wait_for(lambda: count(app, "Pong") >= 50, 30, "traffic before the outage", detail=run.tail)
        control.touch()  # the dependency goes down
        down_at = time.monotonic()
        wait_for(lambda: len(pids_logging(run, "breaker.open")) == WORKERS, 15,
                 "every worker's breaker to open", detail=run.tail)
        # Pull requests sent before the breaker opened run out; from then on no worker pulls.
        time.sleep(PULL_EXPIRES_S + 2)
        sent_before, before = len(load.sent), consumer_info(app, "echo")
        pongs_before = count(app, "Pong")
        time.sleep(max(0.0, down_at + OUTAGE_S - time.monotonic()))
        sent_during, during = len(load.sent), consumer_info(app, "echo")
        assert dlq(app) == []
        assert count(app, "Pong") == pongs_before  # nothing got through the dead dependency
        assert during.delivered.consumer_seq == before.delivered.consumer_seq  # no pulls: nothing delivered
        # The load went on, and everything published meanwhile waits in the stream (give or take a
        # batch the load thread had stored but not yet counted at either snapshot).
        assert sent_during - sent_before >= 200
        assert abs((during.num_pending - before.num_pending) - (sent_during - sent_before)) <= 2 * BATCH
        assert 0 < during.num_ack_pending <= WORKERS * DEFAULT_SERVICE["max_in_flight"]  # parked, in flight
        control.unlink()  # the dependency recovers; the load goes on a few seconds more
        wait_for(lambda: pids_logging(run, "breaker.closed") == pids_logging(run, "breaker.open"), 15,
                 "every breaker to close after a trial", detail=run.tail)
        time.sleep(3)

    sent = load.sent
    wait_for(lambda: count(app, "Pong") >= len(sent), 60, f"{len(sent)} Pongs after recovery", detail=run.tail)
    wait_for(lambda: settled(app, "echo"), 30, "the consumer to settle", detail=run.tail)
    assert dlq(app) == []
    produced = Counter(p.id for p in read(app, "Pong"))
    assert set(produced) == expected_pong_ids(sent) and set(produced.values()) == {1}
    # Delivery attempts were not burnt: only the failures that tripped each worker's breaker were
    # nakked and redelivered (once each); parked events and failed trials cost no attempt.
    failures = run.records("event.failed")
    redeliveries = consumer_info(app, "echo").delivered.consumer_seq - len(sent)
    assert max((r["attempt"] for r in failures), default=0) == 1
    assert 0 < len(failures) == redeliveries <= WORKERS * (FAIL_MAX - 1)
