"""Inspect, replay and purge the dead-letter stream (``jetpool dlq``).

:mod:`engine.deadletter` writes the entries; this module reads them back for a person or a script,
re-publishes them, and deletes them.

Replay trusts no entry. Every service may publish on its own ``<dead_letter.subject_prefix>.<service>``
subject, so an entry's headers are only a claim, and replay runs with the operator's rights. Before it
publishes anything it checks that the entry was stored on the dead-letter subject of the service it names,
that this service is in the loaded config, that the original stream named is that service's stream and
that the subject named is one the service consumes (its filter subjects). It then re-reads the original
message from its stream by sequence and publishes *that*: its body and its safe headers, only if it is
still on the subject the entry names. Safe headers are everything but ``Nats-*`` control headers and
``Jetpool-Dlq-*`` (and names or values the client cannot send); the replay sets its own ``Nats-Msg-Id``.
When the original is gone (``max_age``, a purge) the entry is refused unless ``--from-entry`` is given,
which publishes the body the entry stored, still only on a subject its service consumes; an entry whose
body was cut short (``Jetpool-Dlq-Body-Truncated``) is never replayed from the entry. A refused entry is
reported with its id and the reason and stays in the stream; the others are replayed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.header import decode_header
from typing import Any

import orjson
import structlog
from nats.js.errors import NotFoundError

from engine.config import Config, subject_matches
from engine.deadletter import H, header_value, resendable_headers
from engine.events import MSG_ID_HEADER

log = structlog.get_logger("jetpool.dlq")

TRUNCATED_HEADER = H + "Body-Truncated"  # the original body's size in bytes, when the entry keeps only part
_SHOWN_CHARS = 200  # of a sender-controlled value quoted in a refusal


@dataclass(frozen=True)
class Entry:
    """One dead-letter entry, as ``jetpool dlq`` shows it: what its headers claim, unchecked."""

    id: int
    dlq_subject: str  # the subject it was stored on
    service: str
    route: str
    error_type: str
    error: str
    attempts: int
    subject: str
    stream: str
    stream_seq: int | None  # None when the header is missing or not a number
    first_failure: str
    last_failure: str
    body: bytes
    headers: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "dlq_subject": self.dlq_subject, "service": self.service, "route": self.route,
            "error_type": self.error_type, "error": self.error, "attempts": self.attempts, "subject": self.subject,
            "stream": self.stream, "stream_seq": self.stream_seq, "first_failure": self.first_failure,
            "last_failure": self.last_failure, "body": json_or_text(self.body), "headers": self.original_headers(),
        }

    def original_headers(self) -> dict[str, str]:
        """The headers the message had before it was dead-lettered."""
        headers = {k: v for k, v in self.headers.items() if not k.startswith(H) and k != MSG_ID_HEADER}
        original_id = self.headers.get(H + "Original-Msg-Id", "-")
        if original_id != "-":
            headers[MSG_ID_HEADER] = original_id
        return headers

    @property
    def truncated(self) -> bool:
        """The entry stores only part of the original body."""
        return TRUNCATED_HEADER in self.headers


def json_or_text(body: bytes) -> Any:
    """The body as JSON if orjson can read it *and* write it back (not nested deeper than 255), else as text."""
    try:
        value = orjson.loads(body)
        orjson.dumps(value)
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return body.decode("utf-8", "replace")
    return value


def _number(text: str | None) -> int | None:
    """A decimal count from a header, or None (``int()`` would also take ``" 1_0"`` and non-ASCII digits)."""
    return int(text) if text and text.isascii() and text.isdigit() else None


def read_entry(raw: Any) -> Entry:
    """An entry from a message of the dead-letter stream, as ``js.get_msg`` returns it; never raises on
    what a sender wrote (a header that is not a number reads as None or 0)."""
    h = {str(k): header_text(v, "replace") or "" for k, v in (raw.headers or {}).items()}
    return Entry(
        id=int(raw.seq), dlq_subject=str(raw.subject or ""), service=h.get(H + "Service", ""),
        route=h.get(H + "Route", ""), error_type=h.get(H + "Error-Type", ""), error=h.get(H + "Error", ""),
        attempts=_number(h.get(H + "Attempts")) or 0, subject=h.get(H + "Subject", ""),
        stream=h.get(H + "Stream", ""), stream_seq=_number(h.get(H + "Stream-Seq")),
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
        entries.append(read_entry(raw))
        seq = int(raw.seq) + 1
    return entries


async def get_entry(js: Any, config: Config, entry_id: int) -> Entry:
    missing = LookupError(f"no dead-letter entry {entry_id} in stream {config.dead_letter.stream!r}")
    if entry_id < 1:  # stream sequences start at 1 (and nats-py would send no sequence for 0)
        raise missing
    try:
        return read_entry(await js.get_msg(config.dead_letter.stream, seq=entry_id))
    except NotFoundError:
        raise missing from None


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


# ---- replay: the checks (pure) ----------------------------------------------------------------------


class Refused(Exception):
    """Replay will not publish this entry; the message says why."""


@dataclass(frozen=True)
class Original:
    """The message an entry names, as its stream holds it."""

    subject: str
    body: bytes
    headers: dict[str, Any]


@dataclass(frozen=True)
class Publication:
    """What a replay publishes for one entry (before its own ``Nats-Msg-Id``)."""

    subject: str
    body: bytes
    headers: dict[str, str]
    source: str  # "stream" (the original) or "entry" (its stored body, --from-entry)


def _shown(value: str) -> str:
    """A sender-controlled value quoted in a refusal: escaped by repr, cut short."""
    return repr(value if len(value) <= _SHOWN_CHARS else value[:_SHOWN_CHARS] + "…")


def check_service(config: Config, entry: Entry) -> str:
    """The entry's service, once it agrees with the dead-letter subject the entry was stored on."""
    if not entry.service:
        raise Refused(f"names no service (no {H}Service header)")
    expected = f"{config.dead_letter.subject_prefix}.{entry.service}"
    if entry.dlq_subject != expected:
        raise Refused(f"was stored on {_shown(entry.dlq_subject)} but names service {_shown(entry.service)}, "
                      f"whose entries go on {_shown(expected)}")
    if entry.service not in config.services:
        raise Refused(f"names service {_shown(entry.service)}, which is not in {config.source}")
    return entry.service


def check_subject(config: Config, service: str, subject: str) -> None:
    """Refuse a subject the service does not consume (a literal subject matching one of its filters)."""
    filters = config.filter_subjects(service)
    literal = bool(subject) and all(token and token not in ("*", ">") and token.isprintable() and " " not in token
                                    for token in subject.split("."))
    if not literal or not any(subject_matches(pattern, subject) for pattern in filters):
        raise Refused(f"names subject {_shown(subject)}, which {service} does not consume ({', '.join(filters)})")


def locate(config: Config, entry: Entry) -> tuple[str, int]:
    """(stream, sequence) of the entry's original, once its service, stream and subject are checked."""
    service = check_service(config, entry)
    stream = config.services[service].stream
    if entry.stream != stream:
        raise Refused(f"names stream {_shown(entry.stream)}, but {service} consumes stream {stream!r}")
    if entry.stream_seq is None or entry.stream_seq < 1:
        raise Refused(f"names no valid original sequence ({H}Stream-Seq: "
                      f"{_shown(entry.headers.get(H + 'Stream-Seq', '(missing)'))})")
    check_subject(config, service, entry.subject)
    return stream, entry.stream_seq


def safe_headers(headers: Mapping[str, Any]) -> dict[str, str]:
    """The headers a replay may resend: those a dead-letter entry may keep (no ``Nats-*`` control header,
    no ``Jetpool-Dlq-*``, only names and values the client sends unchanged) whose values are text."""
    texts = {name: text for name, value in headers.items()
             if isinstance(name, str) and (text := header_text(value)) is not None}
    return resendable_headers(texts)


def header_text(value: Any, errors: str = "strict") -> str | None:
    """A header value as text, or None when it is not UTF-8 (unless ``errors="replace"``).

    The client parses headers with :mod:`email`, which returns a value with bytes that are not ASCII
    as a :class:`email.header.Header`; its bytes are read here as UTF-8.
    """
    try:
        if isinstance(value, str):
            if errors == "strict":
                value.encode()  # raises on lone surrogates
            return value
        return "".join(part.decode("utf-8", errors) if isinstance(part, bytes) else part
                       for part, _ in decode_header(value))
    except (UnicodeError, LookupError):  # lone surrogates, bytes that are not UTF-8
        return None


def choose(entry: Entry, original: Original | None, from_entry: bool) -> Publication:
    """What to publish for a located entry: its original if the stream still holds it, else (only when
    asked, and only for a whole body) the body the entry stored."""
    if original is not None:
        return from_original(entry, original)
    where = f"{entry.stream} #{entry.stream_seq}"
    if not from_entry:
        raise Refused(f"its original ({where}) is gone from the stream; --from-entry replays the body the "
                      "entry stored instead")
    if entry.truncated:
        raise Refused(f"its original ({where}) is gone and the entry keeps only part of the body "
                      f"({_shown(entry.headers[TRUNCATED_HEADER])} bytes originally): it cannot be replayed")
    return Publication(entry.subject, entry.body, safe_headers(entry.original_headers()), "entry")


def from_original(entry: Entry, original: Original) -> Publication:
    """The original, once it is the message the entry says it is."""
    where = f"{entry.stream} #{entry.stream_seq}"
    if original.subject != entry.subject:
        raise Refused(f"{where} is a message on {_shown(original.subject)}, not on {_shown(entry.subject)} "
                      "as the entry says")
    # A stream deleted and created again reuses sequences: the id tells its message from the one dead-lettered.
    claimed = entry.headers.get(H + "Original-Msg-Id", "-")
    stored = header_text(original.headers.get(MSG_ID_HEADER, ""), "replace") or ""
    if claimed not in ("", "-") and claimed != header_value(stored, 200):  # as the writer records it
        raise Refused(f"{where} has message id {_shown(stored)}, not {_shown(claimed)} as the entry says")
    return Publication(original.subject, original.body, safe_headers(original.headers), "stream")


# ---- replay: reading, publishing, deleting ----------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """An entry that was not replayed (it stays in the dead-letter stream), and why."""

    id: int
    reason: str


@dataclass
class Report:
    """The outcome of one ``jetpool dlq replay``."""

    replayed: list[int] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"replayed": len(self.replayed), "refused": len(self.refused),
                "refusals": [{"id": r.id, "reason": r.reason} for r in self.refused]}


async def replay(js: Any, config: Config, entries: list[Entry], from_entry: bool = False) -> Report:
    """Re-publish each entry's original to its subject, then delete the entry; refuse what does not check out.

    The replay's ``Nats-Msg-Id`` is derived from the DLQ entry, so replaying the same entry twice
    (say, after a crash between publish and delete) stores the event once.

    Args:
        js: a JetStream context with the rights to read the streams and publish on their subjects.
        config: the deployment's config; entries are checked against its services.
        entries: what to replay (``list_entries`` / ``get_entry``).
        from_entry: when an original is gone from its stream, publish the body the entry stored.
    """
    report = Report()
    for entry in entries:
        try:
            stream, seq = locate(config, entry)
            publication = choose(entry, await _original(js, stream, seq), from_entry)
            await _publish(js, config, entry, publication)
        except Refused as refused:
            report.refused.append(Refusal(entry.id, str(refused)))
            continue
        await _delete(js, config, entry)
        report.replayed.append(entry.id)
    return report


async def _original(js: Any, stream: str, seq: int) -> Original | None:
    try:
        raw = await js.get_msg(stream, seq)
    except NotFoundError:
        return None
    except Exception as exc:  # a timeout, a permission: this entry is not replayed, the others may be
        raise Refused(f"its original ({stream} #{seq}) could not be read: {_error(exc)}") from None
    return Original(str(raw.subject or ""), raw.data or b"", dict(raw.headers or {}))


async def _publish(js: Any, config: Config, entry: Entry, publication: Publication) -> None:
    headers = {**publication.headers, MSG_ID_HEADER: f"replay.{config.dead_letter.stream}.{entry.id}"}
    try:
        await js.publish(publication.subject, publication.body, headers=headers)
    except Exception as exc:  # no stream took it, a timeout: the entry stays for another try
        raise Refused(f"publishing on {_shown(publication.subject)} failed: {_error(exc)}") from None
    log.info("dlq.replayed", entry=entry.id, service=entry.service, subject=publication.subject,
             source=publication.source)


def _error(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


async def _delete(js: Any, config: Config, entry: Entry) -> None:
    try:
        with contextlib.suppress(NotFoundError):
            await js.delete_msg(config.dead_letter.stream, entry.id)
    except Exception as exc:  # published already: a second replay stores nothing new (same Nats-Msg-Id)
        log.warning("dlq.replayed_entry_kept", entry=entry.id, error=repr(exc))
