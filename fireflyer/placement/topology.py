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
class _Base:
    """The nodes' side of a topology, for one version of every node: each node with all its
    GPUs and RDMA devices free, usable unless cordoned or not Ready. Built once per change of the
    nodes, not once per plan: every pass of every deployment plans against the whole fabric."""

    signature: tuple[tuple[str, str], ...]
    infos: dict[str, NodeInfo]
    labels: dict[str, Mapping[str, str]]
    taints: dict[str, tuple[Mapping[str, Any], ...]]
    """Nodes otherwise usable with NoSchedule/NoExecute taints (the plan's tolerations decide)."""
    present: frozenset[str]


_bases: dict[tuple[tuple[tuple[str, str], ...], str], _Base] = {}


def _signature(nodes: Sequence[Mapping[str, Any]]) -> tuple[tuple[str, str], ...] | None:
    """(name, resourceVersion) of each node; None when one has no version (built by hand, and it
    may change in place): such a list is never cached."""
    signature = []
    for node in nodes:
        meta = node.get("metadata", {})
        version = meta.get("resourceVersion")
        if not version:
            return None
        signature.append((meta["name"], str(version)))
    return tuple(signature)


def _build_base(nodes: Sequence[Mapping[str, Any]], keys: Mapping[str, str], rdma_resource: str) -> _Base:
    infos: dict[str, NodeInfo] = {}
    labels_of: dict[str, Mapping[str, str]] = {}
    taints_of: dict[str, tuple[Mapping[str, Any], ...]] = {}
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
            if taints:
                taints_of[name] = taints
        labels_of[name] = labels
        infos[name] = NodeInfo(name, domains, gpus, gpus, rdma, rdma, usable=not why, why_unusable=why)
    return _Base((), infos, labels_of, taints_of, frozenset(present))


def _base(nodes: Iterable[Mapping[str, Any]], keys: Mapping[str, str], rdma_resource: str) -> _Base:
    listed = nodes if isinstance(nodes, Sequence) else list(nodes)
    signature = _signature(listed)
    memo_key = (tuple(keys.items()), rdma_resource)
    held = _bases.get(memo_key)
    if signature is not None and held is not None and held.signature == signature:
        return held
    built = _build_base(listed, keys, rdma_resource)
    if signature is not None:
        if len(_bases) > 8:  # profiles no longer asked for
            _bases.clear()
        _bases[memo_key] = replace(built, signature=signature)
    return built


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
    base = _base(nodes, keys, rdma_resource)
    infos = dict(base.infos)
    selector = dict(node_selector or {})
    for name, node_labels in base.labels.items() if selector else ():
        mismatch = [k for k, v in selector.items() if node_labels.get(k) != v]
        if mismatch:
            why = f"does not match placement.nodeSelector ({mismatch[0]})"
            infos[name] = replace(infos[name], usable=False, why_unusable=why)
    for name, taints in base.taints.items():
        if not infos[name].usable:  # outside the node selector
            continue
        for taint in taints:
            if not (tolerates is not None and tolerates(taint)):
                infos[name] = replace(infos[name], usable=False, why_unusable=f"tainted {taint.get('key')}")
                break
    for name in used_gpu.keys() | used_rdma.keys():
        info = infos.get(name)
        if info is not None:
            infos[name] = replace(
                info,
                free_gpus=max(0, info.gpus - int(used_gpu.get(name, 0))),
                free_rdma=max(0, info.rdma - int(used_rdma.get(name, 0))),
            )
    levels = [level for level in LEVELS if level in base.present]
    return ClusterTopology(infos, levels, keys)
