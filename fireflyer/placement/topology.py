"""The cluster as the planner sees it: nodes, their fabric domains and their free GPUs/RDMA."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

GPU_RESOURCE = "nvidia.com/gpu"
LEVELS = ("accelerator", "leaf", "spine", "core")  # lowest (tightest) first

# Node label keys of each fabric level, per topology profile.
PROFILES: dict[str, dict[str, str]] = {
    "topograph": {
        "accelerator": "network.topology.nvidia.com/accelerator",
        "leaf": "network.topology.nvidia.com/leaf",
        "spine": "network.topology.nvidia.com/spine",
        "core": "network.topology.nvidia.com/core",
    },
    "gke": {
        "accelerator": "cloud.google.com/gce-topology-host",
        "leaf": "cloud.google.com/gce-topology-subblock",
        "spine": "cloud.google.com/gce-topology-block",
    },
    "eks": {
        "leaf": "topology.k8s.aws/network-node-layer-3",
        "spine": "topology.k8s.aws/network-node-layer-2",
        "core": "topology.k8s.aws/network-node-layer-1",
    },
    "coreweave": {
        "leaf": "backend.coreweave.cloud/leafgroup",
        "spine": "backend.coreweave.cloud/superpod",
    },
}
# Taints that GPU workload pods tolerate: the GPU operator's own.
TOLERATED_TAINTS = frozenset({GPU_RESOURCE})


def level_keys(profile: str, custom_keys: Sequence[str] = ()) -> dict[str, str]:
    if profile == "custom":
        return dict(zip(LEVELS, custom_keys, strict=False))
    return dict(PROFILES[profile])


_SUFFIXES = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
}
_SUFFIX_ORDER = sorted(_SUFFIXES, key=len, reverse=True)  # "Mi" before "M"


def parse_quantity(value: str | int | float | None) -> float:
    """Kubernetes quantities as numbers (enough for counts, CPU and memory comparisons)."""
    if value is None:
        return 0.0
    if isinstance(value, int | float):
        return float(value)
    return _parse_text(str(value).strip())


@functools.lru_cache(maxsize=4096)
def _parse_text(text: str) -> float:
    # Few distinct quantities appear across thousands of nodes and pods: parse each once.
    for suffix in _SUFFIX_ORDER:
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * _SUFFIXES[suffix]
    return float(text)


@dataclass(frozen=True)
class NodeInfo:
    name: str
    domains: Mapping[str, str]
    """level → domain name (only the levels the node is labelled with)."""
    gpus: int
    free_gpus: int
    rdma: int
    free_rdma: int
    usable: bool
    """Ready, schedulable and without taints the workloads do not tolerate."""
    why_unusable: str = ""


@dataclass
class ClusterTopology:
    nodes: dict[str, NodeInfo]
    levels: list[str]
    """The levels present (lowest first), limited to the profile's keys."""
    level_keys: dict[str, str] = field(default_factory=dict)

    def usable(self) -> list[NodeInfo]:
        return [n for n in self.nodes.values() if n.usable]


def pod_node(pod: Mapping[str, Any]) -> str:
    """The node a pod is bound to; "" while it is unscheduled (the key may be absent or null)."""
    return str((pod.get("spec") or {}).get("nodeName") or "")


def _requests(pod: Mapping[str, Any], resource: str) -> float:
    total = 0.0
    for container in pod.get("spec", {}).get("containers", []) or []:
        res = container.get("resources", {}) or {}
        amount = (res.get("requests") or {}).get(resource, (res.get("limits") or {}).get(resource))
        total += parse_quantity(amount)
    return total


def _ready(node: Mapping[str, Any]) -> bool:
    for cond in node.get("status", {}).get("conditions", []) or []:
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


def build_topology(
    nodes: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    profile: str = "topograph",
    rdma_resource: str = "rdma/ib",
    custom_keys: Sequence[str] = (),
    ignore_pods: Mapping[str, str] | None = None,
    ignore_namespace: str | None = None,
    reserved: Mapping[str, tuple[int, int]] | None = None,
    node_selector: Mapping[str, str] | None = None,
    tolerates: Callable[[Mapping[str, Any]], bool] | None = None,
) -> ClusterTopology:
    """Free resources per node = allocatable − requests of non-terminated pods bound there −
    reservations (GPUs, RDMA devices) of units planned onto the node whose pods are not bound yet.
    Pods whose labels match all of ignore_pods (e.g. the units being re-planned) are not counted,
    when they are in ignore_namespace (given): a same-named deployment elsewhere is not ours.
    A node that lacks a node_selector label, or has a taint that neither the GPU operator's
    exemption nor `tolerates` covers, is unusable."""
    keys = level_keys(profile, custom_keys)
    used_gpu: dict[str, float] = {}
    used_rdma: dict[str, float] = {}
    for pod in pods:
        node_name = pod_node(pod)
        phase = pod.get("status", {}).get("phase")
        if not node_name or phase in ("Succeeded", "Failed"):
            continue
        labels = pod.get("metadata", {}).get("labels", {}) or {}
        ours = ignore_namespace is None or pod.get("metadata", {}).get("namespace") == ignore_namespace
        if ignore_pods and ours and all(labels.get(k) == v for k, v in ignore_pods.items()):
            continue
        used_gpu[node_name] = used_gpu.get(node_name, 0.0) + _requests(pod, GPU_RESOURCE)
        used_rdma[node_name] = used_rdma.get(node_name, 0.0) + _requests(pod, rdma_resource)
    for node_name, (gpu, rdma) in (reserved or {}).items():
        used_gpu[node_name] = used_gpu.get(node_name, 0.0) + gpu
        used_rdma[node_name] = used_rdma.get(node_name, 0.0) + rdma
    infos: dict[str, NodeInfo] = {}
    present: set[str] = set()
    for node in nodes:
        meta = node.get("metadata", {})
        name = meta["name"]
        labels = meta.get("labels", {}) or {}
        allocatable = node.get("status", {}).get("allocatable", {}) or {}
        gpus = int(parse_quantity(allocatable.get(GPU_RESOURCE)))
        rdma = int(parse_quantity(allocatable.get(rdma_resource)))
        domains = {level: labels[key] for level, key in keys.items() if labels.get(key)}
        present.update(domains)
        why = ""
        mismatch = [k for k, v in (node_selector or {}).items() if labels.get(k) != v]
        if mismatch:
            why = f"does not match placement.nodeSelector ({mismatch[0]})"
        elif node.get("spec", {}).get("unschedulable"):
            why = "cordoned"
        elif not _ready(node):
            why = "not Ready"
        else:
            for taint in node.get("spec", {}).get("taints", []) or []:
                if (
                    taint.get("effect") in ("NoSchedule", "NoExecute")
                    and taint.get("key") not in TOLERATED_TAINTS
                    and not (tolerates is not None and tolerates(taint))
                ):
                    why = f"tainted {taint.get('key')}"
                    break
        infos[name] = NodeInfo(
            name=name,
            domains=domains,
            gpus=gpus,
            free_gpus=max(0, gpus - int(used_gpu.get(name, 0))),
            rdma=rdma,
            free_rdma=max(0, rdma - int(used_rdma.get(name, 0))),
            usable=not why,
            why_unusable=why,
        )
    levels = [level for level in LEVELS if level in present]
    return ClusterTopology(infos, levels, keys)
