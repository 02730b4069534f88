"""The fast state path: KV reads as direct gets on one inbox, compare-and-set writes through the publisher.

nats-py's ``KeyValue`` spends about 90 µs of client CPU on each request (a new inbox future, a
``wait_for``, a ``Msg`` with every header parsed, a JSON API reply). A worker's state stores go around
that plumbing with two things it already has:

- reads are JetStream *direct gets*, ``$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.<key>`` with an empty
  body, sent through the connection's :class:`~engine.transport.Outbox` with a reply subject under ONE
  wildcard inbox per connection (:class:`DirectGets`, delivered inline), matched to the waiting
  future by its reply subject, timed out by a sweep. The answer is the stored message itself: its
  body is the value, ``Nats-Sequence`` its revision; ``Status: 404`` or a ``KV-Operation: DEL|PURGE``
  header is a missing key (revision 0, like nats-py's ``KeyNotFoundError``). A 503 (no stream
  answered: a restart, an election) is retried with backoff within the publish retry budget.
- writes are publishes to ``$KV.<bucket>.<key>`` through the engine's windowed
  :class:`~engine.publisher.Publisher` (one PubAck subscription, transients retried): create and
  update carry ``Nats-Expected-Last-Subject-Sequence`` (0 for a create), a put carries nothing. The
  revision is the PubAck's ``seq``; err_code 10071 (wrong last sequence) is :class:`Conflict`.

A compare-and-set write carries no ``Nats-Msg-Id``: nats-server checks the expected sequence before
duplicates (a resend of a stored CAS write is refused with 10071, not acknowledged as a duplicate),
and an id per write would only fill the server's duplicate table. Instead each CAS write carries a
``Jetpool-Write`` token unique to it. When the publisher had to resend a write (a PubAck was lost,
so the first attempt may have been stored) and the answer is 10071, the key's last message is read:
our token there means the write did land (its revision is returned); a last message that itself
expected the same revision means another writer won (a true :class:`Conflict`); anything else (the
key moved on twice since) cannot be told apart and raises :class:`~engine.errors.PublishTimeout`, so
the handler's delivery is retried rather than a mutation applied twice.

A replicated bucket (R>1) never allows direct gets: a replica behind the leader would answer. It is
read from its leader with ``$JS.API.STREAM.MSG.GET.KV_<bucket>`` (``{"last_by_subj": ...}``, a JSON answer
with the message in base64, :func:`read_msg_get`) through the same inbox, with the same mapping.

Direct gets need the bucket stream's ``allow_direct``: single-replica buckets are created with it
(:func:`engine.state.open_buckets`) and ``jetpool provision`` turns it on for existing ones. A bucket
opened without it (provisioned by an older jetpool, workers run with ``--no-provision``) is read through
nats-py's ``KeyValue.get`` instead (the warning ``state.direct_get_off`` says which) and written on the
fast path, which needs nothing of the stream.

No private name of nats-py is used here: the inline inbox and the outbox are the fenced paths of
:mod:`engine.transport` (``jetpool_fast_path{path="inbox"|"outbox"}``), and when the fence says no they
fall back to nats-py's subscription queue and ``Client.publish``; this module works the same on both.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import random
from typing import Any

import orjson
import structlog
from nats.js.errors import InvalidKeyError, KeyNotFoundError

from engine.errors import BrokerError, PublishTimeout
from engine.publisher import Publisher, Refused
from engine.state import Conflict, RevisionCache, StateStore, Value, direct_gets_for
from engine.transport import inbox
from engine.transport.inbox import Message
from engine.transport.outbox import Outbox

log = structlog.get_logger("jetpool.kv")

EXPECTED = "Nats-Expected-Last-Subject-Sequence"
WRITE = "Jetpool-Write"
_WRONG_LAST = (10071, 10164)  # JSStreamWrongLastSequenceErrF, JSStreamWrongLastSequenceConstantErr
_DELETED = ("DEL", "PURGE")
_SWEEP_INTERVAL_S = 0.25
_RETRY_FIRST_S = 0.1
_RETRY_MAX_S = 2.0

Reply = tuple[int, dict[str, str], bytes]  # status (0: a stored message), header fields, body


def parse_headers(raw: bytes) -> tuple[int, dict[str, str]]:
    """A header block's status code (0 when its first line has none) and its fields.

    ``NATS/1.0 404 Message Not Found\\r\\n\\r\\n`` -> ``(404, {})``; ``NATS/1.0\\r\\nNats-Sequence: 5\\r\\n\\r\\n`` ->
    ``(0, {"Nats-Sequence": "5"})``. Values are stripped of surrounding blanks, as nats-py does.
    """
    head, _, rest = raw.partition(b"\r\n")
    status = head[9:12]
    fields: dict[str, str] = {}
    for line in rest.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep:
            fields[name.decode()] = value.strip().decode()
    return (int(status) if status.isdigit() else 0), fields


def read_reply(msg: Any) -> Reply:
    """A direct get's answer from either inbox path (an inline :class:`Message` or nats-py's ``Msg``)."""
    raw = msg.raw_headers if type(msg) is Message else None
    if raw is not None:
        status, fields = parse_headers(raw)
        return status, fields, msg.data
    fields = dict(msg.headers or {})
    code = fields.pop("Status", "")
    return (int(code) if code.isdigit() else 0), fields, msg.data


def read_msg_get(body: bytes) -> Reply:
    """A ``$JS.API.STREAM.MSG.GET`` answer (JSON) as a direct get's :data:`Reply`.

    ``{"message": {"seq", "hdrs", "data"}}`` (headers and body base64) -> ``(0, fields, data)`` with the
    sequence in ``Nats-Sequence``, as a direct get gives it; ``{"error": {"code": 404, ...}}`` -> ``(404,
    {}, b"")``; another error -> its code (503 while the stream elects a leader), the description in
    ``Description``.

    Raises:
        ValueError: an answer that is not one of those.
    """
    answer = orjson.loads(body)
    if not isinstance(answer, dict):
        raise ValueError(f"not a JSON object: {body[:80]!r}")
    error, message = answer.get("error"), answer.get("message")
    if isinstance(error, dict):
        code = error.get("code")
        if not isinstance(code, int) or isinstance(code, bool):
            raise ValueError(f"an error without a code: {body[:80]!r}")
        return code, ({} if code == 404 else {"Description": str(error.get("description", ""))}), b""
    if not isinstance(message, dict) or not isinstance(message.get("seq"), int):
        raise ValueError(f"neither a message nor an error: {body[:80]!r}")
    hdrs, data = message.get("hdrs") or "", message.get("data") or ""
    if not isinstance(hdrs, str) or not isinstance(data, str):
        raise ValueError(f"headers or data not base64 text: {body[:80]!r}")
    fields = parse_headers(base64.b64decode(hdrs, validate=True))[1] if hdrs else {}
    fields["Nats-Sequence"] = str(message["seq"])
    return 0, fields, base64.b64decode(data, validate=True)


def valid_key(key: str) -> bool:
    """nats-py's rule for KV keys (a space or a wildcard in a subject would break the protocol)."""
    return bool(key) and key[0] != "." and key[-1] != "." and key.isascii() and all(
        c.isalnum() or c in "-/_=." for c in key)


class DirectGets:
    """Direct gets of one connection: one wildcard reply inbox, a future per request, a sweep for timeouts.

    Args:
        nc: a connected ``nats.aio.client.Client``.
        timeout_s: how long one answer may take.
        retry_s: how long 503s (no stream answered) are retried before the caller hears of them.
    """

    def __init__(self, nc: Any, timeout_s: float = 10.0, retry_s: float = 30.0) -> None:
        self._nc = nc
        self._out = Outbox(nc)
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._inbox = nc.new_inbox() + "."
        self._seq = itertools.count(1)
        # reply subject -> (future, deadline, whether the answer is JSON); insertion order is deadline order.
        self._pending: dict[str, tuple[asyncio.Future[Reply], float, bool]] = {}
        self._sub: Any = None
        self._sweeper: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()

    @property
    def pending(self) -> int:
        """Reads waiting for their answer."""
        return len(self._pending)

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox + "*", cb=self._on_reply, pending_msgs_limit=0,
                                             pending_bytes_limit=0)
        inbox.inline(self._nc, self._sub, self._on_reply, "direct_get")
        self._sweeper = self._loop.create_task(self._sweep())

    async def stop(self) -> None:
        """Stop sweeping and fail whatever still waits."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        pending, self._pending = self._pending, {}
        for future, _, _ in pending.values():
            if not future.done():
                future.set_exception(BrokerError("direct gets stopped before the answer came"))
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def last(self, stream: str, subject: str) -> Reply:
        """The last message of ``subject`` in ``stream``, from any replica (a direct get); 503s retried with
        backoff within ``retry_s``."""
        return await self._retried(f"$JS.API.DIRECT.GET.{stream}.{subject}", b"", False, stream, subject)

    async def last_from_leader(self, stream: str, subject: str) -> Reply:
        """The last message of ``subject`` in ``stream``, from the stream's leader (``STREAM.MSG.GET``):
        what a replicated stream must be read with, so a read never misses a write; 503s retried."""
        body = orjson.dumps({"last_by_subj": subject})
        return await self._retried(f"$JS.API.STREAM.MSG.GET.{stream}", body, True, stream, subject)

    async def _retried(self, request: str, body: bytes, json: bool, stream: str, subject: str) -> Reply:
        started = self._loop.time()
        for tries in itertools.count(1):
            reply = await self._ask(request, body, json)
            if reply[0] != 503:
                return reply
            delay = min(_RETRY_MAX_S, _RETRY_FIRST_S * 2 ** (tries - 1)) * random.uniform(0.5, 1.0)
            if self._loop.time() + delay - started >= self._retry_s:
                break
            await asyncio.sleep(delay)
        raise BrokerError(f"read of {subject} in {stream}: no stream answered (503) for {self._retry_s}s: "
                          "is the bucket there (with allow_direct, for a direct get)?")

    async def _ask(self, request: str, body: bytes, json: bool) -> Reply:
        reply = self._inbox + str(next(self._seq))
        future: asyncio.Future[Reply] = self._loop.create_future()
        self._pending[reply] = (future, self._loop.time() + self._timeout_s, json)
        try:
            if not self._out.write(request, body, reply):
                await self._out.publish(request, body, reply)
            return await future
        finally:
            self._pending.pop(reply, None)  # answered already, or cancelled / failed: not to be swept

    async def _on_reply(self, msg: Any) -> None:
        entry = self._pending.pop(msg.subject, None)
        if entry is None or entry[0].done():
            return
        try:
            reply = read_reply(msg)
            if entry[2] and reply[0] == 0:  # a leader read's JSON answer (a 503 comes as a status, no body)
                reply = read_msg_get(reply[2])
        except ValueError as exc:  # base64's errors too; off the books now, so fail the read here
            entry[0].set_exception(BrokerError(f"state read: an answer that cannot be read: {exc!r}"))
            return
        entry[0].set_result(reply)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL_S)
            now = self._loop.time()
            expired = []
            for reply, (_, deadline, _) in self._pending.items():
                if deadline > now:
                    break
                expired.append(reply)
            for reply in expired:
                future, _, _ = self._pending.pop(reply)
                if not future.done():
                    future.set_exception(PublishTimeout(f"no answer to a direct get within {self._timeout_s}s"))


class FastKV(RevisionCache):
    """A StateStore over a KV bucket: direct gets to read, the publisher to write (the module docstring).

    Args:
        bucket: the bucket's name.
        gets: the connection's direct gets; None reads through ``kv`` (a bucket without allow_direct).
        publisher: the worker's publisher (its ``capture`` is told about the bucket's subjects).
        kv: nats-py's ``KeyValue`` of the bucket, for reads when ``gets`` is None.
        leader: read from the stream's leader (``STREAM.MSG.GET`` through ``gets``' inbox), not with
            direct gets: a replicated bucket's.
    """

    def __init__(self, bucket: str, gets: DirectGets | None, publisher: Publisher, kv: Any = None,
                 remember: int = 4096, *, leader: bool = False) -> None:
        super().__init__(remember)
        self.bucket = bucket
        self._leader = leader
        self._read = None if gets is None else gets.last_from_leader if leader else gets.last
        self._publisher = publisher
        self._kv = kv
        self._stream = f"KV_{bucket}"
        self._pre = f"$KV.{bucket}."
        self._tokens = itertools.count(1)
        self._token_prefix = os.urandom(6).hex() + "."
        publisher.capture(self._pre + ">")

    @property
    def direct(self) -> bool:
        """Whether reads are direct gets (else leader reads, or nats-py's ``KeyValue.get``)."""
        return self._read is not None and not self._leader

    @property
    def fast_reads(self) -> bool:
        """Whether reads go through the connection's own inbox (direct gets or leader reads)."""
        return self._read is not None

    async def _last(self, key: str) -> Reply:
        """The key's last message (a 404 status when it has none)."""
        if not valid_key(key):
            raise InvalidKeyError(key)
        if self._read is not None:
            return await self._read(self._stream, self._pre + key)
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError as missing:
            if missing.entry is None or missing.op is None:
                return 404, {}, b""
            # a delete marker (nats-py raises for it too): create() writes over its revision
            return 0, {"Nats-Sequence": str(missing.entry.revision), "KV-Operation": str(missing.op)}, b""
        return 0, {"Nats-Sequence": str(entry.revision or 0)}, entry.value or b""

    async def get(self, key: str) -> tuple[Value | None, int]:
        status, fields, data = await self._last(key)
        if status == 404 or fields.get("KV-Operation") in _DELETED:
            self._known.pop(key, None)
            return None, 0
        if status:
            raise BrokerError(f"state {self.bucket!r}: reading {key!r} answered {status} {fields}")
        revision = int(fields["Nats-Sequence"])
        if not data:
            return None, revision
        self._note(key, data, revision)
        return orjson.loads(data), revision

    async def create(self, key: str, value: Value) -> int:
        raw = orjson.dumps(value)
        try:
            revision = await self._cas(key, raw, 0)
        except Conflict:
            # A deleted key keeps its delete marker as the last message: create over it, as nats-py does.
            status, fields, _ = await self._last(key)
            if status or fields.get("KV-Operation") not in _DELETED:
                self._known.pop(key, None)
                raise Conflict(f"key {key!r} already exists") from None
            revision = await self._cas(key, raw, int(fields["Nats-Sequence"]))
        self._note(key, raw, revision)
        return revision

    async def update(self, key: str, value: Value, revision: int) -> int:
        raw = orjson.dumps(value)
        try:
            new_revision = await self._cas(key, raw, revision)
        except Conflict:
            raise Conflict(f"key {key!r} changed since revision {revision}") from None
        self._note(key, raw, new_revision)
        return new_revision

    async def put(self, key: str, value: Value) -> int:
        if not valid_key(key):
            raise InvalidKeyError(key)
        raw = orjson.dumps(value)
        revision = await self._publisher.store(self._pre + key, raw)
        self._note(key, raw, revision)
        return revision

    async def _cas(self, key: str, raw: bytes, expected: int) -> int:
        """Write ``raw`` if the key's last revision is ``expected`` (0: it has none); its new revision."""
        if not valid_key(key):
            raise InvalidKeyError(key)
        token = self._token_prefix + str(next(self._tokens))
        try:
            return await self._publisher.store(self._pre + key, raw, {EXPECTED: str(expected), WRITE: token})
        except Refused as exc:
            if exc.err_code not in _WRONG_LAST:
                raise
            if exc.attempts > 1:
                landed = await self._landed(key, token, expected)
                if landed:
                    return landed
            self._known.pop(key, None)
            raise Conflict(f"key {key!r}: wrong last revision (expected {expected})") from None

    async def _landed(self, key: str, token: str, expected: int) -> int:
        """After a resent CAS write was refused: its revision if an earlier attempt stored it, 0 if another
        writer won; PublishTimeout when the key's last message cannot tell."""
        status, fields, _ = await self._last(key)
        if not status and fields.get(WRITE) == token:
            return int(fields["Nats-Sequence"])
        if not status and fields.get(EXPECTED) == str(expected):
            return 0
        raise PublishTimeout(f"state {self.bucket!r}: a write of {key!r} was resent after a lost PubAck and the "
                             "key has moved on since: whether the first attempt was stored is unknown")


class KVClient:
    """A worker's fast state path: one :class:`DirectGets` for the connection, the worker's publisher.

    ``open_buckets(js, buckets, create, fast=client)`` opens each bucket as a :class:`FastKV`.
    """

    def __init__(self, nc: Any, publisher: Publisher, timeout_s: float = 10.0, retry_s: float = 30.0) -> None:
        self.gets = DirectGets(nc, timeout_s, retry_s)
        self._publisher = publisher

    async def start(self) -> None:
        await self.gets.start()

    async def stop(self) -> None:
        await self.gets.stop()

    async def store(self, js: Any, bucket: str, kv: Any) -> StateStore:
        """``bucket`` as a :class:`FastKV`; read through ``kv`` when its stream does not allow direct gets."""
        info = await js.stream_info(f"KV_{bucket}")
        replicas = info.config.num_replicas or 1
        if info.config.allow_direct and direct_gets_for(replicas):
            return FastKV(bucket, self.gets, self._publisher, kv)
        if not direct_gets_for(replicas):
            log.info("state.leader_reads", bucket=bucket, replicas=replicas,
                     hint="a replicated bucket is read from its leader, so a read never misses a write")
            return FastKV(bucket, self.gets, self._publisher, kv, leader=True)
        log.warning("state.direct_get_off", bucket=bucket,
                    hint="reads go through nats-py's KeyValue.get; run 'jetpool provision' to allow direct gets")
        return FastKV(bucket, None, self._publisher, kv)
