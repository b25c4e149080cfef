"""When and how a ThreeFSCluster replaces a failed storage node (pure; see threefs.replacement)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from fireflyer.api.threefs import ThreeFSClusterSpec
from fireflyer.threefs import replacement as R

if TYPE_CHECKING:
    from fireflyer.operator.threefs.plan import Desired, Observed


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def not_ready_since(node: dict[str, Any] | None) -> datetime | None:
    """When the node stopped being Ready; None while it is Ready. A deleted node counts as gone."""
    if node is None:
        return datetime.min.replace(tzinfo=None)
    for condition in (node.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            if condition.get("status") == "True":
                return None
            return _parse_time(condition.get("lastTransitionTime"))
    return None


def _node_usable(node: dict[str, Any]) -> bool:
    ready = not_ready_since(node) is None
    taints = (node.get("spec") or {}).get("taints") or []
    return (
        ready
        and not (node.get("spec") or {}).get("unschedulable")
        and not any(t.get("effect") in ("NoSchedule", "NoExecute") for t in taints)
    )


def _matches(node: dict[str, Any], selector: dict[str, str]) -> bool:
    labels = (node.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _storage_pods(observed: Observed) -> dict[int, dict[str, Any]]:
    pods = {}
    for pod in observed.pods:
        labels = pod["metadata"].get("labels") or {}
        if labels.get("fireflyer.dev/component") == "storage" and not pod["metadata"].get(
            "deletionTimestamp"
        ):
            pods[int(pod["metadata"]["name"].rsplit("-", 1)[1])] = pod
    return pods


def _ready_on(pod: dict[str, Any] | None, avoid: str) -> bool:
    if pod is None or (pod.get("spec") or {}).get("nodeName") in (None, avoid):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def plan_replacement(
    cr: dict[str, Any],
    spec: ThreeFSClusterSpec,
    observed: Observed,
    desired: Desired,
    status: dict[str, Any],
    storage_ids: dict[int, int],
    *,
    new_id_rendered: bool = False,
) -> None:
    """Start, advance or hold a storage node replacement; may set desired.launch.

    new_id_rendered: this pass's storage configuration already gives the replaced ordinal its
    new node id (the old pod is only deleted then, so its successor cannot start as the old node).
    """
    from fireflyer.operator.planning import Event
    from fireflyer.operator.threefs.plan import _launch

    pods = _storage_pods(observed)
    current = status.get("replacement")
    if current is None:
        current = _detect_failure(spec, observed, status, storage_ids, pods)
        if current is None:
            return
        status["replacement"] = current
        desired.events.append(
            Event(
                "Warning",
                "StorageNodeReplacing",
                f"storage node {current['oldNodeId']} on {current['nodeName']} failed;"
                f" replacing it with node id {current['newNodeId']}",
            )
        )
    step = current["step"]
    ordinal = current["ordinal"]
    health = observed.health
    fresh = (
        health is not None
        and observed.health_taken_at is not None
        and observed.health_taken_at >= (_parse_time(current.get("startedAt")) or observed.now)
    )
    if step == "remove":
        if not fresh:
            return  # a health check taken after the failure comes first
        assert health is not None
        try:
            removed = R.targets_to_remove(health, current["oldNodeId"])
        except R.ReplacementBlocked as blocked:
            status["_degraded"] = ("ReplacementBlocked", str(blocked))
            return
        current["removedTargets"] = [[r.chain_id, r.target_id, r.disk] for r in removed]
        _launch(cr, spec, desired, R.remove_step(ordinal, current["oldNodeId"], removed, health), "admin_cli")
    elif step == "reschedule":
        status["storageNodeIds"][str(ordinal)] = current["newNodeId"]
        pod = pods.get(ordinal)
        if pod is not None and (pod.get("spec") or {}).get("nodeName") == current["nodeName"]:
            if new_id_rendered:
                desired.delete_pods.append(pod["metadata"]["name"])
        elif _ready_on(pod, current["nodeName"]):
            current["step"] = "add"
            _launch(
                cr, spec, desired, R.add_step(ordinal, _removed(current), current["newNodeId"]), "admin_cli"
            )
    elif (
        step == "sync" and health is not None and _synced(health, current, observed, spec.storage.chain_width)
    ):
        _launch(cr, spec, desired, R.unregister_step(ordinal, current["oldNodeId"]), "admin_cli")


def _synced(health: Any, current: dict[str, Any], observed: Observed, width: int) -> bool:
    """Every chain is whole again and serving, by a health check taken after the targets were
    added (an earlier one shows the shortened chains serving, which proves nothing)."""
    since = _parse_time(current.get("syncSince"))
    # syncSince is kept to the second: a check in that same second may predate the add.
    if (
        since is None
        or observed.health_taken_at is None
        or observed.health_taken_at < since + timedelta(seconds=1)
    ):
        return False
    return bool(health.all_serving()) and all(len(chain.targets) >= width for chain in health.chains)


def _removed(current: dict[str, Any]) -> list[R.RemovedTarget]:
    return [R.RemovedTarget(c, t, d) for c, t, d in current.get("removedTargets") or []]


def _detect_failure(
    spec: ThreeFSClusterSpec,
    observed: Observed,
    status: dict[str, Any],
    storage_ids: dict[int, int],
    pods: dict[int, dict[str, Any]],
) -> dict[str, Any] | None:
    from fireflyer.operator.threefs.plan import next_storage_node_id

    grace = timedelta(seconds=spec.storage.replacement_grace_period_seconds)
    hosting = {(p.get("spec") or {}).get("nodeName") for p in pods.values()}
    spares = [
        name
        for name, node in sorted(observed.nodes.items())
        if name not in hosting and _matches(node, spec.storage.node_selector) and _node_usable(node)
    ]
    for ordinal, pod in sorted(pods.items()):
        node_name = (pod.get("spec") or {}).get("nodeName")
        if not node_name:
            continue
        since = not_ready_since(observed.nodes.get(node_name))
        if since is None:
            continue
        if since != datetime.min and observed.now - since < grace:
            continue
        if not spares:
            status["_degraded"] = (
                "NoSpareStorageNode",
                f"storage node on {node_name} is down and no spare node matches storage.nodeSelector",
            )
            return None
        return {
            "ordinal": ordinal,
            "nodeName": node_name,
            "oldNodeId": storage_ids[ordinal],
            "newNodeId": next_storage_node_id(status, set()),
            "step": "remove",
            "removedTargets": [],
            "startedAt": observed.now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    return None


def record_replacement_step(step: str, status: dict[str, Any], desired: Desired, now: datetime) -> None:
    """An admin step of the replacement finished: move to the next stage."""
    from fireflyer.operator.planning import Event

    current = status.get("replacement")
    if not current:
        return
    stage = step.rsplit("-", 1)[1]
    if stage == "remove":
        current["step"] = "reschedule"
    elif stage == "add":
        current["step"] = "sync"
        # Only a health check taken after this moment can show the new targets serving.
        current["syncSince"] = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    elif stage == "unregister":
        desired.events.append(
            Event(
                "Normal",
                "StorageNodeReplaced",
                f"storage node {current['oldNodeId']} replaced by {current['newNodeId']}; every chain serves",
            )
        )
        status["replacement"] = None
        status["replacementsCompleted"] = int(status.get("replacementsCompleted", 0)) + 1
        return
    desired.events.append(
        Event(
            "Normal",
            "StorageNodeReplacing",
            f"replacing node {current['oldNodeId']}: {stage} done, now {current['step']}",
        )
    )
