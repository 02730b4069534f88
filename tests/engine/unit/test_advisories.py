"""The advisory stream's shape, and how one advisory message is settled."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import nats.errors
import orjson
import pytest
from nats.js import api

from engine import advisories
from engine.advisories import AdvisoryWatcher
from engine.config import Config, load_config
from tests.support import REPO_ROOT

SHOP = REPO_ROOT / "handlers" / "shop.yaml"


@pytest.fixture(scope="module")
def shop() -> Config:
    return load_config(SHOP, env={})


class Msg:
    def __init__(self, data: bytes, delivered: int = 1) -> None:
        self.data = data
        self.metadata = SimpleNamespace(num_delivered=delivered)
        self.settled: list[tuple[str, float | None]] = []

    async def ack(self) -> None:
        self.settled.append(("ack", None))

    async def nak(self, delay: float | None = None) -> None:
        self.settled.append(("nak", delay))

    async def term(self) -> None:
        self.settled.append(("term", None))


class DeadLetters:
    """Fails every full entry when ``fail``; ``fail_minimal`` fails the last resort too."""

    def __init__(self, fail: bool = False, fail_minimal: bool = False) -> None:
        self.fail = fail
        self.fail_minimal = fail_minimal
        self.stored: list[dict[str, Any]] = []
        self.minimal: list[dict[str, Any]] = []

    async def from_advisory(self, js: Any, advisory: dict[str, Any], service: str, keep_body: bool = True) -> None:
        if (self.fail and keep_body) or self.fail_minimal:
            raise TimeoutError("no PubAck from the dead-letter stream")
        (self.stored if keep_body else self.minimal).append(advisory)


class Connection:
    def jetstream(self) -> object:
        return object()


def settle(shop: Config, data: bytes, dead_letters: DeadLetters, delivered: int = 1) -> Msg:
    msg = Msg(data, delivered)
    watcher = AdvisoryWatcher(Connection(), shop, "payments", dead_letters)  # type: ignore[arg-type]
    asyncio.run(watcher._settle(msg))
    return msg


def test_every_service_consumer_has_its_subject_in_one_work_queue_stream(shop: Config) -> None:
    config = advisories.stream_config(shop)
    assert config.name == "DLQ_ADVISORIES"
    assert config.retention == api.RetentionPolicy.WORK_QUEUE
    assert config.subjects == sorted(f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.SHOP.{s}" for s in shop.services)
    consumer = advisories.consumer_config(shop, "payments")
    assert consumer.durable_name == "SHOP_payments"
    assert consumer.filter_subject == "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.SHOP.payments"
    assert consumer.max_deliver == -1  # an entry that cannot be stored yet is tried again, never given up on


def test_an_advisory_is_acked_once_its_entry_is_stored(shop: Config) -> None:
    dead_letters = DeadLetters()
    advisory = {"stream": "SHOP", "consumer": "payments", "stream_seq": 7, "deliveries": 5}
    msg = settle(shop, orjson.dumps(advisory), dead_letters)
    assert dead_letters.stored == [advisory]
    assert msg.settled == [("ack", None)]


def test_after_repeated_failures_the_entry_is_stored_without_the_body_and_the_advisory_acked(shop: Config) -> None:
    advisory = {"stream": "SHOP", "consumer": "payments", "stream_seq": 9, "deliveries": 20}
    first = settle(shop, orjson.dumps(advisory), DeadLetters(fail=True), delivered=2)
    assert first.settled == [("nak", 5.0)]
    dead_letters = DeadLetters(fail=True)
    last = settle(shop, orjson.dumps(advisory), dead_letters, delivered=advisories._LAST_RESORT_AFTER)
    assert (dead_letters.stored, dead_letters.minimal, last.settled) == ([], [advisory], [("ack", None)])
    # Not even the last resort stored (the DLQ stream is down): tried again later, never termed.
    down = settle(shop, orjson.dumps(advisory), DeadLetters(fail_minimal=True), delivered=50)
    assert down.settled == [("nak", 5.0)]


@pytest.mark.parametrize("advisory", [
    {"stream": "SHOP"},  # no sequence
    {"stream": "SHOP", "stream_seq": "7"},  # not a number
    {"stream": "OTHER", "stream_seq": 7},  # another stream's message
    ["SHOP", 7],
])
def test_an_advisory_that_is_not_one_about_this_service_is_termed(shop: Config, advisory: Any) -> None:
    dead_letters = DeadLetters()
    msg = settle(shop, orjson.dumps(advisory), dead_letters)
    assert (dead_letters.stored, msg.settled) == ([], [("term", None)])


def test_an_advisory_whose_entry_could_not_be_stored_is_nakked_for_later(shop: Config) -> None:
    msg = settle(shop, orjson.dumps({"stream": "SHOP", "stream_seq": 7}), DeadLetters(fail=True))
    assert msg.settled == [("nak", 5.0)]


def test_an_unreadable_advisory_is_termed_not_retried_forever(shop: Config) -> None:
    dead_letters = DeadLetters()
    msg = settle(shop, b"not json", dead_letters)
    assert dead_letters.stored == []
    assert msg.settled == [("term", None)]


class Electing:
    """A JetStream context while the cluster elects the consumer's leader: lookups time out, pulls too."""

    def __init__(self) -> None:
        self.fetches = 0

    async def consumer_info(self, stream: str, consumer: str) -> None:
        raise nats.errors.TimeoutError

    async def pull_subscribe_bind(self, durable: str, stream: str) -> Electing:
        return self

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        self.fetches += 1
        await asyncio.sleep(0)
        raise nats.errors.TimeoutError

    async def unsubscribe(self) -> None:
        pass


def test_a_consumer_lookup_that_times_out_does_not_stop_the_worker_and_fetching_goes_on(shop: Config) -> None:
    js = Electing()

    class Cluster:
        def jetstream(self) -> Electing:
            return js

    async def run() -> None:
        watcher = AdvisoryWatcher(Cluster(), shop, "payments", DeadLetters())  # type: ignore[arg-type]
        await watcher.start()  # raised TimeoutError before: the worker crashed while starting
        while js.fetches < 3:
            await asyncio.sleep(0)
        await watcher.stop()

    asyncio.run(asyncio.wait_for(run(), 5))
