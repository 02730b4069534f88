"""The group commit's logic, on an in-memory writer: groups gather, results go back in order, a refused
item fails alone."""

from __future__ import annotations

import asyncio

import pytest

from handlers.group_commit import GroupCommit


class Writer:
    """Doubles each item; refuses negative ones (the whole call fails, as a statement would)."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    async def write(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        await asyncio.sleep(0.001)
        if any(i < 0 for i in items):
            raise ValueError(f"refused: {[i for i in items if i < 0]}")
        return [2 * i for i in items]


def test_concurrent_items_share_writes_and_each_gets_its_own_result() -> None:
    writer = Writer()

    async def run() -> list[int]:
        commits = GroupCommit(writer.write)
        return await asyncio.gather(*(commits.submit(i) for i in range(100)))

    assert asyncio.run(run()) == [2 * i for i in range(100)]
    assert len(writer.calls) <= 2 and sum(map(len, writer.calls)) == 100


def test_a_lone_item_is_written_at_once() -> None:
    writer = Writer()

    async def run() -> int:
        return await GroupCommit(writer.write).submit(21)

    assert asyncio.run(run()) == 42 and writer.calls == [[21]]


def test_a_refused_item_fails_alone_and_the_rest_of_its_group_is_written() -> None:
    writer = Writer()

    async def run() -> list[int | BaseException]:
        commits = GroupCommit(writer.write)
        return await asyncio.gather(*(commits.submit(i) for i in (1, -5, 3)), return_exceptions=True)

    first, refused, third = asyncio.run(run())
    assert (first, third) == (2, 6)
    assert isinstance(refused, ValueError) and "-5" in str(refused)
    assert writer.calls == [[1, -5, 3], [1], [-5], [3]]


def test_a_group_is_bounded_by_max_group() -> None:
    writer = Writer()

    async def run() -> None:
        commits = GroupCommit(writer.write, max_group=10)
        await asyncio.gather(*(commits.submit(i) for i in range(35)))

    asyncio.run(run())
    assert [len(c) for c in writer.calls] == [10, 10, 10, 5]


def test_a_writer_that_returns_the_wrong_number_of_results_fails_no_item_silently() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:1]

    async def run() -> list[int | BaseException]:
        commits = GroupCommit(short)
        return await asyncio.gather(*(commits.submit(i) for i in (7, 8)), return_exceptions=True)

    assert asyncio.run(run()) == [7, 8]  # written alone after the group's answer did not add up


@pytest.mark.parametrize("cancelled", [0, 1])
def test_a_caller_that_gives_up_does_not_stop_the_others(cancelled: int) -> None:
    writer = Writer()

    async def run() -> list[int]:
        commits = GroupCommit(writer.write)
        tasks = [asyncio.create_task(commits.submit(i)) for i in range(3)]
        await asyncio.sleep(0)
        tasks[cancelled].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        return [r for r in done if isinstance(r, int)]

    assert len(asyncio.run(run())) == 2


def test_an_error_that_is_not_one_items_fails_the_whole_group_at_once() -> None:
    """A lost connection is every item's: writing each alone would only wait that much longer."""
    calls: list[list[int]] = []

    async def down(items: list[int]) -> list[int]:
        calls.append(list(items))
        await asyncio.sleep(0.001)
        raise ConnectionResetError("the database went away")

    async def run() -> list[int | BaseException]:
        commits = GroupCommit(down, alone=lambda exc: not isinstance(exc, ConnectionError))
        return await asyncio.gather(*(commits.submit(i) for i in range(5)), return_exceptions=True)

    results = asyncio.run(run())
    assert all(isinstance(r, ConnectionResetError) for r in results)
    assert calls == [[0, 1, 2, 3, 4]]


def test_a_cancelled_writer_leaves_nobody_waiting() -> None:
    async def never(items: list[int]) -> list[int]:
        await asyncio.Event().wait()
        return items

    async def run() -> list[int | BaseException]:
        commits: GroupCommit[int, int] = GroupCommit(never)
        waiting = [asyncio.create_task(commits.submit(i)) for i in range(3)]
        await asyncio.sleep(0.01)
        assert commits._writer is not None
        commits._writer.cancel()
        return await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)

    assert all(isinstance(r, asyncio.CancelledError) for r in asyncio.run(run()))
