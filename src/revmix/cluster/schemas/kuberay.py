"""A strict JSON schema (Draft 7) for the part of KubeRay's ``ray.io/v1`` RayCluster and RayJob we use.

Why our own schema: the KubeRay CRD is only checked by a Kubernetes API server, and it *prunes* unknown
fields instead of rejecting them, so ``maxReplica: 4`` is silently dropped and the group scales to the
default maximum (2^31-1). This schema is strict (``additionalProperties: false``) at every level it defines
and permissive under ``template`` (a Kubernetes PodTemplateSpec: only ``metadata``/``spec`` are checked
there, plus the containers list), so a full pod spec is always accepted.

Fields follow the KubeRay v1.5/v1.6 Go types (``ray-operator/apis/ray/v1/raycluster_types.go`` and
``rayjob_types.go``). ``authOptions`` needs KubeRay >= 1.5.1 and Ray >= 2.52. Print the schema as JSON with
``python -m revmix.cluster.schemas.kuberay``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

API_VERSION = "ray.io/v1"

Schema = dict[str, Any]


def _object(properties: Schema, required: tuple[str, ...] = ()) -> Schema:
    """A closed object: unknown keys are errors (the strictness this module exists for)."""
    schema: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    return schema


_STRING = {"type": "string"}
_BOOL = {"type": "boolean"}
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_NUMBER = {"type": "number", "minimum": 0}
# Kubernetes map[string]string: values must be strings ("0", not 0) — a frequent rayStartParams mistake.
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_ANY_OBJECT = {"type": "object"}  # a Kubernetes type we do not restrict (Service, SecurityContext, ...)
_ANY_ARRAY = {"type": "array"}

_OBJECT_META = _object(
    {
        "name": _STRING,
        "generateName": _STRING,
        "namespace": _STRING,
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    }
)

# PodTemplateSpec: permissive inside ``spec`` (the whole Kubernetes pod API), strict only on its two keys
# and on what KubeRay itself needs: at least one named container with an image.
_POD_TEMPLATE = _object(
    {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "object", "required": ["name", "image"]},
                }
            },
        },
    },
    required=("spec",),
)

_AUTOSCALER_OPTIONS = _object(
    {
        "resources": _ANY_OBJECT,
        "image": _STRING,
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "securityContext": _ANY_OBJECT,
        "idleTimeoutSeconds": _INT32,
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "version": {"enum": ["v1", "v2"]},
        "env": _ANY_ARRAY,
        "envFrom": _ANY_ARRAY,
        "volumeMounts": _ANY_ARRAY,
        "command": {"type": "array", "items": _STRING},
        "args": {"type": "array", "items": _STRING},
    }
)

_AUTH_OPTIONS = _object(
    {"mode": {"enum": ["disabled", "token"]}, "secretName": _STRING, "enableK8sTokenAuth": _BOOL}
)

_HEAD_GROUP_SPEC = _object(
    {
        "template": _POD_TEMPLATE,
        "headService": _ANY_OBJECT,
        "enableIngress": _BOOL,
        "ingressOptions": _ANY_OBJECT,
        "resources": _STRING_MAP,
        "labels": _STRING_MAP,
        "rayStartParams": _STRING_MAP,
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]},
    },
    required=("template",),
)

_WORKER_GROUP_SPEC = _object(
    {
        "suspend": _BOOL,
        "groupName": {"type": "string", "minLength": 1},
        "replicas": _INT32,
        "minReplicas": _INT32,
        "maxReplicas": _INT32,
        "idleTimeoutSeconds": _INT32,
        "priority": {"type": "integer"},
        "resources": _STRING_MAP,
        "labels": _STRING_MAP,
        "rayStartParams": _STRING_MAP,
        "template": _POD_TEMPLATE,
        "scaleStrategy": _object({"workersToDelete": {"type": "array", "items": _STRING}}),
        "numOfHosts": {"type": "integer", "minimum": 1},
    },
    # minReplicas/maxReplicas have CRD defaults (0, 2^31-1); we require them so every group states its range.
    required=("groupName", "minReplicas", "maxReplicas", "template"),
)

_RAY_CLUSTER_SPEC = _object(
    {
        "upgradeStrategy": _object({"type": {"enum": ["Recreate", "None"]}}),
        "authOptions": _AUTH_OPTIONS,
        "suspend": _BOOL,
        "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
        "autoscalerOptions": _AUTOSCALER_OPTIONS,
        "headServiceAnnotations": _STRING_MAP,
        "enableInTreeAutoscaling": _BOOL,
        "gcsFaultToleranceOptions": _ANY_OBJECT,
        "headGroupSpec": _HEAD_GROUP_SPEC,
        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+"},
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP_SPEC},
    },
    required=("headGroupSpec",),
)

_RAY_JOB_SPEC = _object(
    {
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": _INT32,
        "rayClusterSpec": _RAY_CLUSTER_SPEC,
        "submitterPodTemplate": _POD_TEMPLATE,
        "metadata": _STRING_MAP,
        "clusterSelector": _STRING_MAP,
        "submitterConfig": _object({"backoffLimit": _INT32}),
        "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
        "deletionStrategy": _ANY_OBJECT,
        "entrypoint": _STRING,
        "runtimeEnvYAML": _STRING,
        "jobId": _STRING,
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "entrypointResources": _STRING,
        "entrypointNumCpus": _NUMBER,
        "entrypointNumGpus": _NUMBER,
        "ttlSecondsAfterFinished": _INT32,
        "shutdownAfterJobFinishes": _BOOL,
        "suspend": _BOOL,
    }
)


def _document(kind: str, spec: Schema) -> Schema:
    schema = _object(
        {
            "apiVersion": {"const": API_VERSION},
            "kind": {"const": kind},
            "metadata": _OBJECT_META,
            "spec": spec,
        },
        required=("apiVersion", "kind", "metadata", "spec"),
    )
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    schema["title"] = f"revmix subset of KubeRay {API_VERSION} {kind}"
    return schema


SCHEMAS: dict[str, Schema] = {
    "RayCluster": _document("RayCluster", _RAY_CLUSTER_SPEC),
    "RayJob": _document("RayJob", _RAY_JOB_SPEC),
}


if __name__ == "__main__":
    json.dump(SCHEMAS, sys.stdout, indent=2)
    sys.stdout.write("\n")
