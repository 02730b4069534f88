"""The chaos shop: a private nats-server, the shop's YAML changed for fast recovery, the engine running it.

The chaos shop is the shop's YAML (``handlers/shop.yaml``) with these changes (:func:`chaos_config`), none
of which weakens a guarantee: its own broker and files; ``ack_wait_s`` 5 (a killed worker's messages come
back after ack_wait: 30 s would only lengthen every recovery); fast retries (``retry`` 0.1-0.5 s, so a
poison event spends its ``max_deliver`` attempts in seconds); a 5 s breaker reset; a supervisor that
restarts workers within a second and tolerates the kill loop (``max_restarts``); a stream ``max_msg_size``
of 256 KiB (below the server's 1 MiB ``max_payload``, so the *stream* refuses bigger events and says so in
the PubAck) and ``max_event_bytes`` 64 KiB; and payments' OrderPlaced route goes through
:func:`handlers.payments_chaos.charge`, which is the shop's own ``handlers.payments:charge`` unless the
order carries a ``chaos`` marker (``poison``: always raise; ``hang``: hang on the first attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any

import psutil
import yaml

from engine.config import Config, load_config
from engine.embedded import EmbeddedServer
from engine.errors import JetpoolError
from engine.logs import json_records
from engine.process import EngineProcess
from engine.runtime import provision_only
from handlers import SHOP_YAML
from handlers.database import DATABASE_URL_ENV, EmbeddedPostgres, provision
from handlers.gateway import GATEWAY_URL_ENV, GatewayClient
from handlers.gateway.process import GatewayProcess
from handlers.saga import ORDER_PLACED

# ---- what the chaos shop changes in the shop's YAML (see the module docstring for why) ---------------

ACK_WAIT_S = 5.0
BREAKER_RESET_S = 5.0
STREAM_MAX_MSG_BYTES = 256 * 1024
MAX_EVENT_BYTES = 64 * 1024
RETRY = {"base_s": 0.1, "max_s": 0.5}
DRAIN_MARGIN_S = 5.0  # the supervisor kills what is left this long after the largest drain_timeout_s

CHARGE = "handlers.payments:charge"
CHAOS_CHARGE = "handlers.payments_chaos:charge"
AUDIT = "handlers.audit:record"


def chaos_config(base: dict[str, Any], workdir: Path, url: str) -> dict[str, Any]:
    """``base`` (the shop's YAML, loaded) turned into the chaos shop: own broker and files, fast recovery."""
    raw = json.loads(json.dumps(base))
    raw["nats"] = {**raw.get("nats", {}), "url": url, "store_dir": str(workdir / "nats")}
    raw["http"] = {"host": "127.0.0.1", "port": 0}
    raw["log"] = {"level": "info", "format": "json"}
    # The supervisor runs the shop's own restart policy: a kill loop replaces killed workers for as long
    # as it lasts (only boot failures count toward a crash loop), so nothing is loosened here.
    for breaker in raw.get("breakers", {}).values():
        breaker["reset_timeout_s"] = BREAKER_RESET_S
    for stream in raw["streams"]:
        stream["max_msg_size"] = STREAM_MAX_MSG_BYTES
    for svc in raw["services"].values():
        svc.update(ack_wait_s=ACK_WAIT_S, retry=dict(RETRY), max_event_bytes=MAX_EVENT_BYTES)
        routes = svc["routes"]
        if routes.get(ORDER_PLACED) == CHARGE:
            routes[ORDER_PLACED] = CHAOS_CHARGE
            # The slow-handler scenario makes the gateway slower than ack_wait_s: the client must wait.
            svc.setdefault("settings", {}).setdefault("gateway", {})["timeout_s"] = ACK_WAIT_S * 4
        if AUDIT in routes.values():
            svc.setdefault("settings", {})["db_path"] = str(workdir / "audit.sqlite")
    return dict(raw)


class Shop:
    """A private nats-server, the chaos config of the shop, and the engine running it; all stopped by PID.

    Args:
        workdir: where the broker's store, the config, the engine's log, the ledger and the audit store go.
        base_config: the shop's YAML to start from.
    """

    def __init__(self, workdir: Path, base_config: Path = SHOP_YAML) -> None:
        self.workdir = Path(workdir)
        self.base_config = Path(base_config)
        self.server = EmbeddedServer(store_dir=self.workdir / "nats")
        self.config_path = self.workdir / "shop-chaos.yaml"
        self.log_path = self.workdir / "engine.log"
        self.engine: EngineProcess | None = None
        # The ledger's PostgreSQL and the gateway live apart from the engine, as deployed: they outlive
        # worker kills and engine restarts.
        self.database = EmbeddedPostgres(self.workdir / "postgres", die_with_parent=True)
        self.gateway: GatewayProcess | None = None
        self._cfg: Config | None = None

    @property
    def cfg(self) -> Config:
        assert self._cfg is not None, "the shop is not started"
        return self._cfg

    async def start(self) -> Shop:
        """Start the broker, write and provision the config, start the engine and wait for its workers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.server.start)
        base = yaml.safe_load(self.base_config.read_text())
        self.config_path.write_text(yaml.safe_dump(chaos_config(base, self.workdir, self.server.url), sort_keys=False))
        self._cfg = load_config(self.config_path)
        await provision_only(self.cfg)
        # Started on this thread, not in the loop's executor: a tied process gets its signal when the thread
        # that started it ends, and the executor's threads end with the loop (a test's fixture runs one loop
        # to start the shop and others to use it).
        self.database.start()
        await provision(self.database.dsn)
        self.gateway = GatewayProcess(self.database.dsn, self.config_path, self.workdir / "gateway.log", tied=True)
        self.gateway.start()
        await self.start_engine()
        return self

    async def start_engine(self) -> None:
        """Start the engine (tied to this thread: a SIGKILLed chaos run leaves none behind) and wait for it."""
        assert self.gateway is not None
        env = {**os.environ, DATABASE_URL_ENV: self.database.dsn, GATEWAY_URL_ENV: self.gateway.url}
        self.engine = EngineProcess(self.config_path, self.log_path, env=env, nats_url=self.server.url,
                                    args=["--no-provision", "--no-sidecars", "--log-level", "info"],
                                    tied=True).start()
        await self.engine.wait_workers_async(sum(s.workers for s in self.cfg.services.values()), timeout_s=120)

    def close(self) -> None:
        """Stop the engine (drain, then SIGKILL what is left, by PID) and the broker."""
        try:
            if self.engine is not None:
                self.engine.stop(timeout_s=30)
        finally:
            try:
                if self.gateway is not None:
                    self.gateway.stop()
                self.database.stop()
            finally:
                self.server.stop()

    def workers(self) -> list[psutil.Process]:
        """The engine's live worker processes (its spawned children, not multiprocessing's resource tracker)."""
        return [] if self.engine is None or self.engine.proc is None else self.engine.workers()

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the live workers and the broker have used so far."""
        procs = self.workers()
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(self.server.pid))
        total = 0.0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def services_by_pid(self) -> dict[int, str]:
        return {int(r["pid"]): str(r["service"]) for r in self.records("worker.started")}

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def records(self, event: str | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """The engine log's JSON records from byte ``offset`` on (optionally only those named ``event``)."""
        if not self.log_path.exists():
            return []
        with open(self.log_path, "rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
        return [r for r in json_records(text) if event is None or r.get("event") == event]

    def gateway_admin(self) -> GatewayClient:
        """A client of the gateway's admin endpoint (close it when done)."""
        if self.gateway is None:
            raise JetpoolError("the chaos shop's gateway is not started")
        return GatewayClient(self.gateway.url)

    def ledger_dsn(self) -> str:
        """The PostgreSQL holding the gateway's ledger."""
        return self.database.dsn

    def audit_path(self) -> Path:
        svc = next(s for s in self.cfg.services.values() if AUDIT in s.routes.values())
        return Path(str(svc.settings["db_path"]))


