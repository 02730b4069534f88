"""Config validation: every error names the file, the key path and what was expected."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.config import Config, load_config, parse_config, subject_matches
from engine.errors import ConfigError
from tests.support import REPO_ROOT

REPO = REPO_ROOT


def shop() -> dict[str, Any]:
    return copy.deepcopy({
        "app": "shop",
        "subject_prefix": "shop",
        "streams": [{"name": "SHOP", "subjects": ["shop.>"]}],
        "services": {
            "payments": {"stream": "SHOP", "routes": {"OrderPlaced": "handlers.examples:echo"},
                         "workers": 2, "batch": 64, "max_in_flight": 128},
        },
    })


def write(tmp_path: Path, raw: Any, name: str = "shop.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def error_of(tmp_path: Path, raw: Any, env: dict[str, str] | None = None) -> str:
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={} if env is None else env)
    return str(info.value)


def test_valid_config_loads_with_defaults_and_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, shop()), env={})
    svc = cfg.services["payments"]
    assert (svc.workers, svc.batch, svc.max_in_flight) == (2, 64, 128)
    assert svc.effective_max_ack_pending == 2 * 128
    assert cfg.filter_subjects("payments") == ["shop.OrderPlaced"]
    assert cfg.durable("payments") == "payments"
    assert cfg.source == str(tmp_path / "shop.yaml")
    with pytest.raises(ValueError):
        svc.workers = 3


def test_wrong_type_names_file_key_path_and_expectation(tmp_path: Path) -> None:
    raw = shop()
    raw["services"]["payments"]["workers"] = "two"
    path = tmp_path / "shop.yaml"
    assert error_of(tmp_path, raw) == f"{path}: services.payments.workers: expected a positive integer, got 'two'"


def test_parse_config_uses_the_given_source_name() -> None:
    raw = shop()
    raw["services"]["payments"]["workers"] = "two"
    with pytest.raises(ConfigError) as info:
        parse_config(raw, source="config/shop.yaml")
    assert str(info.value) == "config/shop.yaml: services.payments.workers: expected a positive integer, got 'two'"


@pytest.mark.parametrize(("value", "shown"), [(0, "0"), (-3, "-3"), (2.5, "2.5"), (True, "True"), (None, "None")])
def test_workers_must_be_a_positive_integer(tmp_path: Path, value: Any, shown: str) -> None:
    raw = shop()
    raw["services"]["payments"]["workers"] = value
    assert error_of(tmp_path, raw).endswith(f"services.payments.workers: expected a positive integer, got {shown}")


def test_unknown_keys_are_rejected_at_every_level(tmp_path: Path) -> None:
    raw = shop()
    raw["services"]["payments"]["wrokers"] = 2
    raw["colour"] = "blue"
    message = error_of(tmp_path, raw)
    path = tmp_path / "shop.yaml"
    assert f"{path}: services.payments.wrokers: unknown key" in message.splitlines()
    assert f"{path}: colour: unknown key" in message.splitlines()


def test_missing_required_key(tmp_path: Path) -> None:
    raw = shop()
    del raw["streams"]
    assert error_of(tmp_path, raw) == f"{tmp_path / 'shop.yaml'}: streams: required key is missing"


def test_service_referencing_a_missing_stream(tmp_path: Path) -> None:
    raw = shop()
    raw["services"]["payments"]["stream"] = "ORDERS"
    assert error_of(tmp_path, raw) == (
        f"{tmp_path / 'shop.yaml'}: services.payments.stream: no stream named 'ORDERS' (streams: SHOP)")


def test_filter_subject_outside_the_stream(tmp_path: Path) -> None:
    raw = shop()
    raw["services"]["payments"]["filter_subjects"] = ["billing.OrderPlaced"]
    assert error_of(tmp_path, raw).endswith(
        "services.payments: subject 'billing.OrderPlaced' is not captured by stream 'SHOP' (subjects: shop.>)")


def test_window_larger_than_max_ack_pending(tmp_path: Path) -> None:
    raw = shop()
    raw["services"]["payments"].update(workers=4, batch=50, max_in_flight=100, max_ack_pending=300)
    message = error_of(tmp_path, raw)
    assert message.startswith(f"{tmp_path / 'shop.yaml'}: services.payments: ")
    assert "workers x max_in_flight x replicas = 400 exceeds max_ack_pending (300)" in message


def test_window_that_fits_max_ack_pending_is_accepted(tmp_path: Path) -> None:
    raw = shop()
    raw["services"]["payments"].update(workers=4, batch=50, max_in_flight=100, max_ack_pending=400)
    assert load_config(write(tmp_path, raw), env={}).services["payments"].effective_max_ack_pending == 400


def test_batch_larger_than_max_in_flight(tmp_path: Path) -> None:
    raw = shop()
    raw["services"]["payments"].update(batch=300, max_in_flight=100)
    assert error_of(tmp_path, raw).endswith("services.payments: batch (300) must not exceed max_in_flight (100)")


@pytest.mark.parametrize(("target", "shown"), [("handlers.examples", "'handlers.examples'"), (":echo", "':echo'")])
def test_route_target_must_be_module_colon_function(tmp_path: Path, target: str, shown: str) -> None:
    raw = shop()
    raw["services"]["payments"]["routes"] = {"OrderPlaced": target}
    assert error_of(tmp_path, raw).endswith(
        f"services.payments.routes: route OrderPlaced: expected 'module:function', got {shown}")


@pytest.mark.parametrize(("section", "key", "value", "expected"), [
    ("log", "level", "loud", "log.level: expected one of 'debug', 'info', 'warning' or 'error', got 'loud'"),
    ("streams", "storage", "disk", "streams.0.storage: expected one of 'file' or 'memory', got 'disk'"),
    ("streams", "name", "bad name", "streams.0.name: expected letters, digits, '_' or '-', got 'bad name'"),
    ("supervisor", "cpus", [0, -1], "supervisor.cpus.1: expected a non-negative integer, got -1"),
    ("services", "ack_wait_s", 0, "services.payments.ack_wait_s: expected a positive number, got 0"),
    ("services", "idle_heartbeat_s", 16, "services.payments: idle_heartbeat_s (16.0) must be at most half of "
     "pull_expires_s (30.0): the server refuses longer heartbeats"),
])
def test_error_messages_for_other_fields(tmp_path: Path, section: str, key: str, value: Any, expected: str) -> None:
    raw = shop()
    if section == "streams":
        raw["streams"][0][key] = value
    elif section == "services":
        raw["services"]["payments"][key] = value
    else:
        raw[section] = {key: value}
    assert error_of(tmp_path, raw) == f"{tmp_path / 'shop.yaml'}: {expected}"


def test_every_error_is_reported_one_per_line(tmp_path: Path) -> None:
    raw = shop()
    raw["services"]["payments"]["workers"] = "two"
    raw["log"] = {"level": "loud"}
    lines = error_of(tmp_path, raw).splitlines()
    assert len(lines) == 2
    assert all(line.startswith(f"{tmp_path / 'shop.yaml'}: ") for line in lines)


def test_file_level_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: file not found")):
        load_config(missing, env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("services: [unclosed\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: not valid YAML")):
        load_config(bad, env={})
    listed = write(tmp_path, ["a", "b"], "list.yaml")
    with pytest.raises(ConfigError, match=re.escape(f"{listed}: expected a mapping at the top level, got list")):
        load_config(listed, env={})


# ---- environment overrides ---------------------------------------------------------------------------


def test_env_overrides_short_names_and_key_paths(tmp_path: Path) -> None:
    env = {
        "JETPOOL_NATS_URL": "nats://127.0.0.1:4999",
        "JETPOOL_LOG_LEVEL": "debug",
        "JETPOOL_STORE_DIR": "/var/lib/jetpool",
        "JETPOOL__SERVICES__PAYMENTS__WORKERS": "4",
        "JETPOOL__SERVICES__PAYMENTS__PIN_CPUS": "false",
        "JETPOOL__STREAMS__SHOP__MAX_AGE_S": "3600",
        "JETPOOL__SUPERVISOR__MAX_RESTARTS": "9",
        "UNRELATED": "x",
    }
    cfg = load_config(write(tmp_path, shop()), env=env)
    assert cfg.nats.url == "nats://127.0.0.1:4999"
    assert cfg.nats.store_dir == "/var/lib/jetpool"
    assert cfg.log.level == "debug"
    assert cfg.services["payments"].workers == 4
    assert cfg.services["payments"].pin_cpus is False
    assert cfg.streams[0].max_age_s == 3600.0
    assert cfg.supervisor.max_restarts == 9


def test_env_override_by_list_index_and_mixed_case_names(tmp_path: Path) -> None:
    raw = shop()
    raw["services"] = {"Payments": raw["services"]["payments"]}
    env = {"JETPOOL__STREAMS__0__REPLICAS": "3", "JETPOOL__SERVICES__PAYMENTS__WORKERS": "3",
           "JETPOOL__SERVICES__PAYMENTS__ROUTES__ORDERPLACED": "handlers.examples:sink"}
    cfg = load_config(write(tmp_path, raw), env=env)
    assert cfg.streams[0].replicas == 3
    assert list(cfg.services) == ["Payments"]
    assert cfg.services["Payments"].workers == 3
    # The route keeps its YAML spelling: the override replaces it instead of adding 'orderplaced'.
    assert cfg.services["Payments"].routes == {"OrderPlaced": "handlers.examples:sink"}


def test_env_override_values_are_validated_like_the_file(tmp_path: Path) -> None:
    message = error_of(tmp_path, shop(), env={"JETPOOL__SERVICES__PAYMENTS__WORKERS": "two"})
    assert message == f"{tmp_path / 'shop.yaml'}: services.payments.workers: expected a positive integer, got 'two'"


@pytest.mark.parametrize(("name", "reason"), [
    ("JETPOOL__STREAMS__ORDERS__MAX_AGE_S", "cannot set streams.orders.max_age_s: no list item named 'orders'"),
    ("JETPOOL__STREAMS__7__MAX_AGE_S", "cannot set streams.7.max_age_s: no list item named '7'"),
    ("JETPOOL__APP__NAME", "cannot set app.name: expected a mapping to hold 'name', found a str"),
])
def test_bad_env_override_paths_name_file_and_variable(tmp_path: Path, name: str, reason: str) -> None:
    message = error_of(tmp_path, shop(), env={name: "60"})
    assert message == f"{tmp_path / 'shop.yaml'}: environment variable {name}: {reason}"


def test_env_overrides_are_read_from_os_environ_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JETPOOL__SERVICES__PAYMENTS__WORKERS", "5")
    assert load_config(write(tmp_path, shop())).services["payments"].workers == 5


# ---- shipped configs ---------------------------------------------------------------------------------


SHIPPED = sorted((REPO / "config").glob("*.yaml"))


def test_the_example_config_is_shipped() -> None:
    assert REPO / "config" / "example.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path, env={})
    assert isinstance(cfg, Config)
    assert cfg.services and cfg.streams


def test_subject_matching() -> None:
    assert subject_matches("shop.>", "shop.OrderPlaced")
    assert subject_matches("shop.*", "shop.OrderPlaced")
    assert not subject_matches("shop.*", "shop.a.b")
    assert not subject_matches("shop.>", "shop")
    assert not subject_matches("billing.>", "shop.OrderPlaced")
    assert subject_matches("shop.>", "shop.*")
