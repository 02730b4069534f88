"""The command line as a user runs it (subprocesses; no broker needed for any of these)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import REPO_ROOT, run_cli

SHIPPED = sorted((REPO_ROOT / "config").glob("*.yaml"))


def test_jetpool_help_lists_the_commands() -> None:
    result = run_cli(["--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: jetpool ")
    for command in ("run", "provision", "check"):
        assert f"    {command}" in result.stdout


def test_jetpool_run_help_lists_its_options() -> None:
    result = run_cli(["run", "--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: jetpool run ")
    for option in ("--config", "--service", "--nats-url", "--no-provision", "--log-level"):
        assert option in result.stdout
    signals, _, codes = result.stdout.partition("signals:")[2].partition("exit codes:")
    assert "SIGTERM, SIGINT  drain" in signals and "SIGHUP" in signals  # what stopping it does
    assert "3 crash loop, 130 stopped by a second signal" in " ".join(codes.split())


def test_python_dash_m_engine_is_the_same_command() -> None:
    result = run_cli(["--help"], module=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == run_cli(["--help"]).stdout


def test_no_command_is_a_usage_error() -> None:
    result = run_cli([])
    assert result.returncode == 2
    assert "the following arguments are required: COMMAND" in result.stderr


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_pass_check(path: Path) -> None:
    relative = path.relative_to(REPO_ROOT)
    result = run_cli(["check", "-c", str(relative)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{relative}: ok (")


def shop(tmp_path: Path, **service: Any) -> Path:
    raw = {
        "subject_prefix": "shop",
        "streams": [{"name": "SHOP", "subjects": ["shop.>"]}],
        "services": {"payments": {"stream": "SHOP", "routes": {"OrderPlaced": "handlers.examples:echo"},
                                  **service}},
    }
    path = tmp_path / "shop.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_check_bad_config_exits_2_with_the_precise_message(tmp_path: Path) -> None:
    path = shop(tmp_path, workers="two")
    result = run_cli(["check", "-c", str(path)])
    assert result.returncode == 2
    expected = f"{path}: services.payments.workers: expected a positive integer, got 'two'"
    assert result.stderr == f"jetpool: error: {expected}\n"
    assert result.stdout == ""


def test_check_sees_environment_overrides(tmp_path: Path) -> None:
    path = shop(tmp_path)
    result = run_cli(["check", "-c", str(path)], env={"JETPOOL__SERVICES__PAYMENTS__WORKERS": "0"})
    assert result.returncode == 2
    assert result.stderr == f"jetpool: error: {path}: services.payments.workers: expected a positive integer, got 0\n"


def test_check_bad_route_exits_2(tmp_path: Path) -> None:
    path = shop(tmp_path, routes={"OrderPlaced": "handlers.examples:nope"})
    result = run_cli(["check", "-c", str(path)])
    assert result.returncode == 2
    assert result.stderr == (f"jetpool: error: {path}: services.payments.routes.OrderPlaced: "
                             "module 'handlers.examples' has no function 'nope'\n")


def test_run_rejects_a_bad_route_before_starting_anything(tmp_path: Path) -> None:
    path = shop(tmp_path, routes={"OrderPlaced": "handlers.nowhere:handle"})
    # A URL nobody listens on: the error must come before any connection attempt.
    result = run_cli(["run", "-c", str(path), "--nats-url", "nats://127.0.0.1:1"], timeout_s=30)
    assert result.returncode == 2
    assert f"{path}: services.payments.routes.OrderPlaced: cannot import module 'handlers.nowhere'" in result.stderr


def test_run_rejects_cpus_this_machine_does_not_have_before_starting_anything(tmp_path: Path) -> None:
    path = shop(tmp_path)
    absent = max(os.sched_getaffinity(0)) + 1
    result = run_cli(["run", "-c", str(path), "--nats-url", "nats://127.0.0.1:1"], timeout_s=30,
                     env={"JETPOOL__SUPERVISOR__CPUS": f"[{absent}]"})
    assert result.returncode == 2
    assert f"{path}: supervisor.cpus: CPU {absent} is not available to this process (it may use " in result.stderr


def test_run_rejects_an_unknown_service(tmp_path: Path) -> None:
    path = shop(tmp_path)
    result = run_cli(["run", "-c", str(path), "--service", "billing", "--nats-url", "nats://127.0.0.1:1"],
                     timeout_s=30)
    assert result.returncode == 2
    assert result.stderr.strip().endswith(f"{path}: no service named billing (services: payments)")


@pytest.mark.parametrize(("argv", "message"), [
    (["dlq", "list", "--limit", "0"], "argument --limit: must be at least 1, got 0"),
    (["dlq", "list", "--limit", "-3"], "argument --limit: must be at least 1, got -3"),
    (["demo", "--orders", "ten"], "argument --orders: 'ten' is not a whole number"),
    (["chaos", "--orders", "0"], "argument --orders: must be at least 1, got 0"),
])
def test_counts_below_one_are_usage_errors(argv: list[str], message: str) -> None:
    config = ["-c", str(REPO_ROOT / "config" / "shop.yaml")] if argv[0] == "dlq" else []
    result = run_cli([*argv, *config])
    assert result.returncode == 2
    assert message in result.stderr
