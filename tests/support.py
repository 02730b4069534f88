"""Helpers shared by the engine's and the shop's tests: configs, a NATS test client, engine processes,
dead letters, and the HTTP endpoint's metrics.

Everything here talks to 127.0.0.1 only. Tests are plain synchronous pytest functions; each NATS
helper opens its own short-lived connection inside ``asyncio.run`` so no event loop outlives a call.
Engine processes are :class:`engine.process.EngineProcess` trees (``python -m engine run`` in their
own session), stopped by PID, never by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.js.errors
import psutil
import pytest
import yaml
from nats.js import api
from prometheus_client.parser import text_string_to_metric_families

from engine.config import load_config
from engine.dlq import Entry, list_entries
from engine.events import MSG_ID_HEADER, Event, derived_id
from engine.process import EngineProcess

REPO_ROOT = Path(__file__).resolve().parent.parent
HANDLERS = "tests.engine.handlers_fixture"  # route targets: f"{HANDLERS}:slow_echo"
FAILING = "tests.engine.failure_handlers"  # handlers that fail on purpose: f"{FAILING}:poison_aware"

T = TypeVar("T")


# ---- polling ---------------------------------------------------------------------------------------


def wait_for(condition: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.1,
             detail: Callable[[], str] | None = None) -> T:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` (and ``detail()``) on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            extra = f"\n{detail()}" if detail else ""
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}{extra}")
        time.sleep(interval_s)


# ---- configs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class App:
    """A config written for one test: unique stream name and subject prefix, so tests never share data."""

    path: Path
    url: str
    stream: str
    prefix: str
    raw: dict[str, Any]

    def subject(self, event_type: str) -> str:
        return f"{self.prefix}.{event_type}"

    def durable(self, service: str) -> str:
        return str(self.raw["services"][service].get("durable") or service)


DEFAULT_SERVICE: dict[str, Any] = {
    "routes": {"Ping": "handlers.examples:echo"},
    "workers": 1,
    "batch": 32,
    "max_in_flight": 64,
    "ack_wait_s": 10,
    "max_deliver": 5,
    "drain_timeout_s": 10,
    "idle_heartbeat_s": 1,
    "pull_expires_s": 5,
}


def write_config(directory: Path, url: str, services: dict[str, dict[str, Any]] | None = None, *,
                 stream: dict[str, Any] | None = None, supervisor: dict[str, Any] | None = None,
                 nats_options: dict[str, Any] | None = None, name: str = "jetpool.yaml",
                 same_names_as: App | None = None) -> App:
    """Write a config YAML into ``directory`` and return what a test needs to know about it.

    Args:
        directory: where the file goes (the test's tmp_path).
        url: the broker, written as ``nats.url``.
        services: service name -> keys overriding :data:`DEFAULT_SERVICE` (default: one ``echo``).
        stream: keys overriding the stream entry (its name and subjects are unique per call).
        supervisor: the ``supervisor`` section.
        nats_options: more keys for the ``nats`` section.
        name: the file name.
        same_names_as: reuse that config's stream name and subject prefix (to reconfigure its services).
    """
    uid = uuid.uuid4().hex[:10]
    prefix, stream_name = f"t{uid}", f"T{uid.upper()}"
    if same_names_as is not None:
        prefix, stream_name = same_names_as.prefix, same_names_as.stream
    raw: dict[str, Any] = {
        "app": f"test-{uid}",
        "subject_prefix": prefix,
        "nats": {"url": url, "reconnect_wait_s": 0.25, "publish_timeout_s": 5, **(nats_options or {})},
        "streams": [{"name": stream_name, "subjects": [f"{prefix}.>"], "storage": "file", **(stream or {})}],
        "services": {svc: {"stream": stream_name, **DEFAULT_SERVICE, **keys}
                     for svc, keys in (services or {"echo": {}}).items()},
        "log": {"level": "info", "format": "json"},
        # Probes on loopback and a free port: engines of several tests may run at the same time.
        "http": {"host": "127.0.0.1", "port": 0},
    }
    if supervisor:
        raw["supervisor"] = supervisor
    path = directory / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return App(path, url, stream_name, prefix, raw)


# ---- events ----------------------------------------------------------------------------------------


def pings(count: int, **data: Any) -> list[Event]:
    """``count`` Ping events with distinct ids; ``data`` is copied into each payload."""
    return [Event(type="Ping", data={"n": i, **data}, aggregate_id=f"agg-{i}") for i in range(count)]


def expected_pong_ids(events: Iterable[Event]) -> set[str]:
    """The Pong ids the echo handler must produce: output 0 of each Ping (as published, encoded)."""
    return {derived_id(e.encode(), 0) for e in events}


# ---- a NATS test client ----------------------------------------------------------------------------


class PublishFailed(AssertionError):
    """The test's own publish was not stored by the stream."""


async def _publish_async(url: str, items: Sequence[tuple[str, bytes, dict[str, str]]], window: int,
                         timeout_s: float) -> list[dict[str, Any]]:
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        inbox = nc.new_inbox()
        results: dict[int, dict[str, Any]] = {}
        slots = asyncio.Semaphore(window)
        all_in = asyncio.Event()

        async def on_ack(msg: Any) -> None:
            index = int(msg.subject.rsplit(".", 1)[1])
            if msg.headers and msg.headers.get("Status") == "503":
                results[index] = {"error": {"description": "no responders (no stream captures the subject)"}}
            else:
                results[index] = json.loads(msg.data)
            slots.release()
            if len(results) == len(items):
                all_in.set()

        await nc.subscribe(inbox + ".*", cb=on_ack)
        for index, (subject, payload, headers) in enumerate(items):
            await asyncio.wait_for(slots.acquire(), timeout_s)
            await nc.publish(subject, payload, reply=f"{inbox}.{index}", headers=headers)
        if items:
            await asyncio.wait_for(all_in.wait(), timeout_s)
        acks = [results[i] for i in range(len(items))]
        failed = [(i, a["error"]) for i, a in enumerate(acks) if a.get("error")]
        if failed:
            raise PublishFailed(f"{len(failed)} of {len(items)} publishes failed, first: {failed[0]}")
        return acks
    finally:
        await nc.close()


def publish(app: App, events: Sequence[Event], *, msg_ids: Sequence[str] | None = None, window: int = 256,
            timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Publish events as a producer would (subject by type, ``Nats-Msg-Id`` = id), pipelined.

    Returns the PubAcks (``{"stream":..., "seq":..., "duplicate": bool?}``) in event order and raises
    :class:`PublishFailed` if any publish was refused.
    """
    ids = list(msg_ids) if msg_ids is not None else [e.id for e in events]
    items = [(app.subject(e.type), e.encode(), {MSG_ID_HEADER: mid}) for e, mid in zip(events, ids, strict=True)]
    return asyncio.run(_publish_async(app.url, items, window, timeout_s))


def publish_raw(app: App, subject: str, body: bytes, msg_id: str | None = None) -> dict[str, Any]:
    """Publish one arbitrary body (e.g. a malformed event) and return its PubAck."""
    headers = {MSG_ID_HEADER: msg_id or uuid.uuid4().hex}
    return asyncio.run(_publish_async(app.url, [(subject, body, headers)], 1, 30.0))[0]


async def _with_js(url: str, work: Callable[[Any], Any]) -> Any:
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        return await work(nc.jetstream())
    finally:
        await nc.close()


def still_running(procs: Iterable[psutil.Process]) -> list[int]:
    """The PIDs of ``procs`` that have not exited (a zombie has); psutil matches start times, not bare PIDs."""
    alive = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
    return alive


def count(app: App, event_type: str) -> int:
    """How many messages the stream holds on the subject of ``event_type`` (cheap: stream info only)."""

    async def work(js: Any) -> int:
        info = await js.stream_info(app.stream, subjects_filter=app.subject(event_type))
        return int(sum((info.state.subjects or {}).values()))

    return int(asyncio.run(_with_js(app.url, work)))


def read(app: App, event_type: str, timeout_s: float = 60.0) -> list[Event]:
    """Every message stored on the subject of ``event_type``, decoded, in stream order."""
    return [event for event, _ in read_stamped(app, event_type, timeout_s)]


async def _reader(js: Any, stream: str, subject: str, deadline: float) -> Any:
    """An ephemeral pull subscription reading ``subject`` from the start, retried until ``deadline``."""
    config = api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.ALL,
                                inactive_threshold=30.0)
    while True:
        try:
            return await js.pull_subscribe(subject, stream=stream, config=config)
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def read_stamped(app: App, event_type: str, timeout_s: float = 60.0) -> list[tuple[Event, float]]:
    """Every stored message of ``event_type`` with its stream timestamp (wall-clock seconds).

    On a cluster that just lost or regained a node the reader's consumer may not be running yet: its
    creation times out, or a pull is answered 503 (no responders). Both are waited out until
    ``timeout_s``; a wrong count is still a failure.
    """

    async def work(js: Any) -> list[tuple[Event, float]]:
        subject = app.subject(event_type)
        info = await js.stream_info(app.stream, subjects_filter=subject)
        expected = int(sum((info.state.subjects or {}).values()))
        if expected == 0:
            return []
        deadline = time.monotonic() + timeout_s
        sub = await _reader(js, app.stream, subject, deadline)
        out: list[tuple[Event, float]] = []
        try:
            while len(out) < expected:
                if time.monotonic() > deadline:
                    raise AssertionError(f"read only {len(out)} of {expected} {event_type} messages")
                try:
                    for msg in await sub.fetch(min(500, expected - len(out)), timeout=2):
                        out.append((Event.decode(msg.data), msg.metadata.timestamp.timestamp()))
                except nats.errors.TimeoutError:
                    continue
                except nats.js.errors.ServiceUnavailableError:
                    await asyncio.sleep(0.2)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return out

    result: list[tuple[Event, float]] = asyncio.run(_with_js(app.url, work))
    return result


def consumer_info(app: App, service: str) -> Any:
    """The durable consumer's ``ConsumerInfo`` (num_pending, num_ack_pending, config...)."""

    async def work(js: Any) -> Any:
        return await js.consumer_info(app.stream, app.durable(service))

    return asyncio.run(_with_js(app.url, work))


def stream_info(app: App, stream: str | None = None) -> Any:
    """The ``StreamInfo`` of the app's stream, or of ``stream`` on the app's server."""

    async def work(js: Any) -> Any:
        return await js.stream_info(stream or app.stream)

    return asyncio.run(_with_js(app.url, work))


def settled(app: App, service: str) -> bool:
    """True when the service's consumer has nothing left: no pending and no unacknowledged message."""
    info = consumer_info(app, service)
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


# ---- dead letters ---------------------------------------------------------------------------------


def with_dlq(app: App, **top: Any) -> App:
    """Give the test its own dead-letter stream (and any other top-level keys)."""
    raw = dict(app.raw)
    raw["dead_letter"] = {"stream": f"DLQ{app.stream}", "subject_prefix": f"dlq{app.prefix}"}
    raw.update(top)
    app.path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dataclasses.replace(app, raw=raw)


def dlq(app: App, service: str | None = None) -> list[Entry]:
    """The app's dead-letter entries (of ``service`` only, if given), oldest first."""

    async def work() -> list[Entry]:
        nc = await nats.connect(app.url)
        try:
            return await list_entries(nc.jetstream(), load_config(app.path), service, limit=10_000)
        finally:
            await nc.close()

    return asyncio.run(work())


# ---- the HTTP endpoint: health, readiness, metrics ----------------------------------------------------


def with_http(app: App) -> App:
    """Serve the app's HTTP endpoint on any free port of 127.0.0.1 (:func:`port_of` tells which)."""
    raw = {**app.raw, "http": {"port": 0, "host": "127.0.0.1"}}
    app.path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dataclasses.replace(app, raw=raw)


def port_of(run: Engine) -> int:
    """The port the engine's HTTP endpoint listens on, from its ``http.started`` log line."""
    record = wait_for(lambda: run.records("http.started"), 30, "the HTTP endpoint", detail=run.tail)
    return int(record[0]["port"])


def get(port: int, path: str) -> tuple[int, str]:
    """GET ``path`` on 127.0.0.1: the status and the body, also for an error status."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` that carry all of ``labels``."""
    return sum(v for (n, ls), v in samples(text).items() if n == name and all((k, w) in ls for k, w in labels.items()))


def scrape_until(port: int, check: Callable[[str], bool], what: str, timeout_s: float = 30.0) -> str:
    """Scrape /metrics until ``check`` accepts the text (the lag gauges are sampled every 5 s)."""

    def attempt() -> str | None:
        text = get(port, "/metrics")[1]
        return text if check(text) else None

    return wait_for(attempt, timeout_s, what, interval_s=0.25)


def promtool() -> str:
    """promtool from PATH or the venv (``make install`` unpacks it there from Debian's package)."""
    found = shutil.which("promtool") or shutil.which("promtool", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("promtool is missing: run 'make install' (it unpacks Debian's promtool into .venv/bin)")
    return found


def assert_valid_exposition(text: str) -> None:
    """Prometheus' own parser accepts the text, and every metric family appears once."""
    checked = subprocess.run([promtool(), "check", "metrics"], input=text, text=True, capture_output=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


# ---- engine processes ------------------------------------------------------------------------------


def engine_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of an engine subprocess: no stray JETPOOL_* settings nor a metrics directory (each
    engine makes its own, as a real run does, unless the test gives one), tests importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETPOOL") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    # No PYTHONUNBUFFERED: line-buffered stderr writes each log line with one write(), so the
    # processes sharing the log file do not interleave inside a line.
    env.update(extra or {})
    return env


def run_cli(args: Sequence[str], *, env: dict[str, str] | None = None, timeout_s: float = 60.0,
            module: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``jetpool ARGS`` (or ``python -m engine ARGS``) to completion and capture its output."""
    if module:
        command = [sys.executable, "-m", "engine", *args]
    else:
        command = [str(Path(sys.executable).parent / "jetpool"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT,
                          env=engine_env(env))


class Engine(EngineProcess):
    """One ``python -m engine run`` process tree of a test: run from the repo root with :func:`engine_env`.

    Args:
        config: the YAML file.
        log_path: the tree's log.
        env: environment variables on top of :func:`engine_env`'s.
        args: more arguments of ``run``.
    """

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None,
                 args: Sequence[str] = ()) -> None:
        super().__init__(config, log_path, env=engine_env(env), args=args, cwd=REPO_ROOT)
