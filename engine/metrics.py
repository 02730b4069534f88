"""Prometheus metrics: counted per worker process, served once, aggregated, by the supervisor.

prometheus-client's multiprocess mode keeps each process's values in files under
``PROMETHEUS_MULTIPROC_DIR``; the supervisor sets that directory (fresh for each run) before it
spawns workers, and its ``/metrics`` merges the files of every worker, living or dead (so counters
stay monotonic across restarts), plus its own registry (restarts, consumer lag, readiness).

The hot path stays cheap: the consumer tallies outcomes and handler durations in plain dicts and
:class:`RouteMetrics` flushes them to the shared files once per housekeeping tick, instead of a
locked mmap write (or three) per message (durations through :func:`engine.transport.histogram.add`,
which writes prometheus-client's internals behind the fence of :mod:`engine.transport`).

``jetpool_fast_path{path}`` lives with that fence (:data:`engine.transport.fence.FAST_PATH`; here it would
make an import circle), in the same registry and multiprocess files as the metrics here.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from engine.transport import histogram

HANDLER_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BOUNDS = (*HANDLER_BUCKETS_S, float("inf"))

EVENTS_HANDLED = Counter("jetpool_events_handled_total", "Deliveries settled, by service, route and outcome "
                         "(ack, retry, dead_letter, released, parked).", ["service", "route", "outcome"])
HANDLER_DURATION = Histogram("jetpool_handler_duration_seconds", "Handler run time (receipt to return).",
                             ["service", "route"], buckets=HANDLER_BUCKETS_S)
IN_FLIGHT = Gauge("jetpool_in_flight", "Deliveries held by workers (handling or awaiting PubAcks).",
                  ["service"], multiprocess_mode="livesum")
DEAD_LETTERED = Counter("jetpool_dead_lettered_total", "Events written to the dead-letter stream.",
                        ["service", "route"])
REDELIVERIES = Counter("jetpool_redeliveries_total", "Deliveries that were not the message's first "
                       "(JetStream's num_delivered > 1: a nak, an ack timeout, a worker that died).", ["service"])
BREAKER_STATE = Gauge("jetpool_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
                      ["service", "breaker"], multiprocess_mode="livemax")

SUPERVISOR_REGISTRY = CollectorRegistry()
WORKER_RESTARTS = Counter("jetpool_worker_restarts_total",
                          "Worker processes restarted: reason boot_failed (died before it was ready), killed (by "
                          "a signal) or exited (on its own, after it was ready).",
                          ["service", "reason"], registry=SUPERVISOR_REGISTRY)
WORKERS_READY = Gauge("jetpool_workers_ready", "Workers connected with their consumer bound.", ["service"],
                      registry=SUPERVISOR_REGISTRY)
CONSUMER_PENDING = Gauge("jetpool_consumer_pending", "Messages not yet delivered to the service's consumer.",
                         ["service"], registry=SUPERVISOR_REGISTRY)
CONSUMER_ACK_PENDING = Gauge("jetpool_consumer_ack_pending", "Messages delivered but not yet acknowledged.",
                             ["service"], registry=SUPERVISOR_REGISTRY)
CONSUMER_REDELIVERED = Gauge("jetpool_consumer_redelivered", "Messages delivered more than once, not yet acked.",
                             ["service"], registry=SUPERVISOR_REGISTRY)

EXPORTED_METRICS = frozenset({
    "jetpool_events_handled_total", "jetpool_handler_duration_seconds", "jetpool_in_flight",
    "jetpool_dead_lettered_total", "jetpool_breaker_state", "jetpool_worker_restarts_total",
    "jetpool_workers_ready", "jetpool_consumer_pending", "jetpool_consumer_ack_pending",
    "jetpool_consumer_redelivered", "jetpool_redeliveries_total", "payment_process_duration_seconds",
    "jetpool_fast_path",  # set where each fast path is installed: engine/transport/fence.py
})

BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}


def prepare_multiprocess_dir(path: str | None = None) -> Path:
    """Point PROMETHEUS_MULTIPROC_DIR at an empty directory (before any worker is spawned).

    A directory given (argument or environment) is emptied; otherwise a temporary one is made, and
    removed when this process exits.
    """
    chosen = path or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not chosen:
        chosen = tempfile.mkdtemp(prefix="jetpool-metrics-")
        atexit.register(shutil.rmtree, chosen, ignore_errors=True)
    directory = Path(chosen)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return directory


class RouteMetrics:
    """One consumer's local tallies, flushed into the process's metric files once per tick."""

    def __init__(self, service: str, routes: Iterable[str] = (), breakers: Iterable[str] = ()) -> None:
        self.service = service
        routes = list(routes)
        # Export zeros from the start (a series that appears only on the first failure breaks rate()).
        for route in routes:
            DEAD_LETTERED.labels(service, route)
            EVENTS_HANDLED.labels(service, route, "ack")
        for name in breakers:
            BREAKER_STATE.labels(service, name).set(0)
        REDELIVERIES.labels(service)
        self.outcomes: Tally[tuple[str, str]] = Tally()
        # Acks per route, without a tuple key or a Counter: see acked().
        self.acks: dict[str, int] = dict.fromkeys(routes, 0)
        self.redelivered = 0
        self._buckets: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def outcome(self, route: str, outcome: str) -> None:
        self.outcomes[(route, outcome)] += 1

    def acked(self, route: str) -> None:
        """The outcome of nearly every event: one dict increment (an unrouted type counts under "-")."""
        if route in self.acks:
            self.acks[route] += 1
        else:
            self.outcomes[("-", "ack")] += 1

    def duration(self, route: str, seconds: float) -> None:
        counts = self._buckets.get(route)
        if counts is None:
            counts = self._buckets[route] = [0] * len(_BOUNDS)
            self._sums[route] = 0.0
        counts[bisect_left(_BOUNDS, seconds)] += 1
        self._sums[route] += seconds

    def flush(self, in_flight: int, breakers: dict[str, str]) -> None:
        for (route, outcome), n in self.outcomes.items():
            EVENTS_HANDLED.labels(self.service, route, outcome).inc(n)
        self.outcomes.clear()
        for route, n in self.acks.items():
            if n:
                EVENTS_HANDLED.labels(self.service, route, "ack").inc(n)
                self.acks[route] = 0
        if self.redelivered:
            REDELIVERIES.labels(self.service).inc(self.redelivered)
            self.redelivered = 0
        for route, counts in self._buckets.items():
            histogram.add(HANDLER_DURATION.labels(self.service, route), _BOUNDS, counts, self._sums[route])
        self._buckets.clear()
        self._sums.clear()
        IN_FLIGHT.labels(self.service).set(in_flight)
        for name, state in breakers.items():
            BREAKER_STATE.labels(self.service, name).set(BREAKER_STATES.get(state, 2))

