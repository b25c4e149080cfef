"""The operator's metrics: recreation reasons and unit states read from what the real inference
plan decides, status gauges of every kind, and the reconcile and plan timers."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from fireflyer.operator import metrics, object_metrics
from fireflyer.operator.inference import reasons as R
from fireflyer.operator.inference.plan import Desired, Observed, plan
from fireflyer.operator.planning import Event
from tests.unit.test_inference_plan import NOW, _cr, _nodes, _placed, _pods


def _running(
    sets: dict[str, dict[str, Any]], broken: str | None = None, **change: Any
) -> list[dict[str, Any]]:
    """Every unit's pods, running for 30 minutes; `broken`'s first pod gets `change` in its status."""
    pods: list[dict[str, Any]] = []
    for name, sts in sets.items():
        unit = _pods(sts, NOW - timedelta(minutes=30))
        if name == broken:
            unit[0]["status"].update(change)
        pods += unit
    return pods


def _decode(sets: dict[str, dict[str, Any]]) -> str:
    return next(n for n in sets if "decode" in n)


def _plan(cr: dict[str, Any], sets: dict[str, Any], pods: list[dict[str, Any]], **more: Any) -> Desired:
    nodes = more.pop("nodes", None) or _nodes()
    return plan(cr, Observed(nodes=nodes, pods=pods, statefulsets=sets, router=None, now=NOW, **more))


def _reasons(desired: Desired) -> dict[str, str]:
    preflight = {e.message.split(":")[0] for e in desired.events if e.reason == R.PREFLIGHT_FAILED}
    return {u: metrics.recreation_reason(why, u in preflight) for u, why in desired.recreate.items()}


def _units(desired: Desired, cr: dict[str, Any]) -> dict[tuple[str, str], float]:
    samples = object_metrics.inference_samples(cr, desired.status, desired.recreate)
    return {(s.labels[2], s.labels[3]): s.value for s in samples if s.name == "fireflyer_inference_units"}


def test_a_healthy_deployment_counts_every_unit_ready_and_no_recreation() -> None:
    cr, sets = _placed()
    desired = _plan(cr, sets, _running(sets))
    assert desired.recreate == {}
    units = _units(desired, cr)
    assert units[("decode", "ready")] == 1 and units[("prefill", "ready")] == 1
    assert sum(units.values()) == 2


def test_a_failed_pod_is_a_pod_failed_recreation_and_its_unit_recreating() -> None:
    cr, sets = _placed()
    decode = _decode(sets)
    desired = _plan(cr, sets, _running(sets, decode, phase="Failed"))
    assert _reasons(desired) == {decode: "pod_failed"}
    units = _units(desired, cr)
    assert units[("decode", "recreating")] == 1 and units[("decode", "ready")] == 0
    assert units[("prefill", "ready")] == 1


def test_a_pod_replaced_alone_is_a_pod_failed_recreation() -> None:
    cr, sets = _placed()
    decode = _decode(sets)
    pods = _running(sets)
    mine = [p for p in pods if p["metadata"]["name"].startswith(decode)]
    mine[-1]["metadata"]["creationTimestamp"] = (NOW - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert _reasons(_plan(cr, sets, pods)) == {decode: "pod_failed"}


def test_a_node_gone_not_ready_is_a_node_unusable_recreation() -> None:
    cr, sets = _placed()
    decode = _decode(sets)
    pods = _running(sets)
    node = next(p["spec"]["nodeName"] for p in pods if p["metadata"]["name"].startswith(decode))
    nodes = _nodes()
    for n in nodes:
        if n["metadata"]["name"] == node:
            n["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    assert _reasons(_plan(cr, sets, pods, nodes=nodes))[decode] == "node_unusable"


def test_pods_that_never_ran_are_a_bind_timeout_recreation() -> None:
    cr, sets = _placed()
    decode = _decode(sets)
    pods = _running(sets)
    for pod in pods:
        if pod["metadata"]["name"].startswith(decode):
            pod["metadata"]["creationTimestamp"] = (NOW - timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
            pod["status"] = {"phase": "Pending"}
    assert _reasons(_plan(cr, sets, pods)) == {decode: "bind_timeout"}


def test_a_pod_deleted_by_someone_else_is_a_pod_deleted_recreation() -> None:
    cr, sets = _placed()
    decode = _decode(sets)
    # What the controller remembers from the pod's DELETED event (controller._note_pod_failure).
    failed = {decode: f"pod {decode}-0 was deleted"}
    assert _reasons(_plan(cr, sets, _running(sets), failed_units=failed)) == {decode: "pod_deleted"}


def test_a_failed_preflight_is_a_preflight_failed_recreation() -> None:
    cr, sets = _placed()
    decode = _decode(sets)
    pods = _running(sets)
    for i, pod in enumerate(pods):
        pod["metadata"]["uid"] = f"uid-{i}"
    uid = next(p["metadata"]["uid"] for p in pods if p["metadata"]["name"].startswith(decode))
    desired = _plan(cr, sets, pods, preflight_failures={uid: "preflight failed: all-to-all timed out"})
    assert _reasons(desired) == {decode: "preflight_failed"}


def test_a_new_revision_is_a_rollout_recreation() -> None:
    cr, sets = _placed()
    decode = _decode(sets)
    pods = _running(sets)
    cr["spec"]["decode"]["dispatchMode"] = "normal"  # a new revision of the decode units
    assert _reasons(_plan(cr, sets, pods)) == {decode: "rollout"}


def test_units_that_do_not_fit_are_unplaced() -> None:
    cr = _cr()
    cr["spec"]["decode"]["units"] = 40
    desired = plan(cr, Observed(nodes=_nodes(), pods=[], statefulsets={}, router=None, now=NOW))
    units = _units(desired, cr)
    assert units[("decode", "unplaced")] > 0
    assert units[("decode", "placed_not_ready")] + units[("decode", "unplaced")] == 40
    desired_units = [
        s.value
        for s in object_metrics.inference_samples(cr, desired.status, desired.recreate)
        if s.name == "fireflyer_inference_units_desired" and s.labels[2] == "decode"
    ]
    assert desired_units == [40]


@pytest.mark.parametrize(
    ("why", "reason"),
    [
        ("placement moved to leaf l1", "other"),
        ("no longer fits the cluster", "other"),
        ("pods of two revisions in one unit", "rollout"),
    ],
)
def test_other_plan_reasons_map_to_a_bounded_label(why: str, reason: str) -> None:
    assert metrics.recreation_reason(why) == reason
    assert reason in metrics.RECREATION_REASONS


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_recreation_counts_once_when_its_pods_are_deleted_not_while_they_terminate() -> None:
    cr, sets = _placed()
    decode = _decode(sets)
    cr["metadata"]["name"] = "metrics-once"  # series of their own
    pods = _pods(sets[decode], NOW)
    labels = {"namespace": "ns", "deployment": "metrics-once", "role": "decode", "reason": "pod_failed"}
    before = _value("fireflyer_unit_recreations_total", **labels)
    assert metrics.unit_recreated(cr, decode, f"pod {decode}-0 failed", [], pods)
    for pod in pods:
        pod["metadata"]["deletionTimestamp"] = "2026-12-01T12:00:00Z"
    assert not metrics.unit_recreated(cr, decode, f"pod {decode}-0 failed", [], pods)
    assert _value("fireflyer_unit_recreations_total", **labels) == before + 1


def test_a_recreation_with_a_preflight_event_is_labelled_preflight_failed() -> None:
    cr, sets = _placed()
    decode = _decode(sets)
    cr["metadata"]["name"] = "metrics-preflight"
    event = Event("Warning", R.PREFLIGHT_FAILED, f"{decode}: preflight failed: x; recreating it")
    assert metrics.unit_recreated(cr, decode, "preflight failed: x", [event], _pods(sets[decode], NOW))
    labels = {"namespace": "ns", "deployment": "metrics-preflight", "role": "decode"}
    assert _value("fireflyer_unit_recreations_total", **labels, reason="preflight_failed") == 1


def test_timed_counts_outcomes_and_leaves_nothing_in_flight() -> None:
    @metrics.timed("TestKind")
    def fails() -> None:
        assert _value("fireflyer_reconciles_in_flight", kind="TestKind") == 1
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fails()
    assert _value("fireflyer_reconcile_total", kind="TestKind", outcome="error") == 1
    assert _value("fireflyer_reconciles_in_flight", kind="TestKind") == 0
    assert metrics.timed_plan("TestKind", lambda cr, observed: cr + observed, 1, 2) == 3
    assert _value("fireflyer_plan_duration_seconds_count", kind="TestKind") == 1


def test_an_eplb_decision_sets_measured_predicted_and_generation() -> None:
    metrics.eplb_decision("ns", "metrics-eplb", "decode", 0.6, 0.9, 3)
    labels = {"namespace": "ns", "deployment": "metrics-eplb", "role": "decode"}
    assert _value("fireflyer_eplb_collections_total", **labels) == 1
    assert _value("fireflyer_eplb_measured_balancedness", **labels) == 0.6
    assert _value("fireflyer_eplb_predicted_balancedness", **labels) == 0.9
    assert _value("fireflyer_eplb_placement_generation", **labels) == 3


def _meta(name: str) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name}}


def test_training_samples_follow_the_status_and_omit_what_is_not_reported() -> None:
    status = {
        "phase": "Running",
        "restarts": 2,
        "ready": "3/4",
        "step": 120,
        "loss": 2.5,
        "conditions": [{"type": "Ready", "status": "True"}, {"type": "Degraded", "status": "False"}],
    }
    got = {(s.name, s.labels[2:]): s.value for s in object_metrics.training_samples(_meta("tj"), status)}
    assert got[("fireflyer_trainingjob_phase", ("Running",))] == 1
    assert got[("fireflyer_trainingjob_phase", ("Failed",))] == 0
    assert got[("fireflyer_trainingjob_restarts", ())] == 2
    assert got[("fireflyer_trainingjob_step", ())] == 120 and got[("fireflyer_trainingjob_loss", ())] == 2.5
    assert got[("fireflyer_trainingjob_nodes_running", ())] == 3
    assert got[("fireflyer_trainingjob_nodes_desired", ())] == 4
    assert got[("fireflyer_ready", ("tj",))] == 1 and got[("fireflyer_degraded", ("tj",))] == 0
    assert ("fireflyer_trainingjob_last_checkpoint_step", ()) not in got  # none written yet


def test_threefs_samples_count_chains_and_targets_by_bounded_state() -> None:
    status = {
        "phase": "Degraded",
        "chains": {"total": 4, "serving": 3, "degraded": 1},
        "targets": {"serving": 7, "offline": 1, "brand-new-state": 2},
        "usedBytes": 1024,
        "storageReady": "2/3",
        "replacementsCompleted": 1,
    }
    got = {(s.name, s.labels[2:]): s.value for s in object_metrics.threefs_samples(_meta("fs"), status)}
    assert got[("fireflyer_threefs_chains", ("serving",))] == 3
    assert got[("fireflyer_threefs_chains", ("degraded",))] == 1
    assert got[("fireflyer_threefs_targets", ("serving",))] == 7
    assert got[("fireflyer_threefs_targets", ("syncing",))] == 0
    assert got[("fireflyer_threefs_targets", ("other",))] == 2
    assert got[("fireflyer_threefs_phase", ("Degraded",))] == 1
    assert got[("fireflyer_threefs_storage_nodes_ready", ())] == 2
    assert got[("fireflyer_threefs_used_bytes", ())] == 1024
    before_check = object_metrics.threefs_samples(_meta("fs"), {"phase": "Bootstrapping"})
    assert not [
        s for s in before_check if s.name in ("fireflyer_threefs_chains", "fireflyer_threefs_targets")
    ]


def test_the_collector_exports_every_family_and_forgets_objects_not_refreshed() -> None:
    now = [0.0]
    gauges = object_metrics.ObjectGauges(clock=lambda: now[0], stale_seconds=60)
    registry = CollectorRegistry()
    registry.register(gauges)
    names = {m.name for m in registry.collect()}
    assert {"fireflyer_threefs_chains", "fireflyer_trainingjob_restarts"} <= names  # empty families too
    gauges.put("TrainingJob", _meta("tj"), object_metrics.training_samples(_meta("tj"), {"restarts": 1}))
    assert (
        registry.get_sample_value("fireflyer_trainingjob_restarts_total", {"namespace": "ns", "job": "tj"})
        == 1
    )
    now[0] = 61
    assert (
        registry.get_sample_value("fireflyer_trainingjob_restarts_total", {"namespace": "ns", "job": "tj"})
        is None
    )


def test_a_reconcile_hook_merges_the_status_other_writers_keep() -> None:
    """The training plan's status lacks the polled progress: the hook keeps it from the object."""
    cr = {**_meta("hooked"), "status": {"step": 7, "phase": "Running"}}

    class Planned:
        status = {"phase": "Running", "restarts": 0}

    object_metrics.training(cr, Planned())
    assert REGISTRY.get_sample_value("fireflyer_trainingjob_step", {"namespace": "ns", "job": "hooked"}) == 7


def test_the_inference_hook_exports_a_real_plans_units() -> None:
    cr, sets = _placed()
    cr["metadata"]["name"] = "hooked-infd"
    desired = _plan(cr, sets, [])  # placed, no pods yet
    object_metrics.inference(cr, desired)
    labels = {"namespace": "ns", "deployment": "hooked-infd", "role": "decode", "state": "placed_not_ready"}
    assert REGISTRY.get_sample_value("fireflyer_inference_units", labels) == 1
    ready = {"kind": "InferenceDeployment", "namespace": "ns", "name": "hooked-infd"}
    assert REGISTRY.get_sample_value("fireflyer_ready", ready) == 0
