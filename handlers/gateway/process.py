"""The gateway as a child process (``python -m handlers.gateway``) of a tool or a test, stopped by its PID.

The demo, the chaos shop and the tests run the gateway apart from the engine, as a deployment does: it
outlives worker kills and engine restarts, and its faults are changed over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Mapping, MutableMapping
from pathlib import Path

from handlers.database import DATABASE_URL_ENV, database_url
from handlers.gateway.client import GATEWAY_URL_ENV
from handlers.service_process import ServiceProcess


class GatewayProcess(ServiceProcess):
    """One ``python -m handlers.gateway`` on 127.0.0.1 at a free port.

    Args:
        dsn: the ledger's database.
        config: the YAML whose payments ``settings.gateway`` gives the starting faults (None: the shop's).
        log_path: the process's output (None: discarded).
        env: its environment (default: this process's), the DSN added.
        tied: SIGTERM it when the thread that started it ends (see :mod:`engine.lifeline`).
    """

    def __init__(self, dsn: str, config: Path | None = None, log_path: Path | None = None, *,
                 env: Mapping[str, str] | None = None, tied: bool = False) -> None:
        super().__init__("the payment gateway", log_path, {**(os.environ if env is None else env),
                                                           DATABASE_URL_ENV: dsn}, tied)
        self.dsn = dsn
        self.config = config

    def command(self, port: int) -> list[str]:
        args = [sys.executable, "-m", "handlers.gateway", "--port", str(port), "--log-level", "info"]
        return args + (["-c", str(self.config)] if self.config is not None else [])


@contextlib.asynccontextmanager
async def gateway_process(config: Path, log_path: Path,
                          env: MutableMapping[str, str] | None = None) -> AsyncIterator[str | None]:
    """A gateway process for a local run (the demo) unless ``JETPOOL_SHOP_GATEWAY_URL`` is set; its URL
    exported there while the block runs (the engine started inside inherits it and starts none itself).

    Needs the shop's database (``JETPOOL_SHOP_DATABASE_URL``, or the running embedded server).
    """
    env = os.environ if env is None else env
    if env.get(GATEWAY_URL_ENV):
        yield env[GATEWAY_URL_ENV]
        return
    gateway = GatewayProcess(database_url(env), config, log_path, env=env, tied=True)
    await asyncio.to_thread(gateway.start)  # tied to the loop's (main) thread, which outlives the run
    env[GATEWAY_URL_ENV] = gateway.url
    try:
        yield gateway.url
    finally:
        env.pop(GATEWAY_URL_ENV, None)
        await asyncio.to_thread(gateway.stop)
