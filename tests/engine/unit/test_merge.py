"""Merged writes: concurrent changes of one key applied in rounds, each round one compare-and-set."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from engine.merge import MergedWrites, merged
from engine.state import Conflict, MemoryState, Value


class Counting(MemoryState):
    def __init__(self) -> None:
        super().__init__()
        self.writes: Counter[str] = Counter()

    def _write(self, key: str, value: Value) -> int:
        self.writes[key] += 1
        return super()._write(key, value)


def _add(n: int) -> Any:
    return lambda current: {"n": (current or {"n": 0})["n"] + n}


def test_changes_made_at_once_are_all_applied_in_few_writes() -> None:
    store = Counting()
    writes = MergedWrites(store)

    async def run() -> None:
        await asyncio.gather(*(writes.mutate("k", _add(1)) for _ in range(100)))

    asyncio.run(run())
    assert store.data["k"][0] == {"n": 100}
    assert store.writes["k"] == 1  # all queued before the round began
    assert len(writes) == 0


class Slow(Counting):
    async def mutate(self, key: str, fn: Any, attempts: int = 50, *, fresh: bool = False) -> Value | None:
        await asyncio.sleep(0.01)  # a write in flight
        return await super().mutate(key, fn, attempts, fresh=fresh)


def test_changes_arriving_during_a_write_go_together_in_the_next_round() -> None:
    store = Slow()
    writes = MergedWrites(store)

    async def run() -> list[Value | None]:
        first = asyncio.create_task(writes.mutate("k", _add(1)))
        await asyncio.sleep(0.002)  # its round is writing
        later = [asyncio.create_task(writes.mutate("k", _add(1))) for _ in range(50)]
        return [await first, *await asyncio.gather(*later)]

    results = asyncio.run(run())
    assert results[0] == {"n": 1} and all(r == {"n": 51} for r in results[1:])
    assert store.writes["k"] == 2


def test_every_caller_gets_the_value_after_its_round() -> None:
    writes = MergedWrites(MemoryState())

    async def run() -> list[Value | None]:
        return list(await asyncio.gather(*(writes.mutate("k", _add(1)) for _ in range(3))))

    assert asyncio.run(run()) == [{"n": 3}] * 3


def test_a_change_that_raises_fails_only_its_caller() -> None:
    store = MemoryState()
    writes = MergedWrites(store)

    def broken(current: Value | None) -> Value | None:
        raise ValueError("bad change")

    async def run() -> list[Any]:
        return list(await asyncio.gather(writes.mutate("k", _add(1)), writes.mutate("k", _add(1)),
                                         writes.mutate("k", broken), writes.mutate("k", _add(1)),
                                         return_exceptions=True))

    results = asyncio.run(run())
    assert isinstance(results[2], ValueError)
    assert store.data["k"][0] == {"n": 3}


def test_a_change_that_changes_nothing_writes_nothing() -> None:
    store = Counting()
    writes = MergedWrites(store)
    asyncio.run(writes.mutate("k", lambda current: None))
    assert store.writes["k"] == 0 and "k" not in store.data


class FailingStore(MemoryState):
    async def mutate(self, key: str, fn: Any, attempts: int = 50, *, fresh: bool = False) -> Value | None:
        await asyncio.sleep(0)
        raise Conflict("still conflicting")


def test_a_failed_write_fails_every_caller_of_the_round_and_leaves_nothing_behind() -> None:
    writes = MergedWrites(FailingStore())

    async def run() -> list[Any]:
        return list(await asyncio.gather(*(writes.mutate("k", _add(1)) for _ in range(3)), return_exceptions=True))

    assert all(isinstance(r, Conflict) for r in asyncio.run(run()))
    assert len(writes) == 0


def test_a_cancelled_caller_does_not_stall_the_others() -> None:
    store = MemoryState()
    writes = MergedWrites(store)

    async def run() -> Value | None:
        first = asyncio.create_task(writes.mutate("k", _add(1)))
        second = asyncio.create_task(writes.mutate("k", _add(10)))
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await second

    result = asyncio.run(run())
    assert result is not None and result["n"] in (10, 11)  # the cancelled change may still be written


def test_conflicts_with_another_writer_are_retried_on_fresh_data() -> None:
    store = MemoryState()
    mine, theirs = MergedWrites(store), MergedWrites(store)

    async def run() -> None:
        await asyncio.gather(*(w.mutate("k", _add(1)) for w in (mine, theirs) for _ in range(50)))

    asyncio.run(run())
    assert store.data["k"][0] == {"n": 100}


def test_one_merged_writes_per_store() -> None:
    a, b = MemoryState(), MemoryState()
    assert merged(a) is merged(a) and merged(a) is not merged(b)
