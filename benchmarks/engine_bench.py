"""The jetpool engine as a benchmark contender: a real ``jetpool run`` process tree on the BENCH stream.

The engine runs exactly as users run it (supervisor, spawned CPU-pinned workers, provisioning, the
probes endpoint, metrics) with the no-op handlers of ``benchmarks/bench_handlers.py``. Its window and
batch match the floor's, so the two differ only by the consuming loop.

Throughput is timed from the server's point of view, which excludes process start-up: the clock starts
when the consumer's first delivery is seen and stops when its ack floor reaches ``n_total`` (polled every
20 ms). Peak RSS is each worker's ``VmHWM`` from ``/proc`` just before shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
import psutil
import yaml

from benchmarks.floor import CREDIT, MAX_IN_FLIGHT, Mode
from benchmarks.prefill import ACK_WAIT_S, DURABLE, IN_TYPE, MAX_ACK_PENDING, STREAM, SUBJECTS, BenchError

REPO = Path(__file__).resolve().parent.parent
POLL_S = 0.02


def engine_config(url: str, workers: int, mode: Mode, pin_cpus: bool = True, pods: int = 1,
                  linger_ms: float = 0.0) -> dict[str, Any]:
    return {
        "app": "bench",
        "subject_prefix": "bench",
        "nats": {"url": url},
        "streams": [{"name": STREAM, "subjects": SUBJECTS, "duplicate_window_s": 120}],
        "services": {DURABLE: {
            "stream": STREAM,
            "routes": {IN_TYPE: f"benchmarks.bench_handlers:{mode}"},
            "workers": workers,
            "batch": CREDIT,
            "max_in_flight": MAX_IN_FLIGHT,
            "max_ack_pending": MAX_ACK_PENDING,
            "ack_wait_s": ACK_WAIT_S,
            "pin_cpus": pin_cpus,
            "replicas": pods,
            "linger_ms": linger_ms,
        }},
        "http": {"port": 0, "host": "127.0.0.1"},
        "log": {"level": "warning", "format": "json"},
    }


async def _time_run(url: str, n_total: int, procs: list[subprocess.Popen[bytes]], timeout_s: float) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        start = time.perf_counter()
        first = 0.0
        while True:
            for proc in procs:
                if proc.poll() is not None:
                    raise BenchError(f"engine exited with {proc.returncode} during the run")
            try:
                info = await js.consumer_info(STREAM, DURABLE)
            except Exception:
                info = None
            now = time.perf_counter()
            if info is not None:
                if not first and info.delivered.consumer_seq > 0:
                    first = now
                if info.ack_floor.consumer_seq >= n_total:
                    return now - first
            if now - start > timeout_s:
                raise BenchError(f"engine did not finish {n_total} events in {timeout_s}s")
            await asyncio.sleep(POLL_S)
    finally:
        await nc.close()


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _workers(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    out = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        if "resource_tracker" not in " ".join(child.cmdline()):
            out.append(child)
    return out


def _stop(proc: subprocess.Popen[bytes], tree: list[psutil.Process]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for child in tree:
        with contextlib.suppress(psutil.Error):
            child.kill()


def run_engine(url: str, n_total: int, workers: int, mode: Mode, timeout_s: float = 600.0,
               pods: int = 1) -> dict[str, Any]:
    """Run ``pods`` ``jetpool run`` process trees on a prefilled BENCH stream until ``n_total`` inputs are acked.

    ``pods`` > 1 stands for several Kubernetes pods of one service sharing its durable consumer.
    """
    workdir = Path(tempfile.mkdtemp(prefix="jetpool-bench-"))
    config = workdir / "bench.yaml"
    config.write_text(yaml.safe_dump(engine_config(url, workers, mode, pods=pods)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs: list[subprocess.Popen[bytes]] = []
    for pod in range(pods):
        with open(workdir / f"engine-{pod}.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "engine", "run", "-c", str(config)], cwd=REPO,
                                          env=env, stdout=log, stderr=log, start_new_session=True))
    trees: list[list[psutil.Process]] = [[] for _ in procs]
    try:
        seconds = asyncio.run(_time_run(url, n_total, procs, timeout_s))
        trees = [_workers(proc) for proc in procs]
        rss = [round(_peak_rss_mib(p.pid), 1) for tree in trees for p in tree]
        return {"msgs": n_total, "seconds": seconds, "msg_per_s": n_total / seconds, "peak_rss_mib_per_proc": rss}
    except BenchError as exc:
        logs = "".join((workdir / f"engine-{pod}.log").read_text()[-2000:] for pod in range(pods))
        raise BenchError(f"{exc}\n{logs}") from None
    finally:
        for proc, tree in zip(procs, trees, strict=True):
            _stop(proc, tree or (_workers(proc) if proc.poll() is None else []))
