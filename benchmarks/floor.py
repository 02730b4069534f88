"""The floor of the throughput benchmark: the fastest honest loop on a raw nats-py core connection.

No framework, no JetStream helper objects: each worker process speaks the JetStream pull protocol
itself on one connection, so the number it reaches is what Python plus nats-py can do on this machine.
The engine cannot beat it by much; the gap between the engine and this floor is the engine's overhead.

One worker process:

- pulls with credit: a JSON request ``{"batch", "expires", "idle_heartbeat"}`` to
  ``$JS.API.CONSUMER.MSG.NEXT.BENCH.bench`` whose reply subject is one inbox subscription, and pulls
  again once half of the requested messages have arrived;
- reads the server's status messages on that inbox: 100 (idle heartbeat), 404/408/409 (a pull request
  ended; its undelivered count is in the ``Nats-Pending-Messages`` header);
- in ``process`` mode publishes one BenchOut event per input with a reply subject ``<inbox>.<n>`` on
  one wildcard subscription (a window of PubAcks, not one round trip per event) and acks the input
  when its output's PubAck arrives; in ``consume`` mode it acks each input at once.

The multi-process harness here (``run_workers``) is shared with the peers in ``peers.py``.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import multiprocessing.context
import queue
import resource
import time
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

import nats
import orjson
import uvloop
from nats.aio.client import Client
from nats.aio.msg import Msg

from benchmarks.prefill import ACK_WAIT_S, DURABLE, OUT_SUBJECT, OUT_TYPE, STREAM, BenchError
from engine.events import MSG_ID_HEADER, SCHEMA_VERSION, derived_id, now_iso

Mode = Literal["consume", "process"]
MODES: tuple[Mode, ...] = ("consume", "process")

PULL_SUBJECT = f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{DURABLE}"
CREDIT = 500
# Inputs delivered but not yet acked (waiting for their output's PubAck) plus credit still owed.
MAX_IN_FLIGHT = 2_000
PULL_EXPIRES_S = 10.0
IDLE_HEARTBEAT_S = 2.0
# Two missed heartbeats: the server has forgotten our pull requests (restart, leader change).
MISSED_HEARTBEATS = 2
TICK_S = 0.005
READY_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 10.0
STALL_TIMEOUT_S = 2 * ACK_WAIT_S + 5.0
ACK = b"+ACK"
NAK = b"-NAK"
STATUS = "Status"
PENDING_MSGS = "Nats-Pending-Messages"
_NS = 1_000_000_000


def output_envelope(parent: dict[str, Any]) -> dict[str, Any]:
    """The BenchOut event for one decoded input, as the envelope's JSON object.

    Built as a plain dict rather than through ``Event``, whose constructor draws an id and a trace
    id that ``caused_by`` would overwrite at once: the floor pays only for what an output contains.
    It carries the input's data, as the engine's benchmark handler does, so outputs weigh the same.
    """
    return {
        "id": derived_id(parent["id"], 0),
        "type": OUT_TYPE,
        "aggregate_id": parent.get("aggregate_id", ""),
        "data": parent.get("data", {}),
        "timestamp": now_iso(),
        "trace_id": parent.get("trace_id", ""),
        "causation_id": parent["id"],
        "correlation_id": parent.get("correlation_id") or parent["id"],
        "v": SCHEMA_VERSION,
    }


def output_event(parent: dict[str, Any]) -> tuple[str, bytes]:
    """The BenchOut event for one decoded input: its id (the ``Nats-Msg-Id``) and its encoded body."""
    envelope = output_envelope(parent)
    return envelope["id"], orjson.dumps(envelope)


# --------------------------------------------------------------------------------------------------
# The multi-process harness, shared with peers.py
# --------------------------------------------------------------------------------------------------


@dataclass
class WorkerSpec:
    """What a worker process gets from the parent: where to read, what to do, how to report.

    ``total`` is the number of acks of all workers together; each worker adds its own share now and
    then, and stops once it reaches ``n_total``.
    """

    url: str
    n_total: int
    mode: Mode
    options: dict[str, Any]
    total: Any  # multiprocessing.Value("q")
    go: Any  # multiprocessing.Event
    reports: Any  # multiprocessing.Queue


@dataclass
class Progress:
    """One worker's count of acked inputs and the times of its first delivery and last ack."""

    acked: int = 0
    reported: int = 0
    t_first: float = 0.0
    t_last: float = 0.0

    def delivered(self) -> None:
        if not self.t_first:
            self.t_first = time.monotonic()

    def ack(self, n: int = 1) -> None:
        self.acked += n
        self.t_last = time.monotonic()

    def report(self) -> dict[str, Any]:
        return {
            "acked": self.acked,
            "t_first": self.t_first,
            "t_last": self.t_last,
            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


async def watch_total(spec: WorkerSpec, progress: Progress, done: asyncio.Event) -> None:
    """Publish this worker's acks into the shared total and set ``done`` when all workers are through.

    Batched every few milliseconds: a cross-process lock per message would cost more than the
    message itself.
    """
    while not done.is_set():
        delta = progress.acked - progress.reported
        with spec.total.get_lock():
            spec.total.value += delta
            total = spec.total.value
        progress.reported += delta
        if total >= spec.n_total:
            done.set()
            return
        await asyncio.sleep(TICK_S)


async def wait_for_go(spec: WorkerSpec) -> None:
    """Tell the parent this worker is connected, then wait until every worker is."""
    spec.reports.put(("ready", None))
    if not await asyncio.to_thread(spec.go.wait, READY_TIMEOUT_S):
        raise BenchError("the parent never said go")


def child_entry(spec: WorkerSpec, main: Callable[[WorkerSpec], Coroutine[Any, Any, dict[str, Any]]]) -> None:
    """Run one worker's ``main`` under uvloop and report its result or its traceback."""
    try:
        result: dict[str, Any] = uvloop.run(main(spec))
        spec.reports.put(("result", result))
    except BaseException:
        spec.reports.put(("error", traceback.format_exc()))


def run_workers(
    target: Callable[[WorkerSpec], None],
    url: str,
    n_total: int,
    processes: int,
    mode: Mode,
    options: dict[str, Any] | None = None,
    timeout_s: float = 600.0,
    on_go: Callable[[list[int]], None] | None = None,
) -> dict[str, Any]:
    """Start ``processes`` spawned workers running ``target`` and measure them from first message to last ack.

    Start-up is excluded: workers connect, say ready, and only start pulling once all are ready.
    Every worker is stopped by its PID before this returns, also on failure. ``on_go``, if given, is
    called with the workers' PIDs once they were told to go (an observer reading their /proc, for
    example); it must return at once.

    Returns:
        ``{"msgs", "seconds", "msg_per_s", "peak_rss_mib_per_proc"}``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ctx = mp.get_context("spawn")
    spec = WorkerSpec(url, n_total, mode, options or {}, ctx.Value("q", 0), ctx.Event(), ctx.Queue())
    procs = [ctx.Process(target=target, args=(spec,), name=f"bench-worker-{i}") for i in range(processes)]
    try:
        for proc in procs:
            proc.start()
        _collect(spec, procs, "ready", READY_TIMEOUT_S)
        spec.go.set()
        if on_go is not None:
            on_go([proc.pid for proc in procs if proc.pid is not None])
        results = _collect(spec, procs, "result", timeout_s)
        for proc in procs:
            proc.join(DRAIN_TIMEOUT_S)
    finally:
        _stop(procs)
    asyncio.run(settle_consumer(url))
    return summarize(results)


def _collect(
    spec: WorkerSpec, procs: list[multiprocessing.context.SpawnProcess], kind: str, timeout_s: float
) -> list[dict[str, Any]]:
    """Wait for one ``kind`` report from every worker; fail fast on an error, a death or a stall."""
    deadline = time.monotonic() + timeout_s
    watch = _StallWatch(spec.total)
    got: list[dict[str, Any]] = []
    while len(got) < len(procs):
        if time.monotonic() > deadline:
            raise BenchError(f"{len(procs) - len(got)} worker(s) sent no {kind} within {timeout_s}s")
        try:
            got_kind, payload = spec.reports.get(timeout=0.2)
        except queue.Empty:
            _check_alive(procs)
            watch.check()
            continue
        if got_kind == "error":
            raise BenchError(f"worker failed:\n{payload}")
        if got_kind == kind:
            got.append(payload)
    return got


def _check_alive(procs: list[multiprocessing.context.SpawnProcess]) -> None:
    dead = [p for p in procs if p.exitcode not in (None, 0)]
    if dead:
        raise BenchError(f"worker {dead[0].name} died with exit code {dead[0].exitcode}")


@dataclass
class _StallWatch:
    """Fails a run whose shared total stopped moving.

    Longer than the consumer's ack_wait, so an input lost by a worker and redelivered still counts
    as progress; an input terminated by a framework's error policy never comes back, and without
    this the run would only end at its overall timeout.
    """

    total: Any  # multiprocessing.Value("q")
    last: int = -1
    since: float = field(default_factory=time.monotonic)

    def check(self) -> None:
        now, value = time.monotonic(), self.total.value
        if value != self.last:
            self.last, self.since = value, now
        elif now - self.since > STALL_TIMEOUT_S:
            raise BenchError(f"no progress for {STALL_TIMEOUT_S}s at {value} acked inputs")


def _stop(procs: list[multiprocessing.context.SpawnProcess]) -> None:
    """SIGTERM, then SIGKILL, each worker still alive (by its PID, through its Process object)."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


async def settle_consumer(url: str, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Check that the server has every ack: acks are fire-and-forget, a lost one would flatter the numbers."""
    nc = await nats.connect(url)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            info = await nc.jetstream().consumer_info(STREAM, DURABLE)
            if info.num_ack_pending == 0:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{info.num_ack_pending} delivered inputs never acked")
            await asyncio.sleep(0.05)
    finally:
        await nc.close()


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate the workers' reports: the clock runs from the first delivery to the last ack anywhere."""
    active = [r for r in results if r["acked"]]
    msgs = sum(r["acked"] for r in results)
    seconds = max(r["t_last"] for r in active) - min(r["t_first"] for r in active) if active else 0.0
    return {
        "msgs": msgs,
        "seconds": seconds,
        "msg_per_s": msgs / seconds if seconds > 0 else 0.0,
        "peak_rss_mib_per_proc": [round(r["rss_mib"], 1) for r in results],
    }


# --------------------------------------------------------------------------------------------------
# The floor worker
# --------------------------------------------------------------------------------------------------


@dataclass
class FloorWorker:
    """One process's pull loop on a core nats-py connection.

    Attributes:
        nc: the connection.
        mode: ``consume`` acks each input; ``process`` publishes an output first.
        credit: messages asked for per pull request; a new request goes out at half of it.
        max_in_flight: bound on requested-but-undelivered plus delivered-but-unacked inputs.
        expires_s: lifetime of one pull request on the server.
        idle_heartbeat_s: how often the server says it still holds a request nothing was sent for.
    """

    nc: Client
    mode: Mode
    credit: int = CREDIT
    max_in_flight: int = MAX_IN_FLIGHT
    expires_s: float = PULL_EXPIRES_S
    idle_heartbeat_s: float = IDLE_HEARTBEAT_S
    progress: Progress = field(default_factory=Progress)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    outstanding: int = 0
    unacked: dict[int, str] = field(default_factory=dict)
    failure: str = ""
    _seq: int = 0
    _last_seen: float = 0.0
    _pull_inbox: str = ""
    _puback_prefix: str = ""

    async def subscribe(self) -> None:
        """Open the two inboxes: pull deliveries, and PubAcks for outputs."""
        self._pull_inbox = self.nc.new_inbox()
        self._puback_prefix = self.nc.new_inbox() + "."
        await self.nc.subscribe(self._pull_inbox, cb=self.on_delivery)
        await self.nc.subscribe(self._puback_prefix + "*", cb=self.on_puback)
        await self.nc.flush()

    async def pull(self) -> None:
        """Ask for as many messages as credit and the in-flight bound allow."""
        # Deliveries for requests the watchdog already wrote off can push the count below zero.
        self.outstanding = max(self.outstanding, 0)
        room = self.max_in_flight - self.outstanding - len(self.unacked)
        batch = min(self.credit - self.outstanding, room)
        if batch <= 0 or self.done.is_set():
            return
        request = {
            "batch": batch,
            "expires": int(self.expires_s * _NS),
            "idle_heartbeat": int(self.idle_heartbeat_s * _NS),
        }
        self.outstanding += batch
        self._last_seen = time.monotonic()
        await self.nc.publish(PULL_SUBJECT, orjson.dumps(request), reply=self._pull_inbox)

    async def maybe_pull(self) -> None:
        """Pull again once half the credit is used (fewer, larger requests than one per message)."""
        if self.outstanding <= self.credit // 2:
            await self.pull()

    async def on_delivery(self, msg: Msg) -> None:
        """Callback of the pull inbox: an input event, or a status message about our requests."""
        self._last_seen = time.monotonic()
        if not msg.data and msg.headers and STATUS in msg.headers:
            await self.on_status(msg.headers)
            return
        self.outstanding -= 1
        if self.done.is_set():
            # More inputs than n_total: leave them to a later run instead of holding them for ack_wait.
            await self.nc.publish(msg.reply, NAK)
            return
        self.progress.delivered()
        event = orjson.loads(msg.data)
        if self.mode == "consume":
            await self.nc.publish(msg.reply, ACK)
            self.progress.ack()
        else:
            await self.publish_output(event, msg.reply)
        await self.maybe_pull()

    async def publish_output(self, event: dict[str, Any], input_reply: str) -> None:
        """Publish the input's output; its PubAck, on ``<inbox>.<n>``, will ack the input."""
        out_id, body = output_event(event)
        self._seq += 1
        self.unacked[self._seq] = input_reply
        await self.nc.publish(
            OUT_SUBJECT, body, reply=f"{self._puback_prefix}{self._seq}", headers={MSG_ID_HEADER: out_id}
        )

    async def on_puback(self, msg: Msg) -> None:
        """Callback of the PubAck inbox: the output is stored, so its input may be acked."""
        input_reply = self.unacked.pop(int(msg.subject[len(self._puback_prefix) :]))
        if (msg.headers and STATUS in msg.headers) or b'"error"' in msg.data:
            self.fail(f"output not stored: {msg.headers} {msg.data[:300]!r}")
            return
        await self.nc.publish(input_reply, ACK)
        self.progress.ack()
        await self.maybe_pull()

    async def on_status(self, headers: dict[str, str]) -> None:
        """React to a status message on the pull inbox."""
        code = headers[STATUS]
        if code == "100":
            return  # idle heartbeat: the server still holds our requests
        if code in ("404", "408", "409"):
            # A pull request ended; what it did not deliver is credit we no longer have.
            self.outstanding = max(0, self.outstanding - int(headers.get(PENDING_MSGS, 0)))
            if code == "409" and "Consumer Deleted" in headers.get("Description", ""):
                self.fail(f"consumer deleted: {headers}")
                return
            await self.maybe_pull()
            return
        self.fail(f"unexpected status on pull inbox: {headers}")

    def fail(self, reason: str) -> None:
        """Stop the loop; the worker reports ``reason`` as an error."""
        self.failure = self.failure or reason
        self.done.set()

    async def watchdog(self) -> None:
        """Forget credit the server stopped heartbeating about, then pull again."""
        silence_s = MISSED_HEARTBEATS * self.idle_heartbeat_s + 1.0
        while not self.done.is_set():
            await asyncio.sleep(self.idle_heartbeat_s)
            if self.outstanding and time.monotonic() - self._last_seen > silence_s:
                self.outstanding = 0
                await self.pull()

    async def drain(self) -> None:
        """After the shared total is reached: wait (bounded) for PubAcks of outputs already sent."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self.unacked and time.monotonic() < deadline:
            await asyncio.sleep(TICK_S)
        await self.nc.flush()


async def floor_main(spec: WorkerSpec) -> dict[str, Any]:
    """One floor worker: connect, wait for go, pull until all workers together acked ``n_total``."""
    nc = await nats.connect(spec.url, skip_subject_validation=True)
    try:
        worker = FloorWorker(nc, spec.mode, **spec.options)
        await worker.subscribe()
        await wait_for_go(spec)
        tasks = [
            asyncio.create_task(watch_total(spec, worker.progress, worker.done)),
            asyncio.create_task(worker.watchdog()),
        ]
        await worker.pull()
        await worker.done.wait()
        if worker.failure:
            raise BenchError(worker.failure)
        await worker.drain()
        for task in tasks:
            task.cancel()
        return worker.progress.report()
    finally:
        await nc.close()


def floor_child(spec: WorkerSpec) -> None:
    """Process target of a floor worker."""
    child_entry(spec, floor_main)


def run_floor(
    url: str,
    n_total: int,
    processes: int,
    mode: Mode,
    credit: int = CREDIT,
    max_in_flight: int = MAX_IN_FLIGHT,
    timeout_s: float = 600.0,
    on_go: Callable[[list[int]], None] | None = None,
) -> dict[str, Any]:
    """Measure the floor: ``processes`` workers drain ``n_total`` inputs from the ``bench`` consumer.

    Args:
        url: NATS server URL; BENCH must hold the inputs and the consumer must exist (see prefill.py).
        n_total: inputs to ack across all workers.
        processes: worker processes, each with its own connection.
        mode: ``consume`` (ack only) or ``process`` (publish one output, ack after its PubAck).
        credit: messages per pull request.
        max_in_flight: per-worker bound on requested plus unacked inputs.
        timeout_s: give up (and stop the workers) after this long.
        on_go: called with the workers' PIDs once they may start pulling (see :func:`run_workers`).

    Returns:
        ``{"msgs", "seconds", "msg_per_s", "peak_rss_mib_per_proc"}``.
    """
    options = {"credit": credit, "max_in_flight": max_in_flight}
    return run_workers(floor_child, url, n_total, processes, mode, options, timeout_s, on_go)
