"""A preemptible TrainingJob asked for its nodes back (pure plan): the attempt is deleted without
spending a restart, the job keeps off the nodes until the requester has them, then resumes."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from fireflyer.api.training import PREEMPTION_REQUESTED
from fireflyer.operator.planning import format_time
from fireflyer.operator.training import children
from fireflyer.operator.training.plan import Desired, plan
from fireflyer.placement.reservations import planned_nodes
from tests.unit.training_plan_harness import (
    NOW,
    condition_of,
    job_child,
    observed_with,
    pods_of,
    small_nodes,
    started_job,
    training_job,
)

ASKED = NOW + timedelta(seconds=30)
BY = "serving/deepseek-v3"


def _asked(cr: dict[str, Any], nodes: list[str], at: Any = ASKED) -> dict[str, Any]:
    request = {"at": format_time(at), "by": BY, "unit": "prefill-1", "nodes": nodes}
    cr["metadata"]["annotations"] = {PREEMPTION_REQUESTED: json.dumps(request)}
    return cr


def _gpu_pod(node: str, name: str) -> dict[str, Any]:
    """A pod of someone else using all 8 GPUs of `node`."""
    return {
        "metadata": {"name": name, "namespace": "serving", "labels": {"app": "x"}},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "c", "resources": {"requests": {"nvidia.com/gpu": "8"}}}],
        },
        "status": {"phase": "Running"},
    }


def _preempted(desired: Desired) -> dict[str, Any]:
    return condition_of(desired, "Preempted")


def _given_back() -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """A preemptible job that gave its nodes back: (its status, the nodes asked for, the Job)."""
    job = started_job(training_job({"restarts": 1}, preemptible=True))  # attempt 1: one restart spent before
    nodes = planned_nodes(job)
    running = {"phase": "Running", "restarts": 1, "step": 40}
    desired = plan(
        _asked(training_job(running, preemptible=True), nodes), observed_with(job, pods_of(job), now=ASKED)
    )
    status = {**desired.status, "conditions": desired.status["conditions"]}
    return status, nodes, job


def test_a_request_deletes_the_attempt_without_spending_a_restart() -> None:
    job = started_job(training_job({"restarts": 1}, preemptible=True))  # attempt 1: one restart spent before
    nodes = planned_nodes(job)
    cr = _asked(training_job({"phase": "Running", "restarts": 1, "step": 40}, preemptible=True), nodes)
    desired = plan(cr, observed_with(job, pods_of(job), now=ASKED))
    assert desired.delete_job and not desired.persist_first and not desired.delete_pods
    assert desired.status["restarts"] == 1 and desired.status["preemptions"] == 1
    preempted = _preempted(desired)
    assert preempted["status"] == "True" and preempted["reason"] == "NodesTakenBack"
    assert preempted["message"].startswith(f"nodes taken back by {BY} (unit prefill-1) at step 40")
    assert desired.status["preemption"]["nodes"] == nodes
    assert [e.reason for e in desired.events] == ["Preempted"]
    assert "300s to checkpoint" in desired.events[0].message

    # Planned again (the deletion not seen yet): deleted again, counted and announced once.
    again = plan(
        _asked(training_job(desired.status, preemptible=True), nodes),
        observed_with(job, pods_of(job), now=ASKED),
    )
    assert again.delete_job and again.status["preemptions"] == 1 and not again.events


def test_non_preemptible_jobs_and_later_attempts_ignore_a_request() -> None:
    job = started_job(training_job())
    running = {"phase": "Pending", "restarts": 0}
    kept = plan(
        _asked(training_job(running), planned_nodes(job)), observed_with(job, pods_of(job), now=ASKED)
    )
    assert not kept.delete_job and kept.status["phase"] == "Running"

    # An attempt placed after the request was placed knowing of it.
    earlier = NOW - timedelta(seconds=5)
    cr = _asked(training_job(running, preemptible=True), planned_nodes(job), at=earlier)
    later = plan(cr, observed_with(job, pods_of(job), now=ASKED))
    assert not later.delete_job and later.status["phase"] == "Running"


def test_the_next_attempt_keeps_off_the_nodes_asked_for() -> None:
    status, held, _ = _given_back()
    desired = plan(
        training_job(status, preemptible=True), observed_with(None, now=ASKED + timedelta(seconds=5))
    )
    placed = planned_nodes(job_child(desired))
    assert len(placed) == 2 and not set(placed) & set(held)  # whole, elsewhere
    assert desired.status["restarts"] == 1
    resumed = _preempted(desired)
    assert resumed["status"] == "False" and resumed["reason"] == "Resumed"


def test_with_only_the_nodes_asked_for_free_it_waits_until_the_requester_took_them() -> None:
    status, held, _ = _given_back()
    only_held = [n for n in small_nodes() if n["metadata"]["name"] in held]
    later = ASKED + timedelta(seconds=5)

    waiting = plan(training_job(status, preemptible=True), observed_with(None, nodes=only_held, now=later))
    assert not [c for c in waiting.children if c["kind"] == "Job"]
    assert "keeping" in _preempted(waiting)["message"] and _preempted(waiting)["status"] == "True"
    assert "preemption" not in waiting.status  # nothing changed: still held

    # The inference unit's pods took the nodes: the hold ends (recorded), no capacity yet.
    taken = [_gpu_pod(n, f"unit-{i}") for i, n in enumerate(held)]
    observed = observed_with(None, nodes=only_held, now=later)
    observed.pods = taken
    busy = plan(training_job(status, preemptible=True), observed)
    assert busy.status["preemption"]["released"] is True
    assert "waiting for capacity" in _preempted(busy)["message"]

    # Inference scaled in again: the job resumes on the same nodes.
    released = {**status, "preemption": busy.status["preemption"]}
    back = plan(training_job(released, preemptible=True), observed_with(None, nodes=only_held, now=later))
    assert sorted(planned_nodes(job_child(back))) == sorted(held)
    assert _preempted(back)["reason"] == "Resumed" and back.status["restarts"] == 1


def test_the_hold_ends_after_the_grace_period_and_a_minute() -> None:
    status, held, _ = _given_back()
    only_held = [n for n in small_nodes() if n["metadata"]["name"] in held]
    late = ASKED + timedelta(seconds=300 + 61)
    desired = plan(training_job(status, preemptible=True), observed_with(None, nodes=only_held, now=late))
    assert sorted(planned_nodes(job_child(desired))) == sorted(held)


def test_the_grace_period_reaches_the_pods_and_toggling_preemptible_restarts_nothing() -> None:
    job = job_child(plan(training_job(terminationGracePeriodSeconds=900), observed_with()))
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 900
    default = job_child(plan(training_job(), observed_with()))
    assert default["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 300
    spec = training_job()["spec"]
    from fireflyer.api.training import TrainingJobSpec

    plain = children.revision(TrainingJobSpec.model_validate(spec))
    toggled = children.revision(TrainingJobSpec.model_validate({**spec, "preemptible": True}))
    assert plain == toggled
