"""Command line: parse arguments, load the config, call the supervisor or a tool; nothing else.

The engine's own commands are ``run``, ``provision``, ``check`` and ``dlq``. An app adds its own
commands without this module importing it: each is an entry point of the group ``jetpool.commands``
in the app's ``pyproject.toml``::

    [project.entry-points."jetpool.commands"]
    report = "myapp.commands:report"

The entry point names an object (or a class, called without arguments) with:

- ``name: str`` — the command's word (``jetpool report``); it may not shadow one of the engine's;
- ``help: str`` — its one line in ``jetpool --help``;
- ``add_arguments(parser: argparse.ArgumentParser) -> None`` — adds its options to its subparser;
- ``async run(args: argparse.Namespace) -> int`` — does the work on a uvloop event loop and returns
  the exit code.

The CLI treats an app's command like its own: :class:`~engine.errors.JetpoolError` (and
``LookupError``) raised from ``run`` print ``jetpool: error: ...`` and exit 2, Ctrl-C exits 130, and
logging is configured at ``args.log_level`` when the command defines that option, else ``warning``
(an app's command usually prints its own report). :mod:`engine.runtime` holds what such a command
needs from the engine: an embedded broker when no URL is set, provisioning, the config overrides.
A command that fails to load is reported on stderr and left out; the engine's commands still work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

import orjson
import structlog
import uvloop
from nats.js.errors import NotFoundError

from engine import dlq
from engine.config import Config, load_config
from engine.connection import connect, redact_url
from engine.dispatch import build_router
from engine.errors import JetpoolError
from engine.logs import configure_logging
from engine.metrics import prepare_multiprocess_dir
from engine.runtime import broker, positive_int, provision_only, resolve_sidecars, sidecars, with_overrides
from engine.supervisor import Supervisor, check_cpus

COMMANDS_GROUP = "jetpool.commands"
log = structlog.get_logger("jetpool.cli")


@runtime_checkable
class Command(Protocol):
    """A command an app adds to ``jetpool`` through the ``jetpool.commands`` entry-point group."""

    name: str
    help: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the command's options and arguments to its subparser."""

    async def run(self, args: argparse.Namespace) -> int:
        """Run the command; return its exit code."""


_RUN_EPILOG = """signals:
  SIGTERM, SIGINT  drain: stop pulling, finish in-flight work (drain_timeout_s), release the rest
  a second one     stop at once (exit 130)
  SIGHUP           drain, like a first SIGTERM, however often it comes

exit codes:
  0 clean drain, 1 a worker had to be killed or failed during shutdown, 2 bad input
  (config, routes, connection, CPUs), 3 crash loop, 130 stopped by a second signal"""


def build_parser(commands: Sequence[Command] = ()) -> argparse.ArgumentParser:
    """The engine's commands, then ``commands`` (an app's, see the module docstring)."""
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
    run.add_argument("--no-sidecars", action="store_true",
                     help="do not start the config's sidecars (in Kubernetes each is its own Deployment)")
    run.add_argument("--http-port", type=int, metavar="N",
                     help="port of /health, /ready and /metrics (default 8080, 0 = any free port)")

    prov = sub.add_parser("provision", help="create or update streams and durable consumers (idempotent)")
    _common(prov)

    check = sub.add_parser("check", help="validate the config and import every route's handler")
    check.add_argument("-c", "--config", required=True, help="YAML config file")
    _dlq_parser(sub)
    for command in commands:
        command.add_arguments(sub.add_parser(command.name, help=command.help, description=command.help))
    return parser


ENGINE_COMMANDS = ("run", "provision", "check", "dlq")


def app_commands() -> list[Command]:
    """The commands installed apps declare in the ``jetpool.commands`` entry-point group, by name.

    One that cannot be loaded, is not a command, or takes an engine command's name is reported on
    stderr and left out.
    """
    found: dict[str, Command] = {}
    for point in sorted(entry_points(group=COMMANDS_GROUP), key=lambda p: p.name):
        try:
            loaded = point.load()
            command = loaded() if isinstance(loaded, type) else loaded
        except Exception as exc:  # a broken app must not take the engine's own commands down
            _warn(f"command {point.name!r} ({point.value}) could not be loaded: {type(exc).__name__}: {exc}")
            continue
        if not isinstance(command, Command):
            _warn(f"command {point.name!r} ({point.value}) lacks name, help, add_arguments or run")
        elif command.name in ENGINE_COMMANDS or command.name in found:
            _warn(f"command {point.name!r} ({point.value}): the name {command.name!r} is taken")
        else:
            found[command.name] = command
    return list(found.values())


def _warn(text: str) -> None:
    print(f"jetpool: warning: {text}", file=sys.stderr)


def _dlq_parser(sub: Any) -> None:
    command = sub.add_parser("dlq", help="inspect, replay or purge the dead-letter stream")
    actions = command.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="list entries, oldest first")
    listing.add_argument("--service", help="only this service's entries")
    listing.add_argument("--limit", type=positive_int, default=50, help="at most N entries (default 50)")
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


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    p.add_argument("--nats-url", help="NATS URL (overrides JETPOOL_NATS_URL and nats.url); "
                                      "none: start an embedded nats-server")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override log.level")


def load(args: argparse.Namespace) -> Config:
    """The config of ``-c``, with the command line's overrides applied."""
    cfg = with_overrides(load_config(args.config), nats_url=getattr(args, "nats_url", None),
                         log_level=getattr(args, "log_level", None), http_port=getattr(args, "http_port", None))
    if getattr(args, "command", None) in _LOGGING_COMMANDS:
        # The supervisor and the dlq tool log as the config (log.level, JETPOOL_LOG_LEVEL, log.format)
        # says, like the workers.
        configure_logging(cfg.log.level, cfg.log.format)
    return cfg


_LOGGING_COMMANDS = ("run", "provision", "dlq")


async def cmd_run(args: argparse.Namespace) -> int:
    # From the first line SIGTERM/SIGINT stop the run: as a container's PID 1 a signal without a handler
    # is ignored, and a pod deleted while this connects or provisions would wait out its grace period.
    # The supervisor installs its own handlers (drain) once the workers start.
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    try:
        return await _run(args)
    except asyncio.CancelledError:
        log.info("run.stopped", before="the workers started")
        return 0


async def _run(args: argparse.Namespace) -> int:
    cfg = load(args)
    services = args.service or list(cfg.services)
    unknown = [s for s in services if s not in cfg.services]
    if unknown:
        raise JetpoolError(f"{cfg.source}: no service named {', '.join(unknown)} "
                           f"(services: {', '.join(cfg.services)})")
    for service in services:
        build_router(cfg, service)  # fail on a bad route before any process starts
    check_cpus(cfg, services)
    # Before the first connection: connecting already writes a metric (engine.transport's fast path),
    # into this directory when the operator chose one; the supervisor empties it again before workers start.
    prepare_multiprocess_dir()
    hooks = [] if args.no_sidecars else resolve_sidecars(cfg)
    async with broker(cfg) as live, sidecars(live, hooks):
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


def cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    for service in cfg.services:
        build_router(cfg, service)
    print(f"{cfg.source}: ok ({len(cfg.services)} services, {len(cfg.streams)} streams)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    commands = app_commands()
    args = build_parser(commands).parse_args(argv)
    app = {c.name: c for c in commands}.get(args.command)
    if args.command == "run":
        # Until the event loop takes over (cmd_run), a SIGTERM ends the process at once: nothing runs yet.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if args.command == "check":
            return cmd_check(args)
        # An app's command prints a report of its own: its log stays quiet unless asked.
        configure_logging(getattr(args, "log_level", None) or ("warning" if app else "info"))
        if app is not None:
            return uvloop.run(app.run(args))
        engine_commands = {"run": cmd_run, "provision": cmd_provision, "dlq": cmd_dlq}
        return uvloop.run(engine_commands[args.command](args))
    except (JetpoolError, LookupError) as exc:
        print(f"jetpool: error: {redact_url(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # an app's command, after its cleanup ran
        return 130


if __name__ == "__main__":
    sys.exit(main())
