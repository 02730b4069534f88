"""The command line as a user runs it (subprocesses; no broker needed for any of these)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from engine import cli
from engine.errors import JetpoolError
from handlers import SHOP_YAML
from tests.support import REPO_ROOT, run_cli

SHIPPED = sorted((REPO_ROOT / "config").glob("*.yaml"))


def test_jetpool_help_lists_the_commands() -> None:
    result = run_cli(["--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: jetpool ")
    for command in ("run", "provision", "check", "dlq"):
        assert f"    {command}" in result.stdout
    for command in ("demo", "load", "chaos", "audit"):  # the shop's, through the jetpool.commands entry points
        assert f"    {command}" in result.stdout


def test_the_engine_commands_take_no_default_config() -> None:
    result = run_cli(["run"])
    assert result.returncode == 2
    assert "the following arguments are required: -c/--config" in result.stderr


def test_config_shop_yaml_is_a_copy_of_the_installed_one() -> None:
    assert (REPO_ROOT / "config" / "shop.yaml").read_bytes() == SHOP_YAML.read_bytes(), (
        "handlers/shop.yaml is the shop's config: cp handlers/shop.yaml config/shop.yaml")


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
    config = ["-c", str(SHOP_YAML)] if argv[0] == "dlq" else []
    result = run_cli([*argv, *config])
    assert result.returncode == 2
    assert message in result.stderr


# ---- an app's commands: the jetpool.commands entry points -------------------------------------------


class Hello:
    """A command as an app writes one."""

    name = "hello"
    help = "say hello"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--times", type=int, default=1)

    async def run(self, args: argparse.Namespace) -> int:
        if args.times < 0:
            raise JetpoolError("--times: not below zero")
        print("hello " * args.times)
        return 7


class Greet(Hello):
    name = "greet"


hello = Hello()
not_a_command = object()
clash = Hello()
clash.name = "run"


@pytest.fixture(autouse=True)
def _logging_back_to_defaults() -> Iterator[None]:
    """cli.main configures structlog to print to the stderr of its moment (here a capture that closes
    after the test): later tests must not log into it."""
    yield
    structlog.reset_defaults()


def _points(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    points = [EntryPoint(name, value, cli.COMMANDS_GROUP) for name, value in values.items()]
    monkeypatch.setattr(cli, "entry_points", lambda group: points if group == cli.COMMANDS_GROUP else [])


def test_an_apps_command_runs_like_the_engines_own(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    _points(monkeypatch, hello=f"{__name__}:hello", greet=f"{__name__}:Greet")  # an object, or a class
    assert cli.main(["hello", "--times", "2"]) == 7
    assert capsys.readouterr().out == "hello hello \n"
    assert cli.main(["greet"]) == 7
    assert cli.main(["hello", "--times", "-1"]) == 2
    assert capsys.readouterr().err == "jetpool: error: --times: not below zero\n"


def test_an_app_command_that_does_not_load_is_reported_and_left_out(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    _points(monkeypatch, broken="no_such_app.commands:broken", odd=f"{__name__}:not_a_command",
            run=f"{__name__}:clash", hello=f"{__name__}:hello")
    commands = cli.app_commands()
    assert [c.name for c in commands] == ["hello"]
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("jetpool: warning: command 'broken' (no_such_app.commands:broken) could not be loaded: "
                             "ModuleNotFoundError")
    assert err[1] == (f"jetpool: warning: command 'odd' ({__name__}:not_a_command) "
                      "lacks name, help, add_arguments or run")
    assert err[2] == f"jetpool: warning: command 'run' ({__name__}:clash): the name 'run' is taken"
    with pytest.raises(SystemExit):
        cli.build_parser(commands).parse_args(["run", "--help"])  # the engine's run, not the app's
    assert "usage: jetpool run " in capsys.readouterr().out
