"""Desired child objects of an InferenceDeployment (pure builders)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from fireflyer.api.inference import InferenceDeploymentSpec, Role
from fireflyer.operator import labels as L
from fireflyer.operator import pod_security as security
from fireflyer.operator.inference import mounts
from fireflyer.operator.inference.engines import SERVE_PORT, UnitContext, image, shell_line
from fireflyer.operator.inference.pairing import pairing_revision
from fireflyer.operator.network import network_env
from fireflyer.operator.network import node_hca as node_hca  # re-exported: the plan uses it
from fireflyer.operator.objects import owner_reference
from fireflyer.placement.pinning import pod_placement

ROUTER_PORT = 8000
ROUTER_CONFIG_DIR = "/etc/fireflyer/router"
ROUTER_BACKENDS_FILE = "backends.json"
# /dev/shm per pod: NCCL/DeepEP buffers and host-side staging scale with the role's batch.
SHM_SIZE = {"prefill": "64Gi", "decode": "32Gi"}


def unit_name(deployment: str, role: str, index: int) -> str:
    return f"{deployment}-{role}-{index}"


def leader_host(deployment: str, role: str, index: int, namespace: str) -> str:
    name = unit_name(deployment, role, index)
    return f"{name}-0.{name}.{namespace}.svc.cluster.local"


def backend_url(leader: str) -> str:
    """A unit's URL in the router's backends file, from its leader's host name."""
    return f"http://{leader}:{SERVE_PORT}"


def config_map_name(deployment: str) -> str:
    return f"{deployment}-engine"


def base_labels(deployment: str, component: str) -> dict[str, str]:
    return {L.DEPLOYMENT: deployment, L.COMPONENT: component, L.MANAGED_BY: L.MANAGER}


def revision(
    spec: InferenceDeploymentSpec, role_name: str, nodes: tuple[str, ...], kv_mount: str | None = None
) -> str:
    """Everything that, when it changes, needs the unit's pods recreated. How many units a role
    has, how many may be down at once and how it autoscales are not about any one unit: scaling
    a role never restarts the units it keeps. The current ExpertPlacement is not part of it either (the pods
    re-read it in place)."""
    role: Role = getattr(spec, role_name)
    unit_shape = role.model_dump(
        by_alias=True,
        exclude_none=True,
        mode="json",
        exclude={"units", "max_unavailable_units", "autoscaling"},
    )
    material = {
        "engine": spec.engine.to_wire(),
        "kernels": spec.kernels.to_wire(),
        "model": spec.model.to_wire(),
        "role": unit_shape,
        "network": spec.network.to_wire(),
        "eplb": {"mode": spec.eplb.mode, "redundant": spec.eplb.redundant_experts},
        "nodes": list(nodes),
    }
    if spec.kv_cache is not None:  # only when set: specs without it keep their revision
        material["kvCache"] = {**spec.kv_cache.to_wire(), "mount": kv_mount}
    api_keys = mounts.unit_api_keys(spec)
    if api_keys:  # likewise: the units mount the Secret, and ask for keys, only when it is set
        material["apiKeySecret"] = api_keys
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:10]


def _resources(spec: InferenceDeploymentSpec, role: Role) -> dict[str, Any]:
    extra = role.resources or {}
    requests = dict(extra.get("requests", {}))
    limits = dict(extra.get("limits", {}))
    limits["nvidia.com/gpu"] = str(role.gpus_per_node)
    requests["nvidia.com/gpu"] = str(role.gpus_per_node)
    if spec.network.rdma_per_pod:
        limits[spec.network.rdma_resource] = str(spec.network.rdma_per_pod)
        requests[spec.network.rdma_resource] = str(spec.network.rdma_per_pod)
    return {"requests": requests, "limits": limits}


def _network_env(spec: InferenceDeploymentSpec) -> list[dict[str, Any]]:
    rank = {"fieldRef": {"fieldPath": f"metadata.labels['{L.POD_INDEX}']"}}
    return [{"name": "RANK", "valueFrom": rank}, *network_env(spec.network)]


def _model_volumes(spec: InferenceDeploymentSpec) -> list[dict[str, Any]]:
    """A model given as a path lives on the node (a 3FS FUSE mount or a local disk): the pods
    see it at the same path, read-only."""
    if not spec.model.source.startswith("/"):
        return []
    return [{"name": "model", "hostPath": {"path": spec.model.source, "type": "Directory"}}]


def _model_mounts(spec: InferenceDeploymentSpec) -> list[dict[str, Any]]:
    if not spec.model.source.startswith("/"):
        return []
    # HostToContainer: a FUSE mount that comes back after the pod started is seen.
    return [
        {
            "name": "model",
            "mountPath": spec.model.source,
            "readOnly": True,
            "mountPropagation": "HostToContainer",
        }
    ]


def statefulset(
    cr: dict[str, Any],
    spec: InferenceDeploymentSpec,
    role_name: str,
    index: int,
    nodes: tuple[str, ...],
    domain: tuple[str, str, str],
    placed_at: str,
    kv_mount: str | None = None,
) -> dict[str, Any]:
    """One unit: a pod per planned node, all pinned inside the planned domain. kv_mount: the
    kvCache ThreeFSCluster's mount point."""
    deployment = cr["metadata"]["name"]
    namespace = cr["metadata"]["namespace"]
    role: Role = getattr(spec, role_name)
    name = unit_name(deployment, role_name, index)
    rev = revision(spec, role_name, nodes, kv_mount)
    extra_volumes, extra_mounts = mounts.unit_volumes(spec, deployment, role_name, kv_mount)
    selector = {L.DEPLOYMENT: deployment, L.ROLE: role_name, L.UNIT: str(index)}
    pod_labels = {
        **base_labels(deployment, "unit"),
        **selector,
        L.REVISION: rev,
        L.PAIRING_REVISION: pairing_revision(spec),
    }
    level, _, domain_value = domain
    ctx = UnitContext(
        deployment, role_name, index, leader_host(deployment, role_name, index, namespace), "$NCCL_IB_HCA"
    )
    # Our engine's writes are known (/tmp, /dev/shm, the node paths); another engine's are not.
    read_only_root = spec.engine.kind == "fireflyer"
    container: dict[str, Any] = {
        "name": "engine",
        "image": image(spec),
        "command": ["/bin/sh", "-c", shell_line(spec, role, ctx)],
        "env": [
            *_network_env(spec),
            {"name": "FIREFLYER_ROLE", "value": role_name},
            {"name": "FIREFLYER_UNIT", "value": str(index)},
            {"name": "NNODES", "value": str(role.nodes_per_unit)},
            {"name": "MASTER_ADDR", "value": ctx.leader_host},
            *(security.read_only_root_env() if read_only_root else []),
            *mounts.unit_env(spec),
        ],
        "ports": [{"name": "serve", "containerPort": SERVE_PORT}],
        # Every rank of our engine answers /health once its model is loaded and its
        # collectives are up, so a unit is Ready only when it can serve.
        **(
            {"readinessProbe": {"httpGet": {"path": "/health", "port": "serve"}, "periodSeconds": 2}}
            if spec.engine.kind == "fireflyer"
            else {}
        ),
        "resources": _resources(spec, role),
        "securityContext": security.container_security_context(
            read_only_root=read_only_root, add=security.rdma_capabilities(spec.network)
        ),
        "volumeMounts": [
            security.tmp_mount(),
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "engine", "mountPath": "/etc/fireflyer/net", "readOnly": True},
            *extra_mounts,
            *_model_mounts(spec),
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {**base_labels(deployment, "unit"), **selector},
            "annotations": {L.PLACED_AT: placed_at, L.PLACED_DOMAIN: f"{level}/{domain_value}"},
            "ownerReferences": [owner_reference(cr)],
        },
        "spec": {
            "serviceName": name,
            "replicas": role.nodes_per_unit,
            "podManagementPolicy": "Parallel",
            # The operator recreates whole units itself: never two revisions inside one unit.
            "updateStrategy": {"type": "OnDelete"},
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "schedulerName": spec.placement.scheduler_name or "default-scheduler",
                    "hostNetwork": spec.network.host_network,
                    "dnsPolicy": "ClusterFirstWithHostNet" if spec.network.host_network else "ClusterFirst",
                    **pod_placement(spec.placement, selector, nodes, domain),
                    "securityContext": security.pod_security_context(non_root=False),
                    "containers": [container],
                    "volumes": [
                        security.tmp_volume(),
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE[role_name]}},
                        {"name": "engine", "configMap": {"name": config_map_name(deployment)}},
                        *extra_volumes,
                        *_model_volumes(spec),
                    ],
                },
            },
        },
    }


def headless_service(cr: dict[str, Any], role_name: str, index: int) -> dict[str, Any]:
    deployment = cr["metadata"]["name"]
    name = unit_name(deployment, role_name, index)
    selector = {L.DEPLOYMENT: deployment, L.ROLE: role_name, L.UNIT: str(index)}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": cr["metadata"]["namespace"],
            "labels": {**base_labels(deployment, "unit"), **selector},
            "ownerReferences": [owner_reference(cr)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # ranks must find each other before they are Ready
            "selector": selector,
            "ports": [{"name": "serve", "port": SERVE_PORT}],
        },
    }


def router(
    cr: dict[str, Any],
    spec: InferenceDeploymentSpec,
    unit_hosts: dict[str, list[str]],
    *,
    unit_revisions: Mapping[str, str] | None = None,
    draining: Mapping[str, list[str]] | None = None,
) -> list[dict[str, Any]]:
    """The router's Deployment, ConfigMap (its backends file) and Service. Each unit is listed with
    the pairing revision it runs: `unit_revisions[host]` where the caller knows it (units not yet
    rolled out), else the spec's. `draining`: role → leader hosts of units being drained before a
    scale-in, listed with `"draining": true` after the role's other units."""
    deployment = cr["metadata"]["name"]
    namespace = cr["metadata"]["namespace"]
    name = f"{deployment}-router"
    selector = {L.DEPLOYMENT: deployment, L.COMPONENT: "router"}
    # The units are a file the router re-reads, not flags: scaling a role changes the ConfigMap,
    # never the pod template, so the router is not restarted.
    args = ["router", "--policy", spec.router.policy, "--port", str(ROUTER_PORT)]
    args += ["--backends-file", f"{ROUTER_CONFIG_DIR}/{ROUTER_BACKENDS_FILE}"]
    volumes: list[dict[str, Any]] = [{"name": "units", "configMap": {"name": name}}, security.tmp_volume()]
    volume_mounts = [
        {"name": "units", "mountPath": ROUTER_CONFIG_DIR, "readOnly": True},
        security.tmp_mount(),
    ]
    if spec.router.api_key_secret:
        # A file, not an env var: the kubelet refreshes it in place, so keys rotate without a restart.
        key_volume, key_mount = mounts.api_keys_volume(spec.router.api_key_secret)
        volumes.append(key_volume)
        volume_mounts.append(key_mount)
        args += ["--api-key-file", mounts.API_KEY_FILE]
    current = pairing_revision(spec)
    revisions = unit_revisions or {}
    leaving = draining or {}
    backends = {
        role_name: [
            {"url": backend_url(host), "revision": revisions.get(host, current)}
            for host in unit_hosts.get(role_name, [])
        ]
        + [
            {"url": backend_url(host), "revision": revisions.get(host, current), "draining": True}
            for host in leaving.get(role_name, [])
        ]
        for role_name in ("prefill", "decode")
    }
    labels = base_labels(deployment, "router")
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": labels,
                "ownerReferences": [owner_reference(cr)],
            },
            "spec": {
                "replicas": spec.router.replicas,
                "selector": {"matchLabels": selector},
                "template": {
                    "metadata": {"labels": {**labels, **selector}},
                    "spec": {
                        "securityContext": security.pod_security_context(non_root=True),
                        "containers": [
                            {
                                "name": "router",
                                "image": image(spec),
                                "command": ["fireflyer"],
                                "args": args,
                                "ports": [{"name": "http", "containerPort": ROUTER_PORT}],
                                "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}},
                                "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
                                "securityContext": security.container_security_context(read_only_root=True),
                                "volumeMounts": volume_mounts,
                            }
                        ],
                        "volumes": volumes,
                        **(
                            {"nodeSelector": dict(spec.router.node_selector)}
                            if spec.router.node_selector
                            else {}
                        ),
                        **(
                            {"tolerations": [t.to_wire() for t in spec.router.tolerations]}
                            if spec.router.tolerations
                            else {}
                        ),
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": labels,
                "ownerReferences": [owner_reference(cr)],
            },
            "data": {ROUTER_BACKENDS_FILE: json.dumps(backends, indent=1, sort_keys=True)},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": labels,
                "ownerReferences": [owner_reference(cr)],
            },
            "spec": {
                "type": spec.router.service_type,
                "selector": selector,
                "ports": [{"name": "http", "port": ROUTER_PORT, "targetPort": "http"}],
            },
        },
    ]


def config_map(
    cr: dict[str, Any], spec: InferenceDeploymentSpec, node_hcas: dict[str, tuple[str, str]]
) -> dict[str, Any]:
    """Engine configuration plus each node's HCA list: a pod sources env.sh, which picks its
    node's line (the scheduler decides the node, the pod reads NODE_NAME)."""
    deployment = cr["metadata"]["name"]
    data = {
        "engine.json": json.dumps(spec.to_wire(), sort_keys=True, indent=1),
        "env.sh": (
            'if [ -f "/etc/fireflyer/net/hca.$NODE_NAME" ]; then\n'
            '  export NCCL_IB_HCA="$(cat /etc/fireflyer/net/hca.$NODE_NAME)"\n'
            '  export NVSHMEM_HCA_LIST="$NCCL_IB_HCA"\n'
            '  export FIREFLYER_GPU_HCA="$(cat /etc/fireflyer/net/rails.$NODE_NAME)"\n'
            "fi\n"
        ),
    }
    for node, (hcas, rails) in sorted(node_hcas.items()):
        data[f"hca.{node}"] = hcas
        data[f"rails.{node}"] = rails
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": config_map_name(deployment),
            "namespace": cr["metadata"]["namespace"],
            "labels": base_labels(deployment, "config"),
            "ownerReferences": [owner_reference(cr)],
        },
        "data": data,
    }
