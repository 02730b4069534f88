"""config/nats-server-least-privilege.conf stays in step with handlers/shop.yaml and the saga's producers.

The integration test proves the permissions on a real server for one service; this one checks every
user's grants against the shop's config without a server, so renaming a stream, a bucket or an event
type without updating the server configuration fails here.
"""

from __future__ import annotations

import re

import pytest

from engine.config import Config, load_config
from handlers.saga import PRODUCERS
from tests.support import REPO_ROOT

ROOT = REPO_ROOT
CONF = ROOT / "config" / "nats-server-least-privilege.conf"


def grants() -> dict[str, tuple[set[str], set[str]]]:
    """user -> (publish allow, subscribe allow), read from the conf's quoted subjects."""
    text = "\n".join(line for line in CONF.read_text().splitlines() if not line.lstrip().startswith("#"))
    out: dict[str, tuple[set[str], set[str]]] = {}
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"\buser:\s*(\w+)", text)]
    for (start, user), (end, _) in zip(starts, [*starts[1:], (len(text), "")], strict=True):
        block = text[start:end]
        publish, _, subscribe = block.partition("subscribe")
        out[user] = (set(re.findall(r'"([^"]+)"', publish)), set(re.findall(r'"([^"]+)"', subscribe)))
    return out


@pytest.fixture(scope="module")
def shop() -> Config:
    return load_config(ROOT / "handlers" / "shop.yaml", env={})


def test_every_service_and_the_storefront_has_a_user(shop: Config) -> None:
    assert set(grants()) == {"admin", "storefront", *shop.services}


@pytest.mark.parametrize("user", ["storefront", "orders", "payments", "inventory", "notifications", "audit"])
def test_a_user_publishes_exactly_the_events_its_service_produces(user: str, shop: Config) -> None:
    publish, _ = grants()[user]
    own = {shop.subject_for(t) for t, producer in PRODUCERS.items() if producer == user}
    assert {s for s in publish if s.startswith(f"{shop.subject_prefix}.")} == own


@pytest.mark.parametrize("service", ["orders", "payments", "inventory", "notifications", "audit"])
def test_a_service_uses_only_its_own_consumer_buckets_and_inbox(service: str, shop: Config) -> None:
    publish, subscribe = grants()[service]
    stream, durable = shop.services[service].stream, shop.durable(service)
    assert {f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}", f"$JS.ACK.{stream}.{durable}.>",
            f"{shop.dead_letter.subject_prefix}.{service}"} <= publish
    advisories = f"{shop.dead_letter.stream}_ADVISORIES"
    assert {s for s in publish if s.startswith("$JS.API.CONSUMER.")} == {
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}", f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
        f"$JS.API.CONSUMER.MSG.NEXT.{advisories}.{stream}_{durable}",
        f"$JS.API.CONSUMER.INFO.{advisories}.{stream}_{durable}"}
    assert {s for s in publish if s.startswith("$JS.ACK.")} == {
        f"$JS.ACK.{stream}.{durable}.>", f"$JS.ACK.{advisories}.{stream}_{durable}.>"}
    buckets = {s.split(".")[1] for s in publish if s.startswith("$KV.")}
    assert buckets == {*shop.services[service].state, "jetpool_failures"}
    assert f"$KV.jetpool_failures.{service}.>" in publish
    assert subscribe == {f"_INBOX_{service}.>"}
