"""How the pods of an attempt being torn down are deleted: at once where their node is lost, within
seconds when the attempt failed, with their own grace otherwise (they checkpoint, then stop)."""

from __future__ import annotations

from typing import Any

from fireflyer.operator import labels as L
from fireflyer.operator.training.failures import node_problem

# Seconds a failed attempt's surviving ranks get to end after SIGTERM. Their collectives wait for
# a rank that is gone, so they cannot checkpoint (the next attempt resumes from the last
# checkpoint anyway); the pods' own grace (300 s by default, sized for a checkpoint) would only
# hold the restart back.
FAILED_ATTEMPT_GRACE_SECONDS = 10


def _grace(pod: dict[str, Any], nodes: dict[str, dict[str, Any]], restarts: int) -> int | None:
    """How to delete a pod of an attempt being torn down; -1: leave it alone (already going).
    A pod whose attempt is behind the restart count belongs to a failed attempt."""
    node = pod["spec"].get("nodeName")
    if node and node_problem(nodes, node):
        return 0
    meta = pod["metadata"]
    attempt = (meta.get("labels") or {}).get(L.ATTEMPT, "")
    failed = attempt.isdigit() and int(attempt) < restarts
    if failed:
        granted = meta.get("deletionGracePeriodSeconds")
        going_soon = (
            meta.get("deletionTimestamp") and granted is not None and granted <= FAILED_ATTEMPT_GRACE_SECONDS
        )
        return -1 if going_soon else FAILED_ATTEMPT_GRACE_SECONDS
    return -1 if meta.get("deletionTimestamp") else None


def teardown_deletes(
    pods: list[dict[str, Any]], nodes: dict[str, dict[str, Any]], restarts: int
) -> dict[str, int | None]:
    """Pod name → the grace of a delete call to make now (None: the pod's own)."""
    graces = {p["metadata"]["name"]: _grace(p, nodes, restarts) for p in pods}
    return {name: grace for name, grace in sorted(graces.items()) if grace != -1}
