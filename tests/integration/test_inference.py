"""The InferenceDeployment controller on the real control plane, with the operator running as
its own process: whole-unit placement, status, failure handling, rollouts, drift and GC."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from fireflyer.dev import faults
from tests.conftest import Operator
from tests.kube import Kube, condition, wait_for

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = yaml.safe_load((REPO_ROOT / "manifests/samples/small/inference.yaml").read_text())
NAME = SMALL["metadata"]["name"]
LEAF = "network.topology.nvidia.com/leaf"


def _sample(**spec_changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(SMALL)
    doc["spec"].update(spec_changes)
    return doc


def _infd(kube: Kube) -> dict[str, Any]:
    return kube.get("inferencedeployment", NAME)  # type: ignore[no-any-return]


def _ready(kube: Kube) -> dict[str, Any] | None:
    obj = _infd(kube)
    cond = condition(obj, "Ready")
    return obj if cond and cond["status"] == "True" else None


def _unit_pods(kube: Kube, role: str, unit: int) -> list[dict[str, Any]]:
    selector = f"fireflyer.dev/deployment={NAME},fireflyer.dev/role={role},fireflyer.dev/unit={unit}"
    return kube.get("pods", selector=selector)["items"]  # type: ignore[no-any-return]


def _node_labels(cluster: Kube) -> dict[str, dict[str, str]]:
    nodes = cluster.get("nodes", namespaced=False)["items"]
    return {n["metadata"]["name"]: n["metadata"]["labels"] for n in nodes}


def _events(kube: Kube, reason: str) -> list[str]:
    events = kube.get("events")["items"]
    return [e["message"] for e in events if e.get("reason") == reason]


def test_units_are_placed_whole_and_status_says_so(operator: Operator, kube: Kube, cluster: Kube) -> None:
    kube.apply(SMALL)
    obj = wait_for("the deployment to be Ready", lambda: _ready(kube), timeout=60)
    status = obj["status"]
    assert status["prefillReady"] == "1/1" and status["decodeReady"] == "1/1"
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    for cond_type in ("Placed", "PrefillReady", "DecodeReady", "RouterReady"):
        assert condition(obj, cond_type)["status"] == "True", cond_type
    assert condition(obj, "Degraded")["status"] == "False"
    labels = _node_labels(cluster)
    for unit in status["units"]:
        pods = _unit_pods(kube, unit["role"], unit["index"])
        nodes = {p["spec"]["nodeName"] for p in pods}
        want = SMALL["spec"][unit["role"]]["nodesPerUnit"]
        assert len(pods) == want and len(nodes) == want  # one pod per node
        assert len({labels[n][LEAF] for n in nodes}) == 1  # inside one leaf
        assert unit["domain"].startswith("leaf/") and unit["ready"]
        assert sorted(unit["nodes"]) == sorted(nodes)
        for pod in pods:
            container = pod["spec"]["containers"][0]
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
            assert container["resources"]["limits"]["rdma/ib"] == "8"
            assert "IPC_LOCK" in container["securityContext"]["capabilities"]["add"]
            env = {e["name"]: e for e in container["env"]}
            assert env["NVSHMEM_IB_ENABLE_IBGDA"]["value"] == "1"
            assert env["MASTER_ADDR"]["value"].startswith(f"{NAME}-{unit['role']}-{unit['index']}-0.")
    # the per-node HCA lists the pods source at start
    cm = kube.get("configmap", f"{NAME}-engine")
    some_node = status["units"][0]["nodes"][0]
    assert cm["data"][f"hca.{some_node}"].split(",")[:2] == ["mlx5_0", "mlx5_1"]
    assert cm["data"][f"rails.{some_node}"].startswith("0:mlx5_0,1:mlx5_1")
    printed = kube.run("get", "infd", NAME).stdout
    assert "True" in printed and "1/1" in printed


def test_deployment_that_cannot_fit_reports_the_shortfall(operator: Operator, kube: Kube) -> None:
    doc = _sample()
    doc["spec"]["decode"] = {
        "units": 1,
        "nodesPerUnit": 5,
        "gpusPerNode": 8,
        "parallelism": {"tensor": 1, "data": 40, "expert": 40},
    }
    doc["spec"]["eplb"]["redundantExperts"] = 24  # 280 = 40 × 7
    doc["spec"]["prefill"] = {**doc["spec"]["decode"], "units": 0}
    doc["spec"]["placement"] = {"requiredLevel": "leaf"}
    kube.apply(doc)

    def not_placed() -> dict[str, Any] | None:
        cond = condition(_infd(kube), "Placed")
        return cond if cond and cond["status"] == "False" else None

    cond = wait_for("Placed=False", not_placed, timeout=30)
    assert cond["reason"] == "InsufficientCapacity"
    assert "decode-0" in cond["message"] and "inside one leaf" in cond["message"]
    assert not _unit_pods(kube, "decode", 0)  # nothing half-placed
    assert condition(_infd(kube), "Ready")["status"] == "False"


def test_not_ready_node_recreates_the_unit_elsewhere(operator: Operator, kube: Kube, cluster: Kube) -> None:
    kube.apply(_sample(prefill={**SMALL["spec"]["prefill"], "units": 0}))
    wait_for("the deployment to be Ready", lambda: _ready(kube), timeout=60)
    before = _unit_pods(kube, "decode", 0)
    victim = before[0]["spec"]["nodeName"]
    faults.make_node_not_ready(cluster.kubeconfig, victim)
    try:

        def moved() -> list[dict[str, Any]] | None:
            # The old pods stay listed (Running, with a deletionTimestamp) while they terminate.
            pods = [p for p in _unit_pods(kube, "decode", 0) if not p["metadata"].get("deletionTimestamp")]
            nodes = {p["spec"].get("nodeName") for p in pods}
            running = all(p["status"].get("phase") == "Running" for p in pods)
            return pods if len(pods) == 4 and victim not in nodes and running else None

        after = wait_for("the unit to run again without the failed node", moved, timeout=60)
        assert not {p["metadata"]["uid"] for p in before} & {p["metadata"]["uid"] for p in after}
        # The lost node's kubelet never confirms a deletion: only the operator's force delete
        # (grace 0) frees the old unit pods, none is left Terminating there. (A router replica
        # there is the Deployment's: Kubernetes evicts it after its toleration and starts another.)
        on_victim = kube.get("pods", selector=f"fireflyer.dev/deployment={NAME},fireflyer.dev/role")["items"]
        assert not [p["metadata"]["name"] for p in on_victim if p["spec"].get("nodeName") == victim]
        labels = _node_labels(cluster)
        assert len({labels[p["spec"]["nodeName"]][LEAF] for p in after}) == 1
        assert any(victim in m for m in _events(kube, "UnitRecreated"))
        wait_for("Ready again", lambda: _ready(kube), timeout=60)
    finally:
        faults.heal_node(cluster.kubeconfig, victim)


def test_failed_pod_recreates_the_whole_unit(operator: Operator, kube: Kube, cluster: Kube) -> None:
    kube.apply(_sample(decode={**SMALL["spec"]["decode"], "units": 0}))
    wait_for("the deployment to be Ready", lambda: _ready(kube), timeout=60)
    before = {p["metadata"]["uid"] for p in _unit_pods(kube, "prefill", 0)}
    victim = sorted(p["metadata"]["name"] for p in _unit_pods(kube, "prefill", 0))[1]
    faults.fail_pod(cluster.kubeconfig, kube.namespace, victim)

    def replaced() -> bool:
        pods = _unit_pods(kube, "prefill", 0)
        uids = {p["metadata"]["uid"] for p in pods}
        return (
            len(pods) == 2 and not uids & before and all(p["status"].get("phase") == "Running" for p in pods)
        )

    wait_for("both pods of the unit to be replaced", replaced, timeout=60)
    assert any("failed" in m for m in _events(kube, "UnitRecreated"))


def test_drift_is_repaired_and_deletion_collects_everything(operator: Operator, kube: Kube) -> None:
    kube.apply(SMALL)
    wait_for("Ready", lambda: _ready(kube), timeout=60)
    svc = f"{NAME}-decode-0"
    kube.run("delete", "service", svc)
    wait_for("the deleted headless Service to come back", lambda: kube.exists("service", svc), timeout=30)
    # a hand edit of a field the operator owns is reverted
    kube.run(
        "patch",
        "statefulset",
        svc,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"template": {"spec": {"schedulerName": "hand-edited"}}}}),
    )
    wait_for(
        "the hand edit to be reverted",
        lambda: (
            kube.get("statefulset", svc)["spec"]["template"]["spec"]["schedulerName"] == "default-scheduler"
        ),
        timeout=30,
    )
    kube.run("delete", "inferencedeployment", NAME, "--wait=true")
    wait_for(
        "every child to be garbage-collected",
        lambda: (
            not any(
                kube.get(kind, selector=f"fireflyer.dev/deployment={NAME}")["items"]
                for kind in ("statefulsets", "services", "deployments", "configmaps", "pods")
            )
        ),
        timeout=60,
    )


def test_rollout_recreates_whole_units_and_survives_an_operator_restart(
    operator: Operator, kube: Kube
) -> None:
    doc = _sample(
        decode={**SMALL["spec"]["decode"], "units": 0},
        prefill={**SMALL["spec"]["prefill"], "units": 3, "nodesPerUnit": 2},
    )
    kube.apply(doc)
    wait_for("Ready", lambda: _ready(kube), timeout=60)

    def unit_revisions() -> list[set[str]]:
        revs = [
            {
                p["metadata"]["labels"]["fireflyer.dev/revision"]
                for p in _unit_pods(kube, "prefill", i)
                if not p["metadata"].get("deletionTimestamp")
            }
            for i in range(3)
        ]
        for rev in revs:
            assert len(rev) <= 1, f"two revisions inside one unit: {rev}"
        return revs

    before = unit_revisions()
    before_uids = {
        p["metadata"]["uid"] for p in kube.get("pods", selector=f"fireflyer.dev/deployment={NAME}")["items"]
    }
    # The change lands while the operator is down; it is killed again as the rollout starts.
    operator.stop()
    doc["spec"]["engine"] = {"kind": "fireflyer", "args": ["--max-running-requests", "256"]}
    kube.apply(doc)
    operator.start()
    wait_for("the rollout to start", lambda: unit_revisions() != before, timeout=30, interval=0.05)
    operator.stop(kill=True)
    operator.start()

    def done() -> bool:
        revs = unit_revisions()
        return (
            all(revs) and all(r != b for r, b in zip(revs, before, strict=True)) and _ready(kube) is not None
        )

    wait_for("the rollout to finish after the restart", done, timeout=120)
    pods = kube.get("pods", selector=f"fireflyer.dev/deployment={NAME},fireflyer.dev/role=prefill")["items"]
    assert len(pods) == 6 and not {p["metadata"]["uid"] for p in pods} & before_uids
    assert len(kube.get("statefulsets", selector=f"fireflyer.dev/deployment={NAME}")["items"]) == 3
    assert len(kube.get("services", selector=f"fireflyer.dev/deployment={NAME}")["items"]) == 4
    assert len(kube.get("deployments", selector=f"fireflyer.dev/deployment={NAME}")["items"]) == 1


def test_changing_units_adds_and_removes_whole_units(operator: Operator, kube: Kube) -> None:
    # No drain: kwok's router pods answer nothing, so one would wait its whole timeout (drain
    # through the router: test_scaling.py).
    router = {**SMALL["spec"].get("router", {}), "drainTimeoutSeconds": 0}
    doc = _sample(decode={**SMALL["spec"]["decode"], "units": 0}, router=router)
    kube.apply(doc)
    wait_for("Ready", lambda: _ready(kube), timeout=60)

    def unit_uids(index: int) -> set[str]:
        return {p["metadata"]["uid"] for p in _unit_pods(kube, "prefill", index)}

    first = unit_uids(0)
    doc["spec"]["prefill"]["units"] = 2
    kube.apply(doc)
    wait_for(
        "two prefill units",
        lambda: (_ready(kube) or {}).get("status", {}).get("prefillReady") == "2/2",
        timeout=60,
    )
    assert unit_uids(0) == first, "scaling up restarted the unit that was there"
    doc["spec"]["prefill"]["units"] = 1
    kube.apply(doc)
    wait_for(
        "the second unit to go",
        lambda: not kube.exists("statefulset", f"{NAME}-prefill-1") and not _unit_pods(kube, "prefill", 1),
        timeout=60,
    )
    wait_for("Ready with one unit", lambda: _ready(kube), timeout=30)
    assert unit_uids(0) == first, "scaling down restarted the unit that stays"
    assert len(first) == 2


def test_deletion_never_waits_for_the_operator(operator: Operator, kube: Kube) -> None:
    """No finalizer on an InferenceDeployment, so that deleting it, or its namespace, never hangs
    on a stopped operator (owner references collect the children); one an older release left is
    taken off, and none comes back while the periodic resync and EPLB checks run."""
    import time

    doc = _sample()
    doc["metadata"]["finalizers"] = ["fireflyer.dev/finalizer"]
    kube.apply(doc)
    wait_for("Ready", lambda: _ready(kube), timeout=60)
    wait_for(
        "the old finalizer to be taken off", lambda: not _infd(kube)["metadata"].get("finalizers"), timeout=30
    )
    deadline = time.monotonic() + 25  # longer than a resync period
    while time.monotonic() < deadline:
        assert not _infd(kube)["metadata"].get("finalizers"), _infd(kube)["metadata"]
        time.sleep(1)
    assert condition(_infd(kube), "Ready")["status"] == "True"  # type: ignore[index]
