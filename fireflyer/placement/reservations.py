"""GPUs promised to workloads that are planned but not bound yet. A controller applies a gang's
StatefulSet or Job with required node affinity on the planned host names; its pods appear and
bind a moment later. Until they do, nobody else may plan onto those GPUs. Pure."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from fireflyer.placement.pinning import HOSTNAME
from fireflyer.placement.topology import GPU_RESOURCE, parse_quantity, pod_node


def planned_nodes(workload: Mapping[str, Any]) -> list[str]:
    """The host names a StatefulSet's or Job's pod template is pinned to (required affinity)."""
    terms = (
        workload.get("spec", {})
        .get("template", {})
        .get("spec", {})
        .get("affinity", {})
        .get("nodeAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution", {})
        .get("nodeSelectorTerms", [])
    )
    for term in terms:
        for expr in term.get("matchExpressions", []):
            if expr.get("key") == HOSTNAME:
                return list(expr.get("values", []))
    return []


def _per_pod(workload: Mapping[str, Any], resource: str) -> int:
    containers = workload["spec"]["template"]["spec"].get("containers", [])
    total = 0.0
    for container in containers:
        limits = (container.get("resources") or {}).get("limits") or {}
        total += parse_quantity(limits.get(resource))
    return int(total)


def _finished(workload: Mapping[str, Any]) -> bool:
    if workload.get("metadata", {}).get("deletionTimestamp"):
        return True
    if workload.get("kind") == "Job":
        if workload.get("spec", {}).get("suspend"):
            return True
        return any(
            c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
            for c in workload.get("status", {}).get("conditions") or []
        )
    return False


def reservations(
    workloads: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]], rdma_resource: str
) -> dict[str, tuple[int, int]]:
    """node → (GPUs, RDMA devices) reserved by planned nodes that have no bound pod of their
    workload yet. A pod belongs to a workload when it is in its namespace and carries its
    selector's matchLabels (a Job's selector is its controller-uid)."""
    # Bound pods by (namespace, label, value): a workload's pods are found through its rarest
    # selector label, not by scanning every pod for every workload (thousands of each at scale).
    bound: dict[tuple[str | None, str, str], list[tuple[Mapping[str, str], str]]] = defaultdict(list)
    for p in pods:
        node = pod_node(p)
        if not node:
            continue
        meta = p.get("metadata") or {}
        labels = meta.get("labels") or {}
        for key, value in labels.items():
            bound[(meta.get("namespace"), key, value)].append((labels, node))
    reserved: dict[str, tuple[int, int]] = {}
    for workload in workloads:
        if _finished(workload):
            continue
        namespace = workload["metadata"].get("namespace")
        selector = workload.get("spec", {}).get("selector", {}).get("matchLabels") or {}
        if not selector:
            continue
        gpus = _per_pod(workload, GPU_RESOURCE)
        rdma = _per_pod(workload, rdma_resource)
        candidates = min((bound.get((namespace, k, v), []) for k, v in selector.items()), key=len)
        taken = {node for labels, node in candidates if all(labels.get(k) == v for k, v in selector.items())}
        for node in planned_nodes(workload):
            if node not in taken:
                g, r = reserved.get(node, (0, 0))
                reserved[node] = (g + gpus, r + rdma)
    return reserved
