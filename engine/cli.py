"""Command line: parse arguments, load the config, call the supervisor or a tool; nothing else."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import structlog
import uvloop

from engine import deadletter
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
    run.add_argument("--http-port", type=int, metavar="N",
                     help="port of /health, /ready and /metrics (default 8080, 0 = any free port)")

    prov = sub.add_parser("provision", help="create or update streams and durable consumers (idempotent)")
    _common(prov)

    check = sub.add_parser("check", help="validate the config and import every route's handler")
    check.add_argument("-c", "--config", required=True, help="YAML config file")
    _dlq_parser(sub)
    return parser


def _dlq_parser(sub: Any) -> None:
    dlq = sub.add_parser("dlq", help="inspect, replay or purge the dead-letter stream")
    actions = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="list entries, oldest first")
    listing.add_argument("--service", help="only this service's entries")
    listing.add_argument("--limit", type=int, default=50, help="at most N entries (default 50)")
    show = actions.add_parser("show", help="show one entry with its body")
    show.add_argument("id", type=int, help="entry id (its DLQ stream sequence)")
    replay = actions.add_parser("replay", help="re-publish entries to their original subject and remove them")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("id", type=int, nargs="?", help="entry id")
    which.add_argument("--service", help="every entry of this service")
    which.add_argument("--all", action="store_true", help="every entry")
    purge = actions.add_parser("purge", help="delete entries")
    purge.add_argument("--service", help="only this service's entries")
    for action in (listing, show, replay, purge):
        _common(action)
        action.add_argument("--json", action="store_true", help="machine-readable output")


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
    if getattr(args, "http_port", None) is not None:
        updates["http"] = cfg.http.model_copy(update={"port": args.http_port})
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


async def cmd_dlq(args: argparse.Namespace) -> int:
    async with broker(load(args)) as live:
        nc = await connect(live.nats, name=f"{live.app}.dlq")
        try:
            return await dlq_action(args, live, nc.jetstream())
        finally:
            await nc.close()


async def dlq_action(args: argparse.Namespace, cfg: Config, js: Any) -> int:
    action = args.dlq_command
    if action == "list":
        entries = await deadletter.list_entries(js, cfg, args.service, args.limit)
        _print([e.to_json() for e in entries] if args.json else [_line(e) for e in entries], args.json)
    elif action == "show":
        entry = await deadletter.get_entry(js, cfg, args.id)
        _print(entry.to_json(), True)
    elif action == "replay":
        if args.id is not None:
            entries = [await deadletter.get_entry(js, cfg, args.id)]
        else:
            entries = await deadletter.list_entries(js, cfg, args.service, limit=10**9)
        count = await deadletter.replay(js, cfg, entries)
        _print({"replayed": count} if args.json else [f"replayed {count} entries"], args.json)
    else:
        count = await deadletter.purge(js, cfg, args.service)
        _print({"purged": count} if args.json else [f"purged {count} entries"], args.json)
    return 0


def _line(e: deadletter.Entry) -> str:
    return (f"{e.id:>6}  {e.last_failure}  {e.service:<14} {e.route or '-':<18} attempts={e.attempts}  "
            f"{e.error_type}: {e.error[:80]}")


def _print(value: Any, as_json: bool) -> None:
    if as_json:
        print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())
    else:
        for line in value:
            print(line)


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
        commands = {"run": cmd_run, "provision": cmd_provision, "dlq": cmd_dlq}
        return uvloop.run(commands[args.command](args))
    except (JetpoolError, LookupError) as exc:
        print(f"jetpool: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
