"""Why an attempt of a TrainingJob must end: failed or deleted pods, lost nodes, a Job that
failed, pods not scheduled in time. Pure."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fireflyer.api.training import TrainingJobSpec
from fireflyer.operator import labels as L
from fireflyer.operator.planning import parse_time
from fireflyer.placement.reservations import planned_nodes


def job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in job.get("status", {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return dict(cond)
    return None


def owner_uid(pod: dict[str, Any]) -> str | None:
    for owner in pod["metadata"].get("ownerReferences") or []:
        if owner.get("controller"):
            return str(owner.get("uid"))
    return None


def pod_index(pod: dict[str, Any]) -> int:
    annotations = pod["metadata"].get("annotations") or {}
    value = annotations.get(L.COMPLETION_INDEX) or (pod["metadata"].get("labels") or {}).get(
        L.COMPLETION_INDEX
    )
    try:
        return int(str(value))
    except ValueError:
        return 1 << 30


def node_problem(nodes: dict[str, dict[str, Any]], name: str) -> str:
    """Why a node cannot keep a rank ("" when it can): gone, or not Ready."""
    node = nodes.get(name)
    if node is None:
        return f"node {name} is gone"
    ready = next(
        (c for c in node.get("status", {}).get("conditions") or [] if c.get("type") == "Ready"), None
    )
    if ready is None or ready.get("status") != "True":
        return f"node {name} NotReady"
    return ""


def pod_failure(pod: dict[str, Any]) -> tuple[str, str]:
    """(when, why) a pod failed, or ("", "") while it is fine: evicted, a container that exited
    non-zero, or Failed for another reason."""
    name = pod["metadata"]["name"]
    status = pod.get("status", {})
    if status.get("phase") == "Failed" and status.get("reason") == "Evicted":
        detail = status.get("message")
        return status.get("startTime") or "", f"pod {name} was evicted" + (f": {detail}" if detail else "")
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term and term.get("exitCode", 0) != 0:
            return term.get("finishedAt") or "", f"pod {name} exited {term['exitCode']}"
    if status.get("phase") == "Failed":
        reason = status.get("reason")
        return status.get("startTime") or "", f"pod {name} failed" + (f": {reason}" if reason else "")
    return "", ""


def failure(
    spec: TrainingJobSpec,
    job: dict[str, Any],
    pods: list[dict[str, Any]],
    nodes: dict[str, dict[str, Any]],
    now: datetime,
    noted: str = "",
) -> tuple[str, set[str]]:
    """Why the current attempt must end ("" when it is healthy), and the pods to force-delete
    because their node is lost. Node loss comes first (it explains the pods it takes with it),
    then failed pods, earliest first, then pods deleted by someone else."""
    causes: list[str] = []
    lost: set[str] = set()
    active = [p for p in pods if p.get("status", {}).get("phase") not in ("Succeeded", "Failed")]
    needed = {p["spec"]["nodeName"] for p in active if p["spec"].get("nodeName")}
    bound = {p["spec"]["nodeName"] for p in pods if p["spec"].get("nodeName")}
    if len(bound) < spec.nodes:  # a rank still to be scheduled may need any planned node
        needed |= set(planned_nodes(job)) - bound
    causes += [problem for node in sorted(needed) if (problem := node_problem(nodes, node))]
    for pod in active:
        node = pod["spec"].get("nodeName")
        if node and node_problem(nodes, node):
            lost.add(pod["metadata"]["name"])
    failed = sorted((when, pod_index(p), why) for p in pods for when, why in [pod_failure(p)] if why)
    causes += [why for _, _, why in failed]
    if causes:
        extra = len(causes) - 1
        return causes[0] + (f" (and {extra} more)" if extra else ""), lost
    # A pod being deleted counts only when nothing failed: after a failure, the Job controller
    # deletes the other ranks itself.
    deleted = sorted(
        (p["metadata"]["deletionTimestamp"], pod_index(p), p["metadata"]["name"])
        for p in active
        if p["metadata"].get("deletionTimestamp")
    )
    if deleted:
        return f"pod {deleted[0][2]} was deleted", lost
    if noted:
        return noted, lost
    failed_cond = job_condition(job, "Failed")
    if failed_cond:
        return f"Job failed: {failed_cond.get('reason', '')}: {failed_cond.get('message', '')}", lost
    if int(job.get("status", {}).get("failed") or 0) > 0:
        return f"Job counts {job['status']['failed']} failed pods", lost
    placed_at = parse_time((job["metadata"].get("annotations") or {}).get(L.PLACED_AT))
    scheduled = sum(
        1 for p in pods if p["spec"].get("nodeName") and not p["metadata"].get("deletionTimestamp")
    )
    timeout = spec.placement.bind_timeout_seconds
    if scheduled < spec.nodes and placed_at and (now - placed_at).total_seconds() > timeout:
        return f"only {scheduled}/{spec.nodes} pods were scheduled within {timeout}s of placement", lost
    return "", lost
