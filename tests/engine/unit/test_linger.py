"""Linger: a mostly idle loop pauses between awake windows; a busy one never does."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

import pytest

from engine import linger as lingering
from engine.linger import idle, linger, should_linger


def test_only_a_mostly_idle_window_is_followed_by_a_linger() -> None:
    assert should_linger(0.0001, 0.001)
    assert not should_linger(0.0009, 0.001)  # a backlog or a burst: go on at once
    assert not should_linger(0.004, 0.005)
    assert idle(0.00001, 0.001) and not idle(0.0002, 0.001)


def _gaps(linger_s: float) -> list[float]:
    """Time between ticks of a 1 ms timer chain, with a lingering task beside it."""
    async def run() -> list[float]:
        task = asyncio.get_running_loop().create_task(linger(linger_s))
        ticks = [time.perf_counter()]
        for _ in range(20):
            await asyncio.sleep(0.001)
            ticks.append(time.perf_counter())
        task.cancel()
        return [b - a for a, b in itertools.pairwise(ticks)]

    return asyncio.run(run())


def test_an_idle_loop_reads_nothing_while_it_lingers() -> None:
    # The timer is due after 1 ms, but the loop only gets to it once a linger of 30 ms is over.
    assert max(_gaps(0.03)) >= 0.03


def test_a_busy_process_does_not_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    pauses: list[float] = []
    monkeypatch.setattr(time, "process_time", time.perf_counter)  # every window looks fully busy
    monkeypatch.setattr(time, "sleep", pauses.append)
    _gaps(0.2)
    assert pauses == []


def test_an_idle_process_lingers_after_each_awake_window(monkeypatch: pytest.MonkeyPatch) -> None:
    pauses: list[float] = []
    monkeypatch.setattr(time, "sleep", pauses.append)
    _gaps(0.2)
    assert pauses and set(pauses) == {0.2}


def test_a_process_with_nothing_to_do_stops_lingering(monkeypatch: pytest.MonkeyPatch) -> None:
    pauses: list[float] = []
    monkeypatch.setattr(time, "process_time", lambda: 0.0)  # nothing ever runs
    monkeypatch.setattr(time, "sleep", pauses.append)
    monkeypatch.setattr(lingering, "DORMANT_S", 0.001)

    async def run() -> None:
        task = asyncio.get_running_loop().create_task(linger(0.2))
        await asyncio.sleep(0.2)  # far more windows than DORMANT_AFTER
        task.cancel()

    asyncio.run(run())
    assert len(pauses) == lingering.DORMANT_AFTER - 1  # then dormant: no more pauses


def _lingering(monkeypatch: pytest.MonkeyPatch, answers_due: Callable[[], int], windows: int = 12) -> list[str]:
    """What a mostly idle worker's linger did, in order: ``due N`` (it asked how many answers are due,
    N came back) and ``sleep`` (it lingered)."""
    events: list[str] = []
    monkeypatch.setattr(lingering, "idle", lambda cpu, wall: False)
    monkeypatch.setattr(lingering, "should_linger", lambda cpu, wall: True)
    monkeypatch.setattr(time, "sleep", lambda s: events.append("sleep"))

    def due() -> int:
        n = answers_due()
        events.append(f"due {n}")
        return n

    async def run() -> None:
        task = asyncio.get_running_loop().create_task(linger(0.2, answers_due=due))
        while events.count("sleep") < windows:
            await asyncio.sleep(0.001)
        task.cancel()

    asyncio.run(run())
    return events


def test_no_linger_starts_while_broker_answers_are_due(monkeypatch: pytest.MonkeyPatch) -> None:
    # A handler awaits a read, then a write and an output's PubAck: each answer takes a fraction of a ms.
    answers = iter([1, 2])
    events = _lingering(monkeypatch, lambda: next(answers, 0), windows=3)
    assert events == ["due 1", "due 2", "due 0", "sleep", "due 0", "sleep", "due 0", "sleep"]


def test_answers_that_never_come_hold_a_linger_back_only_so_long(monkeypatch: pytest.MonkeyPatch) -> None:
    events = _lingering(monkeypatch, lambda: 3, windows=3)
    assert events == (["due 3"] * lingering.MAX_EXTRA + ["sleep"]) * 3


def test_a_handler_an_answer_resumes_is_given_its_next_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer read in the window resumes its handler two loop passes later (the read loop's callback,
    then the handler's task), where it sends its output; due answers are counted after those passes, or
    the output would wait out a whole linger."""
    events: list[str] = []
    due = [0]
    monkeypatch.setattr(lingering, "idle", lambda cpu, wall: False)
    monkeypatch.setattr(time, "sleep", lambda s: events.append("sleep"))

    def mostly_idle(cpu: float, wall: float) -> bool:
        loop = asyncio.get_running_loop()

        def send_output() -> None:  # the resumed handler: its output's PubAck comes 0.5 ms later
            due[0] = 1
            loop.call_later(0.0005, lambda: due.__setitem__(0, 0))

        if not events:  # an answer was just read: the read loop resumes the handler, which sends
            loop.call_soon(lambda: loop.call_soon(send_output))
        return True

    monkeypatch.setattr(lingering, "should_linger", mostly_idle)

    def counted() -> int:
        events.append(f"due {due[0]}")
        return due[0]

    async def run() -> None:
        task = asyncio.get_running_loop().create_task(linger(0.2, answers_due=counted))
        while "sleep" not in events:
            await asyncio.sleep(0.001)
        task.cancel()

    asyncio.run(run())
    assert events == ["due 1", "due 0", "sleep"]
