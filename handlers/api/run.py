"""How the order API runs: ``jetpool api`` (its own process, a Deployment in Kubernetes), or the sidecar
``handlers.api:sidecar`` that ``jetpool run`` starts around the shop's workers on this machine."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Mapping, MutableMapping
from pathlib import Path

import structlog

from engine.config import Config, load_config
from engine.connection import redact_url
from engine.errors import ConfigError, JetpoolError
from engine.runtime import with_overrides
from handlers import SHOP_YAML
from handlers.api.server import running
from handlers.api.service import OrderDesk

log = structlog.get_logger("jetpool.shop.api")

DEFAULT_PORT = 8000
PORT_ENV = "JETPOOL_SHOP_API_PORT"
URL_ENV = "JETPOOL_SHOP_API_URL"


@contextlib.asynccontextmanager
async def serve(cfg: Config, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> AsyncIterator[str]:
    """The API on ``host:port`` (0: any free port) over the broker of ``cfg`` (its nats.url); yield its URL."""
    if not cfg.nats.url:
        raise JetpoolError("the order API needs a NATS URL: --nats-url, nats.url or JETPOOL_NATS_URL "
                           "(locally, `jetpool run` starts it next to an embedded broker)")
    async with OrderDesk.open(cfg) as desk, running(desk, host, port) as url:
        log.info("api.started", url=url, nats=redact_url(cfg.nats.url), pid=os.getpid())
        yield url
    log.info("api.stopped")


def sidecar_port(env: Mapping[str, str]) -> int:
    """The sidecar's port: ``JETPOOL_SHOP_API_PORT`` (0: any free port), default 8000."""
    text = env.get(PORT_ENV, "").strip()
    if not text:
        return DEFAULT_PORT
    if not text.isdigit() or int(text) > 65535:
        raise ConfigError(f"environment variable {PORT_ENV}: expected a port 0-65535, got {text!r}")
    return int(text)


@contextlib.asynccontextmanager
async def sidecar(config: Config, env: MutableMapping[str, str] | None = None) -> AsyncIterator[None]:
    """``jetpool run``'s sidecar (``handlers.api:sidecar`` in the config's ``sidecars``): the API on
    127.0.0.1:``JETPOOL_SHOP_API_PORT`` (8000; 0 picks a free port), its URL in ``JETPOOL_SHOP_API_URL``
    while the engine runs. It answers 503 until ``jetpool run`` has provisioned the buckets."""
    env = os.environ if env is None else env
    async with serve(config, "127.0.0.1", sidecar_port(env)) as url:
        env[URL_ENV] = url
        try:
            yield
        finally:
            env.pop(URL_ENV, None)


class ApiCommand:
    """``jetpool api``: the HTTP order API as its own service."""

    name = "api"
    help = "run the shop's HTTP order API (POST /orders, GET /orders/{id})"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
        parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default %(default)s; 0: any)")
        parser.add_argument("-c", "--config", default=str(SHOP_YAML),
                            help="YAML config (default: the shop's, installed with the package)")
        parser.add_argument("--nats-url", help="NATS URL of the shop (or nats.url / JETPOOL_NATS_URL)")
        parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")

    async def run(self, args: argparse.Namespace) -> int:
        cfg = with_overrides(load_config(Path(args.config)), nats_url=args.nats_url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        async with serve(cfg, args.host, args.port):
            await stop.wait()
        return 0


command = ApiCommand()
