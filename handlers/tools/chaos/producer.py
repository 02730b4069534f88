"""The chaos producer: publishes like a storefront that must not lose an order (re-sends under one Msg-Id)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable, Sequence

from engine.config import Config
from engine.errors import PublishError
from engine.events import MSG_ID_HEADER, Event
from engine.publisher import Publisher


class _Message:
    """One publish and its re-sends; the Publisher's waiter."""

    __slots__ = ("body", "key", "msg_id", "producer", "subject")

    def __init__(self, producer: Producer, subject: str, body: bytes, msg_id: str, key: str) -> None:
        self.producer, self.subject, self.body, self.msg_id, self.key = producer, subject, body, msg_id, key

    async def on_puback(self, error: Exception | None) -> None:
        self.producer.settle(self, error)


class Producer:
    """Publishes like a storefront that must not lose an order: each message is re-sent under the same
    ``Nats-Msg-Id`` until the stream acknowledges it (the stream drops copies it already stored).

    Args:
        publisher: a started Publisher.
        window: publishes awaiting their PubAck at most.
        retry_s: pause before a re-send.
        give_up_s: stop re-sending a message this long after its first send.
    """

    def __init__(self, publisher: Publisher, window: int = 2000, retry_s: float = 0.5, give_up_s: float = 300) -> None:
        self.publisher = publisher
        self.sent_at: dict[str, float] = {}  # key -> wall time of the first send
        self.stored: set[str] = set()
        self.given_up: set[str] = set()
        self.resends = 0
        self.errors: Counter[str] = Counter()
        self._window, self._retry_s, self._give_up_s = window, retry_s, give_up_s
        self._outstanding = 0
        self._room = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def sent(self) -> int:
        return len(self.sent_at)

    async def send(self, subject: str, body: bytes, msg_id: str, key: str | None = None) -> None:
        """Publish (waiting for room in the window); ``key`` (default: the Msg-Id) names it in the books."""
        while self._outstanding >= self._window:
            self._room.clear()
            await self._room.wait()
        key = key or msg_id
        self.sent_at.setdefault(key, time.time())
        self._outstanding += 1
        self._idle.clear()
        await self._publish(_Message(self, subject, body, msg_id, key))

    async def place(self, items: Sequence[tuple[str, bytes, str]], rate: float) -> None:
        """Send ``(subject, body, msg_id)`` items at ``rate`` per second (0: as fast as the window allows)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, (subject, body, msg_id) in enumerate(items):
            ahead_s = start + i / rate - loop.time() if rate > 0 else 0.0
            if ahead_s > 0.002:
                await asyncio.sleep(ahead_s)
            await self.send(subject, body, msg_id)

    async def flush(self, timeout_s: float = 300.0) -> None:
        """Wait until every message is stored or given up on."""
        await asyncio.wait_for(self._idle.wait(), timeout_s)

    async def _publish(self, message: _Message) -> None:
        try:
            await self.publisher.send(message.subject, message.body, {MSG_ID_HEADER: message.msg_id}, message)
        except PublishError as exc:
            self.settle(message, exc)

    def settle(self, message: _Message, error: Exception | None) -> None:
        if error is None:
            self.stored.add(message.key)
        elif time.time() - self.sent_at[message.key] > self._give_up_s:
            self.given_up.add(message.key)
        else:
            self.errors[f"{type(error).__name__}: {str(error)[:80]}"] += 1
            self.resends += 1
            task = asyncio.get_running_loop().create_task(self._resend(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._outstanding -= 1
        if self._outstanding < self._window:
            self._room.set()
        if self._outstanding == 0:
            self._idle.set()

    async def _resend(self, message: _Message) -> None:
        await asyncio.sleep(self._retry_s)
        await self._publish(message)


def order_items(cfg: Config, events: Iterable[Event]) -> list[tuple[str, bytes, str]]:
    """``(subject, body, msg_id)`` of events as a producer publishes them."""
    return [(cfg.subject_for(e.type), e.encode(), e.id) for e in events]
