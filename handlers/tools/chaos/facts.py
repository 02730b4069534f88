"""Reading back what happened: every stored event and dead-letter entry since a scenario began."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import nats
import orjson
from nats.js import api

from engine.errors import JetpoolError
from handlers.saga import ORDER_CANCELLED, ORDER_CONFIRMED, ORDER_PLACED
from handlers.tools.chaos.shop import MAX_EVENT_BYTES
from handlers.tools.orders import kind_of

TERMINAL = (ORDER_CONFIRMED, ORDER_CANCELLED)


@dataclass(frozen=True, slots=True)
class Seen:
    """One stored event, as the analysis needs it."""

    seq: int
    at: float  # stream time (wall clock, seconds)
    type: str
    order_id: str
    event_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-letter entry; ``original`` is the stream sequence of the message it holds."""

    service: str
    error_type: str
    attempts: int
    order_id: str
    original: int


async def scan(js: Any, stream: str, after_seq: int) -> AsyncIterator[Any]:
    """Every message of ``stream`` after ``after_seq`` up to its current last one (an unacked, ephemeral pull)."""
    last = int((await js.stream_info(stream)).state.last_seq)
    if last <= after_seq:
        return
    config = api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                                opt_start_seq=after_seq + 1, inactive_threshold=60.0, max_ack_pending=-1)
    sub = await js.pull_subscribe("", stream=stream, config=config)
    seq, timeouts = after_seq, 0
    try:
        while seq < last and timeouts < _SCAN_TIMEOUTS:
            try:
                msgs = await sub.fetch(_SCAN_BATCH, timeout=5)
            except nats.errors.TimeoutError:
                timeouts += 1  # a slow fetch of large messages, or the rest was deleted meanwhile
                continue
            timeouts = 0
            for msg in msgs:
                seq = msg.metadata.sequence.stream
                yield msg
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    if seq < last:
        raise JetpoolError(f"could not read stream {stream} past sequence {seq} (last {last})")


_SCAN_BATCH = 256
_SCAN_TIMEOUTS = 5


def seen(msg: Any) -> Seen | None:
    """The event in a stream message, or None for a body that is not one (or too big to bother with)."""
    if len(msg.data) > MAX_EVENT_BYTES:
        return None
    try:
        body = orjson.loads(msg.data)
        data = body["data"]
        return Seen(msg.metadata.sequence.stream, msg.metadata.timestamp.timestamp(), str(body["type"]),
                    str(body.get("aggregate_id", "")), str(body["id"]), str(data.get("reason", "")))
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None


def dead_letter(msg: Any) -> DeadLetter:
    headers = msg.headers or {}
    order_id = ""
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
        body = orjson.loads(msg.data) if len(msg.data) <= MAX_EVENT_BYTES else {}
        order_id = str(body.get("aggregate_id", ""))
    return DeadLetter(headers.get("Jetpool-Dlq-Service", ""), headers.get("Jetpool-Dlq-Error-Type", ""),
                      int(headers.get("Jetpool-Dlq-Attempts", "0") or 0), order_id,
                      int(headers.get("Jetpool-Dlq-Stream-Seq", "0") or 0))


@dataclass
class Facts:
    """What the stream and the dead-letter stream hold since the session began."""

    events: list[Seen]
    dead: list[DeadLetter]

    def ended(self) -> dict[str, list[Seen]]:
        """Order id -> its distinct terminal events (more than one is a bug)."""
        out: dict[str, dict[str, Seen]] = {}
        for e in self.events:
            if e.type in TERMINAL:
                out.setdefault(e.order_id, {})[e.event_id] = e
        return {oid: sorted(ends.values(), key=lambda e: e.seq) for oid, ends in out.items()}

    def placed(self) -> dict[str, float]:
        """Order id -> stream time of its first stored OrderPlaced."""
        out: dict[str, float] = {}
        for e in self.events:
            if e.type == ORDER_PLACED and e.order_id not in out:
                out[e.order_id] = e.at
        return out

    def latencies_ms(self, order_ids: Iterable[str]) -> list[float]:
        """Placed → ended of these orders (stream times), sorted."""
        placed, ended = self.placed(), self.ended()
        return sorted((ended[o][0].at - placed[o]) * 1000 for o in order_ids if o in ended and o in placed)

    def dead_events(self) -> int:
        """Distinct messages dead-lettered (one service or several may have written an entry for each)."""
        return len({d.original for d in self.dead})

    def count(self, event_type: str, order_ids: set[str] | None = None) -> int:
        return sum(1 for e in self.events if e.type == event_type and (order_ids is None or e.order_id in order_ids))


def end_kind(end: Seen) -> str:
    """How an order ended, from its terminal event."""
    return kind_of(end.type == ORDER_CONFIRMED, end.reason)


async def seen_events(messages: AsyncIterator[Any]) -> AsyncIterator[Seen]:
    async for msg in messages:
        event = seen(msg)
        if event is not None:
            yield event
