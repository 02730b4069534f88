"""The event envelope and its wire format.

A jetpool event is a JSON object (encoded with orjson) published on the subject
``<subject_prefix>.<type>``, with these NATS headers:

- ``Nats-Msg-Id``: the event id, so JetStream drops a re-published duplicate inside the
  stream's duplicate window;
- ``traceparent`` (optional): the W3C trace context of the span that produced the event.

Any producer, in any language, that publishes this shape can feed jetpool. Producers are not trusted,
so the consumer checks each delivery at the boundary and dead-letters what fails (never retried):

- the body is a JSON object with the fields below, nested at most :data:`MAX_DEPTH` deep (deeper
  JSON parses but cannot be encoded again, so it could not be stored, audited or dead-lettered);
- its ``type`` is the type its subject carries, the subject's last token (``shop.OrderPlaced``
  carries ``OrderPlaced``): a producer allowed to publish one subject cannot have its event handled
  as another type.

Output events get ids derived from the input's *bytes* (which include its id) and their position:
a redelivered input, or the same event published again under another ``Nats-Msg-Id``, re-publishes
outputs with the same ids, which JetStream deduplicates; two different events that claim the same
``id`` get different output ids, so neither's outputs are dropped as the other's duplicates.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from engine.errors import MalformedEvent

SCHEMA_VERSION = 1
MAX_DEPTH = 64  # JSON nesting accepted in a body: orjson encodes at most 254 levels; events need a few
MSG_ID_HEADER = "Nats-Msg-Id"
TRACEPARENT_HEADER = "traceparent"

# The fields a producer must send, with the JSON type each must have.
_REQUIRED: dict[str, type | tuple[type, ...]] = {"id": str, "type": str, "data": dict}
_OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "aggregate_id": str,
    "timestamp": str,
    "trace_id": str,
    "causation_id": (str, type(None)),
    "correlation_id": (str, type(None)),
    "v": int,
}


def _id_prefix() -> str:
    return os.urandom(8).hex()


_ID_PREFIX = _id_prefix()
_ID_COUNTER = itertools.count()


def _reseed_ids() -> None:
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX, _ID_COUNTER = _id_prefix(), itertools.count()
    _trace_pool.clear()  # a forked child must not repeat its parent's trace ids


os.register_at_fork(after_in_child=_reseed_ids)


def new_id() -> str:
    """A unique event id: 32 hex digits, a random per-process prefix and a counter.

    As unique as a UUID4 in practice (64 random bits per process, never repeated within one) and
    five times cheaper, which matters when every output of every handler needs one.
    """
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


_TRACE_IDS_PER_DRAW = 256
_trace_pool: list[str] = []


def new_trace_id() -> str:
    """A random W3C trace id: 32 lowercase hex digits (from the OS's random source, 256 drawn at a time)."""
    if not _trace_pool:
        digits = os.urandom(16 * _TRACE_IDS_PER_DRAW).hex()
        _trace_pool.extend(digits[i:i + 32] for i in range(0, len(digits), 32))
    return _trace_pool.pop()


def trace_id_of(event_id: str) -> str:
    """The W3C trace id of an event that came without one: 32 hex digits derived from its id."""
    return hashlib.blake2b(event_id.encode(), digest_size=16, person=b"jetpool-trace").hexdigest()


def derived_id(source: bytes | str, position: int) -> str:
    """The id of output ``position`` of an input: its body as received (or, for an event built in
    code, its id). Same input, same output ids; a different body under the same id, other ids."""
    digest = hashlib.blake2b(source.encode() if isinstance(source, str) else source, digest_size=16)
    digest.update(b"/%d" % position)
    return digest.hexdigest()


_clock: list[Any] = [0, ""]
_new = object.__new__


def now_iso() -> str:
    """UTC time as RFC 3339 with milliseconds, e.g. ``2026-11-24T08:00:00.123Z`` (cached per ms)."""
    ms = time.time_ns() // 1_000_000
    if ms != _clock[0]:
        stamp = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
        _clock[0], _clock[1] = ms, stamp.replace("+00:00", "Z")
    return str(_clock[1])


@dataclass(slots=True)
class Event:
    """One domain event.

    Handlers create events with just ``type``, ``data`` and usually ``aggregate_id``; the engine
    fills ``id``, ``trace_id``, ``causation_id`` and ``correlation_id`` of the events a handler
    returns from the event that caused them.

    Attributes:
        type: the event type, e.g. ``OrderPlaced``; routes map it to a handler.
        data: the payload, any JSON object.
        aggregate_id: the entity the event is about (an order id), used for logs and partitioning.
        id: unique id, also the ``Nats-Msg-Id``.
        timestamp: when the event was created (RFC 3339, UTC).
        trace_id: W3C trace id shared by every event of one flow.
        causation_id: id of the event whose handler produced this one.
        correlation_id: id of the first event of the flow (e.g. the OrderPlaced).
        v: envelope schema version.
        traceparent: W3C trace context sent as a header, not part of the JSON body.
        raw: the body this event was decoded from (empty for an event built in code); its outputs'
            ids derive from it.
    """

    type: str
    data: dict[str, Any] = field(default_factory=dict)
    aggregate_id: str = ""
    id: str = ""
    timestamp: str = ""
    trace_id: str = ""
    causation_id: str | None = None
    correlation_id: str | None = None
    v: int = SCHEMA_VERSION
    traceparent: str = field(default="", compare=False, repr=False)
    raw: bytes = field(default=b"", compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.id:
            self.id = new_id()
        if not self.timestamp:
            self.timestamp = now_iso()
        if not self.trace_id:
            self.trace_id = new_trace_id()

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "aggregate_id": self.aggregate_id,
            "data": self.data,
            "timestamp": self.timestamp,
            "trace_id": self.trace_id,
            "causation_id": self.causation_id,
            "correlation_id": self.correlation_id,
            "v": self.v,
        }

    def encode(self) -> bytes:
        """The JSON body of the NATS message."""
        return orjson.dumps(self.to_dict())

    def headers(self) -> dict[str, str]:
        """The NATS headers jetpool sends with the event."""
        if self.traceparent:
            return {MSG_ID_HEADER: self.id, TRACEPARENT_HEADER: self.traceparent}
        return {MSG_ID_HEADER: self.id}

    def caused_by(self, parent: Event, position: int) -> Event:
        """Bind this output event to the input that produced it (ids, trace, causation)."""
        self.id = derived_id(parent.raw or parent.id, position)
        self.trace_id = parent.trace_id
        self.causation_id = parent.id
        self.correlation_id = parent.correlation_id or parent.id
        return self

    @classmethod
    def decode(cls, body: bytes) -> Event:
        """Parse a message body; raise MalformedEvent with a reason a person understands."""
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise MalformedEvent(f"body is not JSON: {exc}") from None
        if type(obj) is not dict:
            raise MalformedEvent(f"body must be a JSON object, got {type(obj).__name__}")
        # Brackets bound the depth from above (a few of them in an event): only then is it measured.
        if body.count(b"{") + body.count(b"[") > MAX_DEPTH and json_depth(obj) > MAX_DEPTH:
            raise MalformedEvent(f"body is nested deeper than {MAX_DEPTH} levels")
        get: Callable[..., Any] = obj.get
        id_, type_, data, aggregate_id = get("id"), get("type"), get("data"), get("aggregate_id", "")
        timestamp, trace_id, v = get("timestamp", ""), get("trace_id", ""), get("v", SCHEMA_VERSION)
        causation_id, correlation_id = get("causation_id"), get("correlation_id")
        # One pass of exact type checks for the common case; the slow path says what is wrong.
        if not (type(id_) is str and id_ and type(type_) is str and type_ and type(data) is dict
                and type(aggregate_id) is str and type(timestamp) is str and type(trace_id) is str
                and (causation_id is None or type(causation_id) is str)
                and (correlation_id is None or type(correlation_id) is str) and type(v) is int):
            _check_fields(obj)
        if not (timestamp and trace_id):
            # A producer that sent no trace id gets one derived from the event id: every attempt of the
            # event (and everything it causes) lands in one trace, not a new random one per delivery.
            return cls(type_, data, aggregate_id, id_, timestamp, trace_id or trace_id_of(id_), causation_id,
                       correlation_id, v, raw=body)
        # Every field is given: skip __init__ and __post_init__, which would only copy and check (hot path).
        event: Event = _new(cls)
        event.type, event.data, event.aggregate_id, event.id = type_, data, aggregate_id, id_
        event.timestamp, event.trace_id, event.causation_id, event.correlation_id = (
            timestamp, trace_id, causation_id, correlation_id)
        event.v, event.traceparent, event.raw = v, "", body
        return event


def carried_type(subject: str) -> str:
    """The event type a subject carries: its last token."""
    return subject.rpartition(".")[2]


def check_subject(event: Event, subject: str) -> None:
    """Raise MalformedEvent unless the event's ``type`` is the one its subject carries."""
    if carried_type(subject) != event.type:
        raise MalformedEvent(f"event type {event.type!r} does not match subject {subject!r}, "
                             f"which carries {carried_type(subject)!r}")


def json_depth(value: Any) -> int:
    """How deep a parsed JSON value nests (a scalar is 0, ``[]`` is 1), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if type(node) is dict:
            children: Any = node.values()
        elif type(node) is list:
            children = node
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children if type(child) in (dict, list))
    return deepest


def _check_fields(obj: dict[str, Any]) -> None:
    for name, expected in _REQUIRED.items():
        if name not in obj:
            raise MalformedEvent(f"field '{name}' is missing")
        if not isinstance(obj[name], expected):
            raise MalformedEvent(_type_reason(name, expected, obj[name]))
    for name, expected in _OPTIONAL.items():
        if name in obj and not isinstance(obj[name], expected):
            raise MalformedEvent(_type_reason(name, expected, obj[name]))
    if not obj["id"] or not obj["type"]:
        raise MalformedEvent("fields 'id' and 'type' must not be empty")


_JSON_NAMES = {str: "a string", dict: "an object", int: "an integer", type(None): "null"}


def _type_reason(name: str, expected: type | tuple[type, ...], value: object) -> str:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    wanted = " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)
    return f"field '{name}' must be {wanted}, got {type(value).__name__}"
