"""FastParser (engine/transport/parser.py) on a real nats-server: installed by jetpool's connect, seeing what
nats-py sees.

If a nats-py upgrade changes the parser's internals, ``install`` refuses and the first test fails (the
engine would still work, on nats-py's own parser).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import nats

from engine.config import NatsConfig
from engine.connection import connect
from engine.embedded import EmbeddedServer
from engine.transport.parser import FastParser


def _corpus() -> list[tuple[str, bytes, dict[str, str] | None]]:
    """Messages of every shape: empty, tiny, larger than a socket read, with and without headers."""
    shapes: list[tuple[str, bytes, dict[str, str] | None]] = []
    for i in range(300):
        size = (0, 1, 200, 5_000, 70_000, 400_000)[i % 6]
        headers = {"Nats-Msg-Id": f"m{i}", "X-Test": "a b"} if i % 3 == 0 else None
        shapes.append((f"parse.{i % 7}", os.urandom(size // 2).hex().encode() + b"\r\nMSG x 1 2\r\n"[: i % 14],
                       headers))
    return shapes


def test_jetpools_connections_read_with_the_fast_parser_and_see_what_nats_py_sees(
        nats_server: EmbeddedServer) -> None:
    corpus = _corpus()

    async def main() -> tuple[list[Any], list[Any]]:
        fast = await connect(NatsConfig(url=nats_server.url), name="fast")
        plain = await nats.connect(nats_server.url)
        assert isinstance(fast._ps, FastParser)
        got: dict[str, list[Any]] = {"fast": [], "plain": []}

        def sink(name: str) -> Any:
            async def cb(msg: Any) -> None:
                got[name].append((msg.subject, msg.reply, msg.data, dict(msg.headers or {})))
            return cb

        await fast.subscribe("parse.>", cb=sink("fast"))
        await plain.subscribe("parse.>", cb=sink("plain"))
        # Request/reply over the fast connection: replies with and without headers come back through it.
        async def echo(msg: Any) -> None:
            await msg.respond(msg.data)

        await plain.subscribe("echo", cb=echo)
        await plain.flush()
        sender = await nats.connect(nats_server.url)
        for n, (subject, data, headers) in enumerate(corpus):
            await sender.publish(subject, data, reply=f"r.{n}" if n % 2 else "", headers=headers)
            if n % 50 == 0:
                reply = await fast.request("echo", b"ping %d" % n, timeout=5)
                assert reply.data == b"ping %d" % n
        await sender.flush()
        for _ in range(200):
            if len(got["fast"]) == len(got["plain"]) == len(corpus):
                break
            await asyncio.sleep(0.05)
        await fast.flush(timeout=5)  # PING/PONG through the fast parser
        for nc in (fast, plain, sender):
            await nc.close()
        return got["fast"], got["plain"]

    fast, plain = asyncio.run(main())
    assert len(plain) == len(corpus)
    assert fast == plain
    assert sum(1 for *_, headers in fast if headers) == 100
