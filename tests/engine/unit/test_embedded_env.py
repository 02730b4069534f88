"""The embedded nats-server's GOMAXPROCS: half the CPUs unless configured, the environment's when set."""

from __future__ import annotations

import os

import pytest

from engine.embedded import go_max_procs, server_env


def test_unset_means_half_the_usable_cpus_and_at_least_one() -> None:
    assert go_max_procs(None) == max(1, len(os.sched_getaffinity(0)) // 2)
    assert go_max_procs(3) == 3


def test_the_server_gets_it_in_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOMAXPROCS", raising=False)
    monkeypatch.setenv("JETPOOL_PROBE", "kept")
    env = server_env(None)
    assert env["GOMAXPROCS"] == str(go_max_procs(None)) and env["JETPOOL_PROBE"] == "kept"
    assert server_env(4)["GOMAXPROCS"] == "4"


def test_zero_leaves_it_to_go(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOMAXPROCS", "7")
    assert "GOMAXPROCS" not in server_env(0)


def test_an_environment_value_wins_over_the_default_not_over_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOMAXPROCS", "7")
    assert server_env(None)["GOMAXPROCS"] == "7"
    assert server_env(2)["GOMAXPROCS"] == "2"
