"""What the kernel and a nats-server's monitoring port say about a set of processes: shared by the benchmarks.

:func:`read_counters` reads one process's CPU (utime + stime), wake-ups (voluntary context switches of all
its threads) and read/write system calls from ``/proc``; :func:`monitor_json` reads a monitoring endpoint of
an embedded nats-server started with ``-m PORT``; :func:`load` records how busy the (shared) machine is, and
:func:`read_machine` how much of its vCPUs' time the hypervisor gave to other guests (steal), which makes every
process's CPU per event dearer (cold caches) in the windows where it is high; :func:`reference_speed` times a
fixed piece of interpreter work, which slows down with the host's other guests even when steal does not show it.
Used by ``benchmarks/paced.py`` (CPU per event at a steady pace) and ``benchmarks/shop_cpu.py`` (CPU per
order of the shop).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil

_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Counters:
    """What the kernel counted for a set of processes: CPU, wake-ups, read and write system calls."""

    cpu_s: float = 0.0
    wakeups: int = 0  # voluntary context switches: the process blocked (epoll, futex) and was woken
    preempted: int = 0  # involuntary context switches
    syscr: int = 0  # read-family system calls (read, readv, pread): a socket read each, here
    syscw: int = 0  # write-family system calls (write, writev): one flush each
    sys_s: float = 0.0  # the kernel's part of cpu_s (stime)

    def __add__(self, o: Counters) -> Counters:
        return Counters(self.cpu_s + o.cpu_s, self.wakeups + o.wakeups, self.preempted + o.preempted,
                        self.syscr + o.syscr, self.syscw + o.syscw, self.sys_s + o.sys_s)

    def __sub__(self, o: Counters) -> Counters:
        return Counters(self.cpu_s - o.cpu_s, self.wakeups - o.wakeups, self.preempted - o.preempted,
                        self.syscr - o.syscr, self.syscw - o.syscw, self.sys_s - o.sys_s)


def read_counters(pid: int) -> Counters:
    """One process's counters (all of its threads); zeros if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        cpu_s = (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14 and 15)
        io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
        wakeups = preempted = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches:"):
                        wakeups += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        preempted += int(line.split()[1])
        return Counters(cpu_s, wakeups, preempted, int(io["syscr"]), int(io["syscw"]), int(fields[12]) / _CLK_TCK)
    except (OSError, ValueError, KeyError):
        return Counters()


@dataclass(frozen=True)
class MachineTimes:
    """The whole machine's CPU time so far (all vCPUs, seconds), from the ``cpu`` line of ``/proc/stat``."""

    total_s: float = 0.0  # user, nice, system, idle, iowait, irq, softirq and steal (guest is inside user)
    steal_s: float = 0.0  # a vCPU was ready to run, and the hypervisor ran something else

    def steal_share(self, before: MachineTimes) -> float | None:
        """The share of all vCPU time the hypervisor took between ``before`` and this reading."""
        total = self.total_s - before.total_s
        return (self.steal_s - before.steal_s) / total if total > 0 else None


def read_machine(stat: str | None = None) -> MachineTimes:
    """The machine's CPU times from ``/proc/stat`` (or from ``stat``, its text); zeros if unreadable."""
    try:
        text = Path("/proc/stat").read_text() if stat is None else stat
        first = text.split("\n", 1)[0].split()
        if first[0] != "cpu":
            return MachineTimes()
        ticks = [int(x) for x in first[1:9]]
    except (OSError, IndexError, ValueError):
        return MachineTimes()
    steal = ticks[7] if len(ticks) == 8 else 0  # kernels before 2.6.11 have no steal column
    return MachineTimes(sum(ticks) / _CLK_TCK, steal / _CLK_TCK)


_REFERENCE = {"order_id": "o-0001", "sku": "sku-01", "qty": 2, "amount_cents": 18497, "lines": list(range(8))}


def reference_speed(rounds: int = 4000, repeats: int = 5) -> float:
    """µs of this process's CPU per round of a fixed interpreter-bound workload (JSON, dicts, strings, the
    shop's kind of work): the median of ``repeats`` timings.

    It measures the machine, not the load on it: CPU time, so waiting for a core does not count, and other
    processes of this machine leave it alone (each gets warm time slices). What moves it is what moves
    the shop's CPU per order from one hour to the next on a shared host: slower cores, caches and memory
    shared with other guests. Compare runs only at similar speeds.
    """
    def once() -> float:
        started = time.process_time()
        for i in range(rounds):
            data = orjson.loads(orjson.dumps(_REFERENCE))
            data["qty"] += i
            key = f"{data['order_id']}.{data['sku']}.{i}"
            sorted({key: data, "n": len(key)})
        return (time.process_time() - started) / rounds * 1e6
    return round(statistics.median(once() for _ in range(repeats)), 3)


def read_groups(groups: dict[str, list[int]]) -> dict[str, Counters]:
    """The counters of each group of processes, summed."""
    return {role: sum((read_counters(pid) for pid in pids), Counters()) for role, pids in groups.items()}


def monitor_json(port: int, path: str) -> dict[str, Any]:
    """A monitoring endpoint of the embedded server on loopback, as JSON."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return dict(orjson.loads(response.read()))


def load() -> dict[str, Any]:
    """The machine's load and its busiest processes over one second (a shared VM is noisy)."""
    procs = list(psutil.process_iter(["pid", "name"]))
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.cpu_percent(None)
    time.sleep(1.0)
    busy = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            busy.append((proc.cpu_percent(None), proc.info["name"], proc.info["pid"]))
    top = [{"cpu_percent": round(p, 1), "name": name, "pid": pid} for p, name, pid in sorted(busy, reverse=True)[:6]
           if p >= 1.0]
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "busiest": top}
