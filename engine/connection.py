"""Connect to NATS with the configured URL and credentials from the environment (never from YAML).

Credentials come from Kubernetes-secret-friendly variables:

- ``JETPOOL_NATS_USER`` / ``JETPOOL_NATS_PASSWORD`` (or ``..._PASSWORD_FILE``);
- ``JETPOOL_NATS_TOKEN`` (or ``JETPOOL_NATS_TOKEN_FILE``);
- ``JETPOOL_NATS_CREDS`` (path of a ``.creds`` file) or ``JETPOOL_NATS_NKEY_SEED`` (path of a seed file);
  both need the ``nkeys`` package;
- ``JETPOOL_NATS_TLS_CA``, ``JETPOOL_NATS_TLS_CERT``, ``JETPOOL_NATS_TLS_KEY`` (paths; the key must not
  be encrypted). With any of them set, jetpool refuses a server that does not speak TLS;
  ``JETPOOL_NATS_TLS_HANDSHAKE_FIRST=1`` starts TLS before the server's first byte (the server needs
  ``tls { handshake_first: true }``), so not even the greeting travels in clear;
- ``JETPOOL_NATS_INBOX_PREFIX``: the prefix of reply subjects (default ``_INBOX``), so that a
  least-privilege user may subscribe to its own replies only (``_INBOX_payments.>``).

Secrets are never logged and never included in error messages: errors name the variable, never its
value, and every message is scrubbed of the secrets in use before it leaves this module.
"""

from __future__ import annotations

import importlib.util
import os
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import nats
import structlog
from nats.errors import AuthorizationError

from engine.config import NatsConfig
from engine.errors import BrokerError
from engine.transport import install as install_fast_paths

Callback = Callable[[], Awaitable[None]]

log = structlog.get_logger("jetpool.connection")

_AUTH_VARS = {
    "user": "JETPOOL_NATS_USER/JETPOOL_NATS_PASSWORD",
    "token": "JETPOOL_NATS_TOKEN",
    "user_credentials": "JETPOOL_NATS_CREDS",
    "nkeys_seed": "JETPOOL_NATS_NKEY_SEED",
}
# The user:password@ (or token@) of every URL in a text: after a scheme, or at the start of a
# scheme-less server ("admin:pw@host:4222", which nats-py accepts). Greedy up to the last "@" before a
# "/" or a space, so an unencoded "@" or "," in a password is hidden too (at worst a host with it).
_URL_USERINFO = re.compile(r"(?:(?<=://)|(?<![^\s,]))[^/\s]*@")
# OpenSSL reasons that mean "the server did not accept our client certificate".
_CLIENT_CERT_REFUSED = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_REQUIRED", "CERTIFICATE_EXPIRED",
                        "UNSUPPORTED_CERTIFICATE", "CERTIFICATE_UNKNOWN", "ACCESS_DENIED")


def connect_options(cfg: NatsConfig, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """nats.connect keyword arguments for this config and environment.

    Raises:
        BrokerError: a credential or TLS file named by a variable cannot be read or used.
    """
    env = os.environ if env is None else env
    options: dict[str, Any] = {
        "servers": [u.strip() for u in (cfg.url or "").split(",") if u.strip()],
        "connect_timeout": cfg.connect_timeout_s,
        "reconnect_time_wait": cfg.reconnect_wait_s,
        "max_reconnect_attempts": cfg.max_reconnect_attempts,
        "skip_subject_validation": True,  # every subject jetpool builds is valid by construction
        "pending_size": 64 * 1024 * 1024,
        **_auth_options(env),
    }
    handshake_first = env.get("JETPOOL_NATS_TLS_HANDSHAKE_FIRST", "").lower() in {"1", "true"}
    tls = _tls_context(env) or (ssl.create_default_context() if handshake_first else None)
    if tls is not None:
        options["tls"], options["tls_handshake_first"] = tls, handshake_first
    if env.get("JETPOOL_NATS_INBOX_PREFIX"):
        options["inbox_prefix"] = env["JETPOOL_NATS_INBOX_PREFIX"]
    return options


def _auth_options(env: Mapping[str, str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if env.get("JETPOOL_NATS_USER"):
        options["user"] = env["JETPOOL_NATS_USER"]
        options["password"] = _secret(env, "JETPOOL_NATS_PASSWORD") or ""
    token = _secret(env, "JETPOOL_NATS_TOKEN")
    if token:
        options["token"] = token
    for variable, option in (("JETPOOL_NATS_CREDS", "user_credentials"), ("JETPOOL_NATS_NKEY_SEED", "nkeys_seed")):
        if env.get(variable):
            _check_readable(variable, env[variable])
            options[option] = env[variable]
            if importlib.util.find_spec("nkeys") is None:
                raise BrokerError(f"{variable} needs the 'nkeys' package: pip install nkeys")
    return options


def _secret(env: Mapping[str, str], name: str) -> str | None:
    if env.get(name):
        return env[name]
    path = env.get(f"{name}_FILE")
    return _readable(f"{name}_FILE", path).strip() if path else None


def _readable(variable: str, path: str) -> str:
    """The file's text; a BrokerError naming the variable and path (never the content) if unreadable."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a text file"
        raise BrokerError(f"{variable}: cannot read {path}: {reason}") from None


def _check_readable(variable: str, path: str) -> None:
    # Only opened: nats-py reads seeds itself, into buffers it wipes after signing.
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise BrokerError(f"{variable}: cannot read {path}: {exc.strerror}") from None


def _tls_context(env: Mapping[str, str]) -> ssl.SSLContext | None:
    ca, cert, key = env.get("JETPOOL_NATS_TLS_CA"), env.get("JETPOOL_NATS_TLS_CERT"), env.get("JETPOOL_NATS_TLS_KEY")
    if key and not cert:
        raise BrokerError("JETPOOL_NATS_TLS_KEY is set without JETPOOL_NATS_TLS_CERT (the client certificate)")
    if not (ca or cert):
        return None
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerError(f"JETPOOL_NATS_TLS_CA: cannot load CA certificates from {ca}: {_ssl_reason(exc)}") from None
    if cert:
        try:
            context.load_cert_chain(cert, key, password=_no_key_password)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise BrokerError(f"JETPOOL_NATS_TLS_CERT/JETPOOL_NATS_TLS_KEY: cannot load the client certificate "
                              f"{cert} (key {key or 'in the same file'}): {_ssl_reason(exc)}") from None
    return context


def _no_key_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal, or hang a pod.
    raise ValueError("the private key is encrypted; give an unencrypted key (mounted from a secret)")


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


async def connect(cfg: NatsConfig, name: str, *, reconnected_cb: Callback | None = None,
                  disconnected_cb: Callback | None = None, closed_cb: Callback | None = None,
                  error_cb: Callable[[Exception], Awaitable[None]] | None = None,
                  env: Mapping[str, str] | None = None, first_attempts: int | None = None) -> Any:
    """Open a connection; raise BrokerError with a message that names the URL but no secret.

    Asynchronous errors go to ``error_cb``; without one, refusals (a missing permission, revoked
    credentials) are logged, scrubbed; the rest are dropped.
    """
    env = os.environ if env is None else env
    options = connect_options(cfg, env)
    if not options["servers"]:
        raise BrokerError("no NATS URL configured")
    where = _scrub(", ".join(options["servers"]), options)

    connected = False

    async def on_error(exc: Exception) -> None:
        if error_cb is not None:
            await error_cb(exc)
        elif connected and _is_refusal(exc):  # a refused connect is reported once, by the BrokerError
            log.warning("nats.refused", error=_scrub(str(exc), options))
        elif not connected and isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError):
            # nats-py keeps trying an unreachable server (max_reconnect_attempts < 0): say why we wait.
            log.warning("nats.connect_failed", url=where, error=_scrub(f"{type(exc).__name__}: {exc}", options))

    # nats-py retries the *first* connect forever when max_reconnect_attempts < 0, even on an
    # authorization error: connect without reconnects (bad credentials fail at once) and with a
    # bounded number of attempts (a wrong URL fails after nats.connect_attempts; workers pass -1 and
    # wait for the broker), then restore the configured reconnect behaviour for the connection's life.
    attempts = cfg.connect_attempts if first_attempts is None else first_attempts
    try:
        nc = await nats.connect(name=name, reconnected_cb=reconnected_cb, disconnected_cb=disconnected_cb,
                                closed_cb=closed_cb, error_cb=on_error,
                                **{**options, "allow_reconnect": False, "max_reconnect_attempts": attempts})
    except Exception as exc:
        raise BrokerError(f"cannot connect to {where}: {_scrub(_explain(exc, options, env), options)}") from None
    if "tls" in options and not _server_requires_tls(nc):
        await nc.close()
        raise BrokerError(f"cannot connect to {where}: TLS is configured (JETPOOL_NATS_TLS_*) but the server "
                          "does not use TLS; refusing an unencrypted connection")
    nc.options["allow_reconnect"] = True
    nc.options["max_reconnect_attempts"] = cfg.max_reconnect_attempts
    install_fast_paths(nc)
    connected = True
    return nc


def _server_requires_tls(nc: Any) -> bool:
    # nats-py upgrades to TLS only when the server's INFO asks for it, and has no public accessor
    # for that INFO; with tls_handshake_first the connection is TLS from the first byte.
    return bool(nc.options.get("tls_handshake_first") or getattr(nc, "_server_info", {}).get("tls_required"))


def _explain(exc: BaseException, options: Mapping[str, Any], env: Mapping[str, str]) -> str:
    """A one-line reason for a failed connect that names the variables to check, never their values."""
    if isinstance(exc, AuthorizationError) or _is_refusal(exc):
        used = [var for key, var in _AUTH_VARS.items() if key in options]
        given = f"given by {', '.join(used)}" if used else "none given: set JETPOOL_NATS_USER/PASSWORD, _TOKEN, " \
                                                            "_CREDS or _NKEY_SEED"
        return f"authorization violation: the server rejected the credentials ({given})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        hint = ("is JETPOOL_NATS_TLS_CA the CA that signed it?" if env.get("JETPOOL_NATS_TLS_CA")
                else "set JETPOOL_NATS_TLS_CA to the CA that signed it")
        return f"TLS: the server's certificate is not trusted ({exc.verify_message}); {hint}"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or exc)
        if any(part in reason for part in _CLIENT_CERT_REFUSED):
            return f"TLS: the server refused the client certificate ({reason}); {_client_cert_hint(env)}"
        return f"TLS handshake failed: {reason}"
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, ConnectionError | EOFError) and "tls" in options:
        # With TLS 1.3 a refused client certificate shows up as an alert or, as often, as a plain reset.
        return f"{text} (TLS: the server closed the connection during the handshake; {_client_cert_hint(env)})"
    return text


def _client_cert_hint(env: Mapping[str, str]) -> str:
    if env.get("JETPOOL_NATS_TLS_CERT"):
        return "is JETPOOL_NATS_TLS_CERT signed by a CA the server trusts?"
    return "if the server requires client certificates, set JETPOOL_NATS_TLS_CERT and JETPOOL_NATS_TLS_KEY"


def _is_refusal(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(word in text for word in ("authorization", "authentication", "permissions violation"))


def redact_url(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``.

    Use it wherever a URL is printed, logged or put in an error: ``nats://admin:S3cret@host:4222``
    becomes ``nats://***@host:4222``.
    """
    return _URL_USERINFO.sub("***@", text)


def _scrub(text: str, options: Mapping[str, Any]) -> str:
    """Remove user:password@ from URLs and every secret value in use from ``text``."""
    text = redact_url(text)
    for key in ("password", "token"):
        secret = options.get(key)
        if secret and len(secret) >= 3:
            text = text.replace(secret, "***")
    return text
