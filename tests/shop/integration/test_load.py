"""``jetpool load`` against a shop that ``jetpool run`` serves on the session's nats-server.

The shop runs as a deployment would: its own process tree, provisioned by ``run``. ``load`` places
orders on it and checks the invariants: every check it can do from here, and the checks that need the
deployment's files (the gateway ledger, the audit store) reported as skipped when they are elsewhere.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from engine.embedded import EmbeddedServer
from handlers import SHOP_YAML
from tests.shop_support import write_shop_config
from tests.support import App, Engine, run_cli

ORDERS = 100
SUMMARY = re.compile(r"confirmed (\d+) cancelled (\d+) \(payment declined (\d+), out of stock (\d+)\) "
                     r"dead-lettered (\d+)")
CHARGES = re.compile(r"✔ no double charge: (\d+) orders charged once, (\d+) refunded once")
AUDIT = re.compile(r"✔ audit: (\d+) events stored once each \(expected (\d+) for the orders that ended\)")


@pytest.fixture(scope="module")
def shop(nats_server: EmbeddedServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """The five services under ``jetpool run`` (which provisions them), stopped by PID afterwards."""
    tmp = tmp_path_factory.mktemp("shop-load")
    app = write_shop_config(tmp, nats_server.url)
    engine = Engine(app.path, tmp / "engine.log", env={"JETPOOL_HTTP_PORT": "0"}).start()
    try:
        engine.wait_workers(len(app.raw["services"]), 90)
        engine.descendants()
        yield app
    finally:
        engine.kill_tree()


def _load(app: App, config: Path) -> tuple[int, str]:
    """``jetpool load`` of ORDERS orders, as fast as the shop takes them; exit code and flattened output.

    Seed 1 puts 19 units of demand on the scarce sku, which gets 10: some orders run out of stock.
    """
    result = run_cli(["load", "-c", str(config), "--nats-url", app.url, "--orders", str(ORDERS), "--rate", "0",
                      "--seed", "1", "--stall-s", "30"], env={"COLUMNS": "200"}, timeout_s=150)
    return result.returncode, " ".join((result.stdout + result.stderr).split())


def _remote_view(app: App, directory: Path) -> Path:
    """The same deployment's config as seen from another machine: its ledger and audit store are not here."""
    raw = copy.deepcopy(app.raw)
    elsewhere = directory / "on-another-machine"
    raw["services"]["payments"]["settings"]["gateway"]["ledger"] = str(elsewhere / "ledger.sqlite")
    raw["services"]["audit"]["settings"]["db_path"] = str(elsewhere / "audit.sqlite")
    path = directory / "remote-view.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_load_places_its_orders_on_a_running_shop_and_checks_every_invariant(shop: App) -> None:
    code, text = _load(shop, shop.path)
    assert code == 0, text
    assert f"placing {ORDERS} orders, unthrottled, 20 skus" in text
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
    code, text = _load(shop, _remote_view(shop, tmp_path))
    assert code == 0, text
    assert f"{ORDERS} of {ORDERS} orders ended" in text
    assert "✔ 0 orders lost" in text and "✔ stock consistent over 20 skus" in text
    elsewhere = tmp_path / "on-another-machine"
    assert (f"○ double-charge check skipped: the gateway ledger {elsewhere / 'ledger.sqlite'} is not on this "
            "machine") in text
    assert f"○ audit check skipped: the audit store {elsewhere / 'audit.sqlite'} is not on this machine" in text
    assert "no double charge" not in text and "audit:" not in text and "Audit timeline" not in text
    assert text.endswith("all checked invariants hold (2 checks skipped)")
    assert not elsewhere.exists()  # the checks did not create the files they could not find


def test_load_without_a_broker_url_exits_2_and_says_what_to_give() -> None:
    result = run_cli(["load", "-c", str(SHOP_YAML), "--orders", "10"])  # the shop's YAML has no nats.url
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == ("jetpool: error: load drives a running deployment: give --nats-url "
                             "(or nats.url / JETPOOL_NATS_URL)\n")
    assert result.stdout == ""  # nothing was placed
