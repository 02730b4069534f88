"""What provisioning warns about before it touches the broker."""

from __future__ import annotations

from typing import Any

import yaml

from engine.config import load_config, parse_config
from engine.provision import short_duplicate_windows
from tests.support import REPO_ROOT

ROOT = REPO_ROOT


def test_the_shipped_configs_cover_every_redelivery_with_their_duplicate_window() -> None:
    for path in (ROOT / "handlers" / "shop.yaml", ROOT / "config" / "example.yaml"):
        assert short_duplicate_windows(load_config(path, env={})) == [], path


def test_a_window_shorter_than_a_services_horizon_is_reported_with_both_figures() -> None:
    raw: dict[str, Any] = yaml.safe_load((ROOT / "handlers" / "shop.yaml").read_text())
    raw["streams"][0]["duplicate_window_s"] = 299
    short = short_duplicate_windows(parse_config(raw))
    # payments: 19 redeliveries of 30 s at least (700 s with backoff); the others: 9 of 30 s (300 s).
    assert {s["service"]: s["redelivery_horizon_s"] for s in short} == {
        "orders": 300.0, "payments": 700.0, "inventory": 300.0, "notifications": 300.0, "audit": 300.0}
    assert all(s["stream"] == "SHOP" and s["duplicate_window_s"] == 299 for s in short)
