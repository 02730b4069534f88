"""The dead-letter stream: what could not be processed, why, and how to replay it.

An entry is the original message body, unchanged, published on ``<dlq prefix>.<service>`` with the
original headers plus ``Jetpool-Dlq-*`` headers (service, route, error type and message, attempts,
original subject / stream / sequence, first and last failure time). Its ``Nats-Msg-Id`` is derived
from the original stream and sequence, so writing the same failure twice (a worker retrying, or the
advisory path racing the handler path) stores one entry.

Two paths write entries:

- the consumer, when :mod:`engine.outcome` decides to dead-letter (bad input at once, or failures
  on the last attempt);
- the ``MAX_DELIVERIES`` advisory, for messages the server gave up on without any handler verdict
  (the worker was killed on every attempt): the original is fetched by sequence and dead-lettered
  (:mod:`engine.advisories` keeps those advisories in a stream until this is done).

First-failure times are kept in a small KV bucket keyed by stream sequence, so they survive the
worker that saw the first failure.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from nats.js import api
from nats.js.errors import NotFoundError

from engine.config import Config
from engine.dispatch import ack_metadata
from engine.events import MSG_ID_HEADER, Event
from engine.metrics import DEAD_LETTERED
from engine.outcome import Outcome
from engine.publisher import Publisher
from engine.state import Conflict, KVState, open_buckets

log = structlog.get_logger("jetpool.dlq")

H = "Jetpool-Dlq-"
FAILURES_BUCKET = "jetpool_failures"
_REOPEN_S = 30.0  # how often a worker tries again to open a first-failure bucket it could not open


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dlq_stream_config(config: Config) -> api.StreamConfig:
    dlq = config.dead_letter
    return api.StreamConfig(
        name=dlq.stream, subjects=[f"{dlq.subject_prefix}.>"],
        storage=api.StorageType.FILE if dlq.storage == "file" else api.StorageType.MEMORY,
        num_replicas=dlq.replicas, max_age=dlq.max_age_s, max_msg_size=dlq.max_msg_size,
        duplicate_window=600.0,
    )


def ack_location(reply: str) -> tuple[str, int]:
    """(stream, stream sequence) from a ``$JS.ACK`` subject."""
    tokens = reply.split(".")
    stream = tokens[4] if len(tokens) >= 11 else tokens[2]
    return stream, ack_metadata(reply)[1]


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
        route = event.type if event else ""
        error_type, _, message = outcome.reason.partition(": ")
        # On the first delivery this failure is the first one, so the bucket is not asked: that saves a
        # round trip to the server per entry of bad input. (A consumer re-created from scratch counts
        # deliveries from 1 again; its entries then carry the later time. The bucket is best effort.)
        await self._store(service, route, error_type, message or outcome.reason, attempt, msg.subject,
                          stream, seq, msg.data, dict(msg.headers or {}), earlier_failures=attempt > 1)

    async def from_advisory(self, js: Any, advisory: dict[str, Any], service: str) -> None:
        """The server gave up on a message (max deliveries): dead-letter the original."""
        stream, seq = advisory["stream"], int(advisory["stream_seq"])
        try:
            original = await js.get_msg(stream, seq)
        except NotFoundError:
            log.warning("dlq.advisory_message_gone", stream=stream, seq=seq)
            return
        body = orjson.loads(original.data) if original.data.startswith(b"{") else {}
        await self._store(service, str(body.get("type", "")) if isinstance(body, dict) else "",
                          "MaxDeliveriesExceeded",
                          "the server stopped redelivering after max_deliver attempts without a handler verdict "
                          "(worker crashed, was killed or timed out each time)",
                          int(advisory.get("deliveries", 0)), original.subject, stream, seq, original.data or b"",
                          dict(original.headers or {}))

    async def _store(self, service: str, route: str, error_type: str, message: str, attempts: int,
                     subject: str, stream: str, seq: int, body: bytes, headers: dict[str, str],
                     earlier_failures: bool = True) -> None:
        first = await self._first_failure(service, stream, seq) if earlier_failures else None
        last = now_iso()
        original_id = headers.get(MSG_ID_HEADER, "")
        headers = {k: v for k, v in headers.items() if not k.startswith(H)}
        # One entry per (service, message): two services rejecting the same event make two entries.
        headers[MSG_ID_HEADER] = f"dlq.{service}.{stream}.{seq}"
        headers.update({
            H + "Service": service, H + "Route": route, H + "Error-Type": error_type,
            H + "Error": " ".join(message.split())[:1000], H + "Attempts": str(attempts),
            H + "Subject": subject, H + "Stream": stream, H + "Stream-Seq": str(seq),
            H + "First-Failure": first or last, H + "Last-Failure": last,
            H + "Original-Msg-Id": original_id or "-",
        })
        await self._publisher.publish(f"{self._config.dead_letter.subject_prefix}.{service}", body, headers)
        DEAD_LETTERED.labels(service, route if route in self._config.services[service].routes else "-").inc()
        log.warning("event.dead_lettered", service=service, route=route, error_type=error_type,
                    stream=stream, seq=seq, attempts=attempts)

    async def _first_failure(self, service: str, stream: str, seq: int) -> str | None:
        failures = await self._bucket()
        if failures is None:
            return None
        with contextlib.suppress(Exception):
            value, _ = await failures.get(f"{service}.{stream}.{seq}")
            return str(value["first"]) if value else None
        return None


@dataclass(frozen=True)
class FailuresBucket:
    """Config of the first-failure bucket: small and in memory; losing it only loses first-failure times."""

    history: int = 1
    storage: str = "memory"
    replicas: int = 1


def failures_bucket(config: Config) -> FailuresBucket:
    """As many replicas as the dead-letter stream, so a cluster keeps it through a node's loss."""
    return FailuresBucket(replicas=config.dead_letter.replicas)


# ---- reading and replaying (``jetpool dlq``) --------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One dead-letter entry, as ``jetpool dlq`` shows it."""

    id: int
    service: str
    route: str
    error_type: str
    error: str
    attempts: int
    subject: str
    stream: str
    stream_seq: int
    first_failure: str
    last_failure: str
    body: bytes
    headers: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        body: Any
        try:
            body = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            body = self.body.decode("utf-8", "replace")
        return {
            "id": self.id, "service": self.service, "route": self.route, "error_type": self.error_type,
            "error": self.error, "attempts": self.attempts, "subject": self.subject, "stream": self.stream,
            "stream_seq": self.stream_seq, "first_failure": self.first_failure, "last_failure": self.last_failure,
            "body": body, "headers": self.original_headers(),
        }

    def original_headers(self) -> dict[str, str]:
        """The headers the message had before it was dead-lettered."""
        headers = {k: v for k, v in self.headers.items() if not k.startswith(H) and k != MSG_ID_HEADER}
        original_id = self.headers.get(H + "Original-Msg-Id", "-")
        if original_id != "-":
            headers[MSG_ID_HEADER] = original_id
        return headers


def _entry(raw: Any) -> Entry:
    h = dict(raw.headers or {})
    return Entry(
        id=int(raw.seq), service=h.get(H + "Service", ""), route=h.get(H + "Route", ""),
        error_type=h.get(H + "Error-Type", ""), error=h.get(H + "Error", ""),
        attempts=int(h.get(H + "Attempts", "0") or 0), subject=h.get(H + "Subject", ""),
        stream=h.get(H + "Stream", ""), stream_seq=int(h.get(H + "Stream-Seq", "0") or 0),
        first_failure=h.get(H + "First-Failure", ""), last_failure=h.get(H + "Last-Failure", ""),
        body=raw.data or b"", headers=h,
    )


async def list_entries(js: Any, config: Config, service: str | None = None, limit: int = 50) -> list[Entry]:
    """Entries oldest first, optionally of one service, at most ``limit``."""
    dlq = config.dead_letter
    info = await js.stream_info(dlq.stream)
    entries: list[Entry] = []
    seq, last = info.state.first_seq, info.state.last_seq
    subject = f"{dlq.subject_prefix}.{service}" if service else None
    while seq and seq <= last and len(entries) < limit:
        try:
            raw = await js.get_msg(dlq.stream, seq=seq, next=True, subject=subject or f"{dlq.subject_prefix}.>")
        except NotFoundError:
            break
        entries.append(_entry(raw))
        seq = int(raw.seq) + 1
    return entries


async def get_entry(js: Any, config: Config, entry_id: int) -> Entry:
    try:
        return _entry(await js.get_msg(config.dead_letter.stream, seq=entry_id))
    except NotFoundError:
        raise LookupError(f"no dead-letter entry {entry_id} in stream {config.dead_letter.stream!r}") from None


async def replay(js: Any, config: Config, entries: list[Entry]) -> int:
    """Re-publish entries to their original subjects, then delete them from the DLQ.

    The replay's ``Nats-Msg-Id`` is derived from the DLQ entry, so replaying the same entry twice
    (say, after a crash between publish and delete) stores the event once.
    """
    done = 0
    for entry in entries:
        headers = entry.original_headers()
        headers[MSG_ID_HEADER] = f"replay.{config.dead_letter.stream}.{entry.id}"
        await js.publish(entry.subject, entry.body, headers=headers)
        with contextlib.suppress(NotFoundError):
            await js.delete_msg(config.dead_letter.stream, entry.id)
        done += 1
    return done


async def purge(js: Any, config: Config, service: str | None = None) -> int:
    """Delete every entry (or every entry of one service); returns how many were removed."""
    dlq = config.dead_letter
    before = (await js.stream_info(dlq.stream)).state.messages
    if service:
        await js.purge_stream(dlq.stream, subject=f"{dlq.subject_prefix}.{service}")
    else:
        await js.purge_stream(dlq.stream)
    after = (await js.stream_info(dlq.stream)).state.messages
    return int(before - after)
