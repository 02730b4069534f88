"""Command line: parse arguments, load the config, call the supervisor or a tool; nothing else."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import structlog
import uvloop

from engine.config import Config, load_config
from engine.connection import connect
from engine.dispatch import build_router
from engine.embedded import EmbeddedServer
from engine.errors import JetpoolError
from engine.logs import configure_logging
from engine.provision import provision
from engine.supervisor import Supervisor

log = structlog.get_logger("jetpool.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jetpool", description="Multiprocess worker engine for NATS JetStream.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the services' workers until SIGTERM/SIGINT")
    _common(run)
    run.add_argument("--service", action="append", default=[], metavar="NAME",
                     help="run only this service (repeatable); default: all services")
    run.add_argument("--no-provision", action="store_true",
                     help="do not create/update streams and consumers before starting")

    prov = sub.add_parser("provision", help="create or update streams and durable consumers (idempotent)")
    _common(prov)

    check = sub.add_parser("check", help="validate the config and import every route's handler")
    check.add_argument("-c", "--config", required=True, help="YAML config file")
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    p.add_argument("--nats-url", help="NATS URL (overrides JETPOOL_NATS_URL and nats.url); "
                                      "none: start an embedded nats-server")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override log.level")


def load(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config)
    updates: dict[str, object] = {}
    if getattr(args, "nats_url", None):
        updates["nats"] = cfg.nats.model_copy(update={"url": args.nats_url})
    if getattr(args, "log_level", None):
        updates["log"] = cfg.log.model_copy(update={"level": args.log_level})
    return cfg.model_copy(update=updates) if updates else cfg


@asynccontextmanager
async def broker(cfg: Config) -> AsyncIterator[Config]:
    """Yield a config whose nats.url is reachable, starting an embedded nats-server if none is set."""
    if cfg.nats.url:
        yield cfg
        return
    server = EmbeddedServer(store_dir=Path(cfg.nats.store_dir))
    await asyncio.to_thread(server.start)
    log.info("embedded.started", url=server.url, pid=server.pid, store_dir=str(server.store_dir))
    try:
        yield cfg.model_copy(update={"nats": cfg.nats.model_copy(update={"url": server.url})})
    finally:
        await asyncio.to_thread(server.stop)
        log.info("embedded.stopped", pid=server.pid)


async def provision_only(cfg: Config, services: Sequence[str] | None = None) -> None:
    nc = await connect(cfg.nats, name=f"{cfg.app}.provision")
    try:
        await provision(nc.jetstream(), cfg, services)
    finally:
        await nc.close()


async def cmd_run(args: argparse.Namespace) -> int:
    cfg = load(args)
    services = args.service or list(cfg.services)
    unknown = [s for s in services if s not in cfg.services]
    if unknown:
        raise JetpoolError(f"{cfg.source}: no service named {', '.join(unknown)} "
                           f"(services: {', '.join(cfg.services)})")
    for service in services:
        build_router(cfg, service)  # fail on a bad route before any process starts
    async with broker(cfg) as live:
        if not args.no_provision:
            await provision_only(live, services)
        return await Supervisor(live, services).run()


async def cmd_provision(args: argparse.Namespace) -> int:
    async with broker(load(args)) as live:
        await provision_only(live)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    for service in cfg.services:
        build_router(cfg, service)
    print(f"{cfg.source}: ok ({len(cfg.services)} services, {len(cfg.streams)} streams)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check":
            return cmd_check(args)
        cfg_level = "info" if not getattr(args, "log_level", None) else args.log_level
        configure_logging(cfg_level)
        command = cmd_run if args.command == "run" else cmd_provision
        return uvloop.run(command(args))
    except JetpoolError as exc:
        print(f"jetpool: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
