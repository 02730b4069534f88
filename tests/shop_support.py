"""Helpers for the shop's tests: handler contexts over in-memory state, an interleaving store, orders."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nats
import yaml

from engine import Context, Event
from engine.breaker import Breaker
from engine.state import KVState, MemoryState, Mutation, Value, mutate_with_cas
from handlers import SHOP_YAML, inventory
from handlers.saga import ORDER_PLACED
from tests.support import App

_orders = itertools.count(1)


def order_placed(sku: str = "sku-1", qty: int = 1, amount_cents: int = 1999, order_id: str | None = None,
                 customer_id: str = "c-1") -> Event:
    """An OrderPlaced event as the storefront would publish it."""
    order_id = order_id or f"o-{next(_orders)}"
    return Event(type=ORDER_PLACED, aggregate_id=order_id, data={
        "order_id": order_id, "customer_id": customer_id, "sku": sku, "qty": qty, "amount_cents": amount_cents})


def context(service: str, resources: Mapping[str, Any] | None = None, settings: Mapping[str, Any] | None = None,
            attempt: int = 1) -> Context:
    """A handler context with the given resources; ``attempt`` is encoded in a fake ack subject."""
    reply = f"$JS.ACK.SHOP.{service}.{attempt}.{next(_orders)}.1.0.0" if attempt else ""
    return Context(service, 0, reply, f"shop.{service}", dict(resources or {}), dict(settings or {}))


class InterleavedState:
    """A view of a shared :class:`MemoryState` that yields to the loop around every call.

    Two views on one MemoryState behave like two processes on one KV bucket: their reads and
    compare-and-set writes interleave, so conflicts and retries really happen.
    """

    def __init__(self, shared: MemoryState) -> None:
        self.shared = shared

    async def get(self, key: str) -> tuple[Value | None, int]:
        await asyncio.sleep(0)
        result = await self.shared.get(key)
        await asyncio.sleep(0)
        return result

    async def create(self, key: str, value: Value) -> int:
        await asyncio.sleep(0)
        return await self.shared.create(key, value)

    async def update(self, key: str, value: Value, revision: int) -> int:
        await asyncio.sleep(0)
        return await self.shared.update(key, value, revision)

    async def put(self, key: str, value: Value) -> int:
        return await self.shared.put(key, value)

    async def mutate(self, key: str, fn: Mutation, attempts: int = 50, *, fresh: bool = False) -> Value | None:
        return await mutate_with_cas(self, key, fn, attempts, fresh=fresh)


def breaker(fail_max: int = 5, reset_timeout_s: float = 30.0) -> Breaker:
    return Breaker("payment_gateway", fail_max=fail_max, reset_timeout_s=reset_timeout_s)


def write_shop_config(directory: Path, url: str, workers: Mapping[str, int] | None = None,
                      gateway: Mapping[str, Any] | None = None, breaker_reset_s: float = 1.0) -> App:
    """handlers/shop.yaml made private to one test: own stream, subject prefix, DLQ, files; fast retries; no sidecars.

    The KV buckets keep their names (handlers name them); tests keep apart by unique order ids and skus.
    """
    raw: dict[str, Any] = yaml.safe_load(SHOP_YAML.read_text())
    uid = uuid.uuid4().hex[:10]
    prefix, stream = f"shop{uid}", f"SHOP{uid.upper()}"
    raw["app"] = f"shop-{uid}"
    raw["subject_prefix"] = prefix
    raw["nats"] = {"url": url, "reconnect_wait_s": 0.25, "publish_timeout_s": 5}
    raw["streams"] = [{"name": stream, "subjects": [f"{prefix}.>"], "storage": "file", "duplicate_window_s": 600}]
    raw["dead_letter"] = {"stream": f"DLQ{stream}", "subject_prefix": f"dlq{prefix}"}
    raw["breakers"]["payment_gateway"]["reset_timeout_s"] = breaker_reset_s
    raw["log"] = {"level": "info", "format": "json"}
    for name, svc in raw["services"].items():
        svc.update(stream=stream, workers=(workers or {}).get(name, 1), idle_heartbeat_s=1, pull_expires_s=5,
                   drain_timeout_s=5, retry={"base_s": 0.1, "max_s": 1.0})
    # The gateway is a service of its own (tests/shop/gateway_support.py); these are its starting faults.
    raw["services"]["payments"]["settings"]["gateway"].update(gateway or {})
    raw.pop("sidecars", None)  # the test starts what the shop needs (nats, PostgreSQL, the gateway) itself
    raw["services"]["audit"]["settings"]["db_path"] = str(directory / "audit.sqlite")
    path = directory / f"shop-{uid}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return App(path, url, stream, prefix, raw)


async def seed_stock(url: str, levels: dict[str, int]) -> None:
    """Set the available stock of each sku in the ``stock`` bucket (created when the shop is not provisioned yet)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        try:
            kv = await js.key_value("stock")
        except nats.js.errors.BucketNotFoundError:
            kv = await js.create_key_value(bucket="stock")
        await inventory.seed(KVState(kv), levels)
    finally:
        await nc.close()
