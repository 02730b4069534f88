"""The paced-load benchmark runs end to end, tiny: one rate, two seconds, a small backlog.

Not a performance test (no figure is compared with a limit): it keeps ``benchmarks/paced.py`` from
rotting, checks the shape of what it writes, and that a re-run keeps the prose around its tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import paced


@pytest.mark.timeout(300)
def test_paced_benchmark_writes_its_tables_and_json(tmp_path: Path) -> None:
    md = tmp_path / "paced.md"
    md.write_text(f"# Kept title\n\nintro\n\n{paced.BEGIN}\nold tables\n{paced.END}\n\n## Where it goes\n\nkept\n")

    paced.main(["--rates", "500", "--seconds", "2", "--warmup", "1", "--idle", "1", "--backlog", "2000",
                "--strace-seconds", "1", "--out", str(tmp_path)])

    res = json.loads((tmp_path / "paced.json").read_text())
    assert {"date", "commit", "machine", "versions", "settings", "load", "paced", "backlog"} <= res.keys()
    assert res["machine"]["cores"] >= 1 and res["machine"]["cpu_model"]
    assert {"python", "nats_server", "nats_py"} <= res["versions"].keys()
    [rate] = res["paced"]
    assert rate["rate"] == 500
    for who, role in (("jetpool", "jetpool"), ("floor", "floor_workers"), ("ingest_only", "nats_server")):
        got = rate[who]
        assert got["events"] > 0, who
        assert got["cpu_us_per_event"][role] >= 0 and got["cpu_us_per_event"]["nats_server"] >= 0, who
        assert got["producer"]["sent"] == got["producer"]["pubacks"] > 0, who
        assert {"wakeups", "syscr", "syscw"} <= got["per_event"]["nats_server"].keys(), who
    assert rate["jetpool"]["pulls"]["requests"] >= 0 and "strace" in rate["jetpool"]
    backlog = res["backlog"]
    assert backlog["events"] == 2000 and len(backlog["ingest"]) == 2
    # A tiny backlog may drain before a window opens: only the shape is checked here.
    assert backlog["jetpool"]["events"] >= 0 and "cpu_us_per_event" in backlog["floor"]

    text = md.read_text()
    assert text.startswith("# Kept title\n\nintro\n") and text.endswith("## Where it goes\n\nkept\n")
    assert "old tables" not in text and text.count(paced.BEGIN) == 1
    assert "| paced 500/s |" in text and "| backlog (2,000 prefilled) |" in text and "paced / backlog" in text
