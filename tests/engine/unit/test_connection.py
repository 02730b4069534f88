"""Credentials and TLS settings come from the environment only, and no secret reaches an error message."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from engine.config import NatsConfig, load_config, parse_config
from engine.connection import connect, connect_options, redact_url
from engine.errors import BrokerError, ConfigError

CFG = NatsConfig(url="nats://127.0.0.1:4222")
SECRET = "s3cret-Value-42"


def test_password_comes_from_a_file_without_its_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / "password").write_text(SECRET + "\n")
    options = connect_options(CFG, {"JETPOOL_NATS_USER": "orders",
                                    "JETPOOL_NATS_PASSWORD_FILE": str(tmp_path / "password")})
    assert (options["user"], options["password"]) == ("orders", SECRET)
    assert "tls" not in options and "token" not in options


def test_token_and_inbox_prefix_from_the_environment() -> None:
    options = connect_options(CFG, {"JETPOOL_NATS_TOKEN": SECRET, "JETPOOL_NATS_INBOX_PREFIX": "_INBOX_orders"})
    assert options["token"] == SECRET
    assert options["inbox_prefix"] == "_INBOX_orders"


@pytest.mark.parametrize("variable", ["JETPOOL_NATS_PASSWORD_FILE", "JETPOOL_NATS_TOKEN_FILE", "JETPOOL_NATS_CREDS",
                                      "JETPOOL_NATS_NKEY_SEED", "JETPOOL_NATS_TLS_CA"])
def test_an_unreadable_file_is_named_with_its_variable(variable: str, tmp_path: Path) -> None:
    missing = tmp_path / "not-mounted"
    with pytest.raises(BrokerError) as err:
        connect_options(CFG, {"JETPOOL_NATS_USER": "orders", variable: str(missing)})
    assert variable in str(err.value) and str(missing) in str(err.value)


def test_a_tls_key_without_a_certificate_is_an_error() -> None:
    with pytest.raises(BrokerError, match="JETPOOL_NATS_TLS_KEY is set without JETPOOL_NATS_TLS_CERT"):
        connect_options(CFG, {"JETPOOL_NATS_TLS_KEY": "/etc/tls/tls.key"})


def test_an_encrypted_tls_key_fails_instead_of_prompting(tmp_path: Path) -> None:
    assert shutil.which("openssl"), "the openssl command is needed to make the test key (Debian: openssl)"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-keyout", "client.key", "-out", "client.pem", "-days", "1", "-subj", "/CN=client",
                    "-passout", f"pass:{SECRET}"], cwd=tmp_path, check=True, capture_output=True, timeout=30)
    env = {"JETPOOL_NATS_TLS_CERT": str(tmp_path / "client.pem"), "JETPOOL_NATS_TLS_KEY": str(tmp_path / "client.key")}
    with pytest.raises(BrokerError, match="the private key is encrypted"):
        connect_options(CFG, env)


def test_connect_errors_hide_the_password_of_a_url_and_of_the_environment(capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing listens on port 1: two attempts fail at once, and the message quotes the URL.
    cfg = NatsConfig(url=f"nats://orders:{SECRET}@127.0.0.1:1", connect_timeout_s=2, reconnect_wait_s=0.05,
                     max_reconnect_attempts=1)
    with pytest.raises(BrokerError) as err:
        asyncio.run(connect(cfg, "test", env={"JETPOOL_NATS_USER": "orders", "JETPOOL_NATS_PASSWORD": SECRET}))
    assert SECRET not in str(err.value)
    assert "nats://***@127.0.0.1:1" in str(err.value)
    logged = capsys.readouterr()
    assert SECRET not in logged.out + logged.err


@pytest.mark.parametrize("key", ["password", "token", "user", "tls_key"])
def test_the_config_file_cannot_carry_credentials(key: str) -> None:
    raw = {"nats": {"url": "nats://127.0.0.1:4222", key: SECRET}, "streams": [{"name": "S", "subjects": ["s.>"]}],
           "services": {"echo": {"stream": "S", "routes": {"Ping": "handlers.examples:echo"}}}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, source="shop.yaml")
    message = str(err.value)
    assert message.startswith(f"shop.yaml: nats.{key}: unknown key; credentials and TLS files never go in the "
                              "config file")
    assert "JETPOOL_NATS_PASSWORD" in message
    assert SECRET not in message


def test_a_secret_in_a_misnamed_override_is_not_echoed(tmp_path: Path) -> None:
    path = tmp_path / "jetpool.yaml"
    path.write_text(yaml.safe_dump({"streams": [{"name": "S", "subjects": ["s.>"]}],
                                    "services": {"echo": {"stream": "S", "routes": {"Ping": "m:f"}}}}))
    with pytest.raises(ConfigError) as err:
        load_config(path, env={"JETPOOL__NATS__PASSWORD": f"[{SECRET}"})  # not valid YAML
    assert "JETPOOL__NATS__PASSWORD" in str(err.value)
    assert SECRET not in str(err.value)


@pytest.mark.parametrize(("text", "shown"), [
    (f"nats://admin:{SECRET}@127.0.0.1:4222", "nats://***@127.0.0.1:4222"),
    (f"admin:{SECRET}@nats-0:4222", "***@nats-0:4222"),  # scheme-less, as nats-py accepts
    (f"tls://{SECRET}@a:4222,nats://u:{SECRET}@b:4222", "tls://***@a:4222,nats://***@b:4222"),
    (f"nats://u:p@{SECRET}@h:4222/x", "nats://***@h:4222/x"),  # an unencoded @ in the password
    (f"no dead-letter stream 'DLQ' on nats://admin:{SECRET}@h:4222 (run x)",
     "no dead-letter stream 'DLQ' on nats://***@h:4222 (run x)"),
    ("nats://127.0.0.1:4222, nats://h:1", "nats://127.0.0.1:4222, nats://h:1"),
])
def test_redact_url_hides_the_credentials_of_every_url(text: str, shown: str) -> None:
    assert redact_url(text) == shown
