"""What the CLI's commands and an app's own commands share: a reachable broker, provisioning, overrides.

An app's commands (the ``jetpool.commands`` entry points, see :mod:`engine.cli`) build on these, not on
the CLI module, which only parses arguments and dispatches.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import structlog

from engine.config import Config
from engine.connection import connect
from engine.dispatch import import_target
from engine.embedded import EmbeddedServer
from engine.provision import provision

log = structlog.get_logger("jetpool.runtime")


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a count of entries or orders)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def with_overrides(cfg: Config, *, nats_url: str | None = None, log_level: str | None = None,
                   http_port: int | None = None) -> Config:
    """``cfg`` with the command line's overrides applied (``None``: keep the config's value)."""
    updates: dict[str, object] = {}
    if nats_url:
        updates["nats"] = cfg.nats.model_copy(update={"url": nats_url})
    if log_level:
        updates["log"] = cfg.log.model_copy(update={"level": log_level})
    if http_port is not None:
        updates["http"] = cfg.http.model_copy(update={"port": http_port})
    return cfg.model_copy(update=updates) if updates else cfg


@asynccontextmanager
async def broker(cfg: Config) -> AsyncIterator[Config]:
    """Yield a config whose nats.url is reachable, starting an embedded nats-server if none is set."""
    if cfg.nats.url:
        yield cfg
        return
    server = EmbeddedServer(store_dir=Path(cfg.nats.store_dir), die_with_parent=True,
                            go_max_procs=cfg.nats.embedded_go_max_procs)
    try:
        await server.start_here()  # spawned on the loop's (main) thread, which lives as long as the server should
        log.info("embedded.started", url=server.url, pid=server.pid, store_dir=str(server.store_dir))
        yield cfg.model_copy(update={"nats": cfg.nats.model_copy(update={"url": server.url})})
    finally:
        await asyncio.to_thread(server.stop)
        log.info("embedded.stopped", pid=server.pid)


async def provision_only(cfg: Config, services: Sequence[str] | None = None) -> None:
    """Create or update the streams, consumers and buckets of ``services`` (default: all), then disconnect."""
    nc = await connect(cfg.nats, name=f"{cfg.app}.provision")
    try:
        await provision(nc.jetstream(), cfg, services)
    finally:
        await nc.close()


Sidecar = Callable[[Config], AbstractAsyncContextManager[Any]]


def resolve_sidecars(cfg: Config) -> list[Sidecar]:
    """The config's ``sidecars``, imported (a bad one is a ConfigError naming its key path)."""
    return [import_target(target, f"{cfg.source}: sidecars[{i}]") for i, target in enumerate(cfg.sidecars)]


@asynccontextmanager
async def sidecars(cfg: Config, hooks: Sequence[Sidecar]) -> AsyncIterator[None]:
    """Enter each sidecar in order (given the config with a reachable broker), exit them in reverse.

    A sidecar may export settings to the workers through ``os.environ`` (they inherit it), e.g. the
    address of the database it started.
    """
    async with AsyncExitStack() as stack:
        for hook in hooks:
            await stack.enter_async_context(hook(cfg))
        yield
