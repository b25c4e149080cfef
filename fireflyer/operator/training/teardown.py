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


def teardown_deletes(
    pods: list[dict[str, Any]], nodes: dict[str, dict[str, Any]], restarts: int
) -> dict[str, int | None]:
    """Pod name → the grace of a delete call to make now (None: the pod's own). A pod whose
    attempt is behind the restart count belongs to a failed attempt; a pod already going away
    within that grace is left alone."""
    deletes: dict[str, int | None] = {}
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        meta, node = pod["metadata"], pod["spec"].get("nodeName")
        attempt = (meta.get("labels") or {}).get(L.ATTEMPT, "")
        deleting = bool(meta.get("deletionTimestamp"))
        granted = meta.get("deletionGracePeriodSeconds")
        if node and node_problem(nodes, node):
            deletes[meta["name"]] = 0
        elif attempt.isdigit() and int(attempt) < restarts:
            if not (deleting and granted is not None and granted <= FAILED_ATTEMPT_GRACE_SECONDS):
                deletes[meta["name"]] = FAILED_ATTEMPT_GRACE_SECONDS
        elif not deleting:
            deletes[meta["name"]] = None
    return deletes
