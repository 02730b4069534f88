"""The embedded nats-server's GOMAXPROCS: half the CPUs unless configured, the environment's when set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.embedded import go_max_procs, server_env, usable_cpus


def test_unset_means_half_the_usable_cpus_and_at_least_one() -> None:
    assert go_max_procs(None) == max(1, usable_cpus() // 2)
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


def test_a_cgroup_cpu_quota_caps_the_cpus_counted(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    affinity = len(os.sched_getaffinity(0))
    cpu_max.write_text("max 100000\n")
    assert usable_cpus(cpu_max) == affinity
    cpu_max.write_text("50000 100000\n")  # half a CPU: at least one
    assert usable_cpus(cpu_max) == 1
    cpu_max.write_text(f"{affinity * 300000} 100000\n")  # more than the machine: the machine
    assert usable_cpus(cpu_max) == affinity
    assert usable_cpus(tmp_path / "absent") == affinity
