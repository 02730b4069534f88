"""``jetpool demo``: the whole shop on this machine, its load, its invariants, and a clean stop.

The demo runs a broker (an embedded nats-server unless ``--nats-url``), the shop's PostgreSQL (embedded
unless ``JETPOOL_SHOP_DATABASE_URL``) and the payment gateway (unless ``JETPOOL_SHOP_GATEWAY_URL``),
provisions the shop, starts the order API (``jetpool api``, a process of its own; not with ``--direct``)
and the engine with all five services as a ``python -m engine run --no-sidecars`` process tree
(:class:`engine.process.EngineProcess`: its own session, so signals reach it only through us), runs
the load of :mod:`handlers.tools.load` against it — orders POSTed to the API — then stops every process
it started, by PID, also on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from rich.console import Console

from engine.config import Config
from engine.connection import redact_url
from engine.process import EngineProcess
from engine.runtime import broker, provision_only
from handlers.gateway.process import gateway_process
from handlers.tools.api_process import ApiProcess
from handlers.tools.audit_cli import shop_database_for
from handlers.tools.load import ShopLoad, describe
from handlers.tools.orders import Plan

EXIT_TERMINATED = 143


async def run_demo(cfg: Config, plan: Plan, log_path: Path, breaker_reset_s: float | None,
                   console: Console | None = None, direct: bool = False) -> int:
    """The whole demo: broker, provision, engine, load, report, stop. SIGTERM stops it like Ctrl-C does."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        # The shop's database (embedded unless JETPOOL_SHOP_DATABASE_URL is set) and the payment gateway
        # (a process of its own unless JETPOOL_SHOP_GATEWAY_URL is set) before the engine, stopped after it.
        async with (broker(cfg) as live, shop_database_for(live),
                    gateway_process(Path(live.source), log_path.with_name("gateway.log"))):
            return await _demo_on(live, plan, log_path, breaker_reset_s, console or Console(), direct)
    except asyncio.CancelledError:
        if not terminated:
            raise  # Ctrl-C: asyncio turns it back into KeyboardInterrupt
        return EXIT_TERMINATED
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def _demo_on(cfg: Config, plan: Plan, log_path: Path, breaker_reset_s: float | None, console: Console,
                   direct: bool) -> int:
    await provision_only(cfg)
    env = {"JETPOOL_HTTP_PORT": os.environ.get("JETPOOL_HTTP_PORT", "0")}
    if breaker_reset_s is not None:
        env["JETPOOL__BREAKERS__PAYMENT_GATEWAY__RESET_TIMEOUT_S"] = str(breaker_reset_s)
    workers = sum(svc.workers for svc in cfg.services.values())
    # Readiness is read from the log's worker.started lines, so the log keeps at least info level.
    level = "debug" if cfg.log.level == "debug" else "info"
    # Tied to this (main) thread: a SIGKILLed demo leaves no engine consuming behind it.
    # Its sidecars are started here: the database and the gateway around the demo, the API below.
    engine = EngineProcess(cfg.source, log_path, env={**os.environ, **env}, nats_url=str(cfg.nats.url),
                           args=["--no-provision", "--no-sidecars", "--log-level", level], tied=True)
    console.print(f"jetpool demo: broker {redact_url(str(cfg.nats.url))}, {len(cfg.services)} services in "
                  f"{workers} worker processes (log: {log_path})")
    breaker = cfg.breakers.get("payment_gateway")
    reset_s = breaker_reset_s if breaker_reset_s is not None else breaker.reset_timeout_s if breaker else None
    if plan.outage is not None and reset_s is not None:
        console.print(f"the payment_gateway breaker waits {reset_s:g}s before each trial after it opens"
                      + ("" if breaker_reset_s is not None else " (--breaker-reset-s changes that)"))
    # Started on this thread (not in an executor's, which may end first): tied, like the engine.
    api = None if direct else ApiProcess(Path(cfg.source), str(cfg.nats.url), log_path.with_name("api.log"),
                                         tied=True).start()
    try:
        engine.start()
        try:
            await engine.wait_workers_async(workers)
            console.print(describe(plan, api.url if api else None))
            code = await ShopLoad(cfg, plan, console, api.url if api else None).run()
        except BaseException:
            engine.kill_tree()  # Ctrl-C or a failure: no drain, just make sure nothing is left behind
            raise
    finally:
        if api is not None:
            api.stop()  # before the engine's drain: no new orders come in while it drains
    exit_code = await asyncio.to_thread(engine.stop)
    if exit_code not in (0, None):
        console.print(f"[yellow]the engine exited with code {exit_code} (see {log_path})[/]")
    return code
