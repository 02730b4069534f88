"""The supervisor's HTTP endpoint (aiohttp): ``/health``, ``/ready`` and the aggregated ``/metrics``.

- ``/health`` (Kubernetes liveness): the supervisor's event loop answered, and no worker is stuck —
  every running worker beat within :data:`STALE_S` (a worker stops beating when its event loop is
  blocked, and beats "unhealthy" when its consumer has stopped hearing the server's heartbeats). A
  worker still starting, waiting for its restart backoff, or draining is not stuck: restarting it is
  the supervisor's job, not Kubernetes'.
- ``/ready`` (readiness): every worker is connected with its consumer bound, and no drain has
  started (so a terminating pod leaves the Service at once).
- ``/metrics``: every worker's metric files merged, plus the supervisor's own registry.

Consumer lag (pending, ack pending, redelivered) is sampled from the server every few seconds by
:class:`LagSampler` over the supervisor's own connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from engine.config import Config
from engine.connection import connect
from engine.metrics import (
    CONSUMER_ACK_PENDING,
    CONSUMER_PENDING,
    CONSUMER_REDELIVERED,
    SUPERVISOR_REGISTRY,
    WORKERS_READY,
)
from engine.worker import BEAT, READY

log = structlog.get_logger("jetpool.http")


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (IPv4 or IPv6, as ``host`` is written), ready to listen."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp's own sites do
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class _Spec(Protocol):
    @property
    def service(self) -> str: ...

    @property
    def index(self) -> int: ...


class Slot(Protocol):
    """What the probes read of a worker position (:class:`engine.supervisor.Slot`, which imports this module)."""

    @property
    def spec(self) -> _Spec: ...

    @property
    def status(self) -> Any: ...

    @property
    def process(self) -> Any: ...

    @property
    def started_at(self) -> float: ...


class Supervisor(Protocol):
    """What the probes read of :class:`engine.supervisor.Supervisor`."""

    @property
    def slots(self) -> Sequence[Slot]: ...

    @property
    def crash_looped(self) -> bool: ...

    @property
    def stopping(self) -> bool: ...


STALE_S = 10.0
STARTUP_GRACE_S = 60.0
LAG_EVERY_S = 5.0


def slot_report(slot: Slot, now: float) -> dict[str, Any]:
    """One worker's view for the probes: alive, healthy (not stuck), ready."""
    proc = slot.process
    alive = proc is not None and proc.exitcode is None
    beat, ready = slot.status[BEAT], slot.status[READY]
    starting = now - slot.started_at < STARTUP_GRACE_S and beat == 0.0  # negative: beating, but unhealthy
    fresh = beat > 0 and now - beat < STALE_S
    return {
        "service": slot.spec.service, "worker": slot.spec.index, "pid": proc.pid if alive else None,
        "alive": alive, "healthy": (not alive) or fresh or starting, "ready": alive and fresh and ready == 1.0,
    }


class Probes:
    """The aiohttp application bound to one supervisor."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host``:``port`` (0: a free port, bound here, so nothing can take it in between)."""
        sock = listening_socket(host, port)
        self.port = int(sock.getsockname()[1])
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        log.info("http.started", host=host, port=self.port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _reports(self) -> list[dict[str, Any]]:
        now = time.time()
        return [slot_report(slot, now) for slot in self._supervisor.slots]

    async def health(self, request: web.Request) -> web.Response:
        workers = self._reports()
        # While draining, workers stop beating on purpose; the supervisor's drain deadline handles a stuck one.
        ok = not self._supervisor.crash_looped and (self._supervisor.stopping or all(w["healthy"] for w in workers))
        return web.json_response({"status": "ok" if ok else "unhealthy", "workers": workers}, status=200 if ok else 503)

    async def ready(self, request: web.Request) -> web.Response:
        workers = self._reports()
        ok = not self._supervisor.stopping and all(w["ready"] for w in workers)
        return web.json_response({"status": "ready" if ok else "not ready", "workers": workers},
                                 status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        for service in {s.spec.service for s in self._supervisor.slots}:
            WORKERS_READY.labels(service).set(sum(1 for w in self._reports() if w["service"] == service and w["ready"]))
        registry = CollectorRegistry()
        registry.register(WorkerFiles(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
        body = generate_latest(registry) + generate_latest(SUPERVISOR_REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class WorkerFiles:
    """The metric files of every worker, living or dead, merged — but not the supervisor's own.

    When PROMETHEUS_MULTIPROC_DIR is set before the supervisor starts, prometheus-client keeps the
    supervisor's registry in files of that directory too; served from there as well, every family of
    that registry would appear twice (once with a ``pid`` label), which Prometheus rejects.
    """

    def __init__(self, path: str) -> None:
        self._path = path

    def collect(self) -> Iterable[Metric]:
        own = f"_{os.getpid()}.db"
        files = [f for f in glob.glob(os.path.join(self._path, "*.db")) if not f.endswith(own)]
        merged: Iterable[Metric] = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
        return merged


class LagSampler:
    """Samples each service's consumer info into the lag gauges."""

    def __init__(self, config: Config, services: list[str]) -> None:
        self._config = config
        self._services = services
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        nc = None
        try:
            nc = await connect(self._config.nats, name=f"{self._config.app}.supervisor")
            js = nc.jetstream()
            while True:
                for service in self._services:
                    with contextlib.suppress(Exception):
                        await self._sample(js, service)
                await asyncio.sleep(LAG_EVERY_S)
        except Exception as exc:
            log.warning("lag.sampler_stopped", error=repr(exc))
        finally:
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()

    async def _sample(self, js: Any, service: str) -> None:
        svc = self._config.services[service]
        info = await js.consumer_info(svc.stream, self._config.durable(service))
        CONSUMER_PENDING.labels(service).set(info.num_pending or 0)
        CONSUMER_ACK_PENDING.labels(service).set(info.num_ack_pending or 0)
        CONSUMER_REDELIVERED.labels(service).set(info.num_redelivered or 0)
