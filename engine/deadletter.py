"""The dead-letter stream: what could not be processed, why, and what it takes to process it again.

An entry is the original message body, unchanged, published on ``<dlq prefix>.<service>`` with the
original headers that are safe to send again plus ``Jetpool-Dlq-*`` headers (service, route, error
type and message, attempts, original subject / stream / sequence, first and last failure time). Its
``Nats-Msg-Id`` is derived from the original stream and sequence, so writing the same failure twice
(a worker retrying, or the advisory path racing the handler path) stores one entry.

Entries are built from untrusted input, so every entry is built to be stored:

- it fits the connection's ``max_payload`` and the stream's ``max_msg_size``, headers included: a
  body too large to fit is cut down and marked ``Jetpool-Dlq-Body-Truncated: <original size>``
  (``jetpool dlq replay`` then re-reads the original from its stream by sequence);
- of the original headers only those are kept that are safe to send again: no ``Nats-*`` control
  header (``Nats-Expected-Stream`` on a dead letter would make its every write fail), no name the
  client refuses, no ``Jetpool-Dlq-*`` (a producer cannot forge an entry's fields), 4 KiB at most;
- the route is the type the original's *subject* carries, never the type its body claims.

Two paths write entries:

- the consumer, when :mod:`engine.outcome` decides to dead-letter (bad input at once, or failures
  on the last attempt);
- the ``MAX_DELIVERIES`` advisory, for messages the server gave up on without any handler verdict
  (the worker was killed on every attempt): the original is fetched by sequence and dead-lettered
  (:mod:`engine.advisories` keeps those advisories in a stream until this is done, and as a last
  resort stores an entry without the body).

First-failure times are kept in a small KV bucket keyed by stream sequence, so they survive the
worker that saw the first failure. Its keys expire (``FailuresBucket.ttl_s``) and its size is
bounded (the oldest keys go first): every message nakked once leaves a key there.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from nats.js import api
from nats.js.errors import NotFoundError

from engine.config import Config
from engine.dispatch import ack_metadata
from engine.events import MSG_ID_HEADER, Event, carried_type
from engine.metrics import DEAD_LETTERED
from engine.outcome import Outcome
from engine.publisher import Publisher
from engine.state import Conflict, KVState, open_buckets
from engine.transport.outbox import header_bytes

log = structlog.get_logger("jetpool.dlq")

H = "Jetpool-Dlq-"
FAILURES_BUCKET = "jetpool_failures"
_REOPEN_S = 30.0  # how often a worker tries again to open a first-failure bucket it could not open
ORIGINAL_HEADERS_MAX_BYTES = 4096
_VALUE_MAX_CHARS = 1000
# The header names nats-py sends (RFC 7230 tokens); it refuses any other with BadHeaderError.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dlq_stream_config(config: Config) -> api.StreamConfig:
    dlq = config.dead_letter
    return api.StreamConfig(
        name=dlq.stream, subjects=[f"{dlq.subject_prefix}.>"],
        storage=api.StorageType.FILE if dlq.storage == "file" else api.StorageType.MEMORY,
        num_replicas=dlq.replicas, max_age=dlq.max_age_s, max_msg_size=dlq.max_msg_size,
        max_bytes=dlq.max_bytes or -1, discard=api.DiscardPolicy.OLD, duplicate_window=600.0,
    )


def ack_location(reply: str) -> tuple[str, int]:
    """(stream, stream sequence) from a ``$JS.ACK`` subject."""
    tokens = reply.split(".")
    stream = tokens[4] if len(tokens) >= 11 else tokens[2]
    return stream, ack_metadata(reply)[1]


def header_value(text: str, limit: int = _VALUE_MAX_CHARS) -> str:
    """``text`` as a header value: no control characters (no CR/LF to forge a header), at most ``limit``."""
    return _CONTROL.sub(" ", text).strip()[:limit]


def resendable_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers of an untrusted message that are safe to store and send again.

    Dropped: ``Nats-*`` (server control headers such as ``Nats-Expected-Stream`` or ``Nats-Rollup``;
    the message id is recorded apart), ``Jetpool-Dlq-*``, names the client would refuse, values with
    control characters, and whatever passes ``ORIGINAL_HEADERS_MAX_BYTES`` in all.
    """
    kept: dict[str, str] = {}
    size = 0
    for name, value in headers.items():
        lower = name.lower()
        if (lower.startswith("nats-") or lower.startswith(H.lower()) or not _HEADER_NAME.fullmatch(name)
                or _CONTROL.search(value) or value != value.strip()):
            continue
        size += len(name.encode()) + len(value.encode()) + 4
        if size > ORIGINAL_HEADERS_MAX_BYTES:
            break
        kept[name] = value
    return kept


@dataclass(frozen=True, slots=True)
class Failure:
    """What an entry says about one failed message."""

    service: str
    route: str
    error_type: str
    error: str
    attempts: int
    subject: str
    stream: str
    seq: int


def build_entry(failure: Failure, body: bytes, headers: Mapping[str, str], first: str, last: str,
                limit: int, keep_body: bool = True) -> tuple[bytes, dict[str, str]]:
    """The entry's body and headers, together at most ``limit`` bytes on the wire.

    Args:
        failure: what went wrong, and where the original is stored.
        body: the original body (untrusted).
        headers: the original headers (untrusted).
        first: when the message first failed; last: now.
        limit: the largest message the DLQ write may send (max_payload, the stream's max_msg_size).
        keep_body: False for the last resort (an entry that only says what happened).
    """
    f = failure
    entry = resendable_headers(headers) if keep_body else {}
    entry[MSG_ID_HEADER] = f"dlq.{f.service}.{f.stream}.{f.seq}"  # one entry per (service, message)
    entry.update({
        H + "Service": f.service, H + "Route": header_value(f.route, 200),
        H + "Error-Type": header_value(f.error_type, 200), H + "Error": header_value(f.error),
        H + "Attempts": str(f.attempts), H + "Subject": header_value(f.subject),
        H + "Stream": f.stream, H + "Stream-Seq": str(f.seq), H + "First-Failure": first, H + "Last-Failure": last,
        H + "Original-Msg-Id": header_value(headers.get(MSG_ID_HEADER, ""), 200) or "-",
    })
    if not keep_body:
        entry[H + "Body-Truncated"] = str(len(body))
        return b"", entry
    if len(body) + header_bytes(entry) > limit:
        entry[H + "Body-Truncated"] = str(len(body))
        body = body[:max(0, limit - header_bytes(entry))]
    return body, entry


class DeadLetters:
    """Writes dead-letter entries for one worker (all its services)."""

    def __init__(self, config: Config, publisher: Publisher, failures: KVState | None,
                 reopen: Callable[[], Awaitable[KVState | None]] | None = None) -> None:
        self._config = config
        self._publisher = publisher
        self._failures = failures
        self._reopen = reopen
        self._reopen_at = time.monotonic() + _REOPEN_S

    @classmethod
    async def open(cls, config: Config, publisher: Publisher, js: Any) -> DeadLetters:
        """Open the writer; without the first-failure bucket entries lack that time until it opens."""

        async def bucket() -> KVState | None:
            try:
                stores = await open_buckets(js, {FAILURES_BUCKET: failures_bucket(config)}, create=False)
            except Exception as exc:  # optional: without it, entries only lack their first-failure time
                log.warning("dlq.failures_bucket_unavailable", bucket=FAILURES_BUCKET, error=repr(exc),
                            hint=f"tried again in {_REOPEN_S:g}s; run 'jetpool provision' if it was never created")
                return None
            store = stores[FAILURES_BUCKET]
            return store if isinstance(store, KVState) else None

        return cls(config, publisher, await bucket(), reopen=bucket)

    async def _bucket(self) -> KVState | None:
        """The first-failure bucket. One that could not be opened (a cluster electing its leader, say)
        is tried again, at most every ``_REOPEN_S``, rather than done without for the worker's life."""
        if self._failures is None and self._reopen is not None and time.monotonic() >= self._reopen_at:
            self._reopen_at = time.monotonic() + _REOPEN_S
            self._failures = await self._reopen()
        return self._failures

    async def note_failure(self, reply: str, service: str) -> None:
        """Remember when this message first failed (a no-op after the first time)."""
        failures = await self._bucket()
        if failures is None:
            return
        stream, seq = ack_location(reply)
        with contextlib.suppress(Conflict, Exception):
            await failures.create(f"{service}.{stream}.{seq}", {"first": now_iso()})

    async def write(self, msg: Any, event: Event | None, outcome: Outcome, attempt: int, service: str) -> None:
        """The consumer's hook: store the entry (and wait for its PubAck) before the message is termed."""
        stream, seq = ack_location(msg.reply)
        error_type, _, message = outcome.reason.partition(": ")
        failure = Failure(service, self._route(service, msg.subject), error_type, message or outcome.reason, attempt,
                          msg.subject, stream, seq)
        # On the first delivery this failure is the first one, so the bucket is not asked: that saves a
        # round trip to the server per entry of bad input. (A consumer re-created from scratch counts
        # deliveries from 1 again; its entries then carry the later time. The bucket is best effort.)
        await self._store(failure, msg.data, msg.headers or {}, earlier_failures=attempt > 1)

    async def from_advisory(self, js: Any, advisory: Mapping[str, Any], service: str, keep_body: bool = True) -> None:
        """The server gave up on a message (max deliveries): dead-letter the original.

        ``keep_body=False`` is the advisory path's last resort: an entry without the original's body
        and headers, which can always be stored, after full entries failed again and again.
        """
        stream, seq = str(advisory["stream"]), int(advisory["stream_seq"])
        try:
            original = await js.get_msg(stream, seq)
        except NotFoundError:
            log.warning("dlq.advisory_message_gone", stream=stream, seq=seq)
            return
        failure = Failure(service, self._route(service, original.subject), "MaxDeliveriesExceeded",
                          "the server stopped redelivering after max_deliver attempts without a handler verdict "
                          "(worker crashed, was killed or timed out each time)",
                          int(advisory.get("deliveries", 0)), original.subject, stream, seq)
        await self._store(failure, original.data or b"", original.headers or {}, keep_body=keep_body)

    def _route(self, service: str, subject: str) -> str:
        """The route an entry names: the type the subject carries, if the service routes it."""
        route = carried_type(subject)
        return route if route in self._config.services[service].routes else ""

    async def _store(self, failure: Failure, body: bytes, headers: Mapping[str, str], earlier_failures: bool = True,
                     keep_body: bool = True) -> None:
        first = await self._first_failure(failure) if earlier_failures else None
        last = now_iso()
        limit = min(self._publisher.max_payload, self._config.dead_letter.max_msg_size)
        body, entry = build_entry(failure, body, headers, first or last, last, limit, keep_body)
        await self._publisher.publish(f"{self._config.dead_letter.subject_prefix}.{failure.service}", body, entry)
        DEAD_LETTERED.labels(failure.service, failure.route or "-").inc()
        log.warning("event.dead_lettered", service=failure.service, route=failure.route,
                    error_type=entry[H + "Error-Type"], stream=failure.stream, seq=failure.seq,
                    attempts=failure.attempts, truncated=H + "Body-Truncated" in entry)

    async def _first_failure(self, failure: Failure) -> str | None:
        failures = await self._bucket()
        if failures is None:
            return None
        with contextlib.suppress(Exception):
            value, _ = await failures.get(f"{failure.service}.{failure.stream}.{failure.seq}")
            return str(value["first"]) if value else None
        return None


@dataclass(frozen=True)
class FailuresBucket:
    """Config of the first-failure bucket: small; losing it only loses first-failure times.

    On file, not in memory: a JetStream deployment may have no memory store at all (the NATS chart's
    values here disable it), and then a memory bucket is created but refuses every write.

    A key is needed only while its message can still be redelivered, so keys expire after ``ttl_s``
    and the bucket keeps at most ``max_bytes``, dropping the oldest keys first: a producer sending
    events that fail once cannot grow it without bound.
    """

    history: int = 1
    storage: str = "file"
    replicas: int = 1
    ttl_s: float = 24 * 3600.0
    max_bytes: int = 64 * 1024 * 1024


def failures_bucket(config: Config) -> FailuresBucket:
    """As many replicas as the dead-letter stream, so a cluster keeps it through a node's loss."""
    return FailuresBucket(replicas=config.dead_letter.replicas)


def failures_stream_config(bucket: FailuresBucket) -> api.StreamConfig:
    """The bucket's stream as nats-py creates a KV bucket, with a TTL, a size limit and discard-old."""
    return api.StreamConfig(
        name=f"KV_{FAILURES_BUCKET}", subjects=[f"$KV.{FAILURES_BUCKET}.>"], allow_direct=False,
        allow_rollup_hdrs=True, allow_msg_ttl=True, deny_delete=True, discard=api.DiscardPolicy.OLD,
        duplicate_window=min(120.0, bucket.ttl_s), max_age=bucket.ttl_s, max_bytes=bucket.max_bytes,
        max_consumers=-1, max_msgs=-1, max_msgs_per_subject=bucket.history, num_replicas=bucket.replicas,
        storage=api.StorageType.FILE if bucket.storage == "file" else api.StorageType.MEMORY,
    )

