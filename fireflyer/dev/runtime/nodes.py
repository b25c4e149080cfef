"""The local nodes: Node objects whose pods the runtime really runs, and their heartbeats."""

from __future__ import annotations

import datetime as dt
from typing import Any

from kubernetes import client

from fireflyer.dev.topology import SIMULATED_LABEL, TOPOGRAPH_PREFIX

LOCAL_LABEL = "fireflyer.dev/local-runtime"
# Simulated workloads (and their DaemonSets) stay off the local nodes unless they tolerate this:
# a pod landing here runs for real.
LOCAL_TAINT = {"key": LOCAL_LABEL, "value": "true", "effect": "NoSchedule"}
NAME_PREFIX = "local"
LEASE_SECONDS = 40
# A request that hangs must not stop the loop that sent it: the node would go NotReady, or its
# pods would never start or end. The loops retry on their next turn.
REQUEST_TIMEOUT = 15.0


def node_names(count: int) -> list[str]:
    return [f"{NAME_PREFIX}-{i}" for i in range(count)]


def node_object(
    name: str, slots: int, host_ip: str, kubelet_port: int, cpu: str, memory: str
) -> dict[str, Any]:
    """A node of this machine. `slots` stands in for `nvidia.com/gpu`: each is one rank of a
    workload, run on the CPU, so the operator's placement treats the node as a GPU node."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    resources = {"cpu": cpu, "memory": memory, "pods": "32", "nvidia.com/gpu": str(slots)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                LOCAL_LABEL: "true",
                SIMULATED_LABEL: "false",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": "CPU",
                "nvidia.com/gpu.count": str(slots),
                f"{TOPOGRAPH_PREFIX}spine": "local",
                f"{TOPOGRAPH_PREFIX}leaf": "local",
            },
        },
        "spec": {"taints": [LOCAL_TAINT]},
        "status": {
            "allocatable": resources,
            "capacity": dict(resources),
            # Where the API server reaches the node's log endpoint (`kubectl logs`); no Hostname
            # address, which the API server would try first and cannot resolve.
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
            "conditions": _conditions(now),
            "nodeInfo": {
                "kubeletVersion": "fireflyer-local",
                "containerRuntimeVersion": "fireflyer-local://1",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "osImage": "this machine",
                "kernelVersion": "",
                "kubeProxyVersion": "",
                "machineID": name,
                "systemUUID": name,
                "bootID": name,
            },
        },
    }


def _conditions(now: str) -> list[dict[str, Any]]:
    healthy = [
        ("MemoryPressure", "KubeletHasSufficientMemory"),
        ("DiskPressure", "KubeletHasNoDiskPressure"),
        ("PIDPressure", "KubeletHasSufficientPID"),
    ]
    out = [
        {"type": t, "status": "False", "reason": r, "lastHeartbeatTime": now, "lastTransitionTime": now}
        for t, r in healthy
    ]
    out.append(
        {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "the local runtime is running",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }
    )
    return out


def register(api: client.CoreV1Api, node: dict[str, Any]) -> None:
    name = node["metadata"]["name"]
    try:
        api.create_node(node)  # type: ignore[arg-type]  # the client takes plain dicts too
    except client.ApiException as exc:
        if exc.status != 409:
            raise
        api.patch_node(name, {"metadata": node["metadata"], "spec": node["spec"]})
    api.patch_node_status(name, {"status": node["status"]})


def heartbeat(core: client.CoreV1Api, leases: client.CoordinationV1Api, name: str) -> None:
    """Renew the node's Lease (what the node lifecycle controller watches) and its Ready time."""
    now = dt.datetime.now(dt.UTC)
    renew = {
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
    }
    try:
        leases.patch_namespaced_lease(name, "kube-node-lease", renew, _request_timeout=REQUEST_TIMEOUT)
    except client.ApiException as exc:
        if exc.status != 404:
            raise
        lease = {"metadata": {"name": name, "namespace": "kube-node-lease"}, **renew}
        leases.create_namespaced_lease(
            "kube-node-lease",
            lease,  # type: ignore[arg-type]  # the client takes plain dicts too
            _request_timeout=REQUEST_TIMEOUT,
        )
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    node = core.read_node_status(name, _request_timeout=REQUEST_TIMEOUT)
    conditions = []
    for cond in (node.status.conditions if node.status else None) or []:
        entry = client.ApiClient().sanitize_for_serialization(cond)
        entry["lastHeartbeatTime"] = stamp
        conditions.append(entry)
    core.patch_node_status(name, {"status": {"conditions": conditions}}, _request_timeout=REQUEST_TIMEOUT)
