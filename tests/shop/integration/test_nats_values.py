"""The NATS the chart deploys against what the engine creates there.

A 3-node cluster is started with the JetStream block of ``helm/nats-values.yaml`` (file store only:
no memory store at all, the PVC size as max_file_store, sync always), the shop's config and the
chart's config (R3) are provisioned on it, and then every stream and bucket provisioning created is
written to. A memory-backed bucket would be created there and refuse its first write (503 "insufficient
resources"), which is how the first-failure bucket lost its times before it moved to file.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import nats
import yaml

from engine.embedded import EmbeddedCluster
from tests.support import REPO_ROOT, run_cli

NATS_VALUES = REPO_ROOT / "helm" / "nats-values.yaml"
CHART_VALUES = REPO_ROOT / "helm" / "jetpool" / "values.yaml"
SHOP = REPO_ROOT / "handlers" / "shop.yaml"
_UNITS = {"": 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}


def jetstream_block(values: dict[str, Any]) -> str:
    """The server's jetstream { } settings the NATS chart renders from these values."""
    js = values["config"]["jetstream"]
    size = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(js["fileStore"]["pvc"]["size"]))
    assert size is not None, js["fileStore"]["pvc"]["size"]
    lines = [f"max_file_store: {int(size.group(1)) * _UNITS[size.group(2) or '']}"]
    if not js.get("memoryStore", {}).get("enabled", False):
        lines.append("max_memory_store: 0")
    lines += [f"{key}: {value}" for key, value in (js.get("merge") or {}).items()]
    return "jetstream {\n  " + "\n  ".join(lines) + "\n}\n"


def start_like_the_chart(nodes: EmbeddedCluster, directory: Path) -> None:
    conf = directory / "nats.conf"
    conf.write_text(jetstream_block(yaml.safe_load(NATS_VALUES.read_text())))
    for node in nodes.nodes:
        node.config_file = conf
    nodes.start()


async def write_everywhere(url: str) -> dict[str, str]:
    """Publish once to every stream and put once into every bucket: name -> 'ok' or the error."""
    nc = await nats.connect(servers=url.split(","))
    results: dict[str, str] = {}
    try:
        js = nc.jetstream()
        async for name in _stream_names(js):
            info = await js.stream_info(name)
            try:
                if name.startswith("KV_"):
                    kv = await js.key_value(name.removeprefix("KV_"))
                    for n in range(3):  # a memory bucket with no memory store took the first, not the second
                        await kv.put(f"probe.{n}", b"{}")
                else:
                    subject = (info.config.subjects or [""])[0].replace(">", "probe").replace("*", "probe")
                    for _ in range(3):
                        await js.publish(subject, b"{}", timeout=10)
                results[name] = "ok"
            except Exception as exc:
                results[name] = repr(exc)
    finally:
        await nc.close()
    return results


async def _stream_names(js: Any) -> Any:
    for name in await js.streams_info():
        yield name.config.name


def provision(config: Path, url: str) -> None:
    result = run_cli(["provision", "-c", str(config)], env={"JETPOOL_NATS_URL": url})
    assert result.returncode == 0, result.stderr


def test_what_the_engine_provisions_can_be_written_on_the_charts_nats(
        cluster: EmbeddedCluster, tmp_path: Path) -> None:
    start_like_the_chart(cluster, tmp_path)
    provision(SHOP, cluster.urls)
    first = asyncio.run(write_everywhere(cluster.urls))
    assert {"SHOP", "DLQ", "DLQ_ADVISORIES", "KV_jetpool_failures", "KV_orders"} <= set(first)
    assert first == dict.fromkeys(first, "ok")

    chart = tmp_path / "chart-config.yaml"
    chart.write_text(yaml.safe_dump(yaml.safe_load(CHART_VALUES.read_text())["config"]))
    provision(chart, cluster.urls)  # the chart's config: the same names, three replicas
    second = asyncio.run(write_everywhere(cluster.urls))
    assert second == dict.fromkeys(second, "ok")
