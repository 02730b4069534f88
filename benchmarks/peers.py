"""Peers of the throughput benchmark: what a user would otherwise run, on the same stream and consumer.

FastStream is the peer: a JetStream *pull* subscriber (``PullSub``) bound to the durable ``bench``
consumer, with a no-op handler, run in 1 or more worker processes by the same harness as the floor
(``floor.run_workers``), so start-up is excluded and the clock runs from the first delivery to the
last handled message in every contender alike.

Two handler shapes, both common in FastStream code:

- ``batch=True`` (the default, ``PullSub(batch_size, batch=True)``): the handler gets the decoded
  bodies of one fetch as a list; in ``process`` mode it publishes one BenchOut per input, all
  concurrently, and returns once every PubAck is in; FastStream then acks each input of the batch.
- ``batch=False`` (``PullSub(batch_size)``): one handler call per message; FastStream runs the
  messages of one fetch concurrently and fetches again when all are done.

Outputs go through ``broker.publish(..., stream=...)``, which waits for the stream's PubAck, and
FastStream acks an input only after its handler returned (its default ack policy). Per-message
logging is turned off (``logger=None``), as anyone measuring would.

FastStream is optional (the ``bench`` extra): importing this module works without it, and
``faststream_available()`` tells a test whether to skip.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from benchmarks.floor import (
    Mode,
    Progress,
    WorkerSpec,
    child_entry,
    output_envelope,
    run_workers,
    wait_for_go,
    watch_total,
)
from benchmarks.prefill import DURABLE, IN_SUBJECT, OUT_SUBJECT, STREAM, BenchError
from engine.events import MSG_ID_HEADER

if TYPE_CHECKING:
    from faststream.nats import NatsBroker

# In per-message mode FastStream handles one fetch concurrently, then fetches again, so the batch
# size is its concurrency; 1 (its default) would measure round trips, not the framework.
FASTSTREAM_BATCH = 100
# A batch subscriber keeps fetching until its batch is full or this expires; the stream is full
# during a run, so it only matters for the last, partial batch of a worker.
FASTSTREAM_FETCH_TIMEOUT_S = 0.2
# FastStream's default publish timeout (0.5 s) is shorter than a PubAck takes when a whole batch
# publishes at once on a busy machine; the publish then fails, the handler raises, and FastStream's
# default policy terminates the input (never redelivered). Users raise it; so does the benchmark.
FASTSTREAM_PUBLISH_TIMEOUT_S = 10.0

Handler = Callable[[Any], Coroutine[Any, Any, None]]


def faststream_available() -> bool:
    """Whether FastStream is installed (``pip install -e '.[bench]'``)."""
    return importlib.util.find_spec("faststream") is not None


def _require_faststream() -> None:
    if not faststream_available():
        raise BenchError("FastStream is not installed: install the 'bench' extra (faststream[nats])")


async def _publish_output(broker: NatsBroker, parent: dict[str, Any]) -> None:
    envelope = output_envelope(parent)
    await broker.publish(
        envelope,
        OUT_SUBJECT,
        stream=STREAM,
        headers={MSG_ID_HEADER: envelope["id"]},
        timeout=FASTSTREAM_PUBLISH_TIMEOUT_S,
    )


@dataclass
class _Run:
    """One FastStream worker's progress, and the first handler error, which fails the run.

    With ``logger=None`` FastStream reports handler errors nowhere, and its default policy
    terminates the input, so the run would stall instead of failing.
    """

    progress: Progress = field(default_factory=Progress)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    failure: str = ""

    def fail(self, exc: BaseException) -> None:
        self.failure = self.failure or repr(exc)
        self.done.set()


def _message_handler(broker: NatsBroker, mode: Mode, run: _Run) -> Handler:
    """The per-message handler: FastStream acks the input right after it returns, in the same task."""

    async def handle(body: dict[str, Any]) -> None:
        run.progress.delivered()
        if mode == "process":
            try:
                await _publish_output(broker, body)
            except Exception as exc:
                run.fail(exc)
                raise
        run.progress.ack()

    return handle


def _batch_handler(broker: NatsBroker, mode: Mode, run: _Run) -> Handler:
    """The batch handler: FastStream acks every input of the batch right after it returns."""

    async def handle(bodies: list[dict[str, Any]]) -> None:
        run.progress.delivered()
        if mode == "process":
            try:
                await asyncio.gather(*(_publish_output(broker, body) for body in bodies))
            except Exception as exc:
                run.fail(exc)
                raise
        run.progress.ack(len(bodies))

    return handle


def _build_broker(spec: WorkerSpec, run: _Run) -> NatsBroker:
    from faststream.nats import JStream, NatsBroker, PullSub

    broker = NatsBroker(spec.url, logger=None)
    batch: bool = spec.options["batch"]
    make_handler = _batch_handler if batch else _message_handler
    pull_sub = PullSub(batch_size=spec.options["batch_size"], timeout=FASTSTREAM_FETCH_TIMEOUT_S, batch=batch)
    subscriber = broker.subscriber(
        IN_SUBJECT, stream=JStream(STREAM, declare=False), durable=DURABLE, pull_sub=pull_sub
    )
    subscriber(make_handler(broker, spec.mode, run))
    return broker


async def faststream_main(spec: WorkerSpec) -> dict[str, Any]:
    """One FastStream worker: connect, wait for go, start the broker, stop once ``n_total`` are through."""
    run = _Run()
    broker = _build_broker(spec, run)
    await broker.connect()
    try:
        await wait_for_go(spec)
        # Starting the subscriber starts fetching at once, so it waits for go like the floor's first pull.
        await broker.start()
        await watch_total(spec, run.progress, run.done)
    finally:
        await broker.stop()
    if run.failure:
        raise BenchError(f"handler failed: {run.failure}")
    return run.progress.report()


def faststream_child(spec: WorkerSpec) -> None:
    """Process target of a FastStream worker."""
    child_entry(spec, faststream_main)


def run_faststream(
    url: str,
    n_total: int,
    processes: int,
    mode: Mode,
    batch_size: int = FASTSTREAM_BATCH,
    batch: bool = True,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Measure FastStream's pull subscriber: ``processes`` workers drain ``n_total`` inputs.

    Args:
        url: NATS server URL; BENCH must hold the inputs and the consumer must exist (see prefill.py).
        n_total: inputs to handle across all workers.
        processes: worker processes, each with its own broker and connection.
        mode: ``consume`` (handler does nothing) or ``process`` (handler publishes one output each).
        batch_size: ``PullSub`` batch size (messages per fetch).
        batch: hand the handler the whole fetch as a list (True) or one message per call (False).
        timeout_s: give up (and stop the workers) after this long.

    Returns:
        ``{"msgs", "seconds", "msg_per_s", "peak_rss_mib_per_proc"}``.

    Raises:
        BenchError: FastStream is not installed, or a worker failed.
    """
    _require_faststream()
    options = {"batch_size": batch_size, "batch": batch}
    return run_workers(faststream_child, url, n_total, processes, mode, options, timeout_s)
