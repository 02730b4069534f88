"""An engine as a real process tree: ``python -m engine run -c CONFIG``, watched through its log, stopped by PID.

What tests of an engine's failure behaviour and tools that drive a whole deployment on one machine
need, and what :mod:`engine.testing` (which runs services in the test's own event loop) does not
give: a supervisor in its own session with its worker processes, so signals, kills and restarts are
the real ones::

    engine = EngineProcess("app.yaml", Path("engine.log"), nats_url=server.url).start()
    try:
        engine.wait_workers(2)
        engine.workers()[0].kill()          # psutil.Process handles
        ...
    finally:
        engine.stop()                       # SIGTERM (drain), then SIGKILL whatever is left

Every process is stopped by its PID, never by name: the supervisor is suspended first so it cannot
spawn replacements, then it and every descendant ever seen are killed. A descendant counts only if
its start time matches (a reused PID is never hit); one the log names but that was never seen counts
only if it carries this engine's tag in its environment. Needs ``psutil`` (the ``local`` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import psutil

from engine.errors import JetpoolError
from engine.lifeline import die_with_parent
from engine.logs import json_records

TAG_VARIABLE = "ENGINE_PROCESS_TAG"


class EngineProcess:
    """One ``python -m engine run`` process tree, its JSON log and what watching it takes.

    Args:
        config: the YAML file.
        log_path: the supervisor's and workers' output, appended to.
        env: the whole environment of the process (default: this process's).
        args: more arguments of ``run`` (``--no-provision``, ``--log-level info``...).
        nats_url: the broker, handed over in ``JETPOOL_NATS_URL`` (never in the argv, which ``ps`` shows
            to every user of the machine); ``JETPOOL__NATS__URL``, which would win over it, is dropped.
        cwd: the working directory (default: this process's).
        tied: SIGHUP the supervisor (it drains) when the thread that started it ends, so a SIGKILLed
            parent leaves no engine behind; start it from the main thread then (see :mod:`engine.lifeline`).
    """

    def __init__(self, config: str | Path, log_path: Path, *, env: Mapping[str, str] | None = None,
                 args: Sequence[str] = (), nats_url: str | None = None, cwd: Path | None = None,
                 tied: bool = False) -> None:
        self.config = Path(config)
        self.log_path = Path(log_path)
        self.env = dict(os.environ if env is None else env)
        self.args = list(args)
        self.nats_url = nats_url
        self.cwd = cwd
        self.tied = tied
        self.proc: subprocess.Popen[bytes] | None = None
        self.tag = uuid.uuid4().hex
        # (pid, create_time) of every descendant ever seen, so teardown can find orphans safely.
        self.seen: set[tuple[int, float]] = set()
        self._offset = 0

    def start(self) -> Self:
        """Start the supervisor; its log lines from here on are this process's."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        command = [sys.executable, "-m", "engine", "run", "-c", str(self.config), *self.args]
        env = {**self.env, TAG_VARIABLE: self.tag}
        if self.nats_url is not None:
            env = {k: v for k, v in env.items() if k.upper() != "JETPOOL__NATS__URL"}
            env["JETPOOL_NATS_URL"] = self.nats_url
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=out, cwd=self.cwd, env=env,
                                         start_new_session=True,
                                         preexec_fn=die_with_parent(signal.SIGHUP) if self.tied else None)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the engine is not started"
        return self.proc.pid

    # ---- the log ----

    def log_text(self) -> str:
        """What this process tree wrote to the log so far."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as handle:
            handle.seek(self._offset)
            return handle.read().decode(errors="replace")

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        """Parsed JSON log records (optionally only those whose ``event`` is ``event``).

        Every process of the tree appends to the same file; a line may hold more than one record
        if two writes interleave, so each line is decoded record by record.
        """
        return [r for r in json_records(self.log_text()) if event is None or r.get("event") == event]

    def tail(self, lines: int = 40) -> str:
        return "engine log tail:\n" + "\n".join(self.log_text().splitlines()[-lines:])

    # ---- waiting ----

    def wait_workers(self, count: int, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Wait until ``count`` ``worker.started`` lines exist; fail early if the supervisor exited."""
        deadline = time.monotonic() + timeout_s
        while (started := self._started(count, deadline, timeout_s)) is None:
            time.sleep(0.1)
        return started

    async def wait_workers_async(self, count: int, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """:meth:`wait_workers` without blocking the event loop."""
        deadline = time.monotonic() + timeout_s
        while (started := self._started(count, deadline, timeout_s)) is None:
            await asyncio.sleep(0.1)
        return started

    def _started(self, count: int, deadline: float, timeout_s: float) -> list[dict[str, Any]] | None:
        assert self.proc is not None, "the engine is not started"
        records = self.records("worker.started")
        if len(records) >= count:
            self.descendants()  # remember the tree now, so teardown finds it even if orphaned
            return records
        if self.proc.poll() is not None:
            raise JetpoolError(f"the engine exited with code {self.proc.returncode} before {count} workers "
                               f"started; see {self.log_path}\n{self.tail()}")
        if time.monotonic() > deadline:
            raise JetpoolError(f"the engine did not start {count} workers within {timeout_s:g}s; "
                               f"see {self.log_path}\n{self.tail()}")
        return None

    def wait_exit(self, timeout_s: float) -> int:
        """The supervisor's exit code, once it exited."""
        assert self.proc is not None, "the engine is not started"
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise JetpoolError(f"the engine did not exit within {timeout_s:g}s\n{self.tail()}") from None

    # ---- the process tree ----

    def descendants(self) -> list[psutil.Process]:
        """The supervisor's live descendants (remembered for :meth:`kill_tree`)."""
        try:
            children: list[psutil.Process] = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for child in children:
            with contextlib.suppress(psutil.Error):
                self.seen.add((child.pid, child.create_time()))
        return children

    def workers(self) -> list[psutil.Process]:
        """Live worker processes (spawned multiprocessing children, not the resource tracker)."""
        out: list[psutil.Process] = []
        for child in self.descendants():
            with contextlib.suppress(psutil.Error):
                if "spawn_main" in " ".join(child.cmdline()):
                    out.append(child)
        return out

    def worker_pids(self) -> dict[tuple[str, int], int]:
        """(service, worker index) -> pid of the latest started process of that slot."""
        return {(r["service"], r["worker"]): r["pid"] for r in self.records("worker.started")}

    def alive(self) -> list[int]:
        """PIDs of the supervisor and of every descendant ever seen that still exist (zombies excluded)."""
        out = []
        if self.proc is not None and self.proc.poll() is None:
            out.append(self.pid)
        for pid, created in set(self.seen):
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(pid)
        return out

    def send(self, signum: int) -> None:
        assert self.proc is not None, "the engine is not started"
        self.proc.send_signal(signum)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (the supervisor drains), then SIGKILL whatever of the tree is left; the exit code."""
        if self.proc is None:
            return None
        self.descendants()
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=timeout_s)
        finally:
            self.kill_tree()
        return self.proc.returncode

    def kill_tree(self) -> None:
        """SIGSTOP the supervisor (no respawns), SIGKILL it and every descendant by PID, reap them."""
        if self.proc is None:
            return
        procs: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            supervisor = psutil.Process(self.pid)
            if self.proc.poll() is None:
                supervisor.suspend()
                procs.append(supervisor)
        self.descendants()
        for pid, created in self.seen:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.create_time() == created:
                    procs.append(proc)
        procs += self._logged_orphans({p.pid for p in procs})
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(procs, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def _logged_orphans(self, known: set[int]) -> list[psutil.Process]:
        """Processes the log says this tree started (workers, an embedded broker) that outlived the
        supervisor unseen; a PID only counts if its process carries this engine's tag."""
        pids = {r.get("pid") for r in self.records("worker.spawned") + self.records("embedded.started")}
        out = []
        for pid in pids - known - {None}:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.environ().get(TAG_VARIABLE) == self.tag:
                    out.append(proc)
        return out
