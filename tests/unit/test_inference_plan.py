"""The inference plan against hand-built observations: what happens to a unit whose pods are
being replaced."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from fireflyer.dev import topology
from fireflyer.operator import labels as L
from fireflyer.operator.inference import recreation
from fireflyer.operator.inference.plan import Observed, plan
from tests.unit.test_inference_revision import SAMPLE

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _nodes() -> list[dict[str, Any]]:
    nodes = topology.nodes(topology.load("small"))
    for node in nodes:
        node["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    return nodes


def _cr() -> dict[str, Any]:
    doc = copy.deepcopy(SAMPLE)
    doc["metadata"] |= {"namespace": "ns", "uid": "uid-1", "generation": 1}
    return doc


def _pods(sts: dict[str, Any], created: datetime, **meta: Any) -> list[dict[str, Any]]:
    template = sts["spec"]["template"]
    nodes = template["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    hosts = nodes["nodeSelectorTerms"][0]["matchExpressions"][0]["values"]
    return [
        {
            "metadata": {
                "name": f"{sts['metadata']['name']}-{rank}",
                "namespace": "ns",
                "labels": {**template["metadata"]["labels"], L.POD_INDEX: str(rank)},
                "creationTimestamp": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
                **meta,
            },
            "spec": {"nodeName": host, "containers": template["spec"]["containers"]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
        }
        for rank, host in enumerate(hosts)
    ]


def _placed() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    cr = _cr()
    first = plan(cr, Observed(nodes=_nodes(), pods=[], statefulsets={}, router=None, now=NOW))
    sets = {c["metadata"]["name"]: c for c in first.children if c["kind"] == "StatefulSet"}
    return cr, sets


def _plan_with_decode_pods(
    cr: dict[str, Any], sets: dict[str, dict[str, Any]], decode: dict[str, Any], pods: list[dict[str, Any]]
) -> Any:
    """The plan with `pods` as the decode unit's and every other unit's pods long settled."""
    settled = NOW - timedelta(minutes=30)
    others = [p for sts in sets.values() if sts is not decode for p in _pods(sts, settled)]
    return plan(cr, Observed(nodes=_nodes(), pods=[*pods, *others], statefulsets=sets, router=None, now=NOW))


def test_a_unit_whose_old_pods_are_still_terminating_is_not_recreated_again() -> None:
    cr, sets = _placed()
    decode = next(s for n, s in sets.items() if "decode" in n)
    old = _pods(decode, NOW - timedelta(minutes=30), deletionTimestamp=NOW.isoformat())
    for pod in old:
        pod["metadata"]["name"] += "-old"
    fresh = _pods(decode, NOW - timedelta(seconds=5))
    pods = [*old, *fresh]
    desired = _plan_with_decode_pods(cr, sets, decode, pods)
    assert desired.recreate == {}, desired.recreate


def test_a_moved_units_terminating_pods_of_the_old_revision_are_not_a_second_revision() -> None:
    """Right after a unit is recreated on other nodes, its old pods (the old revision) terminate
    beside the first fresh pod: counted, they made "pods of two revisions" and the fresh pod
    was deleted again."""
    cr, sets = _placed()
    decode = next(s for n, s in sets.items() if "decode" in n)
    old = _pods(decode, NOW - timedelta(minutes=30), deletionTimestamp=NOW.isoformat())[1:]
    for pod in old:
        pod["metadata"]["name"] += "-old"
        pod["metadata"]["labels"][L.REVISION] = "0ldrev"
    fresh = _pods(decode, NOW - timedelta(seconds=1))[:1]
    pods = [*old, *fresh]
    desired = _plan_with_decode_pods(cr, sets, decode, pods)
    assert desired.recreate == {}, desired.recreate


def test_a_unit_with_one_pod_replaced_alone_is_recreated_whole() -> None:
    cr, sets = _placed()
    decode = next(s for n, s in sets.items() if "decode" in n)
    pods = _pods(decode, NOW - timedelta(minutes=30))
    pods[1]["metadata"]["creationTimestamp"] = (NOW - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    desired = _plan_with_decode_pods(cr, sets, decode, pods)
    assert list(desired.recreate) == [decode["metadata"]["name"]]
    assert "replaced on its own" in desired.recreate[decode["metadata"]["name"]]


def test_a_recreated_unit_gets_a_fresh_bind_deadline() -> None:
    cr, sets = _placed()
    decode = next(s for n, s in sets.items() if "decode" in n)
    long_ago = (NOW - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    decode["metadata"]["annotations"][L.PLACED_AT] = long_ago
    pods = _pods(decode, NOW - timedelta(hours=2))
    pods[0]["status"]["phase"] = "Failed"
    desired = _plan_with_decode_pods(cr, sets, decode, pods)
    assert "failed" in desired.recreate[decode["metadata"]["name"]]
    again = next(c for c in desired.children if c["metadata"]["name"] == decode["metadata"]["name"])
    assert again["metadata"]["annotations"][L.PLACED_AT] == NOW.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_same_named_deployment_in_another_namespace_keeps_its_nodes() -> None:
    """Its pods are someone else's: their GPUs are taken, not free for re-planning ours."""
    cr, sets = _placed()
    theirs = []
    for sts in sets.values():
        for pod in _pods(sts, NOW - timedelta(minutes=30)):
            pod["metadata"]["namespace"] = "other-team"
            gpus = sts["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"]
            pod["spec"]["containers"] = [
                {"name": "engine", "resources": {"requests": {"nvidia.com/gpu": gpus}}}
            ]
            theirs.append(pod)
    taken = {p["spec"]["nodeName"] for p in theirs}
    desired = plan(cr, Observed(nodes=_nodes(), pods=theirs, statefulsets={}, router=None, now=NOW))
    ours = [c for c in desired.children if c["kind"] == "StatefulSet"]
    planned = {
        host
        for sts in ours
        for host in sts["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"][0]["matchExpressions"][0]["values"]
    }
    assert ours and not planned & taken


def test_during_a_rollout_the_router_lists_each_unit_with_the_spec_its_pods_run() -> None:
    """A prefill unit still running the old model is listed with the old pairing revision, so the
    router never pairs it with a decode unit of the new one."""
    import json

    cr, sets = _placed()
    pods: list[dict[str, Any]] = []
    for sts in sets.values():
        pods += _pods(sts, NOW - timedelta(minutes=30))
    prefill = [p for p in pods if p["metadata"]["labels"][L.ROLE] == "prefill"]
    for pod in prefill:
        pod["metadata"]["labels"][L.PAIRING_REVISION] = "0ldspec"
    desired = plan(cr, Observed(nodes=_nodes(), pods=pods, statefulsets=sets, router=None, now=NOW))
    config = next(
        c for c in desired.children if c["kind"] == "ConfigMap" and c["metadata"]["name"].endswith("-router")
    )
    backends = json.loads(config["data"]["backends.json"])
    assert {entry["revision"] for entry in backends["prefill"]} == {"0ldspec"}
    decode_revisions = {entry["revision"] for entry in backends["decode"]}
    assert decode_revisions and "0ldspec" not in decode_revisions
    template_labels = next(iter(sets.values()))["spec"]["template"]["metadata"]["labels"]
    assert template_labels[L.PAIRING_REVISION] in decode_revisions, "new pods carry the spec's revision"


def test_pods_on_a_not_ready_node_are_deleted_without_grace() -> None:
    """No kubelet will confirm the end of a pod on a dead node: the unit is recreated, and its
    pods there (only there) are force-deleted, or the StatefulSet could never replace them."""
    cr, sets = _placed()
    pods: list[dict[str, Any]] = []
    for sts in sets.values():
        pods += _pods(sts, NOW - timedelta(minutes=30))
    dead_pod = pods[0]
    dead_node = dead_pod["spec"]["nodeName"]
    nodes = _nodes()
    for node in nodes:
        if node["metadata"]["name"] == dead_node:
            node["status"]["conditions"] = [{"type": "Ready", "status": "Unknown"}]
    desired = plan(cr, Observed(nodes=nodes, pods=pods, statefulsets=sets, router=None, now=NOW))
    unit = dead_pod["metadata"]["name"].rsplit("-", 1)[0]
    assert "not Ready" in desired.recreate[unit]
    on_dead_node = {p["metadata"]["name"] for p in pods if p["spec"]["nodeName"] == dead_node}
    assert desired.force_delete == on_dead_node
    # Cordoned is not dead: its kubelet still ends pods gracefully.
    for node in nodes:
        if node["metadata"]["name"] == dead_node:
            node["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
            node["spec"]["unschedulable"] = True
    desired = plan(cr, Observed(nodes=nodes, pods=pods, statefulsets=sets, router=None, now=NOW))
    assert desired.force_delete == set()


def test_a_router_pod_on_a_not_ready_node_is_replaced_at_once_and_one_on_a_live_node_is_kept() -> None:
    """A router on a lost node would take requests nowhere until the not-ready eviction, five
    minutes later: the plan has it deleted now, so its ReplicaSet starts one on a live node."""
    cr, sets = _placed()
    pods: list[dict[str, Any]] = []
    for sts in sets.values():
        pods += _pods(sts, NOW - timedelta(minutes=30))
    used = {p["spec"]["nodeName"] for p in pods}
    free = [n["metadata"]["name"] for n in _nodes() if n["metadata"]["name"] not in used]
    router_labels = {L.DEPLOYMENT: cr["metadata"]["name"], L.COMPONENT: "router", L.MANAGED_BY: L.MANAGER}
    routers = [
        {
            "metadata": {"name": f"router-{i}", "namespace": "ns", "labels": router_labels},
            "spec": {"nodeName": node},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
        }
        for i, node in enumerate(free[:2])
    ]
    nodes = _nodes()
    for node in nodes:
        if node["metadata"]["name"] == free[0]:
            node["status"]["conditions"] = [{"type": "Ready", "status": "Unknown"}]
    desired = plan(cr, Observed(nodes=nodes, pods=pods + routers, statefulsets=sets, router=None, now=NOW))
    assert desired.replace_now == {"router-0"}
    assert desired.force_delete == {"router-0"}
    assert desired.recreate == {}, "no unit had a pod on that node"


def _restarted_after_recreating_decode() -> tuple[
    dict[str, Any], dict[str, dict[str, Any]], list[dict[str, Any]], str
]:
    """A decode unit recreated (its pod failed) by a process that then died: what the next
    process sees — the StatefulSets as the last one applied them, fresh pods in the unit."""
    cr, sets = _placed()
    decode = next(s for n, s in sets.items() if "decode" in n)
    unit = decode["metadata"]["name"]
    old = _pods(decode, NOW - timedelta(minutes=30))
    old[0]["status"]["phase"] = "Failed"
    pods = [*old]
    for sts in sets.values():
        if sts is not decode:
            pods += _pods(sts, NOW - timedelta(minutes=30))
    first = plan(cr, Observed(nodes=_nodes(), pods=pods, statefulsets=sets, router=None, now=NOW))
    assert "failed" in first.recreate[unit]
    applied = {c["metadata"]["name"]: c for c in first.children if c["kind"] == "StatefulSet"}
    fresh = [p for p in pods if not p["metadata"]["name"].startswith(unit)]
    fresh += _pods(applied[unit], NOW + timedelta(seconds=3))
    return cr, applied, fresh, unit


def test_after_a_restart_the_old_pods_deleted_events_are_not_failures() -> None:
    """The DELETED events of the pods the previous process deleted reach a process that never
    deleted anything: the record on the StatefulSet tells them apart from a failure."""
    cr, applied, pods, unit = _restarted_after_recreating_decode()
    later = NOW + timedelta(seconds=20)
    failed = {unit: f"pod {unit}-0 was deleted"}
    old_created = {unit: NOW - timedelta(minutes=30)}
    desired = plan(
        cr,
        Observed(
            nodes=_nodes(),
            pods=pods,
            statefulsets=applied,
            router=None,
            now=later,
            failed_units=failed,
            failed_pod_created=old_created,
        ),
    )
    assert desired.recreate == {}, desired.recreate
    # The record stays on the StatefulSet for the next restart.
    sts = next(c for c in desired.children if c["metadata"]["name"] == unit)
    assert sts["metadata"]["annotations"][recreation.RECREATED_AT] == NOW.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert "failed" in sts["metadata"]["annotations"][recreation.RECREATED_WHY]


def test_after_a_restart_a_fresh_pod_deleted_by_someone_else_is_still_a_failure() -> None:
    cr, applied, pods, unit = _restarted_after_recreating_decode()
    later = NOW + timedelta(seconds=20)
    desired = plan(
        cr,
        Observed(
            nodes=_nodes(),
            pods=pods,
            statefulsets=applied,
            router=None,
            now=later,
            failed_units={unit: f"pod {unit}-1 was deleted"},
            failed_pod_created={unit: NOW + timedelta(seconds=3)},
        ),
    )
    assert desired.recreate == {unit: f"pod {unit}-1 was deleted"}
    sts = next(c for c in desired.children if c["metadata"]["name"] == unit)
    assert sts["metadata"]["annotations"][recreation.RECREATED_AT] == later.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_loss_of_unknown_age_is_a_failure() -> None:
    """Without the pod's creation time (or any record on the unit) nothing is taken for ours."""
    cr, sets = _placed()
    pods: list[dict[str, Any]] = []
    for sts in sets.values():
        pods += _pods(sts, NOW - timedelta(minutes=30))
    unit = next(iter(sets))
    observed = Observed(
        nodes=_nodes(),
        pods=pods,
        statefulsets=sets,
        router=None,
        now=NOW,
        failed_units={unit: "pod x failed"},
    )
    assert plan(cr, observed).recreate == {unit: "pod x failed"}


def test_a_unit_on_a_node_ready_again_but_still_tainted_is_left_alone() -> None:
    """Seconds after a brief NotReady the node is Ready but the lifecycle controller has not
    lifted its taint yet: the unit's pods there are fine and must not be recreated."""
    cr, sets = _placed()
    pods: list[dict[str, Any]] = []
    for sts in sets.values():
        pods += _pods(sts, NOW - timedelta(minutes=30))
    node_name = pods[0]["spec"]["nodeName"]
    nodes = _nodes()
    for node in nodes:
        if node["metadata"]["name"] == node_name:
            node["spec"]["taints"] = [
                {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"},
                {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"},
            ]
    desired = plan(cr, Observed(nodes=nodes, pods=pods, statefulsets=sets, router=None, now=NOW))
    assert desired.recreate == {} and desired.force_delete == set()
    # Another taint (a person's) still moves it.
    for node in nodes:
        if node["metadata"]["name"] == node_name:
            node["spec"]["taints"] = [{"key": "maintenance", "effect": "NoExecute"}]
    desired = plan(cr, Observed(nodes=nodes, pods=pods, statefulsets=sets, router=None, now=NOW))
    assert "tainted maintenance" in desired.recreate[pods[0]["metadata"]["name"].rsplit("-", 1)[0]]
