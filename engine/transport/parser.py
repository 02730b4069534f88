"""A faster reader of the NATS protocol for a worker's connection: messages split, not regex-matched.

nats-py's ``Parser.parse`` tries a regular expression on the buffer for every control line (``MSG`` first,
then ``HMSG``, then the rest) and deletes each message from the front of its ``bytearray`` as it goes.
A worker's connection carries two messages per handled event (the delivery and the PubAck of its
output), so that per-message work is a large part of what a worker spends outside the handler:
measured on this machine (py-spy, the engine's loop in one process), nats-py's parser took about a sixth
of the engine's CPU per processed event.

:class:`FastParser` reads ``MSG`` and ``HMSG`` lines by finding the line end and splitting on blanks,
and moves an offset through the buffer, deleting what it consumed once per read. Everything else the
server sends (``PING``, ``PONG``, ``INFO``, ``+OK``, ``-ERR``, a malformed line) is left to nats-py's own
parser, which then reads the rest of that buffer. Both leave the same state behind — a message whose
payload has not fully arrived is described by ``state``, ``msg_arg``, ``needed`` and ``header_needed``
exactly as nats-py does — so either can continue where the other stopped.

It calls ``Client._process_msg(sid, subject, reply, payload, headers)`` with the same arguments as
nats-py's parser, so subscriptions see no difference. :func:`install` replaces ``Client._ps`` when the
fence allows it (:mod:`engine.transport.fence`: a supported nats-py whose parser has those names);
otherwise it leaves the client as it is, ``jetpool_fast_path{path="parser"}`` reads 0, and
tests/engine/integration/test_parser.py fails.
"""

from __future__ import annotations

from typing import Any

from nats.protocol.parser import AWAITING_CONTROL_LINE, AWAITING_MSG_PAYLOAD, Parser

from engine.transport.fence import enable

_CRLF = b"\r\n"
_MSG = b"MSG "
_HMSG = b"HMSG "
_M, _H = ord("M"), ord("H")


class FastParser(Parser):
    """nats-py's parser with a fast path for messages; see the module's docstring."""

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        buf.extend(data)
        if self.state == AWAITING_MSG_PAYLOAD and len(buf) < self.needed + 2:
            return  # a large payload still arriving: no copy of the buffer until it is whole
        if await self._read_messages(buf):
            await super().parse()  # a line that is no message: nats-py's parser reads it and the rest

    async def _read_messages(self, buf: bytearray) -> bool:
        """Deliver the whole messages at the front of ``buf``; True when stopped by another kind of line."""
        view = bytes(buf)  # one copy per read; every slice below is then a single copy
        pos = 0
        process = self.nc._process_msg
        try:
            while True:
                if self.state == AWAITING_MSG_PAYLOAD:
                    # The payload of a message whose control line was read before (by either parser).
                    end = pos + self.needed
                    if len(view) < end + 2:
                        return False
                    arg, split = self.msg_arg, pos + self.header_needed
                    headers = view[pos:split] if self.header_needed else None
                    self.state, self.header_needed = AWAITING_CONTROL_LINE, 0
                    pos = end + 2
                    await process(arg["sid"], arg["subject"], arg["reply"], view[split:end], headers)
                    if self.buf is not buf:
                        return False  # reset by a reconnect while the message was handled
                    continue
                eol = view.find(_CRLF, pos)
                if eol < 0:
                    return False  # a partial control line: wait for more bytes
                line = _message_line(view, pos, eol)
                if line is None:
                    break  # anything but a message: nats-py's parser reads it (and the rest)
                subject, sid, reply, header_size, size = line
                pos = eol + 2
                end = pos + size
                if len(view) < end + 2:
                    # The payload is still on its way: leave nats-py's description of that state.
                    self.msg_arg = {"subject": subject, "sid": sid, "reply": reply}
                    self.needed, self.header_needed = size, header_size
                    self.state = AWAITING_MSG_PAYLOAD
                    return False
                split = pos + header_size
                headers = view[pos:split] if header_size else None
                pos = end + 2
                await process(sid, subject, reply, view[split:end], headers)
                if self.buf is not buf:
                    return False
        finally:
            if self.buf is buf and pos:
                del buf[:pos]
        return True


def _message_line(view: bytes, pos: int, eol: int) -> tuple[bytes, int, bytes, int, int] | None:
    """(subject, sid, reply, header size, total size) of a ``MSG``/``HMSG`` line; None for any other line."""
    first = view[pos]
    try:
        if first == _M and view.startswith(_MSG, pos):
            parts = view[pos + 4:eol].split()
            if len(parts) == 4:
                return parts[0], int(parts[1]), parts[2], 0, int(parts[3])
            if len(parts) == 3:
                return parts[0], int(parts[1]), b"", 0, int(parts[2])
        elif first == _H and view.startswith(_HMSG, pos):
            parts = view[pos + 5:eol].split()
            if len(parts) == 5:
                return parts[0], int(parts[1]), parts[2], int(parts[3]), int(parts[4])
            if len(parts) == 4:
                return parts[0], int(parts[1]), b"", int(parts[2]), int(parts[3])
    except ValueError:
        pass
    return None  # malformed ones too: nats-py's parser raises its own ProtocolError for them


_STATE = ("buf", "state", "needed", "header_needed", "msg_arg")


def missing(nc: Any) -> list[str]:
    """The nats-py names :func:`install` needs that ``nc`` lacks (empty when it has them all)."""
    current = getattr(nc, "_ps", None)
    if isinstance(current, FastParser):
        return []
    if type(current) is not Parser:
        return ["Client._ps (a nats.protocol.parser.Parser)"]
    return [f"Parser.{name}" for name in _STATE if not hasattr(current, name)]


def install(nc: Any) -> bool:
    """Read ``nc``'s protocol with :class:`FastParser` from its next read on; False if the fence says no.

    Safe between reads: nats-py's parser never waits in the middle of a message it delivers inline
    (its ``_process_msg`` hands messages to queues), so its state is whole when this runs.
    """
    if not enable("parser", missing(nc)):
        return False
    current = nc._ps
    if isinstance(current, FastParser):
        return True
    fast = FastParser(nc)
    fast.buf, fast.state, fast.needed = current.buf, current.state, current.needed
    fast.header_needed, fast.msg_arg = current.header_needed, current.msg_arg
    nc._ps = fast
    return True
