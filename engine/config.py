"""Typed, frozen configuration: YAML load, environment overrides, validation with path-precise errors.

Every error names the file, the key path and what was expected, e.g.
``config/shop.yaml: services.payments.workers: expected a positive integer, got 'two'``.

Environment overrides (applied before validation, so they are validated the same way):

- ``JETPOOL_NATS_URL``: the broker URL (``nats.url``);
- ``JETPOOL_STORE_DIR``: the embedded broker's store directory (``nats.store_dir``);
- ``JETPOOL_LOG_LEVEL``: ``log.level``;
- ``JETPOOL__<KEY>__<KEY>...=<value>``: any key path, e.g. ``JETPOOL__SERVICES__PAYMENTS__WORKERS=4``
  (path segments are lower-cased; the value is parsed as a YAML scalar).

Credentials never come from the YAML: see ``engine.connection`` for the variables that carry them.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from engine.errors import ConfigError

ENV_PREFIX = "JETPOOL__"
SHORT_ENV = {
    "JETPOOL_NATS_URL": ("nats", "url"),
    "JETPOOL_STORE_DIR": ("nats", "store_dir"),
    "JETPOOL_LOG_LEVEL": ("log", "level"),
    "JETPOOL_HTTP_PORT": ("http", "port"),
}


def _number(kind: type, positive: bool, allow_zero: bool) -> Any:
    wanted = f"a {'positive ' if positive else 'non-negative ' if allow_zero else ''}" + (
        "integer" if kind is int else "number"
    )

    def check(value: Any) -> Any:
        ok_type = isinstance(value, int | float) and not isinstance(value, bool)
        if kind is int:
            ok_type = ok_type and float(value).is_integer()
        if not ok_type or (positive and value <= 0) or (allow_zero and value < 0):
            raise PydanticCustomError("jetpool_number", "expected {wanted}, got {got}",
                                      {"wanted": wanted, "got": repr(value)})
        return kind(value)

    return BeforeValidator(check)


PosInt = Annotated[int, _number(int, positive=True, allow_zero=False)]
NonNegInt = Annotated[int, _number(int, positive=False, allow_zero=True)]
PosFloat = Annotated[float, _number(float, positive=True, allow_zero=False)]
NonNegFloat = Annotated[float, _number(float, positive=False, allow_zero=True)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NatsConfig(_Frozen):
    """How to reach the broker. No URL means: start an embedded nats-server."""

    url: str | None = None
    store_dir: str = ".jetpool/nats"
    connect_timeout_s: PosFloat = 5.0
    reconnect_wait_s: PosFloat = 1.0
    max_reconnect_attempts: int = -1
    connect_attempts: PosInt = 10
    publish_timeout_s: PosFloat = 10.0
    publish_retry_s: NonNegFloat = 30.0
    # The broker's JetStream limits (its max_file_store / max_memory_store), when known: provisioning
    # warns when what the config may store (every max_bytes) does not fit, or has no limit at all.
    max_file_store_bytes: PosInt | None = None
    max_memory_store_bytes: NonNegInt | None = None
    # GOMAXPROCS of the embedded nats-server (no url): unset = half the CPUs (at least 1), 0 = Go's default.
    embedded_go_max_procs: NonNegInt | None = None


class StreamConfig(_Frozen):
    """A JetStream stream jetpool creates or updates on provision."""

    name: Name
    subjects: list[str] = Field(min_length=1)
    storage: Literal["file", "memory"] = "file"
    replicas: Annotated[int, Field(ge=1, le=5)] = 1
    duplicate_window_s: PosFloat = 120.0
    max_msg_size: PosInt = 1024 * 1024
    max_age_s: NonNegFloat = 0.0
    max_bytes: PosInt | None = None  # None: no size limit (only max_age_s)
    # When max_bytes is reached: "old" drops the oldest events (an event log whose consumers keep up),
    # "new" refuses publishes (nothing stored is ever dropped; producers see the error).
    discard: Literal["old", "new"] = "old"


class BucketConfig(_Frozen):
    """A JetStream key-value bucket that handlers use as state (``ctx.state(name)``)."""

    history: Annotated[int, Field(ge=1, le=64)] = 1
    storage: Literal["file", "memory"] = "file"
    replicas: Annotated[int, Field(ge=1, le=5)] = 1
    max_bytes: PosInt | None = None  # None: no size limit; when reached, writes are refused


class BreakerConfig(_Frozen):
    """A circuit breaker handlers call a dependency through (``ctx.breaker(name)``)."""

    fail_max: PosInt = 5
    reset_timeout_s: PosFloat = 30.0


class RetryConfig(_Frozen):
    """Backoff of nakked failures: exponential from base_s to max_s with jitter, or an explicit list."""

    base_s: PosFloat = 0.5
    max_s: PosFloat = 30.0
    delays_s: list[NonNegFloat] | None = None


class DeadLetterConfig(_Frozen):
    """Where events that cannot be processed go, with the reason (``jetpool dlq`` reads it)."""

    stream: Name = "DLQ"
    subject_prefix: str = "dlq"
    storage: Literal["file", "memory"] = "file"
    replicas: Annotated[int, Field(ge=1, le=5)] = 1
    max_age_s: NonNegFloat = 0.0
    # An entry's own headers take about 2 KiB and the original's up to 4 KiB; the body gets the rest.
    max_msg_size: Annotated[int, Field(ge=16 * 1024)] = 8 * 1024 * 1024
    max_bytes: PosInt | None = None  # None: no size limit; when reached the oldest entries go


class ServiceConfig(_Frozen):
    """One service: a durable pull consumer on a stream and the routes its workers serve."""

    stream: Name
    durable: Name | None = None
    filter_subjects: list[str] = Field(default_factory=list)
    routes: dict[str, str] = Field(min_length=1)
    workers: PosInt = 1
    batch: PosInt = 256
    max_in_flight: PosInt = 1024
    max_ack_pending: PosInt | None = None
    ack_wait_s: PosFloat = 30.0
    max_deliver: PosInt = 5
    handler_timeout_s: PosFloat = 10.0
    drain_timeout_s: PosFloat = 20.0
    idle_heartbeat_s: PosFloat = 5.0
    pull_expires_s: PosFloat = 30.0
    pin_cpus: bool = True
    # Milliseconds a mostly idle worker pauses between short awake windows so that events arriving at a
    # steady pace are read and answered together (engine/linger.py); adds up to this much latency per hop.
    linger_ms: Annotated[float, Field(ge=0, le=1000)] = 0.0
    replicas: PosInt = 1
    state: list[Name] = Field(default_factory=list)
    breakers: list[Name] = Field(default_factory=list)
    retry: RetryConfig = RetryConfig()
    settings: dict[str, Any] = Field(default_factory=dict)
    max_event_bytes: PosInt = 1024 * 1024
    # 'module:function' run once in every worker process before it consumes (e.g. to create the label
    # values of the app's own metrics, so they are exported from the start): ``function(ctx)``, sync or async.
    setup: list[str] = Field(default_factory=list)

    @field_validator("setup")
    @classmethod
    def _setup_are_targets(cls, setup: list[str]) -> list[str]:
        for target in setup:
            module, _, func = target.partition(":")
            if not module or not func:
                raise PydanticCustomError("jetpool_route", "expected 'module:function', got {got}",
                                          {"got": repr(target)})
        return setup

    @field_validator("routes")
    @classmethod
    def _routes_are_targets(cls, routes: dict[str, str]) -> dict[str, str]:
        for event_type, target in routes.items():
            module, _, func = target.partition(":")
            if not module or not func:
                raise PydanticCustomError(
                    "jetpool_route", "route {event}: expected 'module:function', got {got}",
                    {"event": event_type, "got": repr(target)})
        return routes

    @model_validator(mode="after")
    def _window_fits(self) -> ServiceConfig:
        if self.batch > self.max_in_flight:
            raise PydanticCustomError(
                "jetpool_cross", "batch ({batch}) must not exceed max_in_flight ({window})",
                {"batch": self.batch, "window": self.max_in_flight})
        if self.idle_heartbeat_s * 2 > self.pull_expires_s:
            # The server refuses such a pull ("400 heartbeat value too large"): nothing would ever be delivered.
            raise PydanticCustomError(
                "jetpool_cross", "idle_heartbeat_s ({hb}) must be at most half of pull_expires_s ({expires}): "
                "the server refuses longer heartbeats", {"hb": self.idle_heartbeat_s, "expires": self.pull_expires_s})
        needed = self.workers * self.max_in_flight * self.replicas
        if self.max_ack_pending is not None and needed > self.max_ack_pending:
            raise PydanticCustomError(
                "jetpool_cross",
                "workers x max_in_flight x replicas = {needed} exceeds max_ack_pending ({map}); raise "
                "max_ack_pending or lower the window, or workers would wait on each other",
                {"needed": needed, "map": self.max_ack_pending})
        return self

    @property
    def effective_max_ack_pending(self) -> int:
        return self.max_ack_pending or self.workers * self.max_in_flight * self.replicas


class SupervisorConfig(_Frozen):
    """How the supervisor restarts crashed workers and where it pins them."""

    restart_backoff_s: PosFloat = 0.5
    restart_backoff_max_s: PosFloat = 10.0
    max_restarts: PosInt = 5
    restart_window_s: PosFloat = 60.0
    cpus: list[NonNegInt] | None = None


class HttpConfig(_Frozen):
    """The supervisor's /health, /ready and /metrics endpoint. Port 0 picks a free port (logged)."""

    enabled: bool = True
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080


class LogConfig(_Frozen):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Config(_Frozen):
    """The whole file. ``source`` is where it came from, for error messages."""

    app: Name = "jetpool"
    subject_prefix: str = "events"
    nats: NatsConfig = NatsConfig()
    streams: list[StreamConfig] = Field(min_length=1)
    services: dict[Name, ServiceConfig] = Field(min_length=1)
    state: dict[Name, BucketConfig] = Field(default_factory=dict)
    breakers: dict[Name, BreakerConfig] = Field(default_factory=dict)
    dead_letter: DeadLetterConfig = DeadLetterConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    http: HttpConfig = HttpConfig()
    log: LogConfig = LogConfig()
    # 'module:function' giving an async context manager, entered by `jetpool run` around its workers:
    # the app's local companions (a database, an HTTP front end...); `--no-sidecars` leaves them out.
    sidecars: list[str] = Field(default_factory=list)
    source: str = Field(default="<config>", exclude=True)

    @field_validator("sidecars")
    @classmethod
    def _sidecars_are_targets(cls, sidecars: list[str]) -> list[str]:
        for target in sidecars:
            module, _, func = target.partition(":")
            if not module or not func:
                raise PydanticCustomError("jetpool_route", "expected 'module:function', got {got}",
                                          {"got": repr(target)})
        return sidecars

    @model_validator(mode="after")
    def _cross_refs(self) -> Config:
        streams = {s.name: s for s in self.streams}
        for name, svc in self.services.items():
            stream = streams.get(svc.stream)
            if stream is None:
                raise PydanticCustomError(
                    "jetpool_ref", "services.{svc}.stream: no stream named '{stream}' (streams: {known})",
                    {"svc": name, "stream": svc.stream, "known": ", ".join(streams)})
            for kind, known, used in (("state", self.state, svc.state), ("breakers", self.breakers, svc.breakers)):
                missing = [u for u in used if u not in known]
                if missing:
                    raise PydanticCustomError(
                        "jetpool_ref", "services.{svc}.{kind}: {missing} not defined under top-level '{kind}'",
                        {"svc": name, "kind": kind, "missing": ", ".join(missing)})
            for subject in self.filter_subjects(name):
                if not any(subject_matches(pattern, subject) for pattern in stream.subjects):
                    raise PydanticCustomError(
                        "jetpool_ref",
                        "services.{svc}: subject '{subject}' is not captured by stream '{stream}' "
                        "(subjects: {subjects})",
                        {"svc": name, "subject": subject, "stream": stream.name,
                         "subjects": ", ".join(stream.subjects)})
        return self

    def subject_for(self, event_type: str) -> str:
        """The subject an event of this type is published on."""
        return f"{self.subject_prefix}.{event_type}"

    def filter_subjects(self, service: str) -> list[str]:
        """The service's consumer filter: explicit, or one subject per routed event type."""
        svc = self.services[service]
        return list(svc.filter_subjects) or [self.subject_for(t) for t in svc.routes]

    def durable(self, service: str) -> str:
        return self.services[service].durable or service

    def stream(self, name: str) -> StreamConfig:
        return next(s for s in self.streams if s.name == name)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard match: ``*`` is one token, ``>`` the rest (also true for overlapping wildcards)."""
    p_tokens, s_tokens = pattern.split("."), subject.split(".")
    for i, token in enumerate(p_tokens):
        if token == ">":
            return len(s_tokens) > i
        if i >= len(s_tokens):
            return False
        if token != "*" and s_tokens[i] not in ("*", ">") and not fnmatch.fnmatchcase(s_tokens[i], token):
            return False
        if s_tokens[i] == ">":
            return True
    return len(p_tokens) == len(s_tokens)


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment and validate a YAML config file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        apply_env_overrides(raw, os.environ if env is None else env)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], source: str = "<config>") -> Config:
    """Validate an already-loaded mapping; errors name ``source`` and the key path."""
    try:
        return Config.model_validate({**raw, "source": source})
    except ValidationError as exc:
        raise ConfigError("\n".join(_format_error(source, err) for err in exc.errors())) from None


# Said for a stray key under ``nats``: that is where people try to put a password.
_CREDENTIALS_HINT = ("; credentials and TLS files never go in the config file: set JETPOOL_NATS_USER and "
                     "JETPOOL_NATS_PASSWORD(_FILE), JETPOOL_NATS_TOKEN(_FILE), JETPOOL_NATS_CREDS, "
                     "JETPOOL_NATS_NKEY_SEED or JETPOOL_NATS_TLS_CA/_CERT/_KEY in the environment")


def _format_error(source: str, err: Any) -> str:
    path = ".".join(str(p) for p in err["loc"])
    kind, got = err["type"], err.get("input")
    if kind in {"missing"}:
        what = "required key is missing"
    elif kind == "extra_forbidden":
        what = "unknown key" + (_CREDENTIALS_HINT if err["loc"][0] == "nats" else "")
    elif kind == "literal_error":
        what = f"expected one of {err['ctx']['expected']}, got {got!r}"
    elif kind.startswith("jetpool_"):
        what = err["msg"]
    elif kind == "string_pattern_mismatch":
        what = f"expected letters, digits, '_' or '-', got {got!r}"
    else:
        what = f"{err['msg'][0].lower()}{err['msg'][1:]}, got {got!r}"
    return f"{source}: {path}: {what}" if path else f"{source}: {what}"


def apply_env_overrides(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    """Apply JETPOOL_* variables onto the raw mapping, in place; a bad one is a ConfigError naming it."""
    for name, short_path in SHORT_ENV.items():
        if env.get(name):
            _override(raw, name, list(short_path), env[name], parse=False)
    for name, value in sorted(env.items()):
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            keys = [k.lower() for k in name[len(ENV_PREFIX):].split("__") if k]
            _override(raw, name, keys, value, parse=True)


def _override(raw: dict[str, Any], name: str, keys: list[str], value: str, parse: bool) -> None:
    try:
        _set_path(raw, keys, yaml.safe_load(value) if parse and value else value)
    except (ConfigError, yaml.YAMLError) as exc:
        # A YAML error quotes the value, which may be a secret set under the wrong name: give the problem only.
        reason = f"not a YAML value ({exc.problem})" if isinstance(exc, yaml.MarkedYAMLError) else exc
        raise ConfigError(f"environment variable {name}: cannot set {'.'.join(keys)}: {reason}") from None


def _set_path(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node: Any = raw
    for key in keys[:-1]:
        node = _child(node, key)
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(node, last)] = value
    else:
        node[_key(node, last)] = value


def _child(node: Any, key: str) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, key)]
    return node.setdefault(_key(node, key), {})


def _key(node: Any, key: str) -> Any:
    if not isinstance(node, dict):
        raise ConfigError(f"expected a mapping to hold {key!r}, found a {type(node).__name__}")
    # Names keep their YAML spelling (services, route event types); match them case-insensitively.
    return next((k for k in node if str(k).lower() == key), key)


def _list_index(node: list[Any], key: str) -> int:
    if key.isdigit() and int(key) < len(node):
        return int(key)
    for i, item in enumerate(node):
        if isinstance(item, dict) and str(item.get("name", "")).lower() == key:
            return i
    raise ConfigError(f"no list item named {key!r}")
