"""The cluster as the planner sees it: nodes, their fabric domains and their free GPUs/RDMA."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
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


@dataclass(frozen=True)
class _NodeBase:
    """What a plan reads of one version of a node: all its GPUs and RDMA devices free, usable
    unless cordoned or not Ready. Derived once per (node, resourceVersion), not once per plan:
    every pass of every deployment plans against the whole fabric, of which few nodes change
    between two passes."""

    version: str
    info: NodeInfo
    labels: Mapping[str, str]
    taints: tuple[Mapping[str, Any], ...]
    """NoSchedule/NoExecute taints beyond the GPU operator's (the plan's tolerations decide)."""


# (level keys, RDMA resource) → node name → its base at the version last seen.
_node_bases: dict[tuple[tuple[tuple[str, str], ...], str], dict[str, _NodeBase]] = {}
_STALE_SLACK = 1024  # entries of nodes gone that may linger before the memo is pruned


def _node_base(node: Mapping[str, Any], keys: Mapping[str, str], rdma_resource: str) -> _NodeBase:
    meta = node.get("metadata", {})
    name = meta["name"]
    labels = meta.get("labels", {}) or {}
    allocatable = node.get("status", {}).get("allocatable", {}) or {}
    gpus = int(parse_quantity(allocatable.get(GPU_RESOURCE)))
    rdma = int(parse_quantity(allocatable.get(rdma_resource)))
    domains = {level: labels[key] for level, key in keys.items() if labels.get(key)}
    why = ""
    taints: tuple[Mapping[str, Any], ...] = ()
    if node.get("spec", {}).get("unschedulable"):
        why = "cordoned"
    elif not _ready(node):
        why = "not Ready"
    else:
        taints = tuple(
            t
            for t in node.get("spec", {}).get("taints", []) or []
            if t.get("effect") in ("NoSchedule", "NoExecute") and t.get("key") not in TOLERATED_TAINTS
        )
    info = NodeInfo(name, domains, gpus, gpus, rdma, rdma, usable=not why, why_unusable=why)
    return _NodeBase(str(meta.get("resourceVersion") or ""), info, labels, taints)


def _node_bases_of(
    nodes: Iterable[Mapping[str, Any]], keys: Mapping[str, str], rdma_resource: str
) -> list[_NodeBase]:
    memo = _node_bases.setdefault((tuple(keys.items()), rdma_resource), {})
    bases = []
    for node in nodes:
        meta = node.get("metadata", {})
        version = meta.get("resourceVersion")
        held = memo.get(meta["name"])
        if not version or held is None or held.version != str(version):
            held = _node_base(node, keys, rdma_resource)
            if version:  # a node built by hand has no version and may change in place: never kept
                memo[meta["name"]] = held
        bases.append(held)
    if len(memo) > 2 * len(bases) + _STALE_SLACK:
        current = {base.info.name for base in bases}
        for name in [name for name in memo if name not in current]:
            memo.pop(name, None)
    return bases


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
    selector = dict(node_selector or {})
    infos: dict[str, NodeInfo] = {}
    present: set[str] = set()
    for base in _node_bases_of(nodes, keys, rdma_resource):
        info = base.info
        present.update(info.domains)
        mismatch = [k for k, v in selector.items() if base.labels.get(k) != v] if selector else ()
        if mismatch:
            info = replace(
                info, usable=False, why_unusable=f"does not match placement.nodeSelector ({mismatch[0]})"
            )
        elif info.usable:
            for taint in base.taints:
                if not (tolerates is not None and tolerates(taint)):
                    info = replace(info, usable=False, why_unusable=f"tainted {taint.get('key')}")
                    break
        if info.name in used_gpu or info.name in used_rdma:
            info = replace(
                info,
                free_gpus=max(0, info.gpus - int(used_gpu.get(info.name, 0))),
                free_rdma=max(0, info.rdma - int(used_rdma.get(info.name, 0))),
            )
        infos[info.name] = info
    levels = [level for level in LEVELS if level in present]
    return ClusterTopology(infos, levels, keys)
