"""NATS authentication and TLS on real nats-servers: the engine connects with the right credentials,
fails with a clear message (exit code 2) with wrong ones, and never prints a secret.

Every server here is this module's own (random port, store in tmp_path), killed by PID in teardown.
Certificates are made per module with the ``openssl`` command line; NKeys, and the JWTs of a
decentralized (operator mode) set-up for the ``.creds`` login, with the ``nkeys`` package (no ``nsc``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys
import psutil
import pytest

from engine.config import NatsConfig
from engine.connection import connect
from engine.embedded import EmbeddedServer
from engine.errors import BrokerError
from engine.events import MSG_ID_HEADER
from tests.shop_support import write_shop_config
from tests.support import REPO_ROOT, App, Engine, engine_env, pings, run_cli, wait_for, write_config

StartServer = Callable[[Path, str], EmbeddedServer]


@pytest.fixture
def secure_server() -> Iterator[StartServer]:
    """Start nats-servers with a given configuration text; each is SIGKILLed by PID in teardown."""
    started: list[EmbeddedServer] = []

    def start(directory: Path, conf: str) -> EmbeddedServer:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "nats.conf").write_text(conf)
        server = EmbeddedServer(store_dir=directory / "store", config_file=directory / "nats.conf")
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            server.kill()


# ---- certificates ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for 127.0.0.1 and a client certificate it signed, plus a client
    certificate signed by another CA (which the server must refuse)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path

    def client_env(self, ca: bool = True, cert: bool = True, rogue: bool = False) -> dict[str, str]:
        env = {"JETPOOL_NATS_TLS_CA": str(self.ca)} if ca else {}
        if cert:
            env["JETPOOL_NATS_TLS_CERT"] = str(self.rogue_cert if rogue else self.client_cert)
            env["JETPOOL_NATS_TLS_KEY"] = str(self.rogue_key if rogue else self.client_key)
        return env

    def server_tls(self, handshake_first: bool = False) -> str:
        return (f'tls {{\n  cert_file: "{self.server_cert}"\n  key_file: "{self.server_key}"\n'
                f'  ca_file: "{self.ca}"\n  verify: true\n  timeout: 5\n'
                f'  handshake_first: {str(handshake_first).lower()}\n}}\n')


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=30)


def _make_ca(directory: Path, name: str) -> None:
    _openssl(directory, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=jetpool test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _make_leaf(directory: Path, ca: str, name: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(
        f"{extensions}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    _openssl(directory, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
    _openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-set_serial", str(secrets.randbits(63)), "-days", "2", "-out", f"{name}.pem",
             "-extfile", f"{name}.ext")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make the test certificates (Debian: openssl)")
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "rogue-ca")
    _make_leaf(d, "ca", "server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
    _make_leaf(d, "ca", "client", "extendedKeyUsage=clientAuth")
    _make_leaf(d, "rogue-ca", "rogue", "extendedKeyUsage=clientAuth")
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
               d / "rogue.pem", d / "rogue.key")


# ---- credentials -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Auth:
    """A server's authorization block, and client environments with the right and a wrong secret."""

    conf: str
    right: dict[str, str]
    wrong: dict[str, str]
    variable: str  # the variable the failure message must name
    secrets: tuple[str, ...]  # values that must never be printed


def password_auth(directory: Path) -> Auth:
    password, wrong = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    (directory / "password").write_text(password + "\n")  # as a mounted Kubernetes secret may end
    return Auth(f'authorization {{ user: jetpool, password: "{password}" }}\n',
                right={"JETPOOL_NATS_USER": "jetpool", "JETPOOL_NATS_PASSWORD_FILE": str(directory / "password")},
                wrong={"JETPOOL_NATS_USER": "jetpool", "JETPOOL_NATS_PASSWORD": wrong},
                variable="JETPOOL_NATS_PASSWORD", secrets=(password, wrong))


def token_auth(directory: Path) -> Auth:
    token, wrong = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    (directory / "token").write_text(wrong)
    return Auth(f'authorization {{ token: "{token}" }}\n', right={"JETPOOL_NATS_TOKEN": token},
                wrong={"JETPOOL_NATS_TOKEN_FILE": str(directory / "token")}, variable="JETPOOL_NATS_TOKEN",
                secrets=(token, wrong))


def _keypair(prefix: int) -> tuple[str, str, Any]:
    """A new NKey: (seed, public key, key pair)."""
    seed = nkeys.encode_seed(secrets.token_bytes(32), prefix)
    pair = nkeys.from_seed(bytearray(seed))
    return seed.decode(), pair.public_key.decode(), pair


def nkey_auth(directory: Path) -> Auth:
    (seed, public, _), (other, _, _) = _keypair(nkeys.PREFIX_BYTE_USER), _keypair(nkeys.PREFIX_BYTE_USER)
    (directory / "user.nk").write_text(seed)
    (directory / "other.nk").write_text(other)
    return Auth(f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n',
                right={"JETPOOL_NATS_NKEY_SEED": str(directory / "user.nk")},
                wrong={"JETPOOL_NATS_NKEY_SEED": str(directory / "other.nk")},
                variable="JETPOOL_NATS_NKEY_SEED", secrets=(seed, other))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(issuer: Any, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT as nsc issues it: JSON claims signed by the issuer's NKey (alg ed25519-nkey)."""
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    claims = {"jti": base64.b32encode(secrets.token_bytes(20)).decode(), "iat": int(time.time()),
              "iss": issuer.public_key.decode(), "name": name, "sub": subject, "nats": {**nats, "version": 2}}
    signed = f"{header}.{_b64(json.dumps(claims).encode())}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


CREDS = """-----BEGIN NATS USER JWT-----
{jwt}
------END NATS USER JWT------

-----BEGIN USER NKEY SEED-----
{seed}
------END USER NKEY SEED------
"""
UNLIMITED = {key: -1 for key in ("subs", "data", "payload", "imports", "exports", "conn", "leaf", "mem_storage",
                                 "disk_storage", "streams", "consumer")}


def creds_auth(directory: Path) -> Auth:
    """Operator mode: the server trusts an operator, which signed a system account and the app's account;
    the right .creds holds a user of that account, the wrong one a user of an account nobody signed."""
    _, operator, operator_pair = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    accounts = {name: _keypair(nkeys.PREFIX_BYTE_ACCOUNT) for name in ("SYS", "APP", "STRANGER")}
    seeds = []
    for file, account in (("user.creds", "APP"), ("other.creds", "STRANGER")):
        seed, user, _ = _keypair(nkeys.PREFIX_BYTE_USER)
        user_jwt = _jwt(accounts[account][2], user, file, {"type": "user", "subs": -1, "data": -1, "payload": -1})
        (directory / file).write_text(CREDS.format(jwt=user_jwt, seed=seed))
        seeds.append(seed)
    (directory / "operator.jwt").write_text(_jwt(operator_pair, operator, "jetpool-test", {"type": "operator"}))
    # The server knows SYS and APP (JetStream on: its limits include storage); STRANGER is unknown.
    claims: dict[str, dict[str, Any]] = {"SYS": {"type": "account"},
                                         "APP": {"type": "account", "limits": {**UNLIMITED, "wildcards": True}}}
    preload = "".join(f'  {accounts[name][1]}: "{_jwt(operator_pair, accounts[name][1], name, nats)}"\n'
                      for name, nats in claims.items())
    conf = (f'operator: "{directory / "operator.jwt"}"\nsystem_account: {accounts["SYS"][1]}\n'
            f"resolver: MEMORY\nresolver_preload: {{\n{preload}}}\n")
    return Auth(conf, right={"JETPOOL_NATS_CREDS": str(directory / "user.creds")},
                wrong={"JETPOOL_NATS_CREDS": str(directory / "other.creds")}, variable="JETPOOL_NATS_CREDS",
                secrets=tuple(seeds))


def assert_no_secret(text: str, values: tuple[str, ...] | list[str]) -> None:
    for value in values:
        assert value not in text, "a secret was printed"


def provision(app: App, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``jetpool provision`` at debug level, so that even debug logging is checked for secrets."""
    return run_cli(["provision", "-c", str(app.path), "--log-level", "debug"], env=env)


# ---- clients over the engine's own connect ---------------------------------------------------------


async def _with_connection(url: str, env: dict[str, str], work: Callable[[Any], Any]) -> Any:
    nc = await connect(NatsConfig(url=url, connect_timeout_s=5), "security-test", env=env)
    try:
        return await work(nc.jetstream())
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def connects(url: str, env: dict[str, str]) -> bool:
    """True if the engine's own connect succeeds and JetStream answers on the connection."""

    async def work(js: Any) -> bool:
        return bool(await js.account_info())

    return bool(asyncio.run(_with_connection(url, env, work)))


# ---- the tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_auth", [password_auth, token_auth, nkey_auth, creds_auth],
                         ids=["password", "token", "nkey", "creds"])
def test_credentials_from_the_environment(make_auth: Callable[[Path], Auth], secure_server: StartServer,
                                          tmp_path: Path) -> None:
    auth = make_auth(tmp_path)
    server = secure_server(tmp_path / "nats", auth.conf)
    app = write_config(tmp_path, server.url)

    assert connects(server.url, auth.right)

    wrong = provision(app, auth.wrong)
    assert wrong.returncode == 2, wrong.stderr
    assert "authorization violation" in wrong.stderr and auth.variable in wrong.stderr, wrong.stderr
    assert "Traceback" not in wrong.stderr
    assert_no_secret(wrong.stdout + wrong.stderr, auth.secrets)


def test_no_credentials_for_a_server_that_wants_them(secure_server: StartServer, tmp_path: Path) -> None:
    auth = password_auth(tmp_path)
    app = write_config(tmp_path, secure_server(tmp_path / "nats", auth.conf).url)
    result = provision(app, {})
    assert result.returncode == 2
    assert "authorization violation" in result.stderr and "none given" in result.stderr, result.stderr


@pytest.fixture(scope="module")
def tls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """A server that requires TLS with a client certificate signed by the test CA (and no password)."""
    directory = tmp_path_factory.mktemp("tls-nats")
    (directory / "nats.conf").write_text(pki.server_tls())
    server = EmbeddedServer(store_dir=directory / "store", config_file=directory / "nats.conf")
    try:
        yield server.start()
    finally:
        server.kill()


@pytest.mark.parametrize(("client", "expected"), [
    ({"ca": True, "cert": True}, None),
    ({"ca": True, "cert": False}, "set JETPOOL_NATS_TLS_CERT"),
    ({"ca": True, "cert": True, "rogue": True}, "JETPOOL_NATS_TLS_CERT"),
    ({"ca": False, "cert": True}, "the server's certificate is not trusted"),
], ids=["right", "no-client-cert", "client-cert-of-another-ca", "server-not-trusted"])
def test_tls_with_client_certificates(client: dict[str, bool], expected: str | None, pki: Pki,
                                      tls_server: EmbeddedServer, tmp_path: Path) -> None:
    env = pki.client_env(**client)
    if expected is None:
        assert connects(tls_server.url, env)
        return
    result = provision(write_config(tmp_path, tls_server.url), env)
    assert result.returncode == 2, result.stderr
    assert "TLS" in result.stderr and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_tls_configured_refuses_a_server_without_tls(pki: Pki, nats_server: EmbeddedServer) -> None:
    async def attempt() -> None:
        await connect(NatsConfig(url=nats_server.url, connect_timeout_s=5), "tls-test", env=pki.client_env())

    with pytest.raises(BrokerError, match="does not use TLS; refusing an unencrypted connection"):
        asyncio.run(attempt())


def test_tls_handshake_first(pki: Pki, secure_server: StartServer, tmp_path: Path) -> None:
    server = secure_server(tmp_path / "nats", pki.server_tls(handshake_first=True))
    assert connects(server.url, {**pki.client_env(), "JETPOOL_NATS_TLS_HANDSHAKE_FIRST": "1"})


# ---- a whole engine with authentication and TLS ----------------------------------------------------


def _publish_pings(app: App, env: dict[str, str], n: int) -> None:
    async def work(js: Any) -> None:
        for event in pings(n):
            await js.publish(app.subject(event.type), event.encode(), headers={MSG_ID_HEADER: event.id})

    asyncio.run(_with_connection(app.url, env, work))


def _count(app: App, env: dict[str, str], event_type: str) -> int:
    async def work(js: Any) -> int:
        info = await js.stream_info(app.stream, subjects_filter=app.subject(event_type))
        return int(sum((info.state.subjects or {}).values()))

    return int(asyncio.run(_with_connection(app.url, env, work)))


def test_engine_runs_with_password_and_mutual_tls(pki: Pki, secure_server: StartServer,
                                                  engine: Callable[..., Engine], tmp_path: Path) -> None:
    auth = password_auth(tmp_path)
    server = secure_server(tmp_path / "nats", auth.conf + pki.server_tls())
    app = write_config(tmp_path, server.url)
    env = {**auth.right, **pki.client_env()}

    run = engine(app, env={**env, "JETPOOL_HTTP_PORT": "0"}, args=["--log-level", "debug"])
    _publish_pings(app, env, 5)
    wait_for(lambda: _count(app, env, "Pong") >= 5, 60, "5 Pongs from the engine", detail=run.tail)

    assert _count(app, env, "Pong") == 5
    assert run.records("worker.started")
    assert not run.records("nats.refused")
    assert_no_secret(run.log_text(), auth.secrets)


# ---- a password in a URL is never printed ----------------------------------------------------------


def password_in_url(secure_server: StartServer, directory: Path) -> tuple[str, str]:
    """A server wanting user ``admin`` and a new password, and the URL that carries both."""
    password = f"S3cretPassw0rd{secrets.token_hex(8)}"
    server = secure_server(directory / "nats", f'authorization {{ user: admin, password: "{password}" }}\n')
    return f"nats://admin:{password}@127.0.0.1:{server.port}", password


def test_a_cli_error_about_the_server_hides_the_password_of_its_url(secure_server: StartServer,
                                                                     tmp_path: Path) -> None:
    url, password = password_in_url(secure_server, tmp_path)
    app = write_config(tmp_path, url)  # never provisioned: the server has no dead-letter stream

    result = run_cli(["dlq", "list", "-c", str(app.path), "--log-level", "debug"])

    assert result.returncode == 2, result.stderr
    assert "no dead-letter stream" in result.stderr and "nats://***@127.0.0.1" in result.stderr, result.stderr
    assert_no_secret(result.stdout + result.stderr, [password])


def test_the_demo_prints_no_password_and_gives_it_to_no_child_argv(secure_server: StartServer,
                                                                    tmp_path: Path) -> None:
    """The URL reaches the demo, and from it the engine it starts, in the environment only."""
    url, password = password_in_url(secure_server, tmp_path)
    app = write_shop_config(tmp_path, "nats://127.0.0.1:1")  # overridden by JETPOOL_NATS_URL
    log = tmp_path / "engine.log"
    demo = subprocess.Popen([sys.executable, "-m", "engine", "demo", "-c", str(app.path), "--orders", "20",
                             "--rate", "0", "--stall-s", "10", "--log-file", str(log), "--log-level", "debug"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
                            env=engine_env({"JETPOOL_NATS_URL": url}), start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    argv: dict[int, list[str]] = {}
    try:
        while demo.poll() is None:  # the argv of every process the demo starts, while it runs
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(demo.pid).children(recursive=True):
                    seen.setdefault(child.pid, child)
                    with contextlib.suppress(psutil.Error):
                        argv.setdefault(child.pid, child.cmdline())
            time.sleep(0.05)
        out = demo.communicate(timeout=10)[0]
    finally:
        _kill(demo, seen.values())

    assert demo.returncode == 0, out
    assert f"broker nats://***@127.0.0.1:{url.rsplit(':', 1)[1]}" in " ".join(out.split()), out
    assert any("run" in args and "engine" in args for args in argv.values()), argv  # the engine was seen
    assert len(argv) > 2, argv  # ... and its workers
    assert_no_secret(out + log.read_text() + json.dumps(argv), [password])


def _kill(proc: subprocess.Popen[str], children: Any) -> None:
    """SIGKILL a process and the descendants seen of it, by PID (psutil checks each one's start time)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    tree = list(children)
    for child in tree:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(tree, timeout=10)
