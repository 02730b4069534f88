"""Connect to NATS with the configured URL and credentials from the environment (never from YAML).

Credentials come from Kubernetes-secret-friendly variables:

- ``JETPOOL_NATS_USER`` / ``JETPOOL_NATS_PASSWORD`` (or ``..._PASSWORD_FILE``);
- ``JETPOOL_NATS_TOKEN`` (or ``JETPOOL_NATS_TOKEN_FILE``);
- ``JETPOOL_NATS_CREDS`` (path of a ``.creds`` file) or ``JETPOOL_NATS_NKEY_SEED`` (path of a seed file);
- ``JETPOOL_NATS_TLS_CA``, ``JETPOOL_NATS_TLS_CERT``, ``JETPOOL_NATS_TLS_KEY`` (paths).

Secrets are never logged and never included in error messages.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import nats

from engine.config import NatsConfig
from engine.errors import BrokerError

Callback = Callable[[], Awaitable[None]]


def _secret(env: Mapping[str, str], name: str) -> str | None:
    if env.get(name):
        return env[name]
    path = env.get(f"{name}_FILE")
    return Path(path).read_text().strip() if path else None


def connect_options(cfg: NatsConfig, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """nats.connect keyword arguments for this config and environment."""
    env = os.environ if env is None else env
    options: dict[str, Any] = {
        "servers": [u.strip() for u in (cfg.url or "").split(",") if u.strip()],
        "connect_timeout": cfg.connect_timeout_s,
        "reconnect_time_wait": cfg.reconnect_wait_s,
        "max_reconnect_attempts": cfg.max_reconnect_attempts,
        "skip_subject_validation": True,  # every subject jetpool builds is valid by construction
        "pending_size": 64 * 1024 * 1024,
    }
    user, password, token = env.get("JETPOOL_NATS_USER"), _secret(env, "JETPOOL_NATS_PASSWORD"), None
    if user:
        options["user"], options["password"] = user, password or ""
    token = _secret(env, "JETPOOL_NATS_TOKEN")
    if token:
        options["token"] = token
    if env.get("JETPOOL_NATS_CREDS"):
        options["user_credentials"] = env["JETPOOL_NATS_CREDS"]
    if env.get("JETPOOL_NATS_NKEY_SEED"):
        options["nkeys_seed"] = env["JETPOOL_NATS_NKEY_SEED"]
    tls = _tls_context(env)
    if tls is not None:
        options["tls"] = tls
    return options


def _tls_context(env: Mapping[str, str]) -> ssl.SSLContext | None:
    ca, cert, key = env.get("JETPOOL_NATS_TLS_CA"), env.get("JETPOOL_NATS_TLS_CERT"), env.get("JETPOOL_NATS_TLS_KEY")
    if not (ca or cert):
        return None
    context = ssl.create_default_context(cafile=ca)
    if cert:
        context.load_cert_chain(cert, key)
    return context


async def connect(cfg: NatsConfig, name: str, *, reconnected_cb: Callback | None = None,
                  disconnected_cb: Callback | None = None, closed_cb: Callback | None = None,
                  error_cb: Callable[[Exception], Awaitable[None]] | None = None,
                  env: Mapping[str, str] | None = None) -> Any:
    """Open a connection; raise BrokerError with a message that names the URL but no secret."""
    options = connect_options(cfg, env)
    if not options["servers"]:
        raise BrokerError("no NATS URL configured")

    async def quiet_error(exc: Exception) -> None:
        if error_cb is not None:
            await error_cb(exc)

    # nats-py retries the *first* connect forever when max_reconnect_attempts < 0, even on an
    # authorization error; connect once without reconnects so bad input fails fast and clearly,
    # then turn reconnection on for the life of the connection.
    try:
        nc = await nats.connect(name=name, reconnected_cb=reconnected_cb, disconnected_cb=disconnected_cb,
                                closed_cb=closed_cb, error_cb=quiet_error, **{**options, "allow_reconnect": False})
    except Exception as exc:
        raise BrokerError(f"cannot connect to {', '.join(options['servers'])}: {_safe(exc)}") from None
    nc.options["allow_reconnect"] = True
    return nc


def _safe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    lowered = text.lower()
    if "authorization" in lowered or "authentication" in lowered:
        return "authorization violation (check the credentials given by JETPOOL_NATS_* variables)"
    return f"{type(exc).__name__}: {text}"
