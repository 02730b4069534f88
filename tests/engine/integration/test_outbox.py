"""engine/transport/outbox.py on a real nats-server: the fast path is active and sends what Client.publish sends.

If a nats-py upgrade changes the private attributes the outbox writes through,
``test_fast_path_is_active`` fails (publishing would still work, through ``Client.publish``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import nats

from engine.embedded import EmbeddedServer
from engine.transport.outbox import Outbox


def _run(body: Callable[[Any, Any], Coroutine[Any, Any, None]], server: EmbeddedServer) -> None:
    async def main() -> None:
        sender = await nats.connect(server.url, connect_timeout=5, allow_reconnect=False)
        receiver = await nats.connect(server.url, connect_timeout=5, allow_reconnect=False)
        try:
            await body(sender, receiver)
        finally:
            await sender.close()
            await receiver.close()

    asyncio.run(main())


async def _received(receiver: Any, subject: str, count: int, send: Callable[[], Coroutine[Any, Any, None]]
                    ) -> list[Any]:
    got: list[Any] = []
    done = asyncio.Event()

    async def cb(msg: Any) -> None:
        got.append(msg)
        if len(got) == count:
            done.set()

    sub = await receiver.subscribe(subject, cb=cb)
    await receiver.flush()
    await send()
    await asyncio.wait_for(done.wait(), 30)  # seconds on a quiet machine; generous for a loaded one
    await sub.unsubscribe()
    return got


def test_fast_path_is_active(nats_server: EmbeddedServer) -> None:
    async def check(sender: Any, receiver: Any) -> None:
        assert Outbox(sender).fast

    _run(check, nats_server)


TRACEPARENT = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"


def test_outbox_sends_what_client_publish_sends(nats_server: EmbeddedServer) -> None:
    """Same subject, reply, payload and headers through both paths, including the ones the outbox hands on."""
    cases: list[tuple[bytes, str, dict[str, str] | None]] = [
        (b"+ACK", "", None),
        (b"", "reply.to.me", None),
        (b'{"id":"x"}' * 50, "_INBOX.abc.17", {"Nats-Msg-Id": "0123abcd", "traceparent": TRACEPARENT}),
        (b"odd header", "r", {"X-Custom": "kept"}),  # a name the outbox leaves to nats-py
        (b"blank value", "r", {"Nats-Msg-Id": " padded "}),  # nats-py strips it
    ]

    async def check(sender: Any, receiver: Any) -> None:
        outbox = Outbox(sender)
        subject = "outbox.test"
        before = dict(sender.stats)

        client_publish = sender.publish
        handed_on: list[bytes] = []  # what the outbox passed to Client.publish instead of writing itself

        async def recording_publish(subj: str, payload: bytes = b"", **kw: Any) -> None:
            handed_on.append(payload)
            await client_publish(subj, payload, **kw)

        async def send_both() -> None:
            for payload, reply, headers in cases:
                sender.publish = recording_publish
                await outbox.publish(subject, payload, reply=reply, headers=headers)
                sender.publish = client_publish
                await sender.publish(subject, payload, reply=reply, headers=headers)

        got = await _received(receiver, subject, 2 * len(cases), send_both)
        for i, (payload, reply, _) in enumerate(cases):
            ours, theirs = got[2 * i], got[2 * i + 1]
            assert (ours.data, ours.reply, ours.headers) == (theirs.data, theirs.reply, theirs.headers)
            assert ours.data == payload and ours.reply == reply
        assert got[4].headers == {"Nats-Msg-Id": "0123abcd", "traceparent": TRACEPARENT}
        assert got[8].headers["Nats-Msg-Id"] == "padded"
        assert sender.stats["out_msgs"] - before["out_msgs"] == 2 * len(cases)
        assert handed_on == [b"odd header", b"blank value"]  # the first three took the fast path

    _run(check, nats_server)


def test_many_publishes_are_all_flushed(nats_server: EmbeddedServer) -> None:
    """Thousands of publishes without awaiting anything else: the outbox wakes the flusher, nothing is left behind."""
    n = 5000

    async def check(sender: Any, receiver: Any) -> None:
        outbox = Outbox(sender)

        async def send() -> None:
            for i in range(n):
                await outbox.publish("outbox.many", str(i).encode(), headers={"Nats-Msg-Id": str(i)})

        got = await _received(receiver, "outbox.many", n, send)
        assert [int(m.data) for m in got] == list(range(n))

    _run(check, nats_server)


def test_closed_connection_raises_like_client_publish(nats_server: EmbeddedServer) -> None:
    async def check(sender: Any, receiver: Any) -> None:
        await sender.close()
        try:
            await Outbox(sender).publish("outbox.closed", b"x")
        except nats.errors.ConnectionClosedError:
            return
        raise AssertionError("publishing on a closed connection did not raise")

    _run(check, nats_server)


def test_a_full_pending_buffer_is_left_to_client_publish(nats_server: EmbeddedServer) -> None:
    """Over nats-py's pending limit the command needs a forced flush first: write() declines, publish() delivers."""
    async def check(sender: Any, receiver: Any) -> None:
        outbox = Outbox(sender)
        sender._max_pending_size = 1  # any command is over it

        async def send() -> None:
            assert not outbox.write("outbox.full", b"x")
            assert sender._pending_data_size == 0  # declined before touching the buffer
            await outbox.publish("outbox.full", b"x")

        got = await _received(receiver, "outbox.full", 1, send)
        assert got[0].data == b"x"

    _run(check, nats_server)
