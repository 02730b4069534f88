"""Inline delivery (engine/transport/inbox.py) on a real nats-server: active with the pinned nats-py, and safe.

If a nats-py upgrade renames the subscription internals the sink relies on, ``test_hot_inboxes_are_inline``
fails (the engine would still work, on nats-py's slower queue-and-task path).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import nats

from engine.config import load_config
from engine.consumer import Consumer
from engine.dispatch import build_router
from engine.embedded import EmbeddedServer
from engine.publisher import Publisher
from engine.transport import inbox
from tests.support import App


def _run(coro: Callable[[Any], Coroutine[Any, Any, None]], server: EmbeddedServer) -> None:
    async def main() -> None:
        nc = await nats.connect(server.url, connect_timeout=5, allow_reconnect=False)
        try:
            await coro(nc)
        finally:
            await nc.close()

    asyncio.run(main())


def test_hot_inboxes_are_inline(nats_server: EmbeddedServer, make_config: Callable[..., App]) -> None:
    app = make_config({"echo": {}})
    cfg = load_config(app.path)

    async def check(nc: Any) -> None:
        publisher = Publisher(nc, cfg.subject_prefix)
        await publisher.start()
        consumer = Consumer(nc, cfg, "echo", build_router(cfg, "echo"), publisher)
        await consumer.start()
        try:
            assert inbox.is_inline(nc, publisher._sub), "PubAck inbox fell back to nats-py's queue"
            assert inbox.is_inline(nc, consumer._sub), "pull inbox fell back to nats-py's queue"
        finally:
            await consumer.stop(1)
            await publisher.stop()

    _run(check, nats_server)


def test_inline_callbacks_run_in_order_survive_errors_and_may_suspend(nats_server: EmbeddedServer) -> None:
    async def check(nc: Any) -> None:
        seen: list[int] = []
        finished: list[int] = []

        async def cb(msg: Any) -> None:
            n = int(msg.data)
            seen.append(n)
            if n % 10 == 3:
                raise RuntimeError("a failing callback must not break the connection")
            if n % 10 == 7:
                await asyncio.sleep(0.01)  # suspends: continues as a task
            finished.append(n)

        subject = nc.new_inbox()
        sub = await nc.subscribe(subject, cb=cb)
        assert inbox.inline(nc, sub, cb, "test")
        for n in range(100):
            await nc.publish(subject, str(n).encode())
        await nc.flush()
        deadline = asyncio.get_running_loop().time() + 5
        while len(finished) < 90 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert seen == list(range(100))  # started in arrival order, each once
        assert sorted(finished) == [n for n in range(100) if n % 10 != 3]
        assert sub.pending_bytes == 0 and sub.pending_msgs == 0
        assert nc.is_connected
        await sub.drain()

    _run(check, nats_server)


def test_inline_messages_carry_subject_reply_data_and_headers(nats_server: EmbeddedServer) -> None:
    async def check(nc: Any) -> None:
        got: list[Any] = []

        async def cb(msg: Any) -> None:
            got.append(msg)

        subject = nc.new_inbox()
        sub = await nc.subscribe(subject, cb=cb)
        assert inbox.inline(nc, sub, cb, "test")
        await nc.publish(subject, b"plain", reply="r.1")
        await nc.publish(subject, b"with", reply="r.2", headers={"Nats-Msg-Id": "m1", "traceparent": "tp"})
        await nc.publish(subject, b"", headers={"X-Other": "x"})
        await nc.flush()
        deadline = asyncio.get_running_loop().time() + 5
        while len(got) < 3 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        plain, with_headers, other = got
        assert all(type(m) is inbox.Message for m in got)  # nats-py's Msg would mean the fallback ran
        assert (plain.subject, plain.reply, plain.data, plain.headers) == (subject, "r.1", b"plain", None)
        assert inbox.header(with_headers, "traceparent") == "tp"
        assert with_headers.headers == {"Nats-Msg-Id": "m1", "traceparent": "tp"}
        assert inbox.header(other, "traceparent") is None and other.headers == {"X-Other": "x"}
        await sub.unsubscribe()

    _run(check, nats_server)


def test_other_subscriptions_keep_nats_py_delivery(nats_server: EmbeddedServer) -> None:
    async def check(nc: Any) -> None:
        async def hot(msg: Any) -> None:
            return None

        hot_sub = await nc.subscribe(nc.new_inbox(), cb=hot)
        assert inbox.inline(nc, hot_sub, hot, "hot")
        plain = await nc.subscribe("plain.subject")
        await nc.publish("plain.subject", b"x", headers={"A": "b"})
        msg = await plain.next_msg(timeout=5)
        assert type(msg) is not inbox.Message and msg.data == b"x" and msg.headers == {"A": "b"}

    _run(check, nats_server)
