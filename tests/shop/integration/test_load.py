"""``jetpool load`` against a shop that ``jetpool run`` serves on the session's nats-server.

The shop runs as a deployment would: its own process tree, provisioned by ``run``, the payment gateway
over a database of the session's PostgreSQL and the order API, each a process of its own. ``load`` places
orders on it through the API (or, with ``--direct``, straight onto the stream) and checks the invariants:
every check it can do from here, and the checks that need what only the deployment reaches (the gateway's
ledger, the audit store) reported as skipped when they are elsewhere.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from engine.embedded import EmbeddedServer
from handlers import SHOP_YAML
from handlers.api import URL_ENV as API_URL_ENV
from handlers.database import DATABASE_URL_ENV, EmbeddedPostgres
from handlers.gateway import GATEWAY_URL_ENV
from handlers.tools.api_process import ApiProcess
from tests.shop.gateway_support import database_on, gateway_process
from tests.shop_support import write_shop_config
from tests.support import App, Engine, engine_env, run_cli

ORDERS = 100
SUMMARY = re.compile(r"confirmed (\d+) cancelled (\d+) \(payment declined (\d+), out of stock (\d+)\) "
                     r"dead-lettered (\d+)")
CHARGES = re.compile(r"✔ no double charge: (\d+) orders charged once, (\d+) refunded once")
AUDIT = re.compile(r"✔ audit: (\d+) events stored once each \(expected (\d+) for the orders that ended\)")


@pytest.fixture(scope="module")
def shop_env(nats_server: EmbeddedServer, shop_postgres: EmbeddedPostgres,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[App, dict[str, str]]]:
    """The five services under ``jetpool run`` (which provisions them) and the gateway, stopped by PID
    afterwards; with the environment that reaches them (the database's DSN, the gateway's URL)."""
    tmp = tmp_path_factory.mktemp("shop-load")
    app = write_shop_config(tmp, nats_server.url)
    with database_on(shop_postgres) as dsn, gateway_process(dsn, app.path, tmp / "gateway.log") as gateway:
        env = {DATABASE_URL_ENV: dsn, GATEWAY_URL_ENV: gateway}
        engine = Engine(app.path, tmp / "engine.log", env={**env, "JETPOOL_HTTP_PORT": "0"}).start()
        api: ApiProcess | None = None
        try:
            engine.wait_workers(len(app.raw["services"]), 90)
            engine.descendants()
            api = ApiProcess(app.path, app.url, tmp / "api.log", env=engine_env()).start()
            yield app, {**env, API_URL_ENV: api.url}
        finally:
            if api is not None:
                api.stop()
            engine.kill_tree()


@pytest.fixture(scope="module")
def shop(shop_env: tuple[App, dict[str, str]]) -> App:
    return shop_env[0]


def _load(app: App, config: Path, env: dict[str, str], *more: str, cwd: Path | None = None) -> tuple[int, str]:
    """``jetpool load`` of ORDERS orders, as fast as the shop takes them; exit code and flattened output.

    Seed 1 puts 19 units of demand on the scarce sku, which gets 10: some orders run out of stock.
    """
    args = ["load", "-c", str(config), "--nats-url", app.url, "--orders", str(ORDERS), "--rate", "0",
            "--seed", "1", "--stall-s", "30", *more]
    if cwd is None:
        result = run_cli(args, env={"COLUMNS": "200", **env}, timeout_s=150)
    else:  # away from the checkout, whose .jetpool/postgres may hold a running embedded server
        result = subprocess.run([str(Path(sys.executable).parent / "jetpool"), *args], capture_output=True,
                                text=True, timeout=150, cwd=cwd, env=engine_env({"COLUMNS": "200", **env}))
    return result.returncode, " ".join((result.stdout + result.stderr).split())


def _remote_view(app: App, directory: Path) -> Path:
    """The same deployment's config as seen from another machine: its audit store is not here."""
    raw = copy.deepcopy(app.raw)
    elsewhere = directory / "on-another-machine"
    raw["services"]["audit"]["settings"]["db_path"] = str(elsewhere / "audit.sqlite")
    path = directory / "remote-view.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_load_places_its_orders_on_a_running_shop_and_checks_every_invariant(
        shop_env: tuple[App, dict[str, str]]) -> None:
    shop, env = shop_env
    code, text = _load(shop, shop.path, env)  # the API's URL in JETPOOL_SHOP_API_URL, as its sidecar exports it
    assert code == 0, text
    assert f"placing {ORDERS} orders, unthrottled, 20 skus, POST {env[API_URL_ENV]}/orders (64 requests" in text
    assert f"{ORDERS} of {ORDERS} orders ended" in text
    summary = SUMMARY.search(text)
    assert summary is not None, text
    confirmed, cancelled, declined, out_of_stock, dead = map(int, summary.groups())
    assert confirmed + cancelled == ORDERS and declined + out_of_stock == cancelled and dead == 0
    assert confirmed > 0 and out_of_stock > 0  # a tenth of the skus get too little stock on purpose
    assert "✔ 0 orders lost" in text
    charges = CHARGES.search(text)
    assert charges is not None, text
    assert tuple(map(int, charges.groups())) == (confirmed + out_of_stock, out_of_stock)
    assert "✔ stock consistent over 20 skus" in text
    audit = AUDIT.search(text)
    assert audit is not None, text
    assert audit.group(1) == audit.group(2) == str(5 * confirmed + 4 * declined + 6 * out_of_stock)
    assert "Audit timeline of order" in text
    assert "skipped" not in text and "✘" not in text
    assert text.endswith("all invariants hold")


def test_load_reports_the_checks_it_cannot_do_from_here_as_skipped(shop: App, tmp_path: Path) -> None:
    # No DSN: the ledger is elsewhere; no API either: the orders go straight to the stream.
    code, text = _load(shop, _remote_view(shop, tmp_path), {}, "--direct", cwd=tmp_path)
    assert code == 0, text
    assert "OrderPlaced published straight to the stream" in text
    assert f"{ORDERS} of {ORDERS} orders ended" in text
    assert "✔ 0 orders lost" in text and "✔ stock consistent over 20 skus" in text
    elsewhere = tmp_path / "on-another-machine"
    assert ("○ double-charge check skipped: the gateway's ledger is not reachable from here (no "
            f"{DATABASE_URL_ENV}, no embedded PostgreSQL running)") in text
    assert f"○ audit check skipped: the audit store {elsewhere / 'audit.sqlite'} is not on this machine" in text
    assert "no double charge" not in text and "audit:" not in text and "Audit timeline" not in text
    assert text.endswith("all checked invariants hold (2 checks skipped)")
    assert not elsewhere.exists()  # the checks did not create the files they could not find


def test_load_without_a_broker_url_exits_2_and_says_what_to_give() -> None:
    result = run_cli(["load", "-c", str(SHOP_YAML), "--orders", "10", "--direct"])  # the YAML has no nats.url
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == ("jetpool: error: load drives a running deployment: give --nats-url "
                             "(or nats.url / JETPOOL_NATS_URL)\n")
    assert result.stdout == ""  # nothing was placed


def test_load_without_an_api_url_says_how_to_give_one(shop: App) -> None:
    result = run_cli(["load", "-c", str(shop.path), "--nats-url", shop.url, "--orders", "10"])
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == ("jetpool: error: load places orders through the order API: give --api-url (or "
                             f"{API_URL_ENV}), or --direct to publish them straight to the stream\n")
