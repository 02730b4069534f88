"""The shop's commands of ``jetpool``: ``demo``, ``load``, ``chaos`` and ``audit``.

They reach the CLI as entry points of the ``jetpool.commands`` group (``pyproject.toml``), each an
object with ``name``, ``help``, ``add_arguments(parser)`` and ``async run(args) -> int`` (the
interface :mod:`engine.cli` describes). Each defaults to the shop's YAML installed with the package
(:data:`handlers.SHOP_YAML`), so ``jetpool demo`` works from any directory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from engine.config import Config, load_config
from engine.errors import JetpoolError
from engine.runtime import broker, positive_int, with_overrides
from handlers import SHOP_YAML
from handlers.tools.orders import Plan, parse_outage

LOG_LEVELS = ["debug", "info", "warning", "error"]
# handlers.api.URL_ENV, which the API's sidecar exports (not imported: this module loads with every jetpool
# command, the API's server with it would be a cost for all of them).
API_URL_ENV = "JETPOOL_SHOP_API_URL"


@contextlib.contextmanager
def _tools() -> Iterator[None]:
    """Around the import of a tool: every ``jetpool`` run loads this module (a pod's too, which installs
    neither rich nor psutil), so the tools themselves are imported only when their command runs."""
    try:
        yield
    except ModuleNotFoundError as exc:
        raise JetpoolError(f"{exc}: the shop's commands need the 'shop' extra (pip install 'jetpool[shop]')") from None


def _config(parser: argparse.ArgumentParser, nats_help: str) -> None:
    parser.add_argument("-c", "--config", default=str(SHOP_YAML),
                        help="YAML config (default: the shop's, installed with the package)")
    parser.add_argument("--nats-url", help=nats_help)
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="override log.level")


def _load(args: argparse.Namespace) -> Config:
    return with_overrides(load_config(args.config), nats_url=args.nats_url, log_level=args.log_level)


def _plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--orders", type=positive_int, default=2000, help="orders to place (default %(default)s)")
    parser.add_argument("--rate", type=float, default=150.0,
                        help="orders/s offered, 0 = unthrottled (default %(default)s)")
    parser.add_argument("--skus", type=int, default=20,
                        help="products; a tenth get too little stock (default %(default)s)")
    parser.add_argument("--seed", type=int, help="random seed of the orders")
    parser.add_argument("--stall-s", type=float, default=60.0, help="stop waiting when no order ended for this long")
    parser.add_argument("--failure-rate", type=float, metavar="F", help="gateway failure rate during the run (0..1)")
    parser.add_argument("--outage", metavar="START:DURATION", help="gateway outage window in seconds, e.g. 3:5")
    parser.add_argument("--concurrency", type=positive_int, default=64,
                        help="POST /orders requests in flight at most (default %(default)s)")
    parser.add_argument("--direct", action="store_true",
                        help="publish OrderPlaced straight to the stream instead of POSTing to the order API "
                             "(the event path alone, for benchmarks)")


def _plan(args: argparse.Namespace) -> Plan:
    outage = parse_outage(args.outage) if args.outage else None
    return Plan(orders=args.orders, rate=args.rate, skus=args.skus, failure_rate=args.failure_rate,
                outage=outage, stall_s=args.stall_s, seed=args.seed, concurrency=args.concurrency)


class Demo:
    """``jetpool demo``: the whole shop on this machine, under load, and its invariants."""

    name = "demo"
    help = "run the shop end to end on this machine and check its invariants"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _config(parser, "NATS URL; none: start an embedded nats-server")
        _plan_arguments(parser)
        parser.add_argument("--log-file", default=".jetpool/demo-engine.log",
                            help="engine output (default %(default)s)")
        parser.add_argument("--breaker-reset-s", type=float, metavar="S",
                            help="override the payment_gateway breaker's reset timeout for the demo")

    async def run(self, args: argparse.Namespace) -> int:
        with _tools():
            from handlers.tools.demo import run_demo
        return await run_demo(_load(args), _plan(args), Path(args.log_file), args.breaker_reset_s,
                              direct=args.direct)


class Load:
    """``jetpool load``: orders placed on a running deployment, and its invariants."""

    name = "load"
    help = "place orders on a running shop deployment and check its invariants"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _config(parser, "NATS URL of the deployment (or nats.url / JETPOOL_NATS_URL)")
        _plan_arguments(parser)
        parser.add_argument("--api-url", default=os.environ.get(API_URL_ENV),
                            help=f"the deployment's order API, e.g. http://127.0.0.1:8000 (default: ${API_URL_ENV})")

    async def run(self, args: argparse.Namespace) -> int:
        with _tools():
            from handlers.tools.load import run_load
        cfg = _load(args)
        if not cfg.nats.url:
            raise JetpoolError("load drives a running deployment: give --nats-url (or nats.url / JETPOOL_NATS_URL)")
        if not args.api_url and not args.direct:
            raise JetpoolError(f"load places orders through the order API: give --api-url (or {API_URL_ENV}), "
                               "or --direct to publish them straight to the stream")
        return await run_load(cfg, _plan(args), None if args.direct else args.api_url.rstrip("/"))


class Audit:
    """``jetpool audit``: an order's timeline, or the audit store rebuilt from the stream."""

    name = "audit"
    help = "print an order's audit timeline, or rebuild the audit store"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("target", metavar="ORDER_ID|rebuild", help="an order id, or 'rebuild' to replay the stream")
        _config(parser, "NATS URL for rebuild; none: start an embedded nats-server")

    async def run(self, args: argparse.Namespace) -> int:
        with _tools():
            from handlers.tools import audit_cli
        if args.target != "rebuild":
            return await audit_cli.show_timeline(load_config(args.config), args.target)
        async with broker(_load(args)) as live:
            return await audit_cli.rebuild(live)


class Chaos:
    """``jetpool chaos``: faults injected into the shop under load, a row of numbers each."""

    name = "chaos"
    help = "inject faults into the shop under load and count what was lost"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                            help="worker-kill, broker-restart, gateway-outage, sigterm-restart, poison, malformed, "
                                 "hang, slow-handler, duplicates, oversized (default: all, in that order)")
        parser.add_argument("-c", "--config", default=str(SHOP_YAML),
                            help="the shop's YAML (default: the one installed with the package)")
        parser.add_argument("--orders", type=positive_int, help="orders per scenario (default: full size, e.g. 10000)")
        parser.add_argument("--rate", type=float,
                            help="valid orders/s offered (default: each scenario's own, 150; malformed 75)")
        parser.add_argument("--workdir", default=".jetpool/chaos",
                            help="brokers' stores and logs (default %(default)s)")
        parser.add_argument("--json", action="store_true", help="rows as JSON on stdout")
        parser.add_argument("--log-level", choices=LOG_LEVELS, help="override log.level")

    async def run(self, args: argparse.Namespace) -> int:
        with _tools():
            from handlers.tools.chaos.run import report, run_chaos
        rows = await run_chaos(args.scenarios, base_config=Path(args.config), workdir=Path(args.workdir),
                               orders=args.orders, rate=args.rate)
        return report(rows, args.json)


demo = Demo()
load = Load()
audit = Audit()
chaos = Chaos()
