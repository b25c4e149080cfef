"""The TrainingJob controller on the real control plane, with the operator as its own process:
whole-job placement, completion, whole-job restarts (pod failure, node loss) up to maxRestarts,
a restart count that survives an operator restart, and garbage collection. kwok's pods never run
a trainer: a Job's pods complete a second after they start unless they carry
fireflyer.dev/keep-running, and fail when labelled fireflyer.dev/fault=fail."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from fireflyer.dev import faults
from tests.conftest import Operator
from tests.kube import Kube, wait_for
from tests.kube import condition as _condition

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = yaml.safe_load((REPO_ROOT / "manifests/samples/small/training.yaml").read_text())
NAME = SMALL["metadata"]["name"]
LEAF = "network.topology.nvidia.com/leaf"
SELECTOR = f"fireflyer.dev/training-job={NAME}"
KEEP_RUNNING = {"fireflyer.dev/keep-running": "true"}


def _sample(**spec_changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(SMALL)
    doc["spec"].update(spec_changes)
    return doc


def condition(obj: dict[str, Any], cond_type: str) -> dict[str, Any]:
    cond = _condition(obj, cond_type)
    assert cond is not None, f"no {cond_type} condition"
    return cond


def _tj(kube: Kube) -> dict[str, Any]:
    return kube.get("trainingjob", NAME)  # type: ignore[no-any-return,unused-ignore]


def _status(kube: Kube) -> dict[str, Any]:
    return _tj(kube).get("status") or {}


def _pods(kube: Kube, attempt: int | None = None) -> list[dict[str, Any]]:
    selector = SELECTOR if attempt is None else f"{SELECTOR},fireflyer.dev/attempt={attempt}"
    pods = kube.get("pods", selector=selector)["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def _running(kube: Kube, restarts: int) -> list[dict[str, Any]] | None:
    """The attempt's pods once the job is Running with all of them up."""
    status = _status(kube)
    if status.get("phase") != "Running" or status.get("restarts") != restarts:
        return None
    pods = _pods(kube, restarts)
    return pods if len(pods) == 2 and all(p["status"].get("phase") == "Running" for p in pods) else None


def _events(kube: Kube, reason: str) -> list[str]:
    return [e["message"] for e in kube.get("events")["items"] if e.get("reason") == reason]


def _leaves(cluster: Kube) -> dict[str, str]:
    return {
        n["metadata"]["name"]: n["metadata"]["labels"][LEAF]
        for n in cluster.get("nodes", namespaced=False)["items"]
    }


def _rank(pod: dict[str, Any]) -> str:
    return str(pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"])


def test_job_is_placed_whole_and_runs_to_completion(operator: Operator, kube: Kube, cluster: Kube) -> None:
    kube.apply(SMALL)

    def succeeded() -> dict[str, Any] | None:
        obj = _tj(kube)
        return obj if (obj.get("status") or {}).get("phase") == "Succeeded" else None

    obj = wait_for("the job to succeed", succeeded, timeout=60)
    status = obj["status"]
    assert status["restarts"] == 0 and status["ready"] == "2/2"
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    assert condition(obj, "Ready")["reason"] == "JobSucceeded"
    assert condition(obj, "Placed")["status"] == "True"
    pods = _pods(kube)
    nodes = {p["spec"]["nodeName"] for p in pods}
    assert len(pods) == 2 and len(nodes) == 2 and sorted(nodes) == status["nodes"]  # one pod per node
    assert len({_leaves(cluster)[n] for n in nodes}) == 1  # inside one leaf
    assert {_rank(p) for p in pods} == {"0", "1"}
    container = pods[0]["spec"]["containers"][0]
    assert container["command"] == ["fireflyer", "train"] and "--status-port" in container["args"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MASTER_ADDR"] == f"{NAME}-0.{NAME}.{kube.namespace}.svc.cluster.local"
    assert env["NNODES"] == "2" and env["MASTER_PORT"] == "29500"
    job = kube.get("job", NAME)
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["backoffLimit"] == 0
    assert kube.get("service", NAME)["spec"]["clusterIP"] == "None"
    printed = kube.run("get", "tj", NAME).stdout
    for column in ("PHASE", "STEP", "LOSS", "RESTARTS", "READY", "AGE"):
        assert column in printed
    assert "Succeeded" in printed and "2/2" in printed


def test_failed_pods_restart_the_whole_job_until_max_restarts(operator: Operator, kube: Kube) -> None:
    kube.apply(_sample(podLabels=KEEP_RUNNING, restart={"maxRestarts": 1, "resume": "latest"}))
    first = wait_for("the job to run", lambda: _running(kube, 0), timeout=60)
    victim = next(p for p in first if _rank(p) == "1")["metadata"]["name"]
    faults.fail_pod(kube.kubeconfig, kube.namespace, victim)

    second = wait_for("the restarted job to run", lambda: _running(kube, 1), timeout=60)
    assert not {p["metadata"]["uid"] for p in first} & {p["metadata"]["uid"] for p in second}
    assert _status(kube)["lastFailure"] == f"pod {victim} exited 1"
    assert f"restart 1/1: pod {victim} exited 1" in _events(kube, "JobRestarted")

    # The restart count lives in the status: an operator restart neither resets nor repeats it.
    operator.stop()
    operator.start()
    victim = next(p for p in second if _rank(p) == "0")["metadata"]["name"]
    faults.fail_pod(kube.kubeconfig, kube.namespace, victim)

    def failed() -> dict[str, Any] | None:
        obj = _tj(kube)
        return obj if (obj.get("status") or {}).get("phase") == "Failed" else None

    obj = wait_for("the job to fail", failed, timeout=60)
    assert obj["status"]["restarts"] == 1
    ready = condition(obj, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "MaxRestartsExceeded"
    assert f"pod {victim} exited 1" in ready["message"]
    wait_for("the JobFailed event", lambda: _events(kube, "JobFailed"), timeout=10)
    assert len(_events(kube, "JobRestarted")) == 1


def test_a_lost_node_restarts_the_job_on_other_nodes(operator: Operator, kube: Kube, cluster: Kube) -> None:
    kube.apply(_sample(podLabels=KEEP_RUNNING))
    first = wait_for("the job to run", lambda: _running(kube, 0), timeout=60)
    victim = first[0]["spec"]["nodeName"]
    faults.make_node_not_ready(cluster.kubeconfig, victim)
    try:
        second = wait_for("the restarted job to run", lambda: _running(kube, 1), timeout=60)
        nodes = {p["spec"]["nodeName"] for p in second}
        assert victim not in nodes and len({_leaves(cluster)[n] for n in nodes}) == 1
        assert _status(kube)["lastFailure"] == f"node {victim} NotReady"
        assert any(f"node {victim} NotReady" in m for m in _events(kube, "JobRestarted"))
    finally:
        faults.heal_node(cluster.kubeconfig, victim)


PREP_SELECTOR = f"{SELECTOR},fireflyer.dev/component=data-preparation"


def test_data_preparation_runs_before_the_training_pods(operator: Operator, kube: Kube) -> None:
    kube.apply(_sample(podLabels=KEEP_RUNNING, dataPreparation={"input": "/3fs/stage/raw/moe-tiny"}))

    def prep_running() -> dict[str, Any] | None:
        pods = kube.get("pods", selector=PREP_SELECTOR)["items"]
        return pods[0] if len(pods) == 1 and pods[0]["status"].get("phase") == "Running" else None

    pod = wait_for("the preparation pod to run", prep_running, timeout=60)
    args = pod["spec"]["containers"][0]["args"]
    assert (
        args[:2] == ["prepare", "--input"]
        and args[args.index("--out") + 1] == SMALL["spec"]["dataset"]["path"]
    )
    assert kube.get("job", f"{NAME}-prepare")["metadata"]["ownerReferences"][0]["name"] == NAME
    wait_for(
        "DataPrepared=Running",
        lambda: (_condition(_tj(kube), "DataPrepared") or {}).get("reason") == "Running",
        timeout=30,
    )
    assert _status(kube)["phase"] == "Pending"
    assert not kube.exists("job", NAME) and _pods(kube, 0) == []

    # The preparation finds its output prepared and says so in its termination message.
    now = pod["status"].get("startTime")
    message = json.dumps({"result": "already-prepared", "out": SMALL["spec"]["dataset"]["path"]})
    terminated = {
        "exitCode": 0,
        "reason": "Completed",
        "message": message,
        "startedAt": now,
        "finishedAt": now,
    }
    status = {
        "phase": "Succeeded",
        "containerStatuses": [
            {
                "name": "prepare",
                "image": pod["spec"]["containers"][0]["image"],
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {"terminated": terminated},
            }
        ],
    }
    kube.run(
        "patch", "pod", pod["metadata"]["name"], "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip
    wait_for("the job to run after its data is prepared", lambda: _running(kube, 0), timeout=60)
    prepared = condition(_tj(kube), "DataPrepared")
    assert (prepared["status"], prepared["reason"]) == ("True", "AlreadyPrepared")
    assert _events(kube, "DataPrepared")


INVALID: list[tuple[dict[str, Any], list[str]]] = [
    ({"microBatches": 3}, ["spec.microBatches", "at least 2 × parallelism.pipeline"]),
    ({"microBatches": 5}, ["spec.microBatches", "even microBatches"]),
    ({"microBatches": 1}, ["spec.microBatches", "at least parallelism.pipeline"]),
    ({"model": {}}, ["spec.model.source", "needs model.source and dataset.path"]),
    (
        {"dataPreparation": {"input": "/raw", "minTokens": 5, "maxTokens": 2}},
        ["spec.dataPreparation.maxTokens", "maxTokens must be at least minTokens"],
    ),
    (
        {"model": {}, "command": ["python", "train.py"], "dataPreparation": {"input": "/raw"}},
        ["spec.dataPreparation", "needs dataPreparation.tokenizer or model.source"],
    ),
]


def test_invalid_specs_are_rejected_at_admission(crds: Kube, kube: Kube) -> None:
    for changes, expected in INVALID:
        result = kube.apply(_sample(**changes), "--dry-run=server", check=False)
        assert result.returncode != 0, changes
        for text in expected:
            assert text in result.stderr, result.stderr
    # with a command of its own, a job needs neither a model nor a dataset
    assert kube.apply(_sample(model={}, command=["python", "train.py"]), "--dry-run=server").returncode == 0


def test_deleting_the_job_removes_its_children(operator: Operator, kube: Kube) -> None:
    """Last in the file: the garbage collector picks up a newly installed CRD's kind only on its
    next resync (about 30 s), so an early deletion test would mostly measure that."""
    kube.apply(_sample(podLabels=KEEP_RUNNING))
    wait_for("the job to run", lambda: _running(kube, 0), timeout=60)
    kube.run("delete", "trainingjob", NAME, "--wait=true")
    wait_for(
        "every child to be garbage-collected",
        lambda: not any(kube.get(kind, selector=SELECTOR)["items"] for kind in ("jobs", "services", "pods")),
        timeout=90,
    )
