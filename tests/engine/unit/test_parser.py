"""FastParser against nats-py's own parser: the same calls for the same bytes, however the bytes are split."""

from __future__ import annotations

import asyncio
import itertools
import random
from typing import Any

import pytest
from nats.errors import ProtocolError
from nats.protocol.parser import Parser

from engine.transport.parser import FastParser, install


class Recorder:
    """Stands in for a nats-py Client: records what a parser calls, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        self.calls.append(("msg", sid, bytes(subject), bytes(reply), bytes(data),
                           None if headers is None else bytes(headers)))

    async def _process_ping(self) -> None:
        self.calls.append(("ping",))

    async def _process_pong(self) -> None:
        self.calls.append(("pong",))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.calls.append(("info", info))

    async def _process_err(self, err: str) -> None:
        self.calls.append(("err", err))


def _hmsg(subject: bytes, sid: int, reply: bytes, headers: bytes, payload: bytes) -> bytes:
    mid = b" " + reply if reply else b""
    return (b"HMSG %s %d%s %d %d\r\n" % (subject, sid, mid, len(headers), len(headers) + len(payload))
            + headers + payload + b"\r\n")


def _msg(subject: bytes, sid: int, reply: bytes, payload: bytes) -> bytes:
    mid = b" " + reply if reply else b""
    return b"MSG %s %d%s %d\r\n" % (subject, sid, mid, len(payload)) + payload + b"\r\n"


STATUS = b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 3\r\n\r\n"
TRACE = b"NATS/1.0\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n"
STREAM = b"".join([
    b'INFO {"server_id":"x","max_payload":1048576}\r\n',
    _msg(b"orders.placed", 1, b"$JS.ACK.SHOP.orders.1.5.5.1700000000000000000.0", b'{"id":"a"}'),
    _msg(b"a", 22, b"", b""),
    b"PING\r\n",
    _hmsg(b"_INBOX.x", 3, b"", STATUS, b""),
    _msg(b"tricky", 4, b"r.1", b"MSG fake 9 3\r\nabc\r\nPING\r\n"),  # a payload that looks like protocol
    b"+OK\r\n",
    _hmsg(b"bench.BenchIn", 5, b"$JS.ACK.BENCH.bench.2.9.9.1.0", TRACE, b"x" * 3000),
    b"PONG\r\n",
    _msg(b"big", 6, b"reply.to.me", bytes(range(256)) * 40),
    b"-ERR 'Permissions Violation for Publish to \"x\"'\r\n",
    _hmsg(b"h", 7, b"rr", b"NATS/1.0\r\nA: b\r\n\r\n", b"payload"),
])


def _feed(parser_type: type[Parser], chunks: list[bytes]) -> list[tuple[Any, ...]]:
    nc = Recorder()
    parser = parser_type(nc)

    async def run() -> None:
        for chunk in chunks:
            await parser.parse(chunk)

    asyncio.run(run())
    assert not parser.buf, "every byte was read"
    return nc.calls


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def test_one_read_gives_what_nats_py_gives() -> None:
    expected = _feed(Parser, [STREAM])
    assert [c[0] for c in expected].count("msg") == 7
    assert _feed(FastParser, [STREAM]) == expected


def test_every_split_point_gives_what_nats_py_gives() -> None:
    expected = _feed(Parser, [STREAM])
    for cut in range(1, len(STREAM)):
        assert _feed(FastParser, _split(STREAM, [cut])) == expected, cut


def test_random_splits_and_byte_by_byte_give_what_nats_py_gives() -> None:
    expected = _feed(Parser, [STREAM])
    rng = random.Random(7)
    for _ in range(200):
        cuts = rng.sample(range(1, len(STREAM)), rng.randint(2, 40))
        assert _feed(FastParser, _split(STREAM, cuts)) == expected
    assert _feed(FastParser, [STREAM[i:i + 1] for i in range(len(STREAM))]) == expected


def test_a_malformed_message_line_is_nats_pys_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        _feed(FastParser, [_msg(b"ok", 1, b"", b"x") + b"MSG a notanumber 3\r\nabc\r\n"])


def test_install_takes_over_a_parser_mid_message() -> None:
    """A message half read by nats-py's parser is finished by ours."""
    nc = Recorder()
    nc._ps = Parser(nc)  # type: ignore[attr-defined]
    whole = _hmsg(b"s", 1, b"r", TRACE, b"y" * 100) + _msg(b"t", 2, b"", b"z")

    async def run() -> None:
        await nc._ps.parse(whole[:60])  # type: ignore[attr-defined]
        assert install(nc)
        assert isinstance(nc._ps, FastParser)  # type: ignore[attr-defined]
        await nc._ps.parse(whole[60:])  # type: ignore[attr-defined]

    asyncio.run(run())
    assert nc.calls == _feed(Parser, [whole])
