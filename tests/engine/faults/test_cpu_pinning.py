"""Worker CPU affinity, read back from the kernel for each live worker process."""

from __future__ import annotations

import os
from collections.abc import Callable

from engine.supervisor import plan_cpus
from tests.support import App, Engine


def affinities(run: Engine) -> dict[int, set[int]]:
    """worker index -> the CPU set the kernel reports for that worker's process."""
    pids = run.worker_pids()
    assert set(pids.values()) == {p.pid for p in run.workers()}  # the logged pids are the live children
    return {index: os.sched_getaffinity(pid) for (_, index), pid in pids.items()}


def test_workers_are_pinned_round_robin(make_config: Callable[..., App], engine: Callable[..., Engine]) -> None:
    allowed = sorted(os.sched_getaffinity(0))  # the supervisor inherits the test's affinity
    workers = len(allowed) + 1  # one more than CPUs: the plan wraps around
    run = engine(make_config({"echo": {"workers": workers}}))
    planned = plan_cpus(workers, allowed)
    assert planned == [allowed[i % len(allowed)] for i in range(workers)]
    assert affinities(run) == {i: {cpu} for i, cpu in enumerate(planned)}
    assert {r["worker"]: r["cpu"] for r in run.records("worker.started")} == dict(enumerate(planned))


def test_supervisor_cpus_restrict_the_plan(make_config: Callable[..., App], engine: Callable[..., Engine]) -> None:
    only = max(os.sched_getaffinity(0))
    run = engine(make_config({"echo": {"workers": 2}}, supervisor={"cpus": [only]}))
    assert affinities(run) == {0: {only}, 1: {only}}


def test_unpinned_workers_keep_the_full_cpu_set(make_config: Callable[..., App],
                                                engine: Callable[..., Engine]) -> None:
    run = engine(make_config({"echo": {"workers": 2, "pin_cpus": False}}))
    full = os.sched_getaffinity(0)
    assert affinities(run) == {0: full, 1: full}
    assert [r["cpu"] for r in run.records("worker.started")] == [None, None]
