"""The controllers hear of node changes from the Node informer (one watch of every node, not a
second one through kopf): each listener gets the slim node, and one that fails stops neither the
others nor the watch."""

from __future__ import annotations

from typing import Any

import pytest

from fireflyer.operator import cache


def _node(ready: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "n1", "resourceVersion": "9", "managedFields": [{"manager": "kubelet"}]},
        "spec": {"unschedulable": False, "podCIDR": "10.0.0.0/24"},
        "status": {
            "conditions": [{"type": "Ready", "status": ready, "lastHeartbeatTime": "now"}],
            "images": [{"names": ["a"] * 50}],
        },
    }


def test_listeners_get_each_change_as_the_slim_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache, "_listeners", {})
    heard: list[tuple[str, dict[str, Any]]] = []

    def broken(event_type: str, node: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    cache.listen("Node", broken)
    cache.listen("Node", lambda event_type, node: heard.append((event_type, node)))
    informer = cache.Informer("Node", slim=cache.slim_node)
    informer._tell("MODIFIED", _node("False"))
    assert [t for t, _ in heard] == ["MODIFIED"]
    node = heard[0][1]
    assert node["status"]["conditions"] == [{"type": "Ready", "status": "False"}]
    assert "images" not in node["status"] and "managedFields" not in node["metadata"]
    cache.Informer("Pod", slim=cache.slim_pod)._tell("ADDED", {"metadata": {"name": "p"}})
    assert len(heard) == 1  # listeners hear their own kind only


def test_a_node_gone_not_ready_kicks_the_deployment_with_a_unit_on_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fireflyer.operator import kube
    from fireflyer.operator import labels as L
    from fireflyer.operator.inference import controller as inference

    unit_pod = {
        "metadata": {
            "namespace": "ns",
            "name": "svc-decode-0-0",
            "labels": {L.COMPONENT: "unit", L.DEPLOYMENT: "svc"},
        },
        "spec": {"nodeName": "n1"},
    }
    kicked: list[tuple[str, str, bool]] = []
    monkeypatch.setattr(kube, "list_", lambda kind, *a, **k: [unit_pod] if kind == "Pod" else [])
    monkeypatch.setattr(
        inference, "_kick", lambda ns, name, urgent, kwargs: kicked.append((ns, name, urgent))
    )
    for listener in cache._listeners["Node"]:
        listener("MODIFIED", cache.slim_node(_node("True")))
    assert kicked == []  # a heartbeat of a healthy node: nothing to do
    for listener in cache._listeners["Node"]:
        listener("MODIFIED", cache.slim_node(_node("False")))
    assert kicked == [("ns", "svc", True)]


def _pod(labels: dict[str, str], phase: str, message: str = "", job_uid: str = "") -> dict[str, Any]:
    """A pod as the API server sends it (the informer slims it before the listeners see it)."""
    return {
        "metadata": {
            "namespace": "ns",
            "name": "p-0",
            "uid": "u-1",
            "resourceVersion": "7",
            "labels": labels,
            "ownerReferences": [{"kind": "Job", "name": "j", "uid": job_uid, "controller": True}],
            "managedFields": [{"manager": "kubelet"}],
        },
        "spec": {"nodeName": "n1", "containers": [{"name": "engine", "image": "x"}]},
        "status": {
            "phase": phase,
            "containerStatuses": [
                {
                    "name": "engine",
                    "image": "x",
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"exitCode": 3, "message": message, "reason": "Error"}},
                }
            ],
        },
    }


def test_pod_changes_reach_the_controllers_through_the_pod_informer(monkeypatch: pytest.MonkeyPatch) -> None:
    from fireflyer.operator import labels as L
    from fireflyer.operator.inference import controller as inference
    from fireflyer.operator.inference import preflight
    from fireflyer.operator.inference.pod_failures import PodFailures
    from fireflyer.operator.threefs import children as threefs_children
    from fireflyer.operator.threefs import controller as threefs
    from fireflyer.operator.training import controller as training

    kicked: list[tuple[str, ...]] = []
    monkeypatch.setattr(
        inference, "_kick", lambda ns, name, urgent, kw: kicked.append(("svc", ns, name, str(urgent)))
    )
    monkeypatch.setattr(
        training, "_kick", lambda ns, name, urgent, kw: kicked.append(("job", ns, name, str(urgent)))
    )
    monkeypatch.setattr(threefs, "_kick", lambda ns, name: kicked.append(("3fs", ns, name)))
    monkeypatch.setattr(inference, "_pod_failures", PodFailures())
    monkeypatch.setattr(training, "_noted", type(training._noted)(dict))
    informer = cache.Informer("Pod", slim=cache.slim_pod)
    ours = {L.MANAGED_BY: L.MANAGER}

    # A unit pod that failed its preflight: noted with its message, the unit marked for
    # recreation, the deployment reconciled at once.
    failed = f"{preflight.PREFIX} rank 1 cannot reach rank 0"
    unit = {**ours, L.DEPLOYMENT: "svc", L.COMPONENT: "unit", L.ROLE: "decode", L.UNIT: "0"}
    informer._tell("MODIFIED", _pod(unit, "Failed", failed))
    assert kicked == [("svc", "ns", "svc", "True")]
    taken = inference._pod_failures.take("ns", "svc")
    assert taken["preflight_failures"] == {"u-1": failed}
    assert taken["failed_units"] == {"svc-decode-0": "pod p-0 failed"}
    # The loss is handed to one reconcile; the preflight verdict stays while the pod does.
    again = inference._pod_failures.take("ns", "svc")
    assert again["failed_units"] == {} and again["preflight_failures"] == {"u-1": failed}
    # The plan reads the same failure off the cached (slim) pod after a restart.
    assert preflight.failure(cache.slim_pod(_pod(unit, "Running", failed))) == failed

    # A training rank deleted while it ran: its Job attempt is noted as lost.
    kicked.clear()
    informer._tell("DELETED", _pod({**ours, L.TRAINING_JOB: "train"}, "Running", job_uid="job-uid"))
    assert kicked == [("job", "ns", "train", "True")]
    assert training._noted[("ns", "train")] == {"job-uid": "pod p-0 was deleted"}

    # A 3FS cluster's pod: the cluster advances.
    kicked.clear()
    informer._tell("MODIFIED", _pod({threefs_children.CLUSTER: "fs"}, "Running"))
    assert kicked == [("3fs", "ns", "fs")]

    # Someone else's pods, or ours that only changed while pending: nothing.
    kicked.clear()
    informer._tell("MODIFIED", _pod({L.DEPLOYMENT: "svc"}, "Failed"))  # not managed by us
    informer._tell("MODIFIED", _pod({**ours, L.DEPLOYMENT: "svc"}, "Pending"))
    informer._tell("ADDED", _pod({"app": "web"}, "Running"))
    assert kicked == []


def test_child_changes_reach_the_controllers_through_their_informers(monkeypatch: pytest.MonkeyPatch) -> None:
    from fireflyer.operator import labels as L
    from fireflyer.operator.inference import controller as inference
    from fireflyer.operator.threefs import children as threefs_children
    from fireflyer.operator.threefs import controller as threefs
    from fireflyer.operator.training import controller as training

    kicked: list[tuple[str, ...]] = []

    def kick_as(what: str) -> Any:
        return lambda ns, name, urgent, kw: kicked.append((what, name, str(urgent)))

    monkeypatch.setattr(inference, "_kick", kick_as("svc"))
    monkeypatch.setattr(training, "_kick", kick_as("job"))
    monkeypatch.setattr(threefs, "_kick", lambda ns, name: kicked.append(("3fs", name)))
    ours = {L.MANAGED_BY: L.MANAGER}

    def tell(kind: str, event_type: str, labels: dict[str, str], owner: str = "") -> None:
        refs = [{"kind": training.KIND, "name": owner, "uid": "u"}] if owner else []
        meta = {"namespace": "ns", "name": "c", "resourceVersion": "3", "labels": labels}
        body = {"kind": kind, "metadata": {**meta, "ownerReferences": refs}, "spec": {}, "status": {}}
        cache.Informer(kind, cache.MANAGED)._tell(event_type, body)

    tell("StatefulSet", "MODIFIED", {**ours, L.DEPLOYMENT: "svc"})
    tell("StatefulSet", "MODIFIED", {**ours, threefs_children.CLUSTER: "fs"})
    tell("Deployment", "DELETED", {**ours, L.DEPLOYMENT: "svc"})
    tell("Service", "DELETED", {**ours, L.TRAINING_JOB: "train"}, owner="train")
    tell("Service", "MODIFIED", {**ours, L.TRAINING_JOB: "train"}, owner="train")  # no news for a job
    assert kicked == [
        ("svc", "svc", "False"),
        ("3fs", "fs"),
        ("svc", "svc", "True"),
        ("job", "train", "True"),
    ]
