"""Command line: parse arguments, load the config, call the supervisor or a tool; nothing else."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import structlog
import uvloop
from nats.js.errors import NotFoundError

from engine import dlq
from engine.config import Config, load_config
from engine.connection import connect, redact_url
from engine.dispatch import build_router
from engine.embedded import EmbeddedServer
from engine.errors import JetpoolError
from engine.logs import configure_logging
from engine.provision import provision
from engine.supervisor import Supervisor, check_cpus

log = structlog.get_logger("jetpool.cli")


_RUN_EPILOG = """signals:
  SIGTERM, SIGINT  drain: stop pulling, finish in-flight work (drain_timeout_s), release the rest
  a second one     stop at once (exit 130)
  SIGHUP           drain, like a first SIGTERM, however often it comes

exit codes:
  0 clean drain, 1 a worker had to be killed or failed during shutdown, 2 bad input
  (config, routes, connection, CPUs), 3 crash loop, 130 stopped by a second signal"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jetpool", description="Multiprocess worker engine for NATS JetStream.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the services' workers until SIGTERM/SIGINT",
                         description="Provision, then run each service's workers until told to stop.",
                         epilog=_RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    _shop_parsers(sub)
    _chaos_parser(sub)
    return parser


def _shop_parsers(sub: Any) -> None:
    demo = sub.add_parser("demo", help="run the shop end to end on this machine and check its invariants")
    load = sub.add_parser("load", help="place orders on a running shop deployment and check its invariants")
    for p in (demo, load):
        p.add_argument("-c", "--config", default="config/shop.yaml", help="YAML config (default: %(default)s)")
        p.add_argument("--nats-url", help="NATS URL; demo: none starts an embedded nats-server")
        p.add_argument("--orders", type=_positive, default=2000, help="orders to place (default %(default)s)")
        p.add_argument("--rate", type=float, default=150.0,
                       help="orders/s offered, 0 = unthrottled (default %(default)s)")
        p.add_argument("--skus", type=int, default=20,
                       help="products; a tenth get too little stock (default %(default)s)")
        p.add_argument("--seed", type=int, help="random seed of the orders")
        p.add_argument("--stall-s", type=float, default=60.0, help="stop waiting when no order ended for this long")
        p.add_argument("--failure-rate", type=float, metavar="F", help="gateway failure rate during the run (0..1)")
        p.add_argument("--outage", metavar="START:DURATION", help="gateway outage window in seconds, e.g. 3:5")
        p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override log.level")
    demo.add_argument("--log-file", default=".jetpool/demo-engine.log", help="engine output (default %(default)s)")
    demo.add_argument("--breaker-reset-s", type=float, metavar="S",
                      help="override the payment_gateway breaker's reset timeout for the demo")
    audit = sub.add_parser("audit", help="print an order's audit timeline, or rebuild the audit store")
    audit.add_argument("target", metavar="ORDER_ID|rebuild", help="an order id, or 'rebuild' to replay the stream")
    audit.add_argument("-c", "--config", default="config/shop.yaml", help="YAML config (default: %(default)s)")
    audit.add_argument("--nats-url", help="NATS URL for rebuild; none: start an embedded nats-server")
    audit.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override log.level")


def _chaos_parser(sub: Any) -> None:
    chaos = sub.add_parser("chaos", help="inject faults into the shop under load and count what was lost")
    chaos.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                       help="worker-kill, broker-restart, gateway-outage, sigterm-restart, poison, malformed, hang, "
                            "slow-handler, duplicates, oversized (default: all, in that order)")
    chaos.add_argument("-c", "--config", default="config/shop.yaml", help="the shop's YAML (default: %(default)s)")
    chaos.add_argument("--orders", type=_positive, help="orders per scenario (default: full size, e.g. 10000)")
    chaos.add_argument("--rate", type=float,
                       help="valid orders/s offered (default: each scenario's own, 150; malformed 75)")
    chaos.add_argument("--workdir", default=".jetpool/chaos", help="brokers' stores and logs (default %(default)s)")
    chaos.add_argument("--json", action="store_true", help="rows as JSON on stdout")
    chaos.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override log.level")


def _dlq_parser(sub: Any) -> None:
    command = sub.add_parser("dlq", help="inspect, replay or purge the dead-letter stream")
    actions = command.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="list entries, oldest first")
    listing.add_argument("--service", help="only this service's entries")
    listing.add_argument("--limit", type=_positive, default=50, help="at most N entries (default 50)")
    show = actions.add_parser("show", help="show one entry with its body")
    show.add_argument("id", type=int, help="entry id (its DLQ stream sequence)")
    replay = actions.add_parser(
        "replay", help="re-publish entries' originals to their subject and remove them; refuse entries that do "
                       "not check out (exit 1)")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("id", type=int, nargs="?", help="entry id")
    which.add_argument("--service", help="every entry of this service")
    which.add_argument("--all", action="store_true", help="every entry")
    replay.add_argument("--from-entry", action="store_true",
                        help="when an original is gone from its stream, publish the body the entry stored "
                             "(never for an entry whose body was cut short)")
    purge = actions.add_parser("purge", help="delete entries")
    purge.add_argument("--service", help="only this service's entries")
    for action in (listing, show, replay, purge):
        _common(action)
        action.add_argument("--json", action="store_true", help="machine-readable output")


def _positive(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a count of entries or orders)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
    cfg = cfg.model_copy(update=updates) if updates else cfg
    if getattr(args, "command", None) in _LOGGING_COMMANDS:
        # The supervisor and the tools log as the config (log.level, JETPOOL_LOG_LEVEL, log.format) says,
        # like the workers; demo, load, audit and chaos keep their quiet default (they print a report).
        configure_logging(cfg.log.level, cfg.log.format)
    return cfg


_LOGGING_COMMANDS = ("run", "provision", "dlq")


@asynccontextmanager
async def broker(cfg: Config) -> AsyncIterator[Config]:
    """Yield a config whose nats.url is reachable, starting an embedded nats-server if none is set."""
    if cfg.nats.url:
        yield cfg
        return
    server = EmbeddedServer(store_dir=Path(cfg.nats.store_dir), die_with_parent=True)
    server.spawn()  # on the loop's (main) thread, which lives as long as the server should
    try:
        await asyncio.to_thread(server.wait_ready)
        log.info("embedded.started", url=server.url, pid=server.pid, store_dir=str(server.store_dir))
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
    check_cpus(cfg, services)
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
            js = nc.jetstream()
            await _require_dlq_stream(js, live)
            return await dlq_action(args, live, js)
        finally:
            await nc.close()


async def _require_dlq_stream(js: Any, cfg: Config) -> None:
    try:
        await js.stream_info(cfg.dead_letter.stream)
    except NotFoundError:
        raise JetpoolError(f"{cfg.source}: no dead-letter stream {cfg.dead_letter.stream!r} "
                           f"on {redact_url(cfg.nats.url or '')} "
                           f"(run 'jetpool provision -c {cfg.source}' or start the engine once)") from None


async def dlq_action(args: argparse.Namespace, cfg: Config, js: Any) -> int:
    action = args.dlq_command
    if action == "list":
        entries = await dlq.list_entries(js, cfg, args.service, args.limit)
        _print([e.to_json() for e in entries] if args.json else _table(entries), args.json)
    elif action == "show":
        entry = await dlq.get_entry(js, cfg, args.id)
        _print(entry.to_json() if args.json else _details(entry), args.json)
    elif action == "replay":
        return await _replay(args, cfg, js)
    else:
        count = await dlq.purge(js, cfg, args.service)
        _print({"purged": count} if args.json else [f"purged {count} entries"], args.json)
    return 0


async def _replay(args: argparse.Namespace, cfg: Config, js: Any) -> int:
    """Replay the chosen entries: 0, or 1 when any was refused (a line each on stderr, or in the JSON)."""
    if args.id is not None:
        entries = [await dlq.get_entry(js, cfg, args.id)]
    else:
        entries = await dlq.list_entries(js, cfg, args.service, limit=10**9)
    report = await dlq.replay(js, cfg, entries, from_entry=args.from_entry)
    if args.json:
        _print(report.to_json(), True)
    else:
        for refusal in report.refused:
            print(_printable(f"jetpool: dlq replay: entry {refusal.id} refused: {refusal.reason}"), file=sys.stderr)
        print(f"replayed {len(report.replayed)}, refused {len(report.refused)}")
    return 1 if report.refused else 0


def _table(entries: list[dlq.Entry]) -> list[str]:
    if not entries:
        return ["no dead-letter entries"]
    header = f"{'ID':>6}  {'LAST FAILURE':<24}  {'SERVICE':<14} {'ROUTE':<18} {'ATTEMPTS':>8}  ERROR"
    return [header, *(_line(e) for e in entries)]


def _line(e: dlq.Entry) -> str:
    return _printable(f"{e.id:>6}  {e.last_failure:<24}  {e.service:<14} {e.route or '-':<18} "
                      f"{e.attempts:>8}  {e.error_type}: {_clip(e.error, 80)}")


BODY_MAX_CHARS = 4000
BODY_MAX_LINES = 60
BODY_HEX_BYTES = 256


def _details(e: dlq.Entry) -> list[str]:
    """One entry for a person: a field per line, the original headers, then the body."""
    fields = [("id", e.id), ("dlq subject", e.dlq_subject), ("service", e.service), ("route", e.route or "-"),
              ("error type", e.error_type), ("error", e.error), ("attempts", e.attempts), ("subject", e.subject),
              ("stream", e.stream), ("stream seq", "-" if e.stream_seq is None else e.stream_seq),
              ("first failure", e.first_failure), ("last failure", e.last_failure)]
    if e.truncated:
        fields.append(("truncated", f"the entry keeps part of a {e.headers[dlq.TRUNCATED_HEADER]}-byte body"))
    lines = [f"{name + ':':<15}{value}" for name, value in fields]
    headers = e.original_headers()
    lines.append("headers:" + ("" if headers else "       (none)"))
    lines += [f"  {name}: {value}" for name, value in sorted(headers.items())]
    return [_printable(line) for line in lines] + _body(e.body)


def _body(body: bytes) -> list[str]:
    """The body as text (indented when it is JSON) or, when not UTF-8, as hex; a long body is cut short."""
    if not body:
        return ["body:          (empty)"]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        head = body[:BODY_HEX_BYTES]
        lines = [f"body:          {len(body)} bytes, not UTF-8 (hex)"]
        lines += [f"  {head[i:i + 32].hex(' ')}" for i in range(0, len(head), 32)]
        if len(body) > len(head):
            lines.append(f"  ... cut short: {len(head)} of {len(body)} bytes shown")
        return lines
    kind = "text"
    # JSON nested deeper than orjson writes (255) is read but cannot be indented: shown as text.
    with contextlib.suppress(orjson.JSONDecodeError, orjson.JSONEncodeError):
        text = orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode()
        kind = "JSON"
    kept = text[:BODY_MAX_CHARS].splitlines()[:BODY_MAX_LINES]
    lines = [f"body:          {len(body)} bytes, {kind}", *(_printable(f"  {line}") for line in kept)]
    if len(text) > BODY_MAX_CHARS or len(text.splitlines()) > BODY_MAX_LINES:
        shown = len("\n".join(kept))
        lines.append(f"  ... cut short: {shown} of {len(text)} characters shown (--json prints the whole body)")
    return lines


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _printable(text: str) -> str:
    """Escape control characters, so a stored body or error cannot drive the operator's terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _print(value: Any, as_json: bool) -> None:
    if as_json:
        print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())
    else:
        for line in value:
            print(line)


def _plan(args: argparse.Namespace) -> Any:
    from engine import demo

    outage = demo.parse_outage(args.outage) if args.outage else None
    return demo.Plan(orders=args.orders, rate=args.rate, skus=args.skus, failure_rate=args.failure_rate,
                     outage=outage, stall_s=args.stall_s, seed=args.seed)


async def cmd_demo(args: argparse.Namespace) -> int:
    from engine import demo

    return await demo.run_demo(load(args), _plan(args), Path(args.log_file), args.breaker_reset_s)


async def cmd_load(args: argparse.Namespace) -> int:
    from engine import demo

    cfg = load(args)
    if not cfg.nats.url:
        raise JetpoolError("load drives a running deployment: give --nats-url (or nats.url / JETPOOL_NATS_URL)")
    return await demo.run_load(cfg, _plan(args))


async def cmd_audit(args: argparse.Namespace) -> int:
    from engine import shop_cli

    if args.target != "rebuild":
        return await shop_cli.show_timeline(load_config(args.config), args.target)
    async with broker(load(args)) as live:
        return await shop_cli.rebuild(live)


async def cmd_chaos(args: argparse.Namespace) -> int:
    from engine import chaos

    rows = await chaos.run_chaos(args.scenarios, base_config=Path(args.config), workdir=Path(args.workdir),
                                 orders=args.orders, rate=args.rate)
    return chaos.report(rows, args.json)


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
        quiet = args.command in ("demo", "load", "audit", "chaos")  # their output is a report, not a log
        cfg_level = getattr(args, "log_level", None) or ("warning" if quiet else "info")
        configure_logging(cfg_level)
        commands = {"run": cmd_run, "provision": cmd_provision, "dlq": cmd_dlq, "demo": cmd_demo, "load": cmd_load,
                    "audit": cmd_audit, "chaos": cmd_chaos}
        return uvloop.run(commands[args.command](args))
    except (JetpoolError, LookupError) as exc:
        print(f"jetpool: error: {redact_url(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # demo, load, audit: Ctrl-C after their cleanup ran
        return 130


if __name__ == "__main__":
    sys.exit(main())
