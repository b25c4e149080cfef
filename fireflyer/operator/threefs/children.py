"""Desired child objects of a ThreeFSCluster (pure builders)."""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from fireflyer.api.base import Toleration
from fireflyer.api.threefs import ThreeFSClusterSpec
from fireflyer.operator import labels as L
from fireflyer.operator.objects import owner_reference
from fireflyer.threefs.config import APP_FILE, CONFIG_DIR, FDB_CLUSTER_FILE, PORTS, TOKEN_FILE

CLUSTER = "fireflyer.dev/threefs"
STEP = "fireflyer.dev/admin-step"
FDB_IMAGE = "foundationdb/foundationdb:7.3.43"
CLICKHOUSE_IMAGE = "clickhouse/clickhouse-server:24.8"
FDB_PORT = 4500
CLICKHOUSE_PORT = 9000
# Storage hosts need these for 3FS's AIO engine and RDMA buffers (node-wide, so an init container
# sets them; pod sysctls cannot, fs.aio-max-nr is not namespaced).
STORAGE_SYSCTLS = {"fs.aio-max-nr": "67108864", "vm.max_map_count": "1048576"}
OPEN_FILES = 1048576


def labels(cluster: str, component: str) -> dict[str, str]:
    return {CLUSTER: cluster, L.COMPONENT: component, L.MANAGED_BY: L.MANAGER}


def name_of(cluster: str, component: str) -> str:
    return f"{cluster}-{component}"


def _meta(
    cr: dict[str, Any], name: str, component: str, extra: Mapping[str, str] | None = None
) -> dict[str, Any]:
    cluster = cr["metadata"]["name"]
    return {
        "name": name,
        "namespace": cr["metadata"]["namespace"],
        "labels": {**labels(cluster, component), **(extra or {})},
        "ownerReferences": [owner_reference(cr)],
    }


def digest(data: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(data), sort_keys=True).encode()).hexdigest()[:12]


def config_map(cr: dict[str, Any], component: str, data: Mapping[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(cr, name_of(cr["metadata"]["name"], f"{component}-config"), component),
        "data": dict(data),
    }


def headless_service(cr: dict[str, Any], component: str, ports: tuple[int, ...]) -> dict[str, Any]:
    cluster = cr["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(cr, name_of(cluster, component), component),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": labels(cluster, component),
            "ports": [{"name": f"p{p}", "port": p} for p in ports],
        },
    }


def service(cr: dict[str, Any], component: str, port: int) -> dict[str, Any]:
    cluster = cr["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(cr, name_of(cluster, component), component),
        "spec": {"selector": labels(cluster, component), "ports": [{"name": "main", "port": port}]},
    }


def pdb(cr: dict[str, Any], component: str) -> dict[str, Any]:
    cluster = cr["metadata"]["name"]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(cr, name_of(cluster, component), component),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels(cluster, component)}},
    }


def _config_volume(cluster: str, component: str) -> dict[str, Any]:
    return {"name": f"{component}-config", "configMap": {"name": name_of(cluster, f"{component}-config")}}


def _fdb_volume(cluster: str) -> dict[str, Any]:
    return {"name": "fdb-cluster-file", "configMap": {"name": name_of(cluster, "fdb-config")}}


FDB_MOUNT = {"name": "fdb-cluster-file", "mountPath": FDB_CLUSTER_FILE.rsplit("/", 1)[0]}


def _service_command(component: str, binary: str) -> list[str]:
    """Start a 3FS service with its launcher and app TOML; the app TOML is picked by pod ordinal."""
    q = shlex.quote
    app, config = q(f"/run/3fs/{APP_FILE[component]}"), f"{CONFIG_DIR}/{component}"
    line = (
        "set -e; ordinal=${HOSTNAME##*-}; mkdir -p /run/3fs; "
        f'cp {q(config)}/app-"$ordinal".toml {app}; '
        f"ulimit -n {OPEN_FILES}; ulimit -l unlimited; "
        f"exec {q(f'/opt/3fs/bin/{binary}')} --launcher_cfg {q(f'{config}/{binary}_launcher.toml')} "
        f"--app-cfg {app}"
    )
    return ["/bin/sh", "-c", line]


def node_loss_tolerations(seconds: int | None) -> list[dict[str, Any]]:
    """NoExecute tolerations of a lost node's taints: for `seconds`, or without limit (None)."""
    limit = {} if seconds is None else {"tolerationSeconds": seconds}
    return [{"key": key, "operator": "Exists", "effect": "NoExecute", **limit} for key in L.NODE_LOSS_TAINTS]


def service_ports(component: str, *, host_network: bool) -> list[dict[str, Any]]:
    """The ports a 3FS service binds (its serde/RDMA port, then its TCP core port). In the host's
    network namespace they are claimed as host ports too, so the scheduler never puts two pods
    that bind them on one node (an mgmtd pod moving off a lost node beside another mgmtd)."""
    ports = []
    for name, port in zip(("serde", "core"), PORTS[component], strict=True):
        entry: dict[str, Any] = {"name": name, "containerPort": port, "protocol": "TCP"}
        if host_network:
            entry["hostPort"] = port
        ports.append(entry)
    return ports


def service_statefulset(
    cr: dict[str, Any],
    spec: ThreeFSClusterSpec,
    component: str,
    binary: str,
    replicas: int,
    config_digest: str,
    *,
    extra_volumes: list[dict[str, Any]] | None = None,
    extra_mounts: list[dict[str, Any]] | None = None,
    node_selector: Mapping[str, str] | None = None,
    tolerations: list[dict[str, Any]] | None = None,
    one_per_node: bool = False,
    rdma: bool = False,
    init_containers: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    cluster = cr["metadata"]["name"]
    resources: dict[str, Any] = {}
    if rdma and spec.network.transport == "rdma":
        resources = {"limits": {"rdma/ib": "1"}, "requests": {"rdma/ib": "1"}}
    pod_spec: dict[str, Any] = {
        "hostNetwork": spec.network.host_network,
        "dnsPolicy": "ClusterFirstWithHostNet" if spec.network.host_network else "ClusterFirst",
        "automountServiceAccountToken": False,  # 3FS services never call the Kubernetes API
        "containers": [
            {
                "name": component,
                "image": spec.image,
                "command": _service_command(component, binary),
                "ports": service_ports(component, host_network=spec.network.host_network),
                "resources": resources,
                "securityContext": {"capabilities": {"add": ["IPC_LOCK", "SYS_RESOURCE"]}},
                "volumeMounts": [
                    {"name": f"{component}-config", "mountPath": f"{CONFIG_DIR}/{component}"},
                    FDB_MOUNT,
                    *(extra_mounts or []),
                ],
            }
        ],
        "volumes": [_config_volume(cluster, component), _fdb_volume(cluster), *(extra_volumes or [])],
    }
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod_spec["tolerations"] = list(tolerations)
    if init_containers:
        pod_spec["initContainers"] = init_containers
    if one_per_node:
        pod_spec["affinity"] = {
            "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "labelSelector": {"matchLabels": labels(cluster, component)},
                        "topologyKey": "kubernetes.io/hostname",
                    }
                ]
            }
        }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(cr, name_of(cluster, component), component),
        "spec": {
            "serviceName": name_of(cluster, component),
            "replicas": replicas,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels(cluster, component)},
            "template": {
                "metadata": {
                    "labels": labels(cluster, component),
                    # A new configuration rolls the pods.
                    "annotations": {"fireflyer.dev/config": config_digest},
                },
                "spec": pod_spec,
            },
        },
    }


def storage_statefulset(cr: dict[str, Any], spec: ThreeFSClusterSpec, config_digest: str) -> dict[str, Any]:
    disks = [
        (f"disk{d}", spec.storage.disk_path_template.replace("{disk}", str(d)))
        for d in range(spec.storage.disks_per_node)
    ]
    sysctl = " && ".join(f"sysctl -w {shlex.quote(f'{k}={v}')}" for k, v in STORAGE_SYSCTLS.items())
    # Privileged, and only this init container: fs.aio-max-nr is node-wide (not a namespaced
    # sysctl), so no pod-level sysctl or capability can set it.
    init = {
        "name": "host-limits",
        "image": spec.image,
        "command": ["/bin/sh", "-c", sysctl],
        "securityContext": {"privileged": True},
    }
    return service_statefulset(
        cr,
        spec,
        "storage",
        "storage_main",
        spec.storage.nodes,
        config_digest,
        extra_volumes=[
            {"name": name, "hostPath": {"path": path, "type": "DirectoryOrCreate"}} for name, path in disks
        ],
        extra_mounts=[{"name": name, "mountPath": path} for name, path in disks],
        node_selector=spec.storage.node_selector,
        # Storage pods never leave a failed node by eviction: the replacement procedure moves them,
        # after their targets left their chains (a pod restarting elsewhere with the old node id
        # and empty disks would claim targets it no longer holds).
        tolerations=[*tolerations(spec.storage.tolerations), *node_loss_tolerations(None)],
        one_per_node=True,
        rdma=True,
        init_containers=[init],
    )


def fdb_cluster_file(cr: dict[str, Any], replicas: int) -> str:
    """`description:id@coordinators`; coordinators by stable DNS name (FoundationDB ≥ 7.0)."""
    cluster = cr["metadata"]["name"]
    namespace = cr["metadata"]["namespace"]
    coordinators = min(replicas, 5) if replicas % 2 else min(replicas - 1, 5)
    hosts = ",".join(
        f"{cluster}-fdb-{i}.{cluster}-fdb.{namespace}.svc.cluster.local:{FDB_PORT}"
        for i in range(coordinators)
    )
    return f"{cluster.replace('-', '_')}:{cr['metadata']['uid'].replace('-', '')[:16]}@{hosts}\n"


def fdb_statefulset(cr: dict[str, Any], spec: ThreeFSClusterSpec) -> dict[str, Any]:
    managed = spec.foundationdb.managed
    assert managed is not None
    cluster = cr["metadata"]["name"]
    claim: dict[str, Any] = {
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": managed.storage}}},
    }
    if managed.storage_class_name:
        claim["spec"]["storageClassName"] = managed.storage_class_name
    retention = "Delete" if spec.reclaim_policy == "Delete" else "Retain"
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(cr, name_of(cluster, "fdb"), "fdb"),
        "spec": {
            "serviceName": name_of(cluster, "fdb"),
            "replicas": managed.replicas,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels(cluster, "fdb")},
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": retention, "whenScaled": "Retain"},
            "template": {
                "metadata": {"labels": labels(cluster, "fdb")},
                "spec": {
                    "automountServiceAccountToken": False,
                    "containers": [
                        {
                            "name": "fdb",
                            "image": FDB_IMAGE,
                            "env": [
                                {"name": "FDB_CLUSTER_FILE", "value": FDB_CLUSTER_FILE},
                                {"name": "FDB_NETWORKING_MODE", "value": "container"},
                                {"name": "FDB_PORT", "value": str(FDB_PORT)},
                            ],
                            "ports": [{"containerPort": FDB_PORT}],
                            "volumeMounts": [{"name": "data", "mountPath": "/var/fdb/data"}, FDB_MOUNT],
                        }
                    ],
                    "volumes": [_fdb_volume(cluster)],
                },
            },
            "volumeClaimTemplates": [claim],
        },
    }


def foundationdb_cluster(cr: dict[str, Any], spec: ThreeFSClusterSpec) -> dict[str, Any]:
    """For clusters that run the FoundationDB operator: let it run FoundationDB, consume its file."""
    managed = spec.foundationdb.managed
    assert managed is not None
    cluster = cr["metadata"]["name"]
    return {
        "apiVersion": "apps.foundationdb.org/v1beta2",
        "kind": "FoundationDBCluster",
        "metadata": _meta(cr, name_of(cluster, "fdb"), "fdb"),
        "spec": {
            "version": FDB_IMAGE.rsplit(":", 1)[1],
            "processCounts": {"storage": managed.replicas},
            "databaseConfiguration": {"redundancy_mode": "double" if managed.replicas >= 3 else "single"},
            "processes": {
                "general": {
                    "volumeClaimTemplate": {
                        "spec": {"resources": {"requests": {"storage": managed.storage}}}
                        | (
                            {"storageClassName": managed.storage_class_name}
                            if managed.storage_class_name
                            else {}
                        )
                    }
                }
            },
        },
    }


def monitor_deployment(cr: dict[str, Any], spec: ThreeFSClusterSpec, config_digest: str) -> dict[str, Any]:
    cluster = cr["metadata"]["name"]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(cr, name_of(cluster, "monitor"), "monitor"),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels(cluster, "monitor")},
            "template": {
                "metadata": {
                    "labels": labels(cluster, "monitor"),
                    "annotations": {"fireflyer.dev/config": config_digest},
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "tolerations": node_loss_tolerations(spec.failover_seconds),
                    "containers": [
                        {
                            "name": "monitor",
                            "image": spec.image,
                            "command": [
                                "/opt/3fs/bin/monitor_collector_main",
                                "--cfg",
                                f"{CONFIG_DIR}/monitor/monitor_collector_main.toml",
                            ],
                            "ports": [{"containerPort": PORTS["monitor"][0]}],
                            "volumeMounts": [
                                {"name": "monitor-config", "mountPath": f"{CONFIG_DIR}/monitor"}
                            ],
                        }
                    ],
                    "volumes": [_config_volume(cluster, "monitor")],
                },
            },
        },
    }


def clickhouse_statefulset(cr: dict[str, Any]) -> dict[str, Any]:
    cluster = cr["metadata"]["name"]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(cr, name_of(cluster, "clickhouse"), "clickhouse"),
        "spec": {
            "serviceName": name_of(cluster, "clickhouse"),
            "replicas": 1,
            "selector": {"matchLabels": labels(cluster, "clickhouse")},
            "template": {
                "metadata": {"labels": labels(cluster, "clickhouse")},
                "spec": {
                    "automountServiceAccountToken": False,
                    "containers": [
                        {
                            "name": "clickhouse",
                            "image": CLICKHOUSE_IMAGE,
                            "env": [{"name": "CLICKHOUSE_DB", "value": "3fs"}],
                            "ports": [{"containerPort": CLICKHOUSE_PORT}],
                            "volumeMounts": [{"name": "data", "mountPath": "/var/lib/clickhouse"}],
                        }
                    ],
                },
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "data"},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": "50Gi"}},
                    },
                }
            ],
        },
    }


def tolerations(items: Sequence[Toleration]) -> list[dict[str, Any]]:
    return [t.to_wire() for t in items]


def fuse_daemonset(cr: dict[str, Any], spec: ThreeFSClusterSpec, config_digest: str) -> dict[str, Any]:
    """The FUSE clients, on the nodes clients.nodeSelector picks (never empty: admission)."""
    cluster = cr["metadata"]["name"]
    mount_point = spec.clients.mount_point
    q = shlex.quote
    command = (
        f"set -e; ulimit -l unlimited; exec /opt/3fs/bin/hf3fs_fuse_main "
        f"--launcher_cfg {q(f'{CONFIG_DIR}/fuse/hf3fs_fuse_main_launcher.toml')}"
    )
    pod_spec: dict[str, Any] = {
        "hostNetwork": spec.network.host_network,
        "dnsPolicy": "ClusterFirstWithHostNet" if spec.network.host_network else "ClusterFirst",
        "automountServiceAccountToken": False,  # the FUSE client never calls the Kubernetes API
        "nodeSelector": dict(spec.clients.node_selector),
        "containers": [
            {
                "name": "fuse",
                "image": spec.image,
                "command": ["/bin/sh", "-c", command],
                # Privileged is unavoidable here, and the reason the pod runs only on the nodes
                # clients.nodeSelector picks: the API server admits Bidirectional mount
                # propagation (the mount must reach the host for workloads) only for privileged
                # containers, and /dev/fuse is outside the container runtime's default device
                # allowlist. What it shares with the host is the mount point itself, /dev/fuse
                # and /dev/shm (USRBIO), nothing above them.
                "securityContext": {"privileged": True},
                "lifecycle": {"preStop": {"exec": {"command": ["fusermount3", "-u", mount_point]}}},
                "volumeMounts": [
                    {"name": "fuse-config", "mountPath": f"{CONFIG_DIR}/fuse", "readOnly": True},
                    {"name": "token", "mountPath": TOKEN_FILE.rsplit("/", 1)[0], "readOnly": True},
                    {"name": "mount", "mountPath": mount_point, "mountPropagation": "Bidirectional"},
                    {"name": "dev-fuse", "mountPath": "/dev/fuse"},
                    # USRBIO shares iovecs with workloads through the host's /dev/shm.
                    {"name": "shm", "mountPath": "/dev/shm"},
                ],
            }
        ],
        "volumes": [
            _config_volume(cluster, "fuse"),
            {"name": "token", "secret": {"secretName": token_secret_name(cluster), "defaultMode": 0o400}},
            {"name": "mount", "hostPath": {"path": mount_point, "type": "DirectoryOrCreate"}},
            {"name": "dev-fuse", "hostPath": {"path": "/dev/fuse", "type": "CharDevice"}},
            {"name": "shm", "hostPath": {"path": "/dev/shm", "type": "Directory"}},
        ],
    }
    if spec.clients.tolerations:
        pod_spec["tolerations"] = tolerations(spec.clients.tolerations)
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _meta(cr, name_of(cluster, "fuse"), "fuse"),
        "spec": {
            "selector": {"matchLabels": labels(cluster, "fuse")},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}},
            "template": {
                "metadata": {
                    "labels": labels(cluster, "fuse"),
                    "annotations": {"fireflyer.dev/config": config_digest},
                },
                "spec": pod_spec,
            },
        },
    }


def token_secret_name(cluster: str) -> str:
    return name_of(cluster, "token")


def token_secret(cr: dict[str, Any]) -> dict[str, Any]:
    """Created empty before user-add, which writes the root token into it (the operator never
    holds the token)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(cr, token_secret_name(cr["metadata"]["name"]), "token"),
        "type": "Opaque",
    }
