"""The shared setup of the throughput benchmark: the BENCH stream, its input events, its consumer.

Every contender (the raw nats-py floor, FastStream, the jetpool engine) reads the same stream through
the same durable pull consumer, so the numbers differ only by the consuming loop. Prefilling happens
before any contender starts: its cost is not part of any measurement, but it must still be quick for
200k-1M events, so it publishes with a window of outstanding PubAcks instead of one
``js.publish`` round trip per event.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from engine.events import Event

STREAM = "BENCH"
SUBJECTS = ["bench.>"]
IN_TYPE = "BenchIn"
OUT_TYPE = "BenchOut"
IN_SUBJECT = f"bench.{IN_TYPE}"
OUT_SUBJECT = f"bench.{OUT_TYPE}"
DURABLE = "bench"
DUPLICATE_WINDOW_S = 120.0
ACK_WAIT_S = 30.0
# Above any in-flight window a contender uses, so the server never throttles deliveries.
MAX_ACK_PENDING = 20_000
PUBACK_WINDOW = 2_000
# No PubAck for this long means the server is stuck or gone: fail instead of hanging the suite.
STALL_TIMEOUT_S = 30.0


class BenchError(RuntimeError):
    """The benchmark setup or a contender failed; the numbers would be meaningless."""


async def ensure_stream(nc: Client) -> None:
    """Create the BENCH stream unless it exists (an existing one is used as it is)."""
    js = nc.jetstream()
    try:
        await js.stream_info(STREAM)
        return
    except NotFoundError:
        pass
    await js.add_stream(
        StreamConfig(
            name=STREAM,
            subjects=SUBJECTS,
            storage=StorageType.FILE,
            num_replicas=1,
            duplicate_window=DUPLICATE_WINDOW_S,
        )
    )


async def delete_stream(url: str) -> None:
    """Drop BENCH and its consumers, so the next prefill starts from an empty stream."""
    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_stream(STREAM)
    except NotFoundError:
        pass
    finally:
        await nc.close()


def pad_length(body_bytes: int) -> int:
    """How many pad characters make an encoded input event ``body_bytes`` long (ids are fixed-size)."""
    empty = Event(type=IN_TYPE, data={"pad": ""}, aggregate_id=_aggregate_id(0)).encode()
    return max(0, body_bytes - len(empty))


def input_event(index: int, pad: str) -> Event:
    """The ``index``-th input event of the benchmark."""
    return Event(type=IN_TYPE, data={"pad": pad}, aggregate_id=_aggregate_id(index))


def _aggregate_id(index: int) -> str:
    # Fixed width keeps every body the same size.
    return f"agg-{index % 10_000_000:07d}"


@dataclass
class _PubAckWindow:
    """Counts PubAcks for a windowed publisher and lets it wait for room in the window."""

    size: int
    sent: int = 0
    acked: int = 0
    errors: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def outstanding(self) -> int:
        return self.sent - self.acked

    async def on_puback(self, msg: Msg) -> None:
        """Subscription callback for every PubAck (or publish error) on the reply inbox."""
        self.acked += 1
        if _puback_error(msg):
            self.errors.append(f"{msg.subject}: {msg.headers or ''} {msg.data[:200]!r}")
        if self.outstanding <= self.size // 2:
            self.changed.set()

    async def wait_below(self, limit: int) -> None:
        """Return once at most ``limit`` PubAcks are outstanding; fail if none arrive for a while."""
        while self.outstanding > limit:
            self.changed.clear()
            before = self.acked
            try:
                await asyncio.wait_for(self.changed.wait(), STALL_TIMEOUT_S)
            except TimeoutError:
                if self.acked == before:
                    raise BenchError(f"no PubAck for {STALL_TIMEOUT_S}s, {self.outstanding} missing") from None


def _puback_error(msg: Msg) -> bool:
    # A stored event answers {"stream":..,"seq":..}; a missing stream answers a 503 status with no body.
    return bool(msg.headers and msg.headers.get("Status")) or b'"error"' in msg.data


async def prefill(url: str, n: int, body_bytes: int = 200) -> None:
    """Publish ``n`` BenchIn events to BENCH and return once every one is stored.

    Args:
        url: NATS server URL.
        n: number of input events.
        body_bytes: approximate size of each encoded event body.

    Raises:
        BenchError: the server rejected an event or stopped answering.
    """
    nc = await nats.connect(url, skip_subject_validation=True)
    try:
        await ensure_stream(nc)
        await _publish_inputs(nc, n, pad_length(body_bytes))
    finally:
        await nc.close()


async def _publish_inputs(nc: Client, n: int, pad_n: int) -> None:
    window = _PubAckWindow(size=PUBACK_WINDOW)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(f"{inbox}.*", cb=window.on_puback)
    pad = "x" * pad_n
    for index in range(n):
        if window.outstanding >= window.size:
            await window.wait_below(window.size // 2)
        event = input_event(index, pad)
        await nc.publish(IN_SUBJECT, event.encode(), reply=f"{inbox}.{index}", headers=event.headers())
        window.sent += 1
    await nc.flush()
    await window.wait_below(0)
    await sub.unsubscribe()
    if window.errors:
        raise BenchError(f"{len(window.errors)} of {n} events not stored, first: {window.errors[0]}")


async def create_consumer(url: str, durable: str = DURABLE, max_ack_pending: int = MAX_ACK_PENDING) -> None:
    """Create the durable pull consumer every contender reads BenchIn events from.

    An existing consumer of that name is deleted first, so a run starts with every event of the
    stream pending and nothing left unacknowledged by an earlier run; a round of the benchmark is
    ``delete_stream`` → ``prefill`` → ``create_consumer`` → run.
    """
    nc = await nats.connect(url)
    try:
        await ensure_stream(nc)
        js = nc.jetstream()
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(STREAM, durable)
        await js.add_consumer(
            STREAM,
            ConsumerConfig(
                durable_name=durable,
                filter_subject=IN_SUBJECT,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=ACK_WAIT_S,
                max_ack_pending=max_ack_pending,
            ),
        )
    finally:
        await nc.close()
