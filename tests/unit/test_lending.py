"""Lending (pure): which preemptible TrainingJobs must give nodes back so that an inference unit
fits, on the `small` topology (leaf-00: h100-000…003, leaf-01: h100-004…007, 8 GPUs each)."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from fireflyer.api.training import PREEMPTION_REQUESTED
from fireflyer.dev import topology as dev_topology
from fireflyer.operator import labels as L
from fireflyer.operator.inference import lending
from fireflyer.operator.inference.plan import Observed, plan
from fireflyer.operator.planning import format_time
from fireflyer.placement import UnitRequest, build_topology, plan_units
from fireflyer.placement.planner import PlacementPlan
from tests.unit.test_inference_revision import SAMPLE

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
CREATED = NOW - timedelta(hours=1)
RDMA = "rdma/ib"


def _nodes() -> list[dict[str, Any]]:
    nodes = dev_topology.nodes(dev_topology.load("small"))
    for node in nodes:
        node["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    return nodes


def _pod(name: str, node: str, labels: dict[str, str], namespace: str = "ml") -> dict[str, Any]:
    amounts = {"nvidia.com/gpu": "8", RDMA: "8"}
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "creationTimestamp": format_time(CREATED),
        },
        "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"requests": amounts}}]},
        "status": {"phase": "Running"},
    }


def _trainer(job: str, *nodes: str) -> list[dict[str, Any]]:
    labels = {L.TRAINING_JOB: job, L.COMPONENT: "trainer", L.MANAGED_BY: L.MANAGER}
    return [_pod(f"{job}-{i}", node, labels) for i, node in enumerate(nodes)]


def _busy(*nodes: str) -> list[dict[str, Any]]:
    """Pods of something that is not lent (another deployment)."""
    return [_pod(f"other-{node}", node, {"app": "other"}, "serving") for node in nodes]


def _job(name: str, preemptible: bool = True, asked: datetime | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "ml"}
    if asked is not None:
        request = {"at": format_time(asked), "by": "ns/x", "unit": "prefill-0", "nodes": []}
        meta["annotations"] = {PREEMPTION_REQUESTED: json.dumps(request)}
    return {"metadata": meta, "spec": {"preemptible": preemptible}}


def _reclaim(
    jobs: list[dict[str, Any]], pods: list[dict[str, Any]], nodes_per_unit: int = 2
) -> list[lending.Preemption]:
    """A 2-node (or larger) unit that must land inside one leaf."""
    topology = build_topology(_nodes(), pods, rdma_resource=RDMA)
    requests = [UnitRequest("prefill", 0, nodes_per_unit, 8, 8)]

    def place(topo: Any) -> PlacementPlan:
        return plan_units(requests, topo, "leaf")

    return lending.reclaim(jobs, pods, place(topology), topology, place, RDMA)


def test_a_unit_that_fits_without_lending_preempts_nothing() -> None:
    pods = [*_busy("h100-000", "h100-001"), *_trainer("a", "h100-002", "h100-003")]
    assert _reclaim([_job("a")], pods) == []  # leaf-01 is free


def test_only_the_job_whose_nodes_make_the_unit_fit_is_asked() -> None:
    pods = [
        *_busy("h100-000", "h100-001", "h100-005", "h100-006", "h100-007"),
        *_trainer("a", "h100-002", "h100-003"),
        *_trainer("b", "h100-004"),  # freeing b gives one node in leaf-01: not enough
    ]
    (asked,) = _reclaim([_job("a"), _job("b")], pods)
    assert (asked.namespace, asked.name, asked.unit) == ("ml", "a", "prefill-0")
    assert asked.nodes == ("h100-002", "h100-003")


def test_of_two_jobs_that_would_do_the_one_holding_fewer_nodes_is_asked() -> None:
    pods = [
        *_busy("h100-000", "h100-001"),
        *_trainer("big", "h100-004", "h100-005", "h100-006", "h100-007"),
        *_trainer("small", "h100-002", "h100-003"),
    ]
    assert [p.name for p in _reclaim([_job("big"), _job("small")], pods)] == ["small"]


def test_a_unit_stays_whole_in_one_leaf_so_nodes_in_two_leaves_do_not_help() -> None:
    pods = [
        *_busy("h100-000", "h100-001", "h100-002", "h100-005", "h100-006", "h100-007"),
        *_trainer("a", "h100-003"),
        *_trainer("b", "h100-004"),
    ]
    assert _reclaim([_job("a"), _job("b")], pods) == []


def test_non_preemptible_jobs_are_never_asked() -> None:
    pods = [
        *_busy("h100-000", "h100-001", "h100-004", "h100-005", "h100-006", "h100-007"),
        *_trainer("a", "h100-002", "h100-003"),
    ]
    assert _reclaim([_job("a", preemptible=False)], pods) == []
    assert [p.name for p in _reclaim([_job("a")], pods)] == ["a"]


def test_a_unit_may_need_several_jobs_and_gets_exactly_those() -> None:
    pods = [
        *_busy("h100-004", "h100-005", "h100-006"),
        *_trainer("a", "h100-000", "h100-001"),
        *_trainer("b", "h100-002", "h100-003"),
        *_trainer("c", "h100-007"),  # leaf-01: can never make four nodes
    ]
    asked = _reclaim([_job("a"), _job("b"), _job("c")], pods, nodes_per_unit=4)
    assert sorted(p.name for p in asked) == ["a", "b"]


def test_a_job_already_asked_is_not_asked_again_nor_replaced_by_another() -> None:
    pods = [
        *_busy("h100-000", "h100-001", "h100-005", "h100-006"),
        *_trainer("a", "h100-002", "h100-003"),
        *_trainer("b", "h100-004", "h100-007"),
    ]
    asked_after_its_pods = _job("a", asked=CREATED + timedelta(minutes=5))
    assert _reclaim([asked_after_its_pods, _job("b")], pods) == []
    # A request older than the job's pods was for an earlier attempt: this one is asked anew.
    stale = _job("a", asked=CREATED - timedelta(minutes=5))
    assert [p.name for p in _reclaim([stale, _job("b", preemptible=False)], pods)] == ["a"]


def test_the_deployment_plan_asks_and_announces_but_does_not_place_on_lent_nodes() -> None:
    cr = copy.deepcopy(SAMPLE)
    cr["metadata"] |= {"namespace": "ns", "uid": "uid-1", "generation": 1}
    cr["spec"]["placement"] = {"requiredLevel": "leaf"}
    # decode (4 nodes) fits leaf-01; prefill (2 nodes) only where job a runs.
    pods = [*_busy("h100-000", "h100-001"), *_trainer("a", "h100-002", "h100-003")]
    observed = Observed(
        nodes=_nodes(), pods=pods, statefulsets={}, router=None, now=NOW, training_jobs=[_job("a")]
    )
    desired = plan(cr, observed)
    assert [(p.name, p.nodes) for p in desired.preemptions] == [("a", ("h100-002", "h100-003"))]
    assert [e.reason for e in desired.events if e.reason == "PreemptionRequested"] == ["PreemptionRequested"]
    units = {c["metadata"]["name"] for c in desired.children if c["kind"] == "StatefulSet"}
    assert units == {"deepseek-v3-small-decode-0"}  # prefill waits for the nodes to be free
    annotation = json.loads(desired.preemptions[0].annotation("ns/deepseek-v3-small", format_time(NOW)))
    assert annotation == {
        "at": format_time(NOW),
        "by": "ns/deepseek-v3-small",
        "unit": "prefill-0",
        "nodes": ["h100-002", "h100-003"],
    }


def test_a_preemption_request_reaches_the_informer_with_the_write(monkeypatch: Any) -> None:
    """The next pass of the deployment, inside the watch's lag, must see the job already asked
    (else it asks again with a new time, and the job counts two preemptions)."""
    from fireflyer.operator import events, kube
    from fireflyer.operator.inference import lending_writes

    sent: list[tuple[str, str, Any, Any]] = []
    held: list[dict[str, Any]] = []

    def call(method: str, path: str, body: Any = None, query: Any = None, **_: Any) -> dict[str, Any]:
        sent.append((method, path, body, query))
        return {"kind": "TrainingJob", "metadata": {"name": "job", "namespace": "ns", **body["metadata"]}}

    monkeypatch.setattr(kube, "_call", call)
    monkeypatch.setattr(events, "post", lambda *a, **k: None)
    monkeypatch.setattr(
        kube,
        "_cache",
        kube.CacheHooks(lambda *a: None, lambda *a: None, held.append, lambda kind: False),
    )
    deployment = {"metadata": {"name": "dep", "namespace": "ns"}}
    now = datetime(2026, 12, 2, tzinfo=UTC)
    lending_writes.request(deployment, [lending.Preemption("ns", "job", "decode-0", ("n1", "n2"))], now)
    ((method, path, _body, query),) = sent
    assert method == "PATCH" and path.endswith("/trainingjobs/job")
    assert query == [("fieldManager", lending.FIELD_MANAGER)]
    request = json.loads(held[0]["metadata"]["annotations"][PREEMPTION_REQUESTED])
    assert request["by"] == "ns/dep" and request["nodes"] == ["n1", "n2"]
