"""Route an event to the handler its YAML route names, through the service's middleware chain.

A handler is ``async def handler(event: Event, ctx: Context) -> Event | Iterable[Event] | None``.
It never touches NATS: it returns the events to publish and the engine publishes them, waits for
their PubAcks and only then acks the input. A middleware is ``Callable[[Handler], Handler]``; the
chain is built once per route when the router is built, not per message.

Handler timeouts are enforced by the consumer's in-flight sweeper rather than a timer per event:
one periodic scan cancels overdue handlers, which costs nothing on the hot path.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.breaker import Breaker
from engine.config import Config
from engine.errors import ConfigError, NoRoute
from engine.events import Event
from engine.state import StateStore

HandlerResult = Event | Iterable[Event] | None
Handler = Callable[[Event, "Context"], Awaitable[HandlerResult]]
Middleware = Callable[[Handler], Handler]
Setup = Callable[["Context"], Awaitable[None] | None]


@dataclass(slots=True)
class Context:
    """What a handler may know about the delivery it is handling.

    Attributes:
        service: the service consuming the event.
        worker: the worker process index within the supervisor.
        reply: the JetStream ack subject; delivery metadata is parsed from it on demand.
        subject: the subject the event was published on.
        resources: shared per-worker objects (breakers, stores) set up by the engine.
        settings: the service's free-form ``settings`` mapping from the YAML.
    """

    service: str
    worker: int
    reply: str
    subject: str
    resources: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def attempt(self) -> int:
        """This delivery's number, from 1 (JetStream's num_delivered)."""
        return ack_metadata(self.reply)[0]

    @property
    def stream_seq(self) -> int:
        return ack_metadata(self.reply)[1]

    def resource(self, name: str) -> Any:
        """A shared per-worker object registered by the engine (or by a test)."""
        try:
            return self.resources[name]
        except KeyError:
            raise LookupError(f"no resource named {name!r} in service {self.service!r}; "
                              "declare it in the service's 'state' or 'breakers' list") from None

    def state(self, bucket: str) -> StateStore:
        """The key-value state store ``bucket`` (declared in the service's ``state`` list)."""
        store: StateStore = self.resource(f"state:{bucket}")
        return store

    def breaker(self, name: str) -> Breaker:
        """The circuit breaker ``name`` (declared in the service's ``breakers`` list)."""
        breaker: Breaker = self.resource(f"breaker:{name}")
        return breaker


def ack_metadata(reply: str) -> tuple[int, int]:
    """(num_delivered, stream_seq) from a ``$JS.ACK...`` subject, old (9 tokens) or new (11-12) format."""
    tokens = reply.split(".")
    if len(tokens) >= 11:
        return int(tokens[6]), int(tokens[7])
    if len(tokens) >= 9:
        return int(tokens[4]), int(tokens[5])
    return 1, 0


class Router:
    """Event type → handler (already wrapped in the middleware chain), and the service's setup hooks."""

    def __init__(self, routes: Mapping[str, Handler], middleware: Sequence[Middleware] = (),
                 setup: Sequence[Setup] = ()) -> None:
        self._routes: dict[str, Handler] = {t: _chain(h, middleware) for t, h in routes.items()}
        self._setup = list(setup)

    async def run_setup(self, ctx: Context) -> None:
        """Run the service's ``setup`` hooks, in order, once per worker process, before it consumes."""
        for hook in self._setup:
            result = hook(ctx)
            if inspect.isawaitable(result):
                await result

    @property
    def event_types(self) -> list[str]:
        return list(self._routes)

    async def dispatch(self, event: Event, ctx: Context) -> list[Event]:
        """Run the event's handler and bind what it returns to the event (ids, trace, causation)."""
        return bind_outputs(event, await self.handler_for(event, ctx.service)(event, ctx))

    def handler_for(self, event: Event, service: str) -> Handler:
        """The handler of the event's type (the consumer calls it directly: one coroutine less per event)."""
        handler = self._routes.get(event.type)
        if handler is None:
            raise NoRoute(f"no route for event type {event.type!r} in service {service!r}")
        return handler


def bind_outputs(event: Event, result: HandlerResult) -> list[Event]:
    """What a handler returned, as a list of events bound to their input (ids, trace, causation)."""
    if result is None:
        return []
    outputs = [result] if isinstance(result, Event) else list(result)
    for position, output in enumerate(outputs):
        output.caused_by(event, position)
    return outputs


def _chain(handler: Handler, middleware: Sequence[Middleware]) -> Handler:
    for wrap in reversed(middleware):
        handler = wrap(handler)
    return handler


def build_router(config: Config, service: str, middleware: Sequence[Middleware] = ()) -> Router:
    """Resolve a service's ``module:function`` routes; errors name the file and the route's key path."""
    routes = {
        event_type: resolve_handler(target, f"{config.source}: services.{service}.routes.{event_type}")
        for event_type, target in config.services[service].routes.items()
    }
    setup = [resolve_setup(target, f"{config.source}: services.{service}.setup[{i}]")
             for i, target in enumerate(config.services[service].setup)]
    return Router(routes, middleware, setup)


def resolve_setup(target: str, where: str) -> Setup:
    """Import ``module:function`` and check it takes (ctx)."""
    func = import_target(target, where)
    try:
        inspect.signature(func).bind(None)
    except TypeError:
        raise ConfigError(f"{where}: {target!r} must accept (ctx)") from None
    hook: Setup = func
    return hook


def resolve_handler(target: str, where: str) -> Handler:
    """Import ``module:function`` and check it is an async function taking (event, ctx)."""
    func = import_target(target, where)
    if not inspect.iscoroutinefunction(func):
        raise ConfigError(f"{where}: {target!r} must be an 'async def' function")
    try:
        inspect.signature(func).bind(None, None)
    except TypeError:
        raise ConfigError(f"{where}: {target!r} must accept (event, ctx)") from None
    handler: Handler = func
    return handler


def import_target(target: str, where: str) -> Any:
    """The callable ``module:function`` names; errors name where it was configured."""
    module_name, _, func_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import module {module_name!r} ({exc})") from None
    except Exception as exc:  # the module itself is broken (a syntax error, a failing import-time statement)
        raise ConfigError(f"{where}: importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    func = getattr(module, func_name, None)
    if func is None or not callable(func):
        raise ConfigError(f"{where}: module {module_name!r} has no function {func_name!r}")
    return func
