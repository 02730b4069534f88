"""The stream leader of a 3-node cluster is SIGKILLed mid-run: workers ride through the election.

A real cluster (three nats-server processes routed on loopback), the stream, its consumer and the
dead-letter stream at R3, the echo service on two workers. Before traffic starts the stream's leader
is moved to a node a worker is connected to, and the consumer's leader to another node: the kill
then drops a worker's connection while the consumer survives, so pulls keep working but nothing can
be stored until a new stream leader is elected.

Two moments for the kill:

- ``idle``: between two bursts, with the consumer settled. The producer goes on publishing through
  the election; the workers must reconnect and keep pulling, and nothing may be lost.
- ``backlog``: the workers are SIGSTOPped while the producer bursts, SIGCONTed, and the leader dies
  as soon as Pongs flow, so hundreds of Pings are delivered while no Pong can be stored.

The producer retries what the cluster refused or did not acknowledge, under the same
``Nats-Msg-Id``; the killed node is restarted with its store later. Afterwards every Ping has exactly
one Pong, no message was stored twice, the consumer settles, and the supervisor never restarted a
worker. The time from the kill to the first Pong stored after it is printed for the README's table.

A second test restarts a worker while one node is down (the one holding the engine's own
``jetpool_failures`` bucket): a cluster that lost one node of three must not stop workers from starting.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats
import orjson
import psutil
import pytest
import yaml

from engine.embedded import EmbeddedCluster
from engine.events import MSG_ID_HEADER, Event
from tests.cluster_fixture import via_live_node
from tests.support import (
    App,
    Engine,
    consumer_info,
    expected_pong_ids,
    pings,
    publish,
    read,
    read_stamped,
    settled,
    wait_for,
)

TOTAL = 3000
KILL_AFTER = 1000  # Pings of the first burst, published BURST_WINDOW at a time
BURST_WINDOW = 256
PONGS_BEFORE_KILL = 50  # backlog: the workers are busy with the burst when the leader dies
BATCH = 50  # after the kill: BATCH Pings every PACE_S, so publishing spans the election
PACE_S = 0.1
RESTART_AFTER = 2000  # Pings acknowledged before the killed node comes back
ACK_TIMEOUT_S = 2.0
DEADLINE_S = 120.0
SETTLE_S = 30.0

@dataclass
class Run:
    """What the scenario saw; times are wall-clock seconds (comparable with stream timestamps)."""

    acked: set[str] = field(default_factory=set)
    retries: Counter[str] = field(default_factory=Counter)
    killed: str = ""
    killed_at: float = 0.0
    consumer_leader: str = ""
    first_ack_after_kill: float | None = None
    new_leader: str = ""
    new_leader_at: float = 0.0
    done_killing: asyncio.Event = field(default_factory=asyncio.Event)


# ---- the test's producer: retries through the election ------------------------------------------


async def _publish_once(js: Any, app: App, event: Event) -> str | None:
    """None when stored (or a duplicate of a stored one), else why not."""
    try:
        await js.publish(app.subject(event.type), event.encode(), timeout=ACK_TIMEOUT_S,
                         headers={MSG_ID_HEADER: event.id})
    except Exception as exc:  # 503 no responders, timeouts, "JetStream not available", reconnects
        return type(exc).__name__
    return None


async def _publish_until_stored(js: Any, app: App, event: Event, run: Run, deadline: float) -> None:
    while True:
        sent_at = time.time()
        error = await _publish_once(js, app, event)
        if error is None:
            break
        run.retries[error] += 1
        assert time.monotonic() < deadline, f"producer stuck; retries so far: {dict(run.retries)}"
        await asyncio.sleep(0.25)
    run.acked.add(event.id)
    if run.killed_at and sent_at > run.killed_at and run.first_ack_after_kill is None:
        run.first_ack_after_kill = time.time()


async def produce(js: Any, app: App, events: Sequence[Event], run: Run) -> None:
    """A pipelined burst; after the kill, paced batches. Each event is retried until it is stored."""
    deadline = time.monotonic() + DEADLINE_S
    window = asyncio.Semaphore(BURST_WINDOW)

    async def in_window(event: Event) -> None:
        async with window:
            await _publish_until_stored(js, app, event, run, deadline)

    await asyncio.gather(*(in_window(e) for e in events[:KILL_AFTER]))
    await run.done_killing.wait()
    for start in range(KILL_AFTER, len(events), BATCH):
        await asyncio.gather(*(_publish_until_stored(js, app, e, run, deadline) for e in events[start:start + BATCH]))
        await asyncio.sleep(PACE_S)


# ---- placing and killing leaders ---------------------------------------------------------------------


async def _poll(condition: Callable[[], Any], what: str, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    while not (result := await condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(interval_s)
    return result


async def _stream_leader(js: Any, app: App) -> str:
    with contextlib.suppress(Exception):
        info = await js.stream_info(app.stream)
        return str(info.cluster.leader or "") if info.cluster else ""
    return ""


async def _consumer_leader(js: Any, app: App) -> str:
    with contextlib.suppress(Exception):
        info = await js.consumer_info(app.stream, app.durable("echo"))
        return str(info.cluster.leader or "") if info.cluster else ""
    return ""


async def _changed(leader: Callable[[], Any], previous: str) -> str:
    now = await leader()
    return now if now and now != previous else ""


async def _move_leader(nc: Any, subject: str, leader: Callable[[], Any], wanted: str) -> None:
    """Ask the leader to step down in favour of ``wanted`` until ``wanted`` leads."""
    while (current := await _poll(leader, "a leader")) != wanted:
        with contextlib.suppress(Exception):
            await nc.request(subject, orjson.dumps({"placement": {"preferred": wanted}}), timeout=5)
        await _poll(lambda: _changed(leader, current), f"a leader other than {current}")


async def place_leaders(nc: Any, js: Any, app: App, cluster: EmbeddedCluster, run: Run) -> None:
    """Stream leader on a node a worker is connected to, the consumer's leader on another node."""
    names = {f"{app.raw['app']}.echo.{i}" for i in range(2)}
    hosts = [i for i in range(cluster.size)
             if names & {c.get("name") for c in cluster.monitor(i, "/connz").get("connections") or []}]
    assert hosts, "no worker connection found on any node"
    run.killed, run.consumer_leader = cluster.server_name(hosts[0]), cluster.server_name((hosts[0] + 1) % cluster.size)
    await _move_leader(nc, f"$JS.API.STREAM.LEADER.STEPDOWN.{app.stream}", lambda: _stream_leader(js, app),
                       run.killed)
    await _move_leader(nc, f"$JS.API.CONSUMER.LEADER.STEPDOWN.{app.stream}.{app.durable('echo')}",
                       lambda: _consumer_leader(js, app), run.consumer_leader)


def signal_all(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


async def kill_leader(js: Any, app: App, cluster: EmbeddedCluster, run: Run, stopped: Sequence[int]) -> None:
    """After the burst, SIGKILL the stream leader (with the workers idle, or busy if they were stopped)."""

    async def burst_stored() -> bool:
        return len(run.acked) >= KILL_AFTER

    async def ready() -> bool:
        with contextlib.suppress(Exception):
            if stopped:  # backlog: kill as soon as the resumed workers answer
                info = await js.stream_info(app.stream, subjects_filter=app.subject("Pong"))
                return int(sum((info.state.subjects or {}).values())) >= PONGS_BEFORE_KILL
            state = await js.consumer_info(app.stream, app.durable("echo"))
            return bool(state.num_pending == 0 and state.num_ack_pending == 0)
        return False

    await _poll(burst_stored, f"{KILL_AFTER} Pings acknowledged")
    signal_all(stopped, signal.SIGCONT)
    await _poll(ready, "the moment to kill", interval_s=0.005)
    assert await _stream_leader(js, app) == run.killed, "the stream leader moved by itself"
    run.killed_at = time.time()
    cluster.kill(cluster.index_of(run.killed))
    run.done_killing.set()
    run.new_leader = await _poll(lambda: _changed(lambda: _stream_leader(js, app), run.killed),
                                 "a new stream leader")
    run.new_leader_at = time.time()


async def restart_killed(cluster: EmbeddedCluster, run: Run) -> None:
    async def enough() -> bool:
        return len(run.acked) >= RESTART_AFTER

    await _poll(enough, f"{RESTART_AFTER} Pings acknowledged")
    await asyncio.to_thread(cluster.start, cluster.index_of(run.killed))


async def scenario(app: App, cluster: EmbeddedCluster, events: Sequence[Event], stop: Sequence[int]) -> Run:
    """Place the leaders, burst, kill the stream leader, publish the rest, restart the node."""
    run = Run()
    nc = await nats.connect(servers=cluster.urls.split(","), connect_timeout=5, reconnect_time_wait=0.1,
                            max_reconnect_attempts=-1)
    try:
        js = nc.jetstream(timeout=1.0)  # API calls during the election fail fast, so polls see the new leader soon
        await place_leaders(nc, js, app, cluster, run)
        signal_all(stop, signal.SIGSTOP)
        await asyncio.gather(produce(js, app, events, run), kill_leader(js, app, cluster, run, stop))
        await restart_killed(cluster, run)
    finally:
        signal_all(stop, signal.SIGCONT)
        await nc.close()
    return run


# ---- reading the outcome -----------------------------------------------------------------------------


def stored(app: App, event_type: str) -> list[tuple[Event, float]]:
    return read_stamped(app, event_type, timeout_s=60.0)


def settled_now(app: App) -> bool:
    """The consumer has nothing pending or unacknowledged (False while the cluster cannot say)."""
    try:
        return settled(app, "echo")
    except Exception:
        return False


def consumer_state(app: App) -> str:
    try:
        info = consumer_info(app, "echo")
    except Exception as exc:
        return f"consumer info unavailable: {exc!r}"
    return (f"consumer: num_pending={info.num_pending} num_ack_pending={info.num_ack_pending} "
            f"num_redelivered={info.num_redelivered} num_waiting={info.num_waiting}")


def log_counts(run: Engine) -> dict[str, int]:
    events = Counter(r.get("event") for r in run.records())
    names = ("worker.exited", "worker.crashed", "supervisor.crash_loop", "nats.disconnected", "nats.reconnected",
             "pull.status", "pull.heartbeat_missed", "event.failed", "event.dead_lettered", "dlq.write_failed")
    return {name: events[name] for name in names}


def r3_config(make_config: Callable[..., App], cluster: EmbeddedCluster) -> App:
    """The echo service on two workers; its stream, and the dead-letter stream, at R3 on the cluster."""
    app = make_config({"echo": {"workers": 2}}, url=cluster.urls, stream={"replicas": 3},
                      supervisor={"restart_backoff_s": 0.2, "restart_backoff_max_s": 1})
    app.raw["dead_letter"] = {"replicas": 3}
    app.path.write_text(yaml.safe_dump(app.raw, sort_keys=False))
    return app


# ---- the test ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("moment", ["idle", "backlog"])
def test_stream_leader_killed_mid_run(moment: str, cluster: EmbeddedCluster, make_config: Callable[..., App],
                                      engine: Callable[..., Engine]) -> None:
    app = r3_config(make_config, cluster)
    proc = engine(app)
    events = pings(TOTAL)
    stop = list(proc.worker_pids().values()) if moment == "backlog" else []

    run = asyncio.run(scenario(app, cluster, events, stop))
    assert len(run.acked) == TOTAL

    live = via_live_node(app, cluster)
    wait_for(lambda: settled_now(live), SETTLE_S, "the consumer to settle",
             detail=lambda: f"{consumer_state(live)}\n{proc.tail(10)}")
    pongs, pings_stored = stored(live, "Pong"), stored(live, "Ping")
    pong_ids = Counter(event.id for event, _ in pongs)
    missing = expected_pong_ids(events) - set(pong_ids)
    backlog = (sum(stamp < run.killed_at for _, stamp in pings_stored)
               - sum(stamp < run.killed_at for _, stamp in pongs))
    recovery_s = min(stamp for _, stamp in pongs if stamp > run.killed_at) - run.killed_at
    counts = log_counts(proc)
    print(f"\ncluster leader kill ({moment}): killed {run.killed} (stream leader; consumer leader "
          f"{run.consumer_leader}); Pings without a Pong at the kill {backlog}; new stream leader {run.new_leader} "
          f"seen after {run.new_leader_at - run.killed_at:.2f}s; first Pong after the kill {recovery_s:.2f}s; "
          f"producer's first ack after the kill {(run.first_ack_after_kill or 0) - run.killed_at:.2f}s; "
          f"producer retries {dict(run.retries)}; Pings {TOTAL}, stored {len(pings_stored)}; "
          f"Pong messages {len(pongs)}, distinct ids {len(pong_ids)}, missing {len(missing)}, "
          f"duplicate messages {len(pongs) - len(pong_ids)}; log {counts}")

    assert not missing, f"{len(missing)} Pings have no Pong"  # 0 lost
    assert len(pongs) == len(pong_ids)  # 0 duplicates stored: the dedup window covered the retries
    assert len(pings_stored) == TOTAL  # the producer's retries were deduplicated too
    assert proc.proc is not None and proc.proc.poll() is None, "the supervisor exited"
    assert counts["supervisor.crash_loop"] == 0
    assert counts["worker.exited"] == 0, proc.tail()
    assert counts["event.dead_lettered"] == 0


async def _bucket_host(url: str) -> str:
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        info = await nc.jetstream().stream_info("KV_jetpool_failures")
        return str(info.cluster.leader) if info.cluster else ""
    finally:
        await nc.close()


async def _stream_leader_via(app: App) -> str:
    nc = await nats.connect(app.url, connect_timeout=5, allow_reconnect=False)
    try:
        return await _stream_leader(nc.jetstream(), app)
    finally:
        await nc.close()


def stream_led_by_live_node(app: App, cluster: EmbeddedCluster) -> bool:
    """The stream has a leader on a running node: until then the cluster answers publishes with 503."""
    try:
        leader = asyncio.run(_stream_leader_via(app))
    except Exception:
        return False
    return bool(leader) and cluster.running(cluster.index_of(leader))


def test_worker_restarts_while_a_node_is_down(cluster: EmbeddedCluster, make_config: Callable[..., App],
                                              engine: Callable[..., Engine]) -> None:
    app = r3_config(make_config, cluster)
    proc = engine(app)
    cluster.kill(cluster.index_of(asyncio.run(_bucket_host(cluster.nodes[0].url))))
    victim = proc.worker_pids()[("echo", 0)]
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        assert proc.proc is not None and proc.proc.poll() is None, f"the supervisor exited\n{proc.tail(12)}"
        return proc.worker_pids()[("echo", 0)] != victim

    wait_for(replaced, 60, "a new worker 0", detail=proc.tail)
    wait_for(lambda: not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE,
             10, "the killed worker to be gone")
    live = via_live_node(app, cluster)
    # The killed node may have led the stream too: publish once the election is over.
    wait_for(lambda: stream_led_by_live_node(live, cluster), 30, "a stream leader on a running node")
    events = pings(200)
    publish(live, events)
    wait_for(lambda: settled_now(live), SETTLE_S, "the consumer to settle", detail=proc.tail)
    assert {p.id for p in read(live, "Pong")} == expected_pong_ids(events)
    assert [e["code"] for e in proc.records("worker.exited")] == [-signal.SIGKILL]  # only the one we killed
