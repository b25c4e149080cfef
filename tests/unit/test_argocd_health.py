"""GitOps health: the chart's Argo CD health scripts, run in Lua 5.1 (what Argo CD's gopher-lua
speaks) against statuses the real plans write, and the kstatus rules (Flux, Helm 4's --wait)
applied to the same statuses."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51

from fireflyer.api import conditions as C
from fireflyer.api.kinds import KINDS
from tests.unit import test_threefs_plan as threefs
from tests.unit import training_plan_harness as training
from tests.unit.test_inference_plan import NOW, _nodes, _placed, _pods
from tests.unit.test_inference_plan import Observed as InferenceObserved
from tests.unit.test_inference_plan import plan as inference_plan

REPO = Path(__file__).resolve().parents[2]
HEALTH = REPO / "charts/fireflyer/argocd/health"
DOC = REPO / "docs/observability.md"
STAMP = "2026-12-01T12:00:00Z"


def argocd_health(kind: str, obj: dict[str, Any]) -> tuple[str, str]:
    """(status, message) as Argo CD computes them: the script sees the object as `obj`."""
    lua = lua51.LuaRuntime()
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute((HEALTH / f"{kind}.lua").read_text())
    return str(result["status"]), str(result["message"] or "")


def kstatus(obj: dict[str, Any]) -> str:
    """sigs.k8s.io/cli-utils kstatus' generic rules, the only ones it applies to a custom resource:
    Terminating while deleted, InProgress until status.observedGeneration (when present) is the
    object's generation, InProgress/Failed on a True Reconciling/Stalled condition, else Current."""
    meta, status = obj["metadata"], obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return "Terminating"
    if (
        "generation" in meta
        and "observedGeneration" in status
        and status["observedGeneration"] != meta["generation"]
    ):
        return "InProgress"
    for cond in status.get("conditions") or []:
        if cond["type"] == "Reconciling" and cond["status"] == "True":
            return "InProgress"
        if cond["type"] == "Stalled" and cond["status"] == "True":
            return "Failed"
    return "Current"


def written(cr: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    """The object after a reconcile's status write (what every controller's apply does)."""
    generation = cr["metadata"]["generation"]
    previous = (cr.get("status") or {}).get("conditions") or []
    merged = {**(cr.get("status") or {}), **status}
    merged["conditions"] = C.merge(previous, status.get("conditions") or [], STAMP, generation)
    merged["observedGeneration"] = generation
    return {**cr, "status": merged}


# -- InferenceDeployment ---------------------------------------------------------------------------


def _inference(
    change: Callable[[list[dict[str, Any]]], None] | None = None, router: int = 1
) -> dict[str, Any]:
    cr, sets = _placed()
    pods = [p for sts in sets.values() for p in _pods(sts, NOW - timedelta(minutes=30))]
    if change is not None:
        change(pods)
    router_obj = {"status": {"availableReplicas": router}}
    desired = inference_plan(
        cr, InferenceObserved(nodes=_nodes(), pods=pods, statefulsets=sets, router=router_obj, now=NOW)
    )
    return written(cr, desired.status)


def test_a_deployment_with_every_unit_and_the_router_ready_is_healthy() -> None:
    obj = _inference()
    assert argocd_health("InferenceDeployment", obj) == ("Healthy", "Prefill 1/1, decode 1/1")
    assert kstatus(obj) == "Current"


def test_a_deployment_recreating_a_failed_unit_is_degraded_and_says_why() -> None:
    def fail(pods: list[dict[str, Any]]) -> None:
        next(p for p in pods if "-decode-" in p["metadata"]["name"])["status"]["phase"] = "Failed"

    status, message = argocd_health("InferenceDeployment", _inference(fail))
    assert status == "Degraded" and "failed" in message and "-decode-0" in message


def test_a_deployment_whose_pods_are_starting_is_progressing() -> None:
    def starting(pods: list[dict[str, Any]]) -> None:
        for pod in pods:
            pod["status"]["conditions"] = [{"type": "Ready", "status": "False"}]

    status, message = argocd_health("InferenceDeployment", _inference(starting))
    assert status == "Progressing" and message.startswith("waiting for")


def test_a_deployment_without_its_router_is_progressing() -> None:
    status, message = argocd_health("InferenceDeployment", _inference(router=0))
    assert (status, message) == ("Progressing", "waiting for router (0/1 replicas available)")


def test_a_ready_deployment_whose_load_cannot_be_collected_stays_healthy_and_says_so() -> None:
    obj = _inference()
    obj["status"]["conditions"].append(
        C.condition(C.EPLB_HEALTHY, False, C.LOAD_UNAVAILABLE, "decode: http://x: timed out")
    )
    status, message = argocd_health("InferenceDeployment", obj)
    assert status == "Healthy" and message.endswith("EPLB: decode: http://x: timed out")


# -- every kind: generations, invalid specs, no status -------------------------------------------


def _training_running() -> dict[str, Any]:
    job = training.started_job(training.training_job())
    cr = training.training_job({"phase": "Pending", "restarts": 0})
    return written(cr, training.plan(cr, training.observed_with(job, training.pods_of(job))).status)


def _threefs_ready() -> dict[str, Any]:
    nodes = {f"n{i}": threefs._node(f"n{i}", labels={"storage": "yes"}) for i in range(4)}
    pods = [threefs._pod("threefs-small-mgmtd-0", "mgmtd", "n0")] + [
        threefs._pod(f"threefs-small-storage-{i}", "storage", f"n{i}") for i in range(3)
    ]
    health = threefs._health(None)
    # The last health check's figures, as a consumed health step left them in status.
    checked = {"chains": health.chain_counts(), "targets": health.target_counts()}
    desired = threefs._bootstrapped(nodes, pods, health, threefs.NOW, checked)
    cr = threefs._cr({"bootstrapSteps": threefs.ALL_STEPS, **checked})
    return written(cr, desired.status)


HEALTHY = {
    "InferenceDeployment": _inference,
    "TrainingJob": _training_running,
    "ThreeFSCluster": _threefs_ready,
}


@pytest.mark.parametrize("kind", sorted(HEALTHY))
def test_a_new_generation_is_progressing_until_the_operator_observes_it(kind: str) -> None:
    obj = HEALTHY[kind]()
    assert argocd_health(kind, obj)[0] == "Healthy" and kstatus(obj) == "Current"
    obj["metadata"]["generation"] += 1
    assert argocd_health(kind, obj) == (
        "Progressing",
        f"Waiting for the operator to observe generation {obj['metadata']['generation']}",
    )
    assert kstatus(obj) == "InProgress"


@pytest.mark.parametrize("kind", sorted(HEALTHY))
def test_an_invalid_spec_is_degraded(kind: str) -> None:
    obj = HEALTHY[kind]()
    obj["metadata"]["generation"] += 1
    obj["status"] = C.invalid_spec_status(obj, "spec.x: must be positive", STAMP)
    assert argocd_health(kind, obj) == ("Degraded", "spec.x: must be positive")
    assert kstatus(obj) == "Current"  # observed; kstatus reads no Ready or Degraded condition


@pytest.mark.parametrize("kind", sorted(HEALTHY))
def test_an_object_the_operator_has_not_written_yet_is_progressing(kind: str) -> None:
    obj = copy.deepcopy(HEALTHY[kind]())
    del obj["status"]
    assert argocd_health(kind, obj) == ("Progressing", "Waiting for the operator")


@pytest.mark.parametrize("kind", sorted(HEALTHY))
def test_statuses_follow_the_kstatus_conventions(kind: str) -> None:
    obj = HEALTHY[kind]()
    status = obj["status"]
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    types = {c["type"] for c in status["conditions"]}
    assert {"Ready", "Progressing", "Degraded"} <= types
    # kstatus' own abnormal-true conditions are not written: nothing claims a meaning it lacks.
    assert not types & {"Reconciling", "Stalled"}
    for cond in status["conditions"]:
        assert cond["status"] in ("True", "False", "Unknown")
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]*", cond["reason"]), cond
        assert cond["observedGeneration"] == obj["metadata"]["generation"]
        assert cond["lastTransitionTime"]
    obj["metadata"]["deletionTimestamp"] = STAMP
    assert kstatus(obj) == "Terminating"


# -- TrainingJob -----------------------------------------------------------------------------------


def test_training_running_succeeded_restarting_and_failed() -> None:
    obj = _training_running()
    assert argocd_health("TrainingJob", obj) == ("Healthy", "Running")
    obj["status"]["step"] = 120
    assert argocd_health("TrainingJob", obj) == ("Healthy", "Running, step 120")

    job = training.started_job(training.training_job())
    done = training.plan(
        training.training_job({"phase": "Running"}),
        training.observed_with(job, training.pods_of(job, "Succeeded")),
    )
    succeeded = written(training.training_job({"phase": "Running", "step": 500}), done.status)
    assert argocd_health("TrainingJob", succeeded) == ("Healthy", "Succeeded at step 500")

    pods = training.pods_of(job)
    training.fail_pod(pods[1])
    restarting = training.plan(
        training.training_job({"phase": "Running", "restarts": 0}), training.observed_with(job, pods)
    )
    status, message = argocd_health(
        "TrainingJob", written(training.training_job({"phase": "Running"}), restarting.status)
    )
    assert status == "Degraded" and "exited 1" in message

    job = training.started_job(training.training_job(status={"restarts": 3}))
    pods = training.pods_of(job)
    training.fail_pod(pods[0])
    failed = training.plan(
        training.training_job({"phase": "Restarting", "restarts": 3}), training.observed_with(job, pods)
    )
    status, message = argocd_health(
        "TrainingJob", written(training.training_job({"restarts": 3}), failed.status)
    )
    assert status == "Degraded" and "maxRestarts (3)" in message


def test_training_waiting_for_its_pods_is_progressing() -> None:
    job = training.started_job(training.training_job())
    pods = training.pods_of(job)
    pods[1]["status"]["phase"] = "Pending"
    desired = training.plan(training.training_job({"phase": "Pending"}), training.observed_with(job, pods))
    status, _ = argocd_health(
        "TrainingJob", written(training.training_job({"phase": "Pending"}), desired.status)
    )
    assert status == "Progressing"


# -- ThreeFSCluster --------------------------------------------------------------------------------


def test_threefs_ready_bootstrapping_and_replacing() -> None:
    obj = _threefs_ready()
    assert argocd_health("ThreeFSCluster", obj) == ("Healthy", "2/2 chains serving")

    booting = written(threefs._cr(), threefs.plan(threefs._cr(), threefs._observed()).status)
    status, message = argocd_health("ThreeFSCluster", booting)
    assert status == "Progressing" and message.startswith("Bootstrapping")

    nodes, pods = threefs._cluster(threefs.NOW - timedelta(seconds=60))
    replacing = threefs._bootstrapped(nodes, pods, threefs._health(10002), threefs.NOW)
    status, message = argocd_health("ThreeFSCluster", written(threefs._cr(), replacing.status))
    assert status == "Degraded" and "replacing storage node 10002" in message


# -- ExpertPlacement -------------------------------------------------------------------------------


def test_a_placement_is_healthy_once_a_unit_runs_it() -> None:
    placement = {"metadata": {"name": "x-decode-3", "generation": 1}, "spec": {"generation": 3}}
    assert argocd_health("ExpertPlacement", placement) == (
        "Progressing",
        "No unit reports running generation 3 yet",
    )
    placement["status"] = {"appliedUnits": 2, "balancedness": 0.93}
    assert argocd_health("ExpertPlacement", placement) == (
        "Healthy",
        "Generation 3 runs on 2 unit(s), balancedness 0.93",
    )


# -- InferenceRoleScaler ---------------------------------------------------------------------------


def test_a_role_scaler_is_healthy_once_its_units_are_ready() -> None:
    scaler = {"metadata": {"name": "x-prefill"}, "spec": {"replicas": 2}, "status": {"replicas": 1}}
    assert argocd_health("InferenceRoleScaler", scaler) == ("Progressing", "0/2 units ready, 1 planned")
    scaler["status"] = {"replicas": 2, "readyReplicas": 2}
    assert argocd_health("InferenceRoleScaler", scaler) == ("Healthy", "2/2 units ready")


# -- the shipped files ------------------------------------------------------------------------------


def test_there_is_a_script_for_every_kind() -> None:
    assert {p.stem for p in HEALTH.glob("*.lua")} == {k.kind for k in KINDS}


def test_the_documented_argocd_cm_snippet_is_the_shipped_scripts() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
    (snippet,) = [yaml.safe_load(b) for b in blocks if "resource.customizations.health" in b]
    data = snippet["data"]
    assert data == {
        f"resource.customizations.health.fireflyer.dev_{p.stem}": p.read_text() for p in HEALTH.glob("*.lua")
    }
