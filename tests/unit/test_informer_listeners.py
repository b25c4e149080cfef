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
