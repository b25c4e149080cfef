"""The inference plan, placement and the pod cache on pods the scheduler has not bound yet: their
`spec.nodeName` is absent, or null in a cached copy, and must read as "no node"."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from fireflyer.operator import cache
from fireflyer.operator.inference.plan import Observed, plan
from fireflyer.placement import build_topology, pod_node
from fireflyer.placement.reservations import planned_nodes, reservations
from tests.unit.test_inference_plan import NOW, _nodes, _placed, _pods


def _unbind(pod: dict[str, Any], how: str) -> None:
    if how == "null":
        pod["spec"]["nodeName"] = None
    else:
        del pod["spec"]["nodeName"]
    pod["status"] = {"phase": "Pending"}


@pytest.mark.parametrize("how", ["null", "absent"])
def test_a_unit_with_one_unscheduled_pod_is_planned_and_reports_its_bound_nodes(how: str) -> None:
    cr, sets = _placed()
    decode = next(s for n, s in sets.items() if "decode" in n)
    decode_pods = _pods(decode, NOW - timedelta(seconds=30))
    _unbind(decode_pods[1], how)
    pods = list(decode_pods)
    for sts in sets.values():
        if sts is not decode:
            pods += _pods(sts, NOW - timedelta(seconds=30))

    desired = plan(cr, Observed(nodes=_nodes(), pods=pods, statefulsets=sets, router=None, now=NOW))

    assert desired.recreate == {}  # still within its bind deadline: waiting, not broken
    unit = next(u for u in desired.status["units"] if u["role"] == "decode")
    bound = sorted(p["spec"]["nodeName"] for p in decode_pods if p["spec"].get("nodeName"))
    assert len(bound) == len(decode_pods) - 1
    assert unit["nodes"] == bound
    assert unit["ready"] is False
    assert decode_pods[1]["metadata"]["name"] not in desired.force_delete


def test_a_unit_whose_pods_are_all_unscheduled_reports_its_planned_nodes() -> None:
    cr, sets = _placed()
    pods: list[dict[str, Any]] = []
    for sts in sets.values():
        for pod in _pods(sts, NOW - timedelta(seconds=30)):
            _unbind(pod, "null")
            pods.append(pod)

    desired = plan(cr, Observed(nodes=_nodes(), pods=pods, statefulsets=sets, router=None, now=NOW))

    for unit in desired.status["units"]:
        sts = sets[f"{cr['metadata']['name']}-{unit['role']}-{unit['index']}"]
        assert unit["nodes"] == planned_nodes(sts)


def test_unscheduled_pods_take_no_gpus_and_leave_their_planned_nodes_reserved() -> None:
    _, sets = _placed()
    decode = next(s for n, s in sets.items() if "decode" in n)
    pods = _pods(decode, NOW)
    _unbind(pods[0], "null")
    topology = build_topology(_nodes(), pods)
    hosts = planned_nodes(decode)
    assert topology.nodes[hosts[0]].free_gpus == 8
    assert topology.nodes[hosts[1]].free_gpus == 0
    reserved = reservations([decode], pods, "rdma/ib")
    assert set(reserved) == {hosts[0]}
    assert reserved[hosts[0]][0] == 8


def test_a_cached_pod_never_carries_a_null_node_name() -> None:
    slim = cache.slim_pod({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"nodeName": None}})
    assert slim["spec"]["nodeName"] == ""
    assert pod_node(slim) == ""
    assert pod_node({"spec": {"nodeName": None}}) == "" and pod_node({}) == ""
    assert pod_node({"spec": {"nodeName": "h100-000"}}) == "h100-000"
