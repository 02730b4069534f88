"""The hot publishes (handler outputs, acks) written straight into the connection's outgoing buffer.

Every handled event costs a worker two publishes: its output (with a ``Nats-Msg-Id`` header) and the
``+ACK`` of its input. nats-py's ``Client.publish`` spends more on each than the rest of the path does:
three coroutine layers, a regular expression, a strip and a translate per header, and a fresh
command assembled from several ``bytes`` — measured on this machine with a 300-byte payload, 7.7 µs
per publish with one header and 3.9 µs without, against 2.8 µs and 1.8 µs for the same command
built here in one piece.

:meth:`Outbox.write` does exactly what ``Client.publish`` does for a connected client — append the
``PUB``/``HPUB`` command to the pending buffer, count it in ``stats``, wake the flusher when it is idle —
synchronously, so the hot paths (an output, an ack) pay no coroutine for it, and it returns False for
every other case, which :meth:`Outbox.publish` then hands to ``Client.publish`` itself: not connected
(nats-py buffers or refuses during a reconnect), draining, a payload over the server's limit, a pending
buffer that must be flushed first, a flusher task that is gone, a header nats-py would validate or
clean (another name, a value with a line break or surrounding blanks).

Nothing is sent whose body and headers together exceed the server's ``max_payload``: the server
answers such a message by closing the connection, which would end the worker and, redelivered, the
next one. nats-py checks only the body; :meth:`Outbox.publish` raises :class:`PayloadTooLarge` instead.

The few private attributes it
uses are checked once per :class:`Outbox`, by the fence (:mod:`engine.transport.fence`: a supported
nats-py with those names); without them every call goes through ``Client.publish``,
``jetpool_fast_path{path="outbox"}`` reads 0 and tests/engine/integration/test_outbox.py fails, so a nats-py
upgrade that changes them is noticed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from engine.errors import PayloadTooLarge
from engine.transport.fence import enable

_NEEDS = ("_status", "_pending", "_pending_data_size", "_max_pending_size", "_max_payload", "_flush_queue",
          "_flusher_task", "stats")
_CONNECTED = 1  # nats.aio.client.Client.CONNECTED
_HEADER_LINE = "NATS/1.0\r\n"
_HEADER_BLOCK_BYTES = len(_HEADER_LINE) + 2  # the status line and the blank line that ends the block
# Header names written as they are; any other name goes through nats-py, which validates it.
_PLAIN_KEYS = frozenset({"Nats-Msg-Id", "traceparent", "tracestate",
                         # the fast state path's compare-and-set writes (engine/kv.py)
                         "Nats-Expected-Last-Subject-Sequence", "Jetpool-Write"})


def _plain(value: str) -> bool:
    """A header value nats-py would send unchanged (it strips blanks and removes line breaks)."""
    return "\r" not in value and "\n" not in value and value == value.strip()


def header_bytes(headers: dict[str, str] | None) -> int:
    """The size of the header block nats-py sends for ``headers`` (at most: it strips values)."""
    if not headers:
        return 0
    return _HEADER_BLOCK_BYTES + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def missing(nc: Any) -> list[str]:
    """The nats-py names the outbox writes through that ``nc`` lacks (or has with another meaning)."""
    absent = [f"Client.{name}" for name in _NEEDS if not hasattr(nc, name)]
    if getattr(type(nc), "CONNECTED", None) != _CONNECTED:
        absent.append(f"Client.CONNECTED == {_CONNECTED}")
    return absent


def available(nc: Any) -> bool:
    """Whether the fence lets commands be written straight into ``nc``'s pending buffer."""
    return enable("outbox", missing(nc))


class Outbox:
    """Publishes on ``nc`` (a ``nats.aio.client.Client``) without its per-call overhead when it can."""

    __slots__ = ("_nc", "fast")

    def __init__(self, nc: Any) -> None:
        self._nc = nc
        self.fast = available(nc)

    def write(self, subject: str, payload: bytes, reply: str = "", headers: dict[str, str] | None = None) -> bool:
        """Append the command to the connection's pending buffer; False (nothing done) when :meth:`publish` must."""
        nc = self._nc
        if not self.fast or nc._status != _CONNECTED or not subject:
            return False
        if headers:
            lines = [_HEADER_LINE]
            for key, value in headers.items():
                if key not in _PLAIN_KEYS or not _plain(value):
                    return False
                lines.append(f"{key}: {value}\r\n")
            lines.append("\r\n")
            hdr = "".join(lines).encode()
            if len(hdr) + len(payload) > nc._max_payload:
                return False
            cmd = b"".join((f"HPUB {subject} {reply} {len(hdr)} {len(hdr) + len(payload)}\r\n".encode(),
                            hdr, payload, b"\r\n"))
        elif len(payload) > nc._max_payload:
            return False
        else:
            cmd = b"".join((f"PUB {subject} {reply} {len(payload)}\r\n".encode(), payload, b"\r\n"))
        size = nc._pending_data_size + len(cmd)
        queue = nc._flush_queue
        if (0 < nc._max_pending_size < size or queue is None or nc._flusher_task is None
                or nc._flusher_task.done()):
            return False  # a forced flush, or no flusher to wake: Client.publish does both
        nc._pending.append(cmd)
        nc._pending_data_size = size
        stats = nc.stats
        stats["out_msgs"] += 1
        stats["out_bytes"] += len(payload)
        if queue.empty():
            # What Client._flush_pending does: a future on the flusher's queue; it writes what is pending.
            queue.put_nowait(asyncio.get_running_loop().create_future())
        return True

    async def publish(self, subject: str, payload: bytes, reply: str = "",
                      headers: dict[str, str] | None = None) -> None:
        """:meth:`write`, or ``Client.publish`` for whatever it leaves; a message over max_payload raises."""
        if not self.write(subject, payload, reply, headers):
            limit = self.max_payload
            size = len(payload) + header_bytes(headers)
            if size > limit:
                raise PayloadTooLarge(f"message to {subject} of {size} bytes (headers included) exceeds the "
                                      f"server's max_payload ({limit})")
            await self._nc.publish(subject, payload, reply=reply, headers=headers)

    @property
    def max_payload(self) -> int:
        """The largest message (body and headers) the server accepts on this connection."""
        return int(self._nc.max_payload)
