"""``jetpool demo`` against the session's nats-server: the report, the exit code, and cleaning up after itself.

Also each invariant check of the demo's (and ``jetpool load``'s) report, fed corrupted data without a
broker, so every way it can fail is seen to fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import psutil
import pytest
import yaml
from rich.console import Console

from engine.config import load_config
from engine.embedded import EmbeddedServer
from engine.events import Event
from engine.logs import json_records
from engine.state import MemoryState
from handlers import inventory
from handlers.audit_store import AuditRecord, SqliteAuditStore
from handlers.database import DATABASE_URL_ENV, provision
from handlers.schemas import LEDGER_SCHEMA
from handlers.tools.load import Outcome, ShopLoad
from handlers.tools.orders import Plan
from tests.shop_support import write_shop_config
from tests.support import REPO_ROOT, App, engine_env, still_running, wait_for


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the demo and everything it started, by PID, unless it already exited.

    The demo's engine (a supervisor in its own session, and its workers) would outlive a killed demo,
    so the tree is collected first; psutil checks each PID's start time, so a reused PID is never hit.
    """
    if proc.poll() is not None:
        return
    tree: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        tree = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    proc.wait(10)
    for child in tree:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(tree, timeout=10)


def _demo(config: Path, url: str, dsn: str, *args: str) -> subprocess.Popen[str]:
    """``jetpool demo`` on the session's broker, its gateway's ledger in the test's database."""
    command = [sys.executable, "-m", "engine", "demo", "-c", str(config), "--nats-url", url, *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
                            env=engine_env({"COLUMNS": "200", DATABASE_URL_ENV: dsn}), start_new_session=True)


def _run_demo(app: App, dsn: str, log_dir: Path, *args: str) -> tuple[int, str]:
    """Run the demo to its end: exit code and output with whitespace runs flattened."""
    demo = _demo(app.path, app.url, dsn, *args, "--log-file", str(log_dir / "engine.log"))
    try:
        out, _ = demo.communicate(timeout=150)
    finally:
        stop(demo)
    return demo.returncode, " ".join(out.split())


def _shop_config(directory: Path, url: str, edit: Callable[[dict[str, Any]], None] | None = None,
                 **kwargs: Any) -> App:
    """The shop's test config, changed by ``edit`` (on the raw YAML) before it is written again."""
    directory.mkdir(parents=True, exist_ok=True)
    app = write_shop_config(directory, url, **kwargs)
    if edit is not None:
        edit(app.raw)
        app.path.write_text(yaml.safe_dump(app.raw, sort_keys=False))
    return app


def test_the_demo_reports_every_order_and_holds_its_invariants_through_an_outage(
        nats_server: EmbeddedServer, shop_dsn: str, tmp_path: Path) -> None:
    app = write_shop_config(tmp_path, nats_server.url)
    code, text = _run_demo(app, shop_dsn, tmp_path, "--orders", "150", "--rate", "100", "--failure-rate", "0.1",
                           "--outage", "0.5:1", "--breaker-reset-s", "1")
    assert code == 0, text
    assert "POST http://127.0.0.1:" in text and "/orders (64 requests at most in flight)" in text  # through the API
    assert "150 of 150 orders ended" in text
    assert "latency placed → ended: p50" in text
    assert "0 orders lost" in text and "no double charge" in text and "stock consistent over 20 skus" in text
    assert "gateway outage started" in text and "gateway outage ended" in text
    assert "Audit timeline of order" in text and "NotificationSent" in text
    assert "all invariants hold" in text


def _without_orders_service(raw: dict[str, Any]) -> None:
    del raw["services"]["orders"]  # nobody moves an order to its end


def test_the_demo_exits_1_when_its_orders_cannot_end(nats_server: EmbeddedServer, shop_dsn: str,
                                                      tmp_path: Path) -> None:
    app = _shop_config(tmp_path, nats_server.url, _without_orders_service)
    code, text = _run_demo(app, shop_dsn, tmp_path, "--orders", "20", "--rate", "0", "--stall-s", "1")
    assert code == 1, text
    assert "no order ended for 1s: giving up waiting" in text
    assert "0 of 20 orders ended" in text
    assert "✘ 20 orders lost (e.g. " in text
    assert text.endswith("invariants violated")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_ctrl_c_or_kill_9_stops_the_demo_and_every_process_it_started(sig: signal.Signals,
                                                                       nats_server: EmbeddedServer,
                                                                       shop_dsn: str, tmp_path: Path) -> None:
    """Ctrl-C: the demo kills its engine. kill -9 runs no code in the demo: its engine is told by the
    kernel (SIGHUP on the parent's death), drains and exits with its workers."""
    app = write_shop_config(tmp_path, nats_server.url)
    log = tmp_path / "engine.log"
    demo = _demo(app.path, nats_server.url, shop_dsn, "--orders", "100000", "--rate", "200", "--log-file", str(log))
    seen: dict[int, psutil.Process] = {}
    try:
        def engine_running() -> bool:
            for child in psutil.Process(demo.pid).children(recursive=True):
                seen[child.pid] = child
            return log.exists() and log.read_text(errors="replace").count('"worker.started"') >= 5

        wait_for(engine_running, 90, "the demo's engine to start its five workers")
        time.sleep(1.0)  # orders are flowing
        engine_running()
        os.kill(demo.pid, sig)
        demo.wait(timeout=60)

        wait_for(lambda: not still_running(seen.values()), 5 if sig == signal.SIGINT else 60,
                 "every process the demo started to exit", detail=lambda: f"{still_running(seen.values())}")
        if sig == signal.SIGKILL:  # the engine was told (SIGHUP, once per demo thread), drained, and exited 0
            records = list(json_records(log.read_text(errors="replace")))
            assert [(r["signal"], r["action"]) for r in records if r.get("event") == "supervisor.signal"] == [
                ("SIGHUP", "drain")]
            assert [r["exit_code"] for r in records if r.get("event") == "supervisor.stopped"] == [0]
        assert len(seen) >= 6  # the supervisor and its five workers were watched
    finally:
        stop(demo)
        for proc in seen.values():
            if proc.is_running():
                proc.kill()


# ---- the checks, on corrupted data -------------------------------------------------------------------


def _shop_load(directory: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> ShopLoad:
    """A load run that never connects: only its orders, its config and a console to read back."""
    app = _shop_config(directory, "nats://127.0.0.1:1", edit)
    return ShopLoad(load_config(app.path), Plan(orders=6, skus=2, seed=3), Console(file=io.StringIO(), width=200))


def _kinds(load: ShopLoad) -> dict[str, str]:
    """The first three orders ended confirmed, declined, out of stock; the other three are not asked about."""
    oids = list(load.orders.by_id)
    return {oids[0]: "confirmed", oids[1]: "declined", oids[2]: "out_of_stock"}


def _only(outcome: Outcome) -> tuple[str, str]:
    assert len(outcome.lines) == 1, outcome.lines
    return outcome.lines[0]


MoneyCorruption = Callable[[str, dict[str, str]], None]


def _move(dsn: str, order_id: str, kind: str, key: str = "") -> None:
    """A money movement written into the gateway's ledger tables as the gateway writes one (its key's row first)."""
    key = f"{kind}:{key or order_id}"

    async def write() -> None:
        await provision(dsn, [LEDGER_SCHEMA])
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO ledger.idempotency_keys (key, kind, fingerprint, order_id, http_status, response) "
                    "VALUES ($1, $2, 'f', $3, 200, '{}'::jsonb)", key, kind, order_id)
                if kind == "charge":
                    await conn.execute("INSERT INTO ledger.charges (id, order_id, amount_cents, currency, "
                                       "idempotency_key) VALUES ($1, $2, 1000, 'usd', $1)", key, order_id)
                else:
                    charge = await conn.fetchval("SELECT id FROM ledger.charges WHERE order_id = $1 LIMIT 1",
                                                 order_id)
                    assert charge is not None, f"no charge of {order_id} to refund"
                    await conn.execute("INSERT INTO ledger.refunds (id, charge_id, order_id, amount_cents, "
                                       "idempotency_key) VALUES ($1, $2, $3, 1000, $1)", key, charge, order_id)
        finally:
            await conn.close()

    asyncio.run(write())


def _by_kind(kinds: dict[str, str], wanted: str) -> str:
    return next(oid for oid, kind in kinds.items() if kind == wanted)


MONEY: dict[str, tuple[MoneyCorruption, str]] = {
    "charged twice": (lambda dsn, kinds: _move(dsn, _by_kind(kinds, "confirmed"), "charge", "again"),
                      "1 charged or refunded twice"),
    "refunded twice": (lambda dsn, kinds: _move(dsn, _by_kind(kinds, "out_of_stock"), "refund", "again"),
                       "1 charged or refunded twice"),
    "declined yet charged": (lambda dsn, kinds: _move(dsn, _by_kind(kinds, "declined"), "charge"),
                             "1 orders' money does not match their end (e.g. {declined}: "),
    "confirmed yet refunded": (lambda dsn, kinds: _move(dsn, _by_kind(kinds, "confirmed"), "refund"),
                               "1 orders' money does not match their end (e.g. {confirmed}: "),
}


@pytest.mark.parametrize("corruption", [None, *MONEY])
def test_the_double_charge_check_fails_on_each_kind_of_wrong_money(tmp_path: Path, shop_dsn: str,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   corruption: str | None) -> None:
    load = _shop_load(tmp_path)
    kinds = _kinds(load)
    _move(shop_dsn, _by_kind(kinds, "confirmed"), "charge")
    _move(shop_dsn, _by_kind(kinds, "out_of_stock"), "charge")
    _move(shop_dsn, _by_kind(kinds, "out_of_stock"), "refund")
    if corruption is not None:
        MONEY[corruption][0](shop_dsn, kinds)
    monkeypatch.setenv(DATABASE_URL_ENV, shop_dsn)
    outcome = Outcome()
    asyncio.run(load._check_charges(outcome, kinds))
    status, text = _only(outcome)
    if corruption is None:
        assert (status, text) == ("passed", "no double charge: 2 orders charged once, 1 refunded once")
    else:
        assert status == "failed" and not outcome.ok
        by_kind = {kind: oid for oid, kind in kinds.items()}
        assert MONEY[corruption][1].format(**by_kind) in text, text


StockCorruption = Callable[[dict[str, Any]], dict[str, Any] | None]

STOCK: dict[str, StockCorruption] = {
    "left half-reserved": lambda level: {**level, "pending": {"some-order": 1}},
    "reserved but not sold": lambda level: {**level, "available": level["available"] - 1,
                                            "reserved": level["reserved"] + 1},
    "units vanished": lambda level: {**level, "available": level["available"] - 1},
    "units appeared": lambda level: {**level, "available": level["available"] + 1},
    "level missing": lambda level: None,
}


@pytest.mark.parametrize("corruption", [None, *STOCK])
def test_the_stock_check_fails_on_each_kind_of_inconsistent_level(tmp_path: Path, corruption: str | None) -> None:
    load = _shop_load(tmp_path)
    kinds = _kinds(load)
    sold = load.orders.line(_by_kind(kinds, "confirmed"))
    store = MemoryState()
    outcome = Outcome()

    async def check() -> None:
        await inventory.seed(store, load.orders.stock)
        key = inventory.sku_key(sold["sku"])
        level, _ = await store.get(key)
        assert level is not None
        level = {**level, "available": level["available"] - sold["qty"], "reserved": sold["qty"]}
        corrupted = STOCK[corruption](level) if corruption is not None else level
        if corrupted is None:
            store.data.pop(key)
        else:
            await store.put(key, corrupted)
        await load._check_stock(store, outcome, kinds)

    asyncio.run(check())
    status, text = _only(outcome)
    units = sum(load.orders.stock.values())
    if corruption is None:
        assert (status, text) == ("passed", f"stock consistent over 2 skus: {sold['qty']} of {units} units sold, "
                                            "none oversold, none left half-reserved")
    else:
        assert status == "failed" and not outcome.ok
        assert f"{sold['sku']}: seeded {load.orders.stock[sold['sku']]}, sold {sold['qty']}, now " in text, text


def test_the_stock_check_fails_when_orders_bought_more_than_a_sku_had(tmp_path: Path) -> None:
    load = _shop_load(tmp_path)
    kinds = dict.fromkeys(load.orders.by_id, "confirmed")  # the scarce sku's orders too
    sold = Counter[str]()
    for oid in kinds:
        sold[load.orders.line(oid)["sku"]] += load.orders.line(oid)["qty"]
    oversold = [sku for sku, seeded in load.orders.stock.items() if sold[sku] > seeded]
    assert len(oversold) == 1  # seed 3: 9 units of the scarce sku ordered, 5 in stock
    store = MemoryState()
    outcome = Outcome()

    async def check() -> None:
        for sku, seeded in load.orders.stock.items():  # every unit accounted for, none pending: only oversold
            await store.put(inventory.sku_key(sku), {"available": seeded - sold[sku], "reserved": sold[sku],
                                                     "pending": {}})
        await load._check_stock(store, outcome, kinds)

    asyncio.run(check())
    status, text = _only(outcome)
    sku = oversold[0]
    assert status == "failed"
    assert (f"{sku}: seeded {load.orders.stock[sku]}, sold {sold[sku]}, now {{'available': "
            f"{load.orders.stock[sku] - sold[sku]}, ") in text, text


@pytest.mark.parametrize("stored", [5, 6])
def test_the_audit_check_fails_unless_each_event_is_stored_once(tmp_path: Path, stored: int) -> None:
    load = _shop_load(tmp_path)
    confirmed = _by_kind(_kinds(load), "confirmed")
    path = load.cfg.services["audit"].settings["db_path"]
    outcome = Outcome()

    async def check() -> Any:
        store = SqliteAuditStore(path)
        try:
            await store.add_many([AuditRecord.from_event(Event(type="OrderPlaced", aggregate_id=confirmed, data={}))
                                  for _ in range(stored)])
        finally:
            store.close()
        return await load._check_audit(outcome, {confirmed: "confirmed"})  # five events for a confirmed order

    table = asyncio.run(check())
    status, text = _only(outcome)
    assert text.startswith(f"audit: {stored} events stored once each (expected 5 for the orders that ended)")
    assert status == ("passed" if stored == 5 else "failed")
    assert table is not None and table.row_count == stored


def _without_audit(raw: dict[str, Any]) -> None:
    del raw["services"]["audit"]


def test_checks_this_machine_cannot_do_are_skipped_with_the_reason(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # no embedded PostgreSQL runs on its default data directory here
    remote = _shop_load(tmp_path / "remote")  # its audit store was never written here
    outcome = Outcome()
    asyncio.run(remote._check_charges(outcome, {}))
    assert asyncio.run(remote._check_audit(outcome, {})) is None
    audit = remote.cfg.services["audit"].settings["db_path"]
    assert outcome.lines == [
        ("skipped", "double-charge check skipped: the gateway's ledger is not reachable from here "
                    f"(no {DATABASE_URL_ENV}, no embedded PostgreSQL running)"),
        ("skipped", f"audit check skipped: the audit store {audit} is not on this machine")]
    assert outcome.ok

    unconfigured = _shop_load(tmp_path / "unconfigured", _without_audit)
    outcome = Outcome()
    assert asyncio.run(unconfigured._check_audit(outcome, {})) is None
    assert outcome.lines == [
        ("skipped", f"audit check skipped: {unconfigured.cfg.source}: no service routes events to "
                    "handlers.audit:record")]


def test_the_verdict_counts_skipped_checks_and_any_failure_wins() -> None:
    outcome = Outcome()
    outcome.check(True, "0 orders lost")
    assert outcome.render() == ["  [green]✔[/] 0 orders lost", "[green]all invariants hold[/]"]
    outcome.skip("audit check", "elsewhere")
    assert outcome.ok
    assert outcome.render()[1:] == ["  [dim]○[/] audit check skipped: elsewhere",
                                    "[green]all checked invariants hold[/] (1 check skipped)"]
    outcome.skip("double-charge check", "elsewhere")
    assert outcome.render()[-1] == "[green]all checked invariants hold[/] (2 checks skipped)"
    outcome.check(False, "3 orders lost")
    assert not outcome.ok
    assert outcome.render()[-2:] == ["  [red]✘[/] 3 orders lost", "[red]invariants violated[/]"]
