"""One worker process: uvloop, one connection, the service's consumer, then a drain on shutdown.

The process is started by the supervisor with the *spawn* method, so no event loop, socket or
lock crosses a fork. It watches three stop signals: the supervisor's shared shutdown event (set on
SIGTERM/SIGINT to the supervisor), its own SIGTERM, and the death of its parent (orphaned workers
drain and exit instead of consuming forever). SIGINT is ignored here: Ctrl-C in a terminal reaches
the whole process group and the supervisor alone decides what it means.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import uvloop

from engine.advisories import AdvisoryWatcher
from engine.breaker import build_breakers
from engine.config import Config
from engine.connection import connect
from engine.consumer import Consumer
from engine.deadletter import DeadLetters
from engine.dispatch import Context, build_router
from engine.kv import KVClient
from engine.linger import linger
from engine.logs import configure_logging
from engine.publisher import Publisher
from engine.state import open_buckets
from engine.tracing import setup_tracing, shutdown_tracing

log = structlog.get_logger("jetpool.worker")

_POLL_S = 0.1
_BEAT_S = 1.0
# A worker's status, shared with the supervisor: an array of doubles.
BEAT = 0  # wall time of the last healthy beat; 0 before the first; minus the time when unhealthy (deaf consumer)
READY = 1  # 1.0 while connected with the consumer bound and not draining
STARTED = 2  # wall time the worker first became ready (consuming); never reset: tells a boot failure from a death
STATUS_SLOTS = 3


class StopFlag:
    """The supervisor's shared shutdown flag: a byte in shared memory that workers poll.

    Not a ``multiprocessing.Event``: that holds named semaphores, which multiprocessing's resource
    tracker process must follow; when that tracker is killed along with workers (a kill loop, the
    OOM killer) its replacement prints a ``KeyError`` traceback for every semaphore it never saw.
    A raw shared value needs no tracker, and workers already poll (every ``_POLL_S``).
    """

    def __init__(self, ctx: Any) -> None:
        self._value = ctx.RawValue("b", 0)

    def set(self) -> None:
        self._value.value = 1

    def is_set(self) -> bool:
        return bool(self._value.value)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, picklable for the spawn start method."""

    config: Config
    service: str
    index: int
    slot: int
    cpu: int | None


def worker_main(spec: WorkerSpec, shutdown: Any, status: Any) -> None:
    """Process entry point (top-level so that spawn can import it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's signals reach the supervisor, which drains us
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if spec.cpu is not None:
        os.sched_setaffinity(0, {spec.cpu})
    cfg = spec.config
    configure_logging(cfg.log.level, cfg.log.format, service=spec.service, worker=spec.index, pid=os.getpid())
    setup_tracing(f"{cfg.app}.{spec.service}")
    try:
        code = uvloop.run(run_worker(spec, shutdown, status))
    except Exception as exc:
        log.error("worker.crashed", error=repr(exc))
        code = 1
    sys.exit(code)


async def run_worker(spec: WorkerSpec, shutdown: Any, status: Any) -> int:
    """Consume until told to stop, then drain. Returns the process exit code."""
    cfg, service = spec.config, spec.service
    loop = asyncio.get_running_loop()
    local_stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, local_stop.set)
    consumers: list[Consumer] = []

    async def reconnected() -> None:
        log.info("nats.reconnected")
        for consumer in consumers:
            consumer.on_reconnect()

    closing = asyncio.Event()  # set before the worker's own drain closes the connection

    async def disconnected() -> None:
        if not closing.is_set():  # else it is our own close, not news
            log.warning("nats.disconnected")

    lost = asyncio.Event()

    async def closed() -> None:
        # The reconnect budget (nats.max_reconnect_attempts) is spent: exit non-zero so the
        # supervisor restarts this worker rather than letting it sit connected to nothing.
        if not (shutdown.is_set() or local_stop.is_set()):
            log.error("nats.connection_lost")
            lost.set()

    router = build_router(cfg, service)
    nc = await connect(cfg.nats, name=f"{cfg.app}.{service}.{spec.index}", reconnected_cb=reconnected,
                       disconnected_cb=disconnected, closed_cb=closed, first_attempts=-1)
    captured = [subject for stream in cfg.streams for subject in stream.subjects]
    captured.append(f"{cfg.dead_letter.subject_prefix}.>")
    publisher = Publisher(nc, cfg.subject_prefix, cfg.nats.publish_timeout_s, cfg.nats.publish_retry_s, captured)
    await publisher.start()
    state = KVClient(nc, publisher, cfg.nats.publish_timeout_s, cfg.nats.publish_retry_s)
    await state.start()
    resources = await open_resources(nc, cfg, service, state)
    await router.run_setup(Context(service, spec.index, "", "", resources, cfg.services[service].settings))
    dead_letters = await DeadLetters.open(cfg, publisher, nc.jetstream())
    advisories = AdvisoryWatcher(nc, cfg, service, dead_letters)
    await advisories.start()
    consumer = Consumer(nc, cfg, service, router, publisher, worker=spec.index, resources=resources,
                        dead_letters=dead_letters)
    # Everything allocated so far (modules, config, connection) lives as long as the process: moved out of
    # the collector's sight, full collections stop re-scanning it while events flow (+5-10 % on the
    # throughput benchmark's process loop).
    gc.freeze()
    await consumer.start()
    consumers.append(consumer)
    lingering = _start_linger(cfg.services[service].linger_ms, lambda: publisher.pending + state.gets.pending)
    log.info("worker.started", cpu=spec.cpu)
    status[STARTED] = time.time()
    await _wait_for_stop(shutdown, local_stop, lost, consumer, nc, status)
    status[BEAT] = status[READY] = 0.0
    if lingering is not None:  # a drain waits for answers: no pauses in it
        lingering.cancel()
    if lost.is_set():
        return 1
    log.info("worker.draining", in_flight=consumer.in_flight)
    await consumer.stop(cfg.services[service].drain_timeout_s)
    await advisories.stop()
    await state.stop()
    await publisher.stop()
    shutdown_tracing()
    with contextlib.suppress(Exception):
        await nc.flush(timeout=5)  # the last acks and outputs on the wire
    closing.set()
    try:
        await nc.drain()  # unsubscribe everything, finish what was received, flush, close
    except Exception as exc:
        log.warning("nats.drain_failed", error=repr(exc))
        await nc.close()
    log.info("worker.stopped")
    return 0


def _start_linger(linger_ms: float, answers_due: Callable[[], int]) -> asyncio.Task[None] | None:
    """The service's linger (engine/linger.py) as a task of this loop, or None when it is off.

    ``answers_due``: the broker answers the worker waits for (PubAcks, KV reads); no linger starts
    before they are in."""
    if not linger_ms:
        return None
    log.info("worker.linger", linger_ms=linger_ms)
    return asyncio.get_running_loop().create_task(linger(linger_ms / 1000, answers_due=answers_due))


async def open_resources(nc: Any, cfg: Config, service: str, state: KVClient | None = None) -> dict[str, Any]:
    """The per-worker objects the service's handlers reach through their context (stores on ``state``'s
    fast path when given)."""
    svc = cfg.services[service]
    buckets = {name: cfg.state[name] for name in svc.state}
    stores = await open_buckets(nc.jetstream(), buckets, create=False, fast=state)
    breakers = build_breakers(dict(cfg.breakers), list(svc.breakers))
    return {**{f"state:{n}": s for n, s in stores.items()}, **{f"breaker:{n}": b for n, b in breakers.items()}}


async def _wait_for_stop(shutdown: Any, local_stop: asyncio.Event, lost: asyncio.Event, consumer: Consumer,
                         nc: Any, status: Any) -> None:
    """Beat while alive and healthy (the supervisor's /health and /ready read it); return when told to stop."""
    parent = os.getppid()
    beat_at = 0.0
    while not (shutdown.is_set() or local_stop.is_set() or lost.is_set() or os.getppid() != parent):
        now = time.time()
        if now - beat_at >= _BEAT_S:
            status[BEAT] = now if consumer.healthy else -now
            status[READY] = 1.0 if nc.is_connected and consumer.bound else 0.0
            beat_at = now
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(local_stop.wait(), _POLL_S)
