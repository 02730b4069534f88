"""``jetpool demo`` against the session's nats-server: the report, the exit code, and cleaning up after itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from engine.embedded import EmbeddedServer
from tests.shop_support import write_shop_config
from tests.support import REPO_ROOT, engine_env, wait_for


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the demo by PID unless it already exited (Popen knows, so a reused PID is never hit)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _demo(config: Path, url: str, *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "engine", "demo", "-c", str(config), "--nats-url", url, *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
                            env=engine_env({"COLUMNS": "200"}), start_new_session=True)


def test_the_demo_reports_every_order_and_holds_its_invariants_through_an_outage(
        nats_server: EmbeddedServer, tmp_path: Path) -> None:
    app = write_shop_config(tmp_path, nats_server.url, gateway={"control_poll_s": 0.1})
    demo = _demo(app.path, nats_server.url, "--orders", "150", "--rate", "100", "--failure-rate", "0.1",
                 "--outage", "0.5:1", "--breaker-reset-s", "1", "--log-file", str(tmp_path / "engine.log"))
    try:
        out, _ = demo.communicate(timeout=150)
    finally:
        stop(demo)
    text = " ".join(out.split())
    assert demo.returncode == 0, out
    assert "150 of 150 orders ended" in text
    assert "latency placed → ended: p50" in text
    assert "0 orders lost" in text and "no double charge" in text and "stock consistent over 20 skus" in text
    assert "gateway outage started" in text and "gateway outage ended" in text
    assert "Audit timeline of order" in text and "NotificationSent" in text
    assert "all invariants hold" in text


def test_ctrl_c_stops_the_demo_and_every_process_it_started(nats_server: EmbeddedServer, tmp_path: Path) -> None:
    app = write_shop_config(tmp_path, nats_server.url)
    log = tmp_path / "engine.log"
    demo = _demo(app.path, nats_server.url, "--orders", "100000", "--rate", "200", "--log-file", str(log))
    seen: dict[int, psutil.Process] = {}
    try:
        def engine_running() -> bool:
            for child in psutil.Process(demo.pid).children(recursive=True):
                seen[child.pid] = child
            return log.exists() and log.read_text(errors="replace").count('"worker.started"') >= 5

        wait_for(engine_running, 90, "the demo's engine to start its five workers")
        time.sleep(1.0)  # orders are flowing
        engine_running()
        os.kill(demo.pid, signal.SIGINT)
        demo.wait(timeout=60)
        alive = [p.pid for p in seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert alive == [], f"left running: {alive}"
        assert len(seen) >= 6  # the supervisor and its five workers were watched
    finally:
        stop(demo)
        for proc in seen.values():
            if proc.is_running():
                proc.kill()
