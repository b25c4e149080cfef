"""Lending on the real control plane, the operator as its own process: a preemptible TrainingJob
runs on the nodes an inference deployment scaled in released; scaling the role back up takes them
back (the job is asked, its pods are deleted, no restart is spent, the unit is placed and Ready),
and scaling in again lets the job resume. kwok's pods never run a trainer (test_training.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Operator
from tests.kube import Kube, wait_for
from tests.kube import condition as _condition

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
INFERENCE = yaml.safe_load((REPO_ROOT / "manifests/samples/small/inference.yaml").read_text())
TRAINING = yaml.safe_load((REPO_ROOT / "manifests/samples/small/training.yaml").read_text())
DEPLOYMENT = INFERENCE["metadata"]["name"]
JOB = TRAINING["metadata"]["name"]
SCALER = f"{DEPLOYMENT}-prefill"
ANNOTATION = "fireflyer.dev/preemption-requested"


def _deployment() -> dict[str, Any]:
    """decode-0 fills one leaf, prefill-0 half of the other: two nodes free in that leaf. No
    router: a scale-in then removes the unit at once (there is nothing to drain)."""
    doc = copy.deepcopy(INFERENCE)
    doc["spec"]["router"] = {"replicas": 0}
    doc["spec"]["eplb"] = {"mode": "off"}
    doc["spec"]["placement"] = {"requiredLevel": "leaf"}
    return doc


def _job() -> dict[str, Any]:
    doc = copy.deepcopy(TRAINING)
    doc["spec"].update(
        preemptible=True,
        terminationGracePeriodSeconds=5,
        podLabels={"fireflyer.dev/keep-running": "true"},
        placement={"requiredLevel": "leaf"},
    )
    return doc


def _tj(kube: Kube) -> dict[str, Any]:
    return kube.get("trainingjob", JOB)  # type: ignore[no-any-return,unused-ignore]


def _trainer_nodes(kube: Kube) -> list[str]:
    pods = kube.get("pods", selector=f"fireflyer.dev/training-job={JOB}")["items"]
    return sorted(
        p["spec"]["nodeName"]
        for p in pods
        if not p["metadata"].get("deletionTimestamp") and p["status"].get("phase") == "Running"
    )


def _prefill_nodes(kube: Kube, unit: int) -> list[str]:
    selector = f"fireflyer.dev/deployment={DEPLOYMENT},fireflyer.dev/role=prefill,fireflyer.dev/unit={unit}"
    pods = kube.get("pods", selector=selector)["items"]
    return sorted(p["spec"].get("nodeName") or "" for p in pods if not p["metadata"].get("deletionTimestamp"))


def _status(kube: Kube) -> dict[str, Any]:
    return _tj(kube).get("status") or {}


def _preempted(kube: Kube) -> dict[str, Any]:
    return _condition(_tj(kube), "Preempted") or {}


def _reasons(kube: Kube, kind: str, name: str) -> list[str]:
    return [
        e["reason"]
        for e in kube.get("events")["items"]
        if e["involvedObject"].get("kind") == kind and e["involvedObject"].get("name") == name
    ]


def test_inference_takes_lent_nodes_back_and_the_job_resumes(operator: Operator, kube: Kube) -> None:
    kube.apply(_deployment())
    wait_for(
        "decode-0 and prefill-0 Ready",
        lambda: (
            (kube.get("inferencedeployment", DEPLOYMENT).get("status") or {}).get("prefillReady") == "1/1"
        ),
        timeout=40,
    )
    kube.apply(_job())
    lent = wait_for(
        "the job running on the two free nodes",
        lambda: (
            (nodes := _trainer_nodes(kube))
            and len(nodes) == 2
            and _status(kube).get("phase") == "Running"
            and nodes
        ),
        timeout=40,
    )

    kube.run("scale", f"inferencerolescaler/{SCALER}", "--replicas", "2")
    request = wait_for(
        "the preemption request on the job",
        lambda: (_tj(kube)["metadata"].get("annotations") or {}).get(ANNOTATION),
        timeout=30,
    )
    asked = json.loads(request)
    assert asked["by"] == f"{kube.namespace}/{DEPLOYMENT}" and asked["unit"] == "prefill-1"
    assert sorted(asked["nodes"]) == lent
    wait_for("the Preempted condition", lambda: _preempted(kube).get("status") == "True", timeout=30)
    assert _preempted(kube)["reason"] == "NodesTakenBack"
    taken = wait_for(
        "prefill-1 placed on the lent nodes and Ready",
        lambda: (
            (kube.get("inferencedeployment", DEPLOYMENT).get("status") or {}).get("prefillReady") == "2/2"
            and _prefill_nodes(kube, 1)
        ),
        timeout=40,
    )
    assert taken == lent and _trainer_nodes(kube) == []
    status = _status(kube)
    assert status["restarts"] == 0 and status["preemptions"] == 1  # no restart spent
    assert "PreemptionRequested" in _reasons(kube, "InferenceDeployment", DEPLOYMENT)
    assert {"PreemptionRequested", "Preempted"} <= set(_reasons(kube, "TrainingJob", JOB))
    # The job waits (nothing else is free) and learns the requester has its nodes.
    wait_for(
        "the job to see the nodes taken",
        lambda: (_status(kube).get("preemption") or {}).get("released") is True,
        timeout=40,
    )
    assert _preempted(kube)["status"] == "True" and not _trainer_nodes(kube)

    kube.run("scale", f"inferencerolescaler/{SCALER}", "--replicas", "1")
    back = wait_for(
        "the job placed and running again",
        lambda: (
            (nodes := _trainer_nodes(kube))
            and len(nodes) == 2
            and _status(kube).get("phase") == "Running"
            and nodes
        ),
        timeout=50,
    )
    assert back == lent
    resumed = _preempted(kube)
    assert resumed["status"] == "False" and resumed["reason"] == "Resumed"
    assert _status(kube)["restarts"] == 0
    assert not operator.refusals()
