"""The supervisor: start, pin and restart worker processes; one shared shutdown; the exit code.

Each service gets ``workers`` processes. Worker *slots* are numbered across services and pinned
round-robin over the CPUs the supervisor may use (``supervisor.cpus`` or its own affinity), so two
busy workers do not fight over one core while another idles.

The restart policy is gunicorn's arbiter's: two failures, two answers.

- A worker that dies **before it ever became ready** (an import error, a bad credential, a crash
  while connecting) failed to boot: the same start would fail again. It is restarted with
  exponential backoff, and ``max_restarts`` boot failures *in a row* of one slot are a crash loop:
  everything is stopped and the exit code is 3.
- A worker that dies **after it was ready** (killed by the OOM killer or an operator, a crash while
  serving) is simply replaced, for as long as the supervisor runs: each time after a jittered
  backoff that doubles with each death of that slot within ``restart_window_s`` (from
  ``restart_backoff_s``, capped at ``restart_backoff_max_s``). What it was handling is redelivered
  after its ack wait; a message that kills every worker it reaches is dead-lettered by the
  ``MAX_DELIVERIES`` advisory once ``max_deliver`` is spent.

Every exit is one log line (``worker.exited``: exit code or signal, whether it had been ready, when
it restarts) and one count in ``jetpool_worker_restarts_total{service,reason}``.

SIGTERM or SIGINT sets one shared flag that every worker watches: they stop pulling, drain and exit.
The supervisor waits until the largest ``drain_timeout_s`` plus a margin (Kubernetes'
terminationGracePeriodSeconds must be larger), then kills what is left. A second signal kills at once.
SIGHUP drains too but never counts as that second signal: it is what a closed terminal sends, and
what the kernel sends, once per exiting thread, when the process that started the engine (``jetpool
demo``) dies (see :mod:`engine.lifeline`).

Exit codes: 0 clean drain, 1 a worker had to be killed or exited with an error during shutdown,
3 crash loop, 130 stopped by a second signal.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import signal
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import multiprocess

from engine.config import Config
from engine.errors import ConfigError, JetpoolError
from engine.metrics import WORKER_RESTARTS, prepare_multiprocess_dir
from engine.probes import LagSampler, Probes
from engine.worker import STARTED, STATUS_SLOTS, StopFlag, WorkerSpec, worker_main

log = structlog.get_logger("jetpool.supervisor")

EXIT_OK, EXIT_UNCLEAN, EXIT_CRASH_LOOP, EXIT_FORCED = 0, 1, 3, 130
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_DRAIN_MARGIN_S = 5.0
RESTART_REASONS = ("boot_failed", "killed", "exited")


@dataclass
class Slot:
    """One worker position: keeps its CPU and index across restarts.

    ``status`` is shared memory the worker writes (see :data:`engine.worker.BEAT` / ``READY``).
    """

    spec: WorkerSpec
    status: Any
    process: Any = None
    started_at: float = 0.0
    boot_failures: int = 0  # in a row: reset once a worker of this slot became ready
    deaths: deque[float] = field(default_factory=deque)  # after being ready, within restart_window_s
    exit_codes: list[int] = field(default_factory=list)


def check_cpus(config: Config, services: Sequence[str]) -> None:
    """``supervisor.cpus`` must name CPUs this process may use, else every pinned worker would die at start.

    Checked when a supervisor is about to start (not when the file is loaded: the same file is checked
    on other machines), and only if one of ``services`` pins its workers.
    """
    wanted = config.supervisor.cpus
    if not wanted or not any(config.services[s].pin_cpus for s in services):
        return
    allowed = os.sched_getaffinity(0)
    missing = sorted(set(wanted) - allowed)
    if missing:
        raise ConfigError(f"{config.source}: supervisor.cpus: CPU {', '.join(map(str, missing))} is not available "
                          f"to this process (it may use {', '.join(map(str, sorted(allowed)))})")


def plan_cpus(count: int, allowed: Sequence[int] | None = None) -> list[int]:
    """CPU for each of ``count`` slots, round-robin over the allowed CPUs."""
    cpus = sorted(allowed if allowed else os.sched_getaffinity(0))
    return [cpus[i % len(cpus)] for i in range(count)]


class Supervisor:
    """Runs the worker processes of the given services until shutdown.

    Args:
        config: the loaded config; ``nats.url`` must be set (the CLI starts an embedded broker first).
        services: which services to run (one Kubernetes pod usually runs one).
    """

    def __init__(self, config: Config, services: Sequence[str]) -> None:
        self.config = config
        self._ctx = multiprocessing.get_context("spawn")
        self.shutdown = StopFlag(self._ctx)
        self.slots = self._plan(services)
        self._stopping = False
        self._exit_code = EXIT_OK
        self._done: asyncio.Future[int] | None = None
        self._signals = 0
        self.http_port: int | None = None

    def _plan(self, services: Sequence[str]) -> list[Slot]:
        wanted = [(s, i) for s in services for i in range(self.config.services[s].workers)]
        cpus = plan_cpus(len(wanted), self.config.supervisor.cpus)
        slots = []
        for slot_no, ((service, index), cpu) in enumerate(zip(wanted, cpus, strict=True)):
            pinned = cpu if self.config.services[service].pin_cpus else None
            spec = WorkerSpec(self.config, service, index, slot_no, pinned)
            slots.append(Slot(spec, self._ctx.Array("d", STATUS_SLOTS, lock=False)))
        return slots

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def crash_looped(self) -> bool:
        return self._exit_code == EXIT_CRASH_LOOP

    @property
    def pids(self) -> list[int]:
        return [s.process.pid for s in self.slots if s.process is not None and s.process.is_alive()]

    async def run(self) -> int:
        """Start every slot and wait until shutdown completes; return the exit code."""
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        for signum in _SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, signum)
        prepare_multiprocess_dir()
        for service in {slot.spec.service for slot in self.slots}:  # every series exists, at 0, from the start
            for reason in RESTART_REASONS:
                WORKER_RESTARTS.labels(service, reason)
        probes, lag = await self._start_http()
        for slot in self.slots:
            self._start(slot)
        log.info("supervisor.started", workers=len(self.slots), pid=os.getpid())
        try:
            return await self._done
        finally:
            for signum in _SIGNALS:
                loop.remove_signal_handler(signum)
            if lag is not None:
                await lag.stop()
            if probes is not None:
                await probes.stop()

    async def _start_http(self) -> tuple[Probes | None, LagSampler | None]:
        http = self.config.http
        if not http.enabled:
            return None, None
        probes = Probes(self)
        try:
            self.http_port = await probes.start(http.host, http.port)
        except OSError as exc:
            raise JetpoolError(f"cannot serve /health and /metrics on {http.host}:{http.port}: {exc.strerror} "
                               "(set http.port, --http-port or JETPOOL_HTTP_PORT)") from None
        lag = LagSampler(self.config, sorted({s.spec.service for s in self.slots}))
        lag.start()
        return probes, lag

    def _start(self, slot: Slot) -> None:
        for i in range(STATUS_SLOTS):
            slot.status[i] = 0.0
        slot.started_at = time.time()
        proc = self._ctx.Process(target=worker_main, args=(slot.spec, self.shutdown, slot.status),
                                 name=f"jetpool-{slot.spec.service}-{slot.spec.index}")
        proc.start()
        slot.process = proc
        # The sentinel becomes readable when the process ends: no polling needed.
        asyncio.get_running_loop().add_reader(proc.sentinel, self._on_exit, slot, proc)
        # A restart is told by the exit's own line (restart_in_s): one line per death, not two.
        (log.debug if slot.exit_codes else log.info)(
            "worker.spawned", service=slot.spec.service, worker=slot.spec.index, pid=proc.pid, cpu=slot.spec.cpu)

    def _on_exit(self, slot: Slot, proc: Any) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(proc.sentinel)
        proc.join()
        code = proc.exitcode
        slot.exit_codes.append(code)
        # Live gauges of a dead process must go; its counters stay so totals never go backwards.
        multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
        if self._stopping:
            if code != 0:
                self._exit_code = max(self._exit_code, EXIT_UNCLEAN)
            self._maybe_finish()
            return
        ready = slot.status[STARTED] > 0
        reason, delay = self._restart_plan(slot, ready, time.monotonic())
        WORKER_RESTARTS.labels(slot.spec.service, reason).inc()
        log.warning("worker.exited", service=slot.spec.service, worker=slot.spec.index, pid=proc.pid, code=code,
                    signal=_signal_name(code), ready=ready, boot_failures=slot.boot_failures,
                    restart_in_s=None if delay is None else round(delay, 2))
        if delay is None:
            log.error("supervisor.crash_loop", service=slot.spec.service, worker=slot.spec.index,
                      boot_failures=slot.boot_failures, max_restarts=self.config.supervisor.max_restarts)
            self._exit_code = EXIT_CRASH_LOOP
            self.begin_shutdown()
            return
        loop.call_later(delay, self._restart, slot)

    def _restart_plan(self, slot: Slot, ready: bool, now: float) -> tuple[str, float | None]:
        """Why the slot's worker is restarted (a metric label) and after how long; None: a crash loop."""
        sup = self.config.supervisor
        if not ready:
            slot.boot_failures += 1
            if slot.boot_failures > sup.max_restarts:
                return "boot_failed", None
            return "boot_failed", _backoff_s(sup.restart_backoff_s, sup.restart_backoff_max_s, slot.boot_failures)
        slot.boot_failures = 0
        slot.deaths.append(now)
        while slot.deaths and now - slot.deaths[0] > sup.restart_window_s:
            slot.deaths.popleft()
        delay = _backoff_s(sup.restart_backoff_s, sup.restart_backoff_max_s, len(slot.deaths))
        reason = "killed" if _signal_name(slot.exit_codes[-1]) else "exited"
        return reason, random.uniform(delay / 2, delay)  # jitter: workers killed together do not return together

    def _restart(self, slot: Slot) -> None:
        if not self._stopping:
            self._start(slot)
        else:
            self._maybe_finish()

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            if not self._stopping:
                log.info("supervisor.signal", signal="SIGHUP", action="drain")
            self.begin_shutdown()
            return
        self._signals += 1
        if self._signals == 1:
            log.info("supervisor.signal", signal=signal.Signals(signum).name, action="drain")
            self.begin_shutdown()
            return
        log.warning("supervisor.signal", signal=signal.Signals(signum).name, action="kill")
        self._exit_code = EXIT_FORCED
        self._kill_all()
        self._finish()

    def begin_shutdown(self) -> None:
        """Set the shared shutdown event and arm the kill deadline."""
        if self._stopping:
            return
        self._stopping = True
        self.shutdown.set()
        deadline = max(self.config.services[s.spec.service].drain_timeout_s for s in self.slots) + _DRAIN_MARGIN_S
        asyncio.get_running_loop().call_later(deadline, self._deadline_passed)
        self._maybe_finish()

    def _deadline_passed(self) -> None:
        if self.pids:
            log.error("supervisor.drain_deadline", killing=self.pids)
            self._exit_code = max(self._exit_code, EXIT_UNCLEAN)
            self._kill_all()
        self._finish()

    def _kill_all(self) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.is_alive():
                slot.process.kill()

    def _maybe_finish(self) -> None:
        if not any(s.process is not None and s.process.exitcode is None for s in self.slots):
            self._finish()

    def _finish(self) -> None:
        if self._done is not None and not self._done.done():
            log.info("supervisor.stopped", exit_code=self._exit_code)
            self._done.set_result(self._exit_code)


def _backoff_s(base_s: float, max_s: float, failures: int) -> float:
    """``base_s`` doubled for each failure after the first, at most ``max_s``."""
    return float(min(max_s, base_s * 2 ** min(max(failures - 1, 0), 16)))


def _signal_name(code: int | None) -> str | None:
    """The signal that ended a process (a negative exit code), e.g. ``SIGKILL``; None for an exit."""
    if code is None or code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"
