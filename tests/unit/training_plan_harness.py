"""The TrainingJob plan's test inputs: the sample job, the `small` topology's nodes, and the Job
and pods the API server would hold for a planned job."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from fireflyer.dev import topology as dev_topology
from fireflyer.operator import labels as L
from fireflyer.operator.training.plan import Desired, Observed, plan
from fireflyer.placement.reservations import planned_nodes

REPO = Path(__file__).resolve().parents[2]
SMALL = yaml.safe_load((REPO / "manifests/samples/small/training.yaml").read_text())
NAME = SMALL["metadata"]["name"]
NS = "ml"
LEAF = "network.topology.nvidia.com/leaf"
NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


def small_nodes(not_ready: tuple[str, ...] = (), gone: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    nodes = [n for n in dev_topology.nodes(dev_topology.load("small")) if n["metadata"]["name"] not in gone]
    for node in nodes:
        ready = "False" if node["metadata"]["name"] in not_ready else "True"
        node["status"]["conditions"] = [{"type": "Ready", "status": ready}]
    return nodes


def training_job(
    status: dict[str, Any] | None = None, labels: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    doc = copy.deepcopy(SMALL)
    doc["metadata"].update(namespace=NS, uid="cr-uid", generation=1, labels=labels or {})
    doc["spec"].update(spec)
    if status is not None:
        doc["status"] = status
    return doc


def observed_with(
    job: dict[str, Any] | None = None,
    pods: list[dict[str, Any]] | None = None,
    nodes: list[dict[str, Any]] | None = None,
    now: datetime = NOW,
    **extra: Any,
) -> Observed:
    pods = pods or []
    return Observed(
        nodes=nodes if nodes is not None else small_nodes(),
        pods=list(pods),
        job_pods=list(pods),
        job=job,
        now=now,
        **extra,
    )


def job_child(desired: Desired) -> dict[str, Any]:
    jobs = [c for c in desired.children if c["kind"] == "Job"]
    assert len(jobs) == 1, [c["kind"] for c in desired.children]
    return jobs[0]


def server_job(child: dict[str, Any], uid: str = "job-uid", **status: Any) -> dict[str, Any]:
    job = copy.deepcopy(child)
    job["metadata"]["uid"] = uid
    job["status"] = status
    return job


def pods_of(
    job: dict[str, Any], phase: str = "Running", nodes: list[str] | None = None
) -> list[dict[str, Any]]:
    template = job["spec"]["template"]
    result = []
    for index, node in enumerate(nodes or planned_nodes(job)):
        result.append(
            {
                "metadata": {
                    "name": f"{job['metadata']['name']}-{index}-abcde",
                    "namespace": NS,
                    "labels": {**template["metadata"]["labels"], L.COMPLETION_INDEX: str(index)},
                    "annotations": {L.COMPLETION_INDEX: str(index)},
                    "ownerReferences": [{"kind": "Job", "uid": job["metadata"]["uid"], "controller": True}],
                    "creationTimestamp": "2025-01-01T11:59:00Z",
                },
                "spec": {"nodeName": node, "containers": template["spec"]["containers"]},
                "status": {"phase": phase, "podIP": f"10.1.0.{index}"},
            }
        )
    return result


def fail_pod(pod: dict[str, Any], code: int = 1) -> None:
    pod["status"] = {
        "phase": "Failed",
        "containerStatuses": [
            {
                "name": "trainer",
                "state": {"terminated": {"exitCode": code, "finishedAt": "2025-01-01T11:59:30Z"}},
            }
        ],
    }


def started_job(cr: dict[str, Any], nodes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The Job the first pass creates, as the API server holds it."""
    return server_job(job_child(plan(cr, observed_with(nodes=nodes))))


def condition_of(desired: Desired, type_: str) -> dict[str, Any]:
    return next(c for c in desired.status["conditions"] if c["type"] == type_)


def container_env(job: dict[str, Any]) -> dict[str, Any]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
