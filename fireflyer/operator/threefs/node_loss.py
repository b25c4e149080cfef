"""Pods of a 3FS cluster left on a lost node."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fireflyer.operator.threefs.replacement_plan import not_ready_since

if TYPE_CHECKING:
    from fireflyer.operator.threefs.plan import Observed


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
