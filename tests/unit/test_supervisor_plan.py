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


def test_backoff_doubles_up_to_the_maximum() -> None:
    sup = Supervisor(config(restart_backoff_s=0.5, restart_backoff_max_s=3), ["audit"])
    slot = sup.slots[0]
    delays = []
    for restarts in range(5):
        slot.restarts = restarts
        delays.append(sup._backoff(slot))
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_crash_loop_is_more_than_max_restarts_within_the_window() -> None:
    sup = Supervisor(config(max_restarts=3, restart_window_s=60), ["audit"])
    assert [sup._crash_loop() for _ in range(4)] == [False, False, False, True]
