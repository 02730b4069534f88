"""Strict JSON schemas for the custom resources the chart renders, which kubernetes-validate has none for.

Written from the CRDs' documented fields (Prometheus operator ``monitoring.coreos.com/v1`` ServiceMonitor
and PrometheusRule, KEDA ``keda.sh/v1alpha1`` ScaledObject), covering the part of each spec the chart can
produce plus the common neighbours. ``additionalProperties: false`` throughout, so a misspelled or misplaced
field fails the way the API server's structural-schema pruning would silently drop it.
"""

from __future__ import annotations

from typing import Any

_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
         "maxLength": 253}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# Prometheus durations as the operator's CRD accepts them, e.g. 30s, 1m30s, 500ms.
_DURATION = {"type": "string",
             "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}


def _object(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_METADATA = _object({
    "name": _NAME,
    "namespace": _NAME,
    "labels": _STRING_MAP,
    "annotations": _STRING_MAP,
}, required=("name",))

_LABEL_SELECTOR = _object({
    "matchLabels": _STRING_MAP,
    "matchExpressions": {"type": "array", "items": _object({
        "key": {"type": "string"},
        "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
        "values": {"type": "array", "items": {"type": "string"}},
    }, required=("key", "operator"))},
})

_ENDPOINT = _object({
    "port": {"type": "string"},
    "targetPort": {"type": ["integer", "string"]},
    "path": {"type": "string"},
    "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
    "interval": _DURATION,
    "scrapeTimeout": _DURATION,
    "honorLabels": {"type": "boolean"},
    "honorTimestamps": {"type": "boolean"},
    "params": {"type": "object"},
    "relabelings": {"type": "array", "items": {"type": "object"}},
    "metricRelabelings": {"type": "array", "items": {"type": "object"}},
    "tlsConfig": {"type": "object"},
    "bearerTokenSecret": {"type": "object"},
    "basicAuth": {"type": "object"},
})

SERVICE_MONITOR = _object({
    "apiVersion": {"const": "monitoring.coreos.com/v1"},
    "kind": {"const": "ServiceMonitor"},
    "metadata": _METADATA,
    "spec": _object({
        "selector": _LABEL_SELECTOR,
        "namespaceSelector": _object({"any": {"type": "boolean"},
                                      "matchNames": {"type": "array", "items": {"type": "string"}}}),
        "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
        "jobLabel": {"type": "string"},
        "targetLabels": {"type": "array", "items": {"type": "string"}},
        "podTargetLabels": {"type": "array", "items": {"type": "string"}},
        "sampleLimit": _INT32,
    }, required=("selector", "endpoints")),
}, required=("apiVersion", "kind", "metadata", "spec"))

# A rule of a PrometheusRule group: an alert or a recording rule, never both (the operator's CRD requires
# expr; promtool checks the PromQL itself).
_RULE = {**_object({
    "alert": {"type": "string", "minLength": 1},
    "record": {"type": "string", "minLength": 1},
    "expr": {"type": ["string", "integer"], "minLength": 1},
    "for": _DURATION,
    "keep_firing_for": _DURATION,
    "labels": _STRING_MAP,
    "annotations": _STRING_MAP,
}, required=("expr",)), "oneOf": [{"required": ["alert"]}, {"required": ["record"]}]}

PROMETHEUS_RULE = _object({
    "apiVersion": {"const": "monitoring.coreos.com/v1"},
    "kind": {"const": "PrometheusRule"},
    "metadata": _METADATA,
    "spec": _object({
        "groups": {"type": "array", "items": _object({
            "name": {"type": "string", "minLength": 1},
            "interval": _DURATION,
            "query_offset": _DURATION,
            "limit": _INT32,
            "partial_response_strategy": {"type": "string"},
            "labels": _STRING_MAP,
            "rules": {"type": "array", "items": _RULE},
        }, required=("name",))},
    }),
}, required=("apiVersion", "kind", "metadata", "spec"))

_TRIGGER = _object({
    "type": {"type": "string", "minLength": 1},
    "name": {"type": "string"},
    # KEDA's CRD types trigger metadata as a map of strings: a bare number or boolean is rejected.
    "metadata": _STRING_MAP,
    "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
    "useCachedMetrics": {"type": "boolean"},
    "authenticationRef": _object({"name": {"type": "string"},
                                  "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}},
                                 required=("name",)),
}, required=("type", "metadata"))

SCALED_OBJECT = _object({
    "apiVersion": {"const": "keda.sh/v1alpha1"},
    "kind": {"const": "ScaledObject"},
    "metadata": _METADATA,
    "spec": _object({
        "scaleTargetRef": _object({
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "name": {"type": "string", "minLength": 1},
            "envSourceContainerName": {"type": "string"},
        }, required=("name",)),
        "pollingInterval": _INT32,
        "cooldownPeriod": _INT32,
        "initialCooldownPeriod": _INT32,
        "idleReplicaCount": _INT32,
        "minReplicaCount": _INT32,
        "maxReplicaCount": _INT32,
        "advanced": _object({
            "horizontalPodAutoscalerConfig": _object({"name": {"type": "string"}, "behavior": {"type": "object"}}),
            "restoreToOriginalReplicaCount": {"type": "boolean"},
            "scalingModifiers": {"type": "object"},
        }),
        "fallback": _object({"failureReplicas": _INT32, "replicas": _INT32}, required=("failureReplicas", "replicas")),
        "triggers": {"type": "array", "minItems": 1, "items": _TRIGGER},
    }, required=("scaleTargetRef", "triggers")),
}, required=("apiVersion", "kind", "metadata", "spec"))

CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
}
