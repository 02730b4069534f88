"""The fence of engine/transport: its version gate decides alone, and a failed check reads 0 on the metric.

:func:`engine.transport.fence.fallback_reason` is a pure function of a version string and the names a
module found missing, so another release's verdict is asked for here without installing it.
"""

from __future__ import annotations

import math
import uuid

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Histogram

from engine.metrics import EXPORTED_METRICS, HANDLER_BUCKETS_S
from engine.transport import fence, histogram
from engine.transport.fence import NATS_PY, PROMETHEUS_CLIENT, fallback_reason

BOUNDS = (*HANDLER_BUCKETS_S, math.inf)


def gauge(path: str) -> float | None:
    return REGISTRY.get_sample_value("jetpool_fast_path", {"path": path})


@pytest.mark.parametrize("version", ["2.16.0", "2.16.7", "2.16.1rc1", "2.16.0.post1"])
def test_the_supported_nats_py_line_passes(version: str) -> None:
    assert fence.supported(NATS_PY, version)
    assert all(fallback_reason(path, version) is None for path in ("parser", "inbox", "outbox"))


@pytest.mark.parametrize("version", ["2.17.0", "2.15.9", "3.0.0", "2.1.6", "2", "", "dev"])
def test_any_other_nats_py_release_falls_back(version: str) -> None:
    reason = fallback_reason("outbox", version)
    assert reason is not None and "outside the supported range >=2.16,<2.17" in reason


def test_the_prometheus_client_range_and_unknown_versions() -> None:
    assert fallback_reason("histogram", "0.26.0") is None
    assert fallback_reason("histogram", "0.21.1") is None
    assert "outside" in (fallback_reason("histogram", "0.27.0") or "")
    assert "outside" in (fallback_reason("histogram", "1.0.0") or "")
    assert "version is unknown" in (fallback_reason("parser", None) or "")


def test_missing_names_fail_a_supported_version_and_are_named() -> None:
    assert fallback_reason("inbox", "2.16.0", ["Client._subs", "Subscription._id"]) == \
        "nats-py 2.16.0 lacks Client._subs, Subscription._id"


def test_the_installed_versions_are_the_supported_ones() -> None:
    """The venv's nats-py and prometheus-client: the fast paths are meant to be on where tests run."""
    for package in (NATS_PY, PROMETHEUS_CLIENT):
        version = fence.installed(package)
        assert version is not None and fence.supported(package, version), (package, version)


def test_a_failed_check_reads_0_on_the_metric_and_a_passing_one_1() -> None:
    assert "jetpool_fast_path" in EXPORTED_METRICS
    try:
        assert not fence.enable("histogram", version="0.99.0")
        assert gauge("histogram") == 0
        assert not fence.enable("inbox", ["Client._subs"], version="2.16.0")
        assert gauge("inbox") == 0
    finally:
        assert fence.enable("histogram") and fence.enable("inbox")
    assert gauge("histogram") == gauge("inbox") == 1


def test_a_real_histogram_has_what_the_fast_write_needs() -> None:
    child = Histogram("fence_probe_seconds", "probe", ["x"], buckets=HANDLER_BUCKETS_S,
                      registry=CollectorRegistry()).labels("y")
    assert histogram.missing(child, BOUNDS) == []
    assert histogram.missing(child, BOUNDS[1:]) != []  # other bounds: not the histogram add() was given
    assert histogram.missing(object(), BOUNDS) == ["Histogram._buckets (one value per bound, 16)", "Histogram._sum"]


def _samples(metric: Histogram) -> dict[str, float]:
    return {f"{s.name} {s.labels.get('le', '')}": s.value for family in metric.collect() for s in family.samples
            if not s.name.endswith("_created")}


@pytest.mark.parametrize("values", [
    [0.0, 0.0004, 0.001, 0.0011, 0.3, 0.3, 7.0, 29.9],
    [0.0002] * 50,
    [31.0, 120.0, 0.5],  # beyond the last bound
    [],
])
def test_the_public_api_fallback_keeps_buckets_count_and_sum(values: list[float]) -> None:
    def fresh() -> Histogram:
        return Histogram(f"h_{uuid.uuid4().hex[:8]}", "t", buckets=HANDLER_BUCKETS_S, registry=CollectorRegistry())

    reference, fallback = fresh(), fresh()
    counts = [0] * len(BOUNDS)
    for value in values:
        reference.observe(value)
        counts[sum(1 for b in BOUNDS if b < value)] += 1
    histogram.observe_many(fallback, BOUNDS, counts, sum(values))

    ref = {k.split("_", 2)[-1]: v for k, v in _samples(reference).items()}
    got = {k.split("_", 2)[-1]: v for k, v in _samples(fallback).items()}
    sums = [k for k in ref if k.startswith("sum")]
    assert {k: v for k, v in got.items() if k not in sums} == {k: v for k, v in ref.items() if k not in sums}
    assert got[sums[0]] == pytest.approx(ref[sums[0]], rel=1e-9, abs=1e-12)


def test_add_uses_the_fallback_when_the_fence_said_no(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(histogram, "_fast", False)
    child = Histogram("fence_fallback_seconds", "t", buckets=HANDLER_BUCKETS_S, registry=CollectorRegistry())
    counts = [0] * len(BOUNDS)
    counts[3] = 2
    histogram.add(child, BOUNDS, counts, 0.009)
    samples = _samples(child)
    assert samples["fence_fallback_seconds_count "] == 2
    assert samples["fence_fallback_seconds_bucket 0.0025"] == 0
    assert samples["fence_fallback_seconds_bucket 0.005"] == 2
    assert samples["fence_fallback_seconds_sum "] == pytest.approx(0.009)
