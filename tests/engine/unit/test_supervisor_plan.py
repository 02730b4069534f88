"""Pure supervisor logic: CPU planning, slot specs, restart backoff and crash-loop accounting."""

from __future__ import annotations

import os

from engine.config import Config, parse_config
from engine.supervisor import Supervisor, plan_cpus


def test_plan_cpus_round_robin_over_allowed_cpus() -> None:
    assert plan_cpus(5, [0, 1]) == [0, 1, 0, 1, 0]
    assert plan_cpus(4, [3, 1, 2]) == [1, 2, 3, 1]
    assert plan_cpus(0, [0, 1]) == []


def test_plan_cpus_defaults_to_own_affinity() -> None:
    mine = sorted(os.sched_getaffinity(0))
    assert plan_cpus(len(mine) + 1) == [*mine, mine[0]]


def config(**supervisor: object) -> Config:
    return parse_config({
        "subject_prefix": "shop",
        "streams": [{"name": "SHOP", "subjects": ["shop.>"]}],
        "services": {
            "orders": {"stream": "SHOP", "routes": {"A": "handlers.examples:echo"}, "workers": 2},
            "audit": {"stream": "SHOP", "routes": {"B": "handlers.examples:sink"}, "workers": 1, "pin_cpus": False},
            "payments": {"stream": "SHOP", "routes": {"C": "handlers.examples:sink"}, "workers": 2},
        },
        "supervisor": supervisor,
    })


def test_slots_are_numbered_across_services_and_pinned_round_robin() -> None:
    sup = Supervisor(config(cpus=[0, 1]), ["orders", "audit", "payments"])
    specs = [(s.spec.service, s.spec.index, s.spec.slot, s.spec.cpu) for s in sup.slots]
    assert specs == [
        ("orders", 0, 0, 0), ("orders", 1, 1, 1),
        ("audit", 0, 2, None),  # pin_cpus: false keeps the slot unpinned, but it still takes its turn
        ("payments", 0, 3, 1), ("payments", 1, 4, 0),
    ]


def test_only_the_selected_services_get_slots() -> None:
    sup = Supervisor(config(cpus=[1]), ["payments"])
    assert [(s.spec.service, s.spec.cpu) for s in sup.slots] == [("payments", 1), ("payments", 1)]


def test_boot_failures_back_off_and_more_than_max_restarts_in_a_row_is_a_crash_loop() -> None:
    sup = Supervisor(config(restart_backoff_s=0.5, restart_backoff_max_s=3, max_restarts=4), ["audit"])
    slot = sup.slots[0]
    plans = [sup._restart_plan(slot, ready=False, now=float(t)) for t in range(5)]
    assert plans == [("boot_failed", 0.5), ("boot_failed", 1.0), ("boot_failed", 2.0), ("boot_failed", 3.0),
                     ("boot_failed", None)]


def test_a_worker_that_became_ready_resets_the_boot_failures() -> None:
    sup = Supervisor(config(max_restarts=2), ["audit"])
    slot = sup.slots[0]
    sup._restart_plan(slot, ready=False, now=0.0)
    sup._restart_plan(slot, ready=False, now=1.0)
    slot.exit_codes.append(-9)
    assert sup._restart_plan(slot, ready=True, now=2.0)[1] is not None
    assert slot.boot_failures == 0
    assert [sup._restart_plan(slot, ready=False, now=3.0 + t)[1] is None for t in range(3)] == [False, False, True]


def test_deaths_after_being_ready_are_restarted_forever_with_a_jittered_capped_backoff() -> None:
    sup = Supervisor(config(restart_backoff_s=0.5, restart_backoff_max_s=4, max_restarts=1, restart_window_s=60),
                     ["audit"])
    slot = sup.slots[0]
    delays = []
    for t in range(100):  # a kill every second for 100 s: far more than max_restarts, never a crash loop
        slot.exit_codes.append(-9)
        reason, delay = sup._restart_plan(slot, ready=True, now=float(t))
        assert reason == "killed" and delay is not None
        delays.append(delay)
    assert 0.25 <= delays[0] <= 0.5 and 0.5 <= delays[1] <= 1.0  # doubling, with equal jitter
    assert all(2.0 <= d <= 4.0 for d in delays[5:])  # capped
    assert len(slot.deaths) == 61  # only deaths within restart_window_s count
    slot.exit_codes.append(1)
    assert sup._restart_plan(slot, ready=True, now=1000.0)[0] == "exited"  # an exit, not a signal
    quiet = sup._restart_plan(slot, ready=True, now=2000.0)[1]  # after a quiet minute: back to the base
    assert quiet is not None and 0.25 <= quiet <= 0.5
