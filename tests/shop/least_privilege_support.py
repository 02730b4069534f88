"""The shipped least-privilege nats-server configuration on a server of the test module's own, the shop
provisioned on it by the admin user, and plain nats-py clients that log in as one of its users.

A test module takes the server with ``shop = least_privilege_support.shop`` (a module-scoped fixture: each
module gets its own server; random port, store in a temp dir, passwords in its environment, killed by PID
in teardown), with the payment gateway as a process of its own over a database of the session's PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml

from engine.embedded import EmbeddedServer
from engine.events import Event
from handlers.database import DATABASE_URL_ENV, EmbeddedPostgres
from handlers.gateway import GATEWAY_URL_ENV
from tests.shop.gateway_support import database_on, gateway_process
from tests.support import REPO_ROOT, App, run_cli

CONF = REPO_ROOT / "config" / "nats-server-least-privilege.conf"
SHOP = REPO_ROOT / "handlers" / "shop.yaml"
USERS = ("admin", "storefront", "orders", "payments", "inventory", "notifications", "audit")
STORE_LINE = 'store_dir: "/data/jetstream"'


@dataclass(frozen=True)
class Shop:
    """A server running the shipped configuration, the shop provisioned on it by the admin user."""

    server: EmbeddedServer
    app: App
    passwords: dict[str, str]
    dsn: str
    gateway_url: str

    def env(self, user: str) -> dict[str, str]:
        """The engine's environment for ``user`` (services keep their replies under their own inbox prefix),
        with the shop's database and payment gateway."""
        env = {"JETPOOL_NATS_USER": user, "JETPOOL_NATS_PASSWORD": self.passwords[user],
               DATABASE_URL_ENV: self.dsn, GATEWAY_URL_ENV: self.gateway_url}
        if user != "admin":
            env["JETPOOL_NATS_INBOX_PREFIX"] = f"_INBOX_{user}"
        return env

    def violations(self) -> list[str]:
        log = (self.server.store_dir / "nats-server.log").read_text(errors="replace")
        return [line for line in log.splitlines() if "Violation" in line]


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, shop_postgres: EmbeddedPostgres) -> Iterator[Shop]:
    directory = tmp_path_factory.mktemp("least-privilege")
    conf = CONF.read_text()
    assert STORE_LINE in conf, "the test removes the store_dir line (EmbeddedServer passes -sd)"
    (directory / "nats.conf").write_text(conf.replace(STORE_LINE, ""))
    # Letters first: nats-server reads an environment value that starts with a digit as a number.
    passwords = {user: "pw" + secrets.token_hex(16) for user in USERS}
    server = EmbeddedServer(store_dir=directory / "nats", config_file=directory / "nats.conf")
    with pytest.MonkeyPatch.context() as mp:  # the server reads its passwords from its environment
        for user, password in passwords.items():
            mp.setenv(f"NATS_{user.upper()}_PASSWORD", password)
        server.start()
    try:
        app = _shop_config(directory, server.url)
        with database_on(shop_postgres) as dsn, gateway_process(dsn, app.path, directory / "gateway.log") as url:
            shop = Shop(server, app, passwords, dsn, url)
            result = run_cli(["provision", "-c", str(shop.app.path)], env=shop.env("admin"))
            assert result.returncode == 0, result.stderr
            yield shop
    finally:
        server.kill()


def _shop_config(directory: Path, url: str) -> App:
    """handlers/shop.yaml pointed at the server, no declines, the audit store in the temp dir; no sidecars
    (the fixture starts the gateway and gives the database, the test starts the API when it needs it)."""
    raw = yaml.safe_load(SHOP.read_text())
    raw["nats"] = {"url": url, "reconnect_wait_s": 0.25}
    raw.pop("sidecars", None)
    raw["services"]["payments"]["settings"]["gateway"].update(decline_rate=0.0, failure_rate=0.0)
    raw["services"]["audit"]["settings"] = {"db_path": str(directory / "audit.sqlite")}
    path = directory / "shop.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return App(path, url, "SHOP", "shop", raw)


# ---- plain nats-py clients -------------------------------------------------------------------------


async def _as(shop: Shop, user: str, work: Callable[[Any, list[str]], Awaitable[Any]]) -> Any:
    """Run ``work(nc, errors)`` on a connection of ``user``; ``errors`` collects asynchronous errors."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(shop.server.url, user=user, password=shop.passwords[user], error_cb=on_error,
                            inbox_prefix=shop.env(user).get("JETPOOL_NATS_INBOX_PREFIX", "_INBOX"),
                            allow_reconnect=False, connect_timeout=5)
    try:
        return await work(nc, errors)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def as_user(shop: Shop, user: str, work: Callable[[Any, list[str]], Awaitable[Any]]) -> Any:
    return asyncio.run(_as(shop, user, work))


def counts(shop: Shop) -> dict[str, int]:
    """Messages per subject in SHOP and DLQ, read by the admin."""

    async def work(nc: Any, _: list[str]) -> dict[str, int]:
        js, out = nc.jetstream(), dict[str, int]()
        for stream, subjects in (("SHOP", "shop.>"), ("DLQ", "dlq.>")):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                out.update((await js.stream_info(stream, subjects_filter=subjects)).state.subjects or {})
        return out

    result: dict[str, int] = as_user(shop, "admin", work)
    return result


def order(order_id: str, **data: Any) -> Event:
    line = {"order_id": order_id, "customer_id": "c-1", "sku": "widget", "qty": 1, "amount_cents": 1999, **data}
    return Event(type="OrderPlaced", data={k: v for k, v in line.items() if v is not None}, aggregate_id=order_id)
