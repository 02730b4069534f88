"""The gateway's fault settings: read from the shop's YAML, changed by the admin endpoint, each checked."""

from __future__ import annotations

import pytest

from handlers.gateway.client import GatewayNotConfigured, gateway_url
from handlers.gateway.faults import Faults, InvalidFault


def test_faults_come_from_the_payments_settings_and_ignore_the_clients_keys() -> None:
    faults = Faults.from_settings({"latency_ms": 3, "decline_rate": 0.1, "url": "http://x", "timeout_s": 2})
    assert (faults.latency_ms, faults.decline_rate, faults.outage) == (3.0, 0.1, False)


@pytest.mark.parametrize(("changes", "param"), [
    ({"failure_rate": 1.5}, "failure_rate"), ({"latency_ms": -1}, "latency_ms"), ({"outage": 1}, "outage"),
    ({"decline_rate": "0.1"}, "decline_rate"), ({"jitter_ms": float("nan")}, "jitter_ms"),
    ({"max_amount_cents": 1.5}, "max_amount_cents"), ({"latency_ms": True}, "latency_ms"), ({"speed": 1}, "speed"),
])
def test_a_bad_fault_names_its_parameter(changes: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidFault) as caught:
        Faults().updated(changes)
    assert caught.value.param == param


def test_the_gateway_url_comes_from_the_environment_first() -> None:
    assert gateway_url({"url": "http://b"}, {"JETPOOL_SHOP_GATEWAY_URL": "http://a"}) == "http://a"
    assert gateway_url({"url": "http://b"}, {}) == "http://b"
    with pytest.raises(GatewayNotConfigured, match="JETPOOL_SHOP_GATEWAY_URL"):
        gateway_url({}, {})
