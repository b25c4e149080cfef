"""The nodes' side of a topology is built once per version of the nodes and reused by every
plan; any change of a node (a new resourceVersion) is seen by the next plan."""

from __future__ import annotations

import copy
from typing import Any

from fireflyer.placement import build_topology
from fireflyer.placement.topology import GPU_RESOURCE

LEAF = "network.topology.nvidia.com/leaf"


def _node(name: str, version: str, leaf: str = "leaf-0", gpus: str = "8") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "resourceVersion": version, "labels": {LEAF: leaf}},
        "spec": {},
        "status": {
            "allocatable": {GPU_RESOURCE: gpus, "rdma/ib": "8"},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def _pod(node: str, gpus: str = "8") -> dict[str, Any]:
    return {
        "metadata": {"name": f"p-{node}", "namespace": "ns", "labels": {}},
        "spec": {"nodeName": node, "containers": [{"resources": {"requests": {GPU_RESOURCE: gpus}}}]},
        "status": {"phase": "Running"},
    }


def test_each_plan_sees_its_own_pods_on_the_same_nodes() -> None:
    nodes = [_node(f"n{i}", "1") for i in range(4)]
    first = build_topology(nodes, [_pod("n0")])
    second = build_topology(nodes, [_pod("n1", "2")])
    assert first.nodes["n0"].free_gpus == 0 and first.nodes["n1"].free_gpus == 8
    assert second.nodes["n0"].free_gpus == 8 and second.nodes["n1"].free_gpus == 6
    assert first.levels == ["leaf"]


def test_a_changed_node_is_seen_by_the_next_plan() -> None:
    nodes = [_node(f"n{i}", "1") for i in range(3)]
    assert build_topology(nodes, []).nodes["n2"].usable
    changed = copy.deepcopy(nodes)
    changed[2]["metadata"]["resourceVersion"] = "2"
    changed[2]["spec"]["unschedulable"] = True
    changed[1]["metadata"]["resourceVersion"] = "2"
    changed[1]["metadata"]["labels"][LEAF] = "leaf-1"
    topology = build_topology(changed, [])
    assert topology.nodes["n2"].why_unusable == "cordoned"
    assert topology.nodes["n1"].domains == {"leaf": "leaf-1"}
    # A node that joins, and one that leaves.
    grown = [*changed[1:], _node("n9", "5", gpus="4")]
    topology = build_topology(grown, [])
    assert set(topology.nodes) == {"n1", "n2", "n9"}
    assert topology.nodes["n9"].free_gpus == 4


def test_nodes_without_a_version_are_read_afresh_every_time() -> None:
    nodes = [_node("a", "1"), _node("b", "1")]
    for node in nodes:
        del node["metadata"]["resourceVersion"]
    assert build_topology(nodes, []).nodes["b"].usable
    nodes[1]["status"]["conditions"] = [{"type": "Ready", "status": "False"}]  # changed in place
    assert build_topology(nodes, []).nodes["b"].why_unusable == "not Ready"


def test_selector_and_tolerations_are_per_plan_on_a_shared_base() -> None:
    nodes = [_node("a", "1"), _node("b", "1", leaf="leaf-1")]
    nodes[1]["spec"]["taints"] = [{"key": "maintenance", "effect": "NoSchedule"}]
    plain = build_topology(nodes, [])
    assert plain.nodes["b"].why_unusable == "tainted maintenance"
    tolerant = build_topology(nodes, [], tolerates=lambda taint: taint.get("key") == "maintenance")
    assert tolerant.nodes["b"].usable
    picky = build_topology(nodes, [], node_selector={LEAF: "leaf-1"}, tolerates=lambda t: True)
    assert picky.nodes["a"].why_unusable == f"does not match placement.nodeSelector ({LEAF})"
    assert picky.nodes["b"].usable
    # None of the plans above changed what the next one starts from.
    assert build_topology(nodes, []).nodes["a"].usable
    assert build_topology(nodes, []).nodes["b"].why_unusable == "tainted maintenance"
