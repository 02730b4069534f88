"""Throughput: the jetpool engine against the raw nats-py floor and FastStream, in one run.

    make bench                                   # full size: 200k events per round, 3 rounds
    JETPOOL_BENCH_N=50000 JETPOOL_BENCH_ROUNDS=1 make bench   # quicker

Every contender drains the same prefilled BENCH stream (events of 238 bytes, the smallest envelope, as
prefill pads toward 200; file storage) through the same durable pull consumer, with the same no-op work:
``process`` publishes one output per input and acks the input after the output's PubAck; ``consume`` only
acks. Rounds are interleaved: each runs floor, jetpool and FastStream once (in an order rotated every round)
on a freshly prefilled stream, so a slow spell of a shared machine lands on every contender. Each rate is
timed from the first delivery to the last ack, so process start-up and prefilling are excluded. The session
prints a table of medians, the engine/floor ratios (of the medians, and the median of each round's own
ratio) and peak RSS per worker; pytest-benchmark's own timing of a whole round is kept in its JSON for
reference.
"""

from __future__ import annotations

import asyncio
import os
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.engine_bench import run_engine
from benchmarks.floor import Mode, run_floor
from benchmarks.peers import faststream_available, run_faststream
from benchmarks.prefill import create_consumer, delete_stream, prefill
from engine.embedded import EmbeddedServer

N = int(os.environ.get("JETPOOL_BENCH_N", "200000"))
ROUNDS = int(os.environ.get("JETPOOL_BENCH_ROUNDS", "3"))
RESULTS: dict[tuple[str, str, int], list[dict[str, Any]]] = {}

Runner = Callable[[str, int, int, Mode], dict[str, Any]]
CONTENDERS: dict[str, Runner] = {"floor": run_floor, "jetpool": run_engine, "faststream": run_faststream}
CASES = [(mode, workers) for mode in ("process", "consume") for workers in (1, 2)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    broker = EmbeddedServer(store_dir=tmp_path_factory.mktemp("bench-store"))
    try:
        yield broker.start()
    finally:
        broker.stop()


def _fresh_stream(url: str, name: str) -> None:
    asyncio.run(delete_stream(url))
    asyncio.run(prefill(url, N))
    if name != "jetpool":  # the engine provisions its own consumer, as users run it
        asyncio.run(create_consumer(url))


def round_order(round_index: int) -> list[str]:
    """The contenders of one round, rotated every round so none always runs first or last."""
    names = list(CONTENDERS)
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


@pytest.mark.timeout(1800)  # three contenders x three rounds; FastStream alone takes ~30 s a round
@pytest.mark.parametrize(("mode", "workers"), CASES, ids=[f"{m}-{w}w" for m, w in CASES])
def test_throughput(benchmark: Any, server: EmbeddedServer, mode: Mode, workers: int) -> None:
    """Interleaved rounds: each round runs every contender once, so a slow spell of a shared machine
    hits all of them (and the per-round ratio) rather than one contender's rounds."""
    if not faststream_available():
        pytest.fail("FastStream is not installed: run 'make bench' (installs the 'bench' extra)")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}

    def one_round() -> None:
        for name in round_order(len(runs["floor"])):
            _fresh_stream(server.url, name)
            runs[name].append(CONTENDERS[name](server.url, N, workers, mode))

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    for name, got in runs.items():
        assert [r["msgs"] for r in got] == [N] * ROUNDS, name
        RESULTS[(name, mode, workers)] = got
        benchmark.extra_info[name] = summary(got)
    benchmark.extra_info["round_ratios"] = round_ratios(runs["jetpool"], runs["floor"])


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["msg_per_s"] for r in runs]
    rss = [max(r["peak_rss_mib_per_proc"] or [0.0]) for r in runs]
    return {"median_msg_per_s": statistics.median(rates), "rates": [round(x) for x in rates],
            "peak_rss_mib": max(rss)}


def round_ratios(engine: list[dict[str, Any]], floor: list[dict[str, Any]]) -> list[float]:
    """jetpool / floor within each round (the two ran minutes apart at most)."""
    return [round(e["msg_per_s"] / f["msg_per_s"], 3) for e, f in zip(engine, floor, strict=True)]


def table() -> str:
    lines = [f"{N:,} events x {ROUNDS} interleaved rounds, medians (msg/s); ratio = jetpool / floor of the "
             "medians; per round = median of the rounds' own ratios (and their range)", "",
             "| loop | workers | floor | jetpool | ratio | per round | FastStream | jetpool peak RSS/worker |",
             "|---|---|---|---|---|---|---|---|"]
    for mode in ("process", "consume"):
        for workers in (1, 2):
            got = {n: RESULTS[(n, mode, workers)] for n in CONTENDERS if (n, mode, workers) in RESULTS}
            if not got:
                continue
            med = {n: summary(r)["median_msg_per_s"] for n, r in got.items()}
            floor, engine, peer = med.get("floor"), med.get("jetpool"), med.get("faststream")
            ratio = f"{engine / floor:.2f}" if floor and engine else "-"
            per_round = "-"
            if "floor" in got and "jetpool" in got:
                each = round_ratios(got["jetpool"], got["floor"])
                per_round = f"{statistics.median(each):.2f} ({min(each):.2f}-{max(each):.2f})"
            rss = summary(got["jetpool"])["peak_rss_mib"] if "jetpool" in got else "-"
            cells = [mode, str(workers), _fmt(floor), _fmt(engine), ratio, per_round, _fmt(peer), f"{rss} MiB"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(rate: float | None) -> str:
    return f"{rate:,.0f}" if rate else "-"


@pytest.fixture(scope="session", autouse=True)
def _report() -> Iterator[None]:
    yield
    if RESULTS:
        text = table()
        print("\n" + text)
        Path(os.environ.get("JETPOOL_BENCH_TABLE", ".benchmarks/throughput.md")).parent.mkdir(exist_ok=True)
        Path(os.environ.get("JETPOOL_BENCH_TABLE", ".benchmarks/throughput.md")).write_text(text + "\n")


BACKLOG = int(os.environ.get("JETPOOL_BENCH_BACKLOG", "1000000"))


def test_worker_memory_with_a_large_backlog(benchmark: Any, server: EmbeddedServer) -> None:
    """A 1M-event backlog: the window, not the backlog, bounds what a worker holds."""
    runs: list[dict[str, Any]] = []

    def setup() -> None:
        asyncio.run(delete_stream(server.url))
        asyncio.run(prefill(server.url, BACKLOG))

    benchmark.pedantic(lambda: runs.append(run_engine(server.url, BACKLOG, 2, "process")), setup=setup,
                       rounds=1, iterations=1)
    peak = max(runs[0]["peak_rss_mib_per_proc"])
    benchmark.extra_info.update({"backlog": BACKLOG, "peak_rss_mib": peak, "msg_per_s": runs[0]["msg_per_s"]})
    print(f"\nbacklog {BACKLOG:,}: jetpool process loop, 2 workers: {runs[0]['msg_per_s']:,.0f} msg/s, "
          f"peak RSS per worker {runs[0]['peak_rss_mib_per_proc']} MiB")
