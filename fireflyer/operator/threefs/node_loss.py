"""Pods of a 3FS cluster left on a lost node."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fireflyer.operator.threefs.replacement_plan import not_ready_since

if TYPE_CHECKING:
    from fireflyer.operator.threefs.plan import Observed

# The taints the node lifecycle controller puts on a node that stops reporting or turns NotReady.
NODE_LOSS_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")


def stay_on_lost_nodes(workload: dict[str, Any]) -> None:
    """Storage pods never leave a failed node by eviction: the replacement procedure moves them,
    after their targets left their chains (a pod restarting elsewhere with the old node id and
    empty disks would claim targets it no longer holds)."""
    _add_tolerations(workload, [_node_loss_toleration(key, None) for key in NODE_LOSS_TAINTS])


def fail_over_after(workload: dict[str, Any], seconds: int) -> None:
    """mgmtd, meta and monitor keep their state in FoundationDB (or none): their pods leave a lost
    node after `seconds` rather than the cluster-wide default (300 s), and stranded_pods then ends
    the evicted pod so its controller starts the successor on a live node."""
    _add_tolerations(workload, [_node_loss_toleration(key, seconds) for key in NODE_LOSS_TAINTS])


def _node_loss_toleration(key: str, seconds: int | None) -> dict[str, Any]:
    toleration: dict[str, Any] = {"key": key, "operator": "Exists", "effect": "NoExecute"}
    if seconds is not None:
        toleration["tolerationSeconds"] = seconds
    return toleration


def _add_tolerations(workload: dict[str, Any], tolerations: list[dict[str, Any]]) -> None:
    pod = workload["spec"]["template"]["spec"]
    pod["tolerations"] = [*pod.get("tolerations", []), *tolerations]


def stranded_pods(observed: Observed) -> list[str]:
    """Pods being deleted on a node that is gone or not Ready: no kubelet will confirm their end,
    so they stay Terminating and their StatefulSet never starts a successor (an mgmtd or meta
    pod evicted from a lost node). Storage pods tolerate node loss and move only through the
    replacement procedure."""
    stranded = []
    for pod in observed.pods:
        labels = pod["metadata"].get("labels") or {}
        node_name = (pod.get("spec") or {}).get("nodeName") or ""
        if not pod["metadata"].get("deletionTimestamp") or not node_name:
            continue
        if labels.get("fireflyer.dev/component") == "storage":
            continue
        if not_ready_since(observed.nodes.get(node_name)) is not None:  # NotReady, or gone
            stranded.append(pod["metadata"]["name"])
    return sorted(stranded)
