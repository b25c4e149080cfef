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
from tests.unit.test_training_plan import NOW, _cond, _cr, _job_child, _nodes, _observed, _pods, _started

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
    return _cond(desired, "Preempted")


def _given_back() -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """A preemptible job that gave its nodes back: (its status, the nodes asked for, the Job)."""
    job = _started(_cr({"restarts": 1}, preemptible=True))  # attempt 1: one restart spent before
    nodes = planned_nodes(job)
    running = {"phase": "Running", "restarts": 1, "step": 40}
    desired = plan(_asked(_cr(running, preemptible=True), nodes), _observed(job, _pods(job), now=ASKED))
    status = {**desired.status, "conditions": desired.status["conditions"]}
    return status, nodes, job


def test_a_request_deletes_the_attempt_without_spending_a_restart() -> None:
    job = _started(_cr({"restarts": 1}, preemptible=True))  # attempt 1: one restart spent before
    nodes = planned_nodes(job)
    cr = _asked(_cr({"phase": "Running", "restarts": 1, "step": 40}, preemptible=True), nodes)
    desired = plan(cr, _observed(job, _pods(job), now=ASKED))
    assert desired.delete_job and not desired.persist_first and not desired.delete_pods
    assert desired.status["restarts"] == 1 and desired.status["preemptions"] == 1
    preempted = _preempted(desired)
    assert preempted["status"] == "True" and preempted["reason"] == "NodesTakenBack"
    assert preempted["message"].startswith(f"nodes taken back by {BY} (unit prefill-1) at step 40")
    assert desired.status["preemption"]["nodes"] == nodes
    assert [e.reason for e in desired.events] == ["Preempted"]
    assert "300s to checkpoint" in desired.events[0].message

    # Planned again (the deletion not seen yet): deleted again, counted and announced once.
    again = plan(_asked(_cr(desired.status, preemptible=True), nodes), _observed(job, _pods(job), now=ASKED))
    assert again.delete_job and again.status["preemptions"] == 1 and not again.events


def test_non_preemptible_jobs_and_later_attempts_ignore_a_request() -> None:
    job = _started(_cr())
    running = {"phase": "Pending", "restarts": 0}
    kept = plan(_asked(_cr(running), planned_nodes(job)), _observed(job, _pods(job), now=ASKED))
    assert not kept.delete_job and kept.status["phase"] == "Running"

    # An attempt placed after the request was placed knowing of it.
    earlier = NOW - timedelta(seconds=5)
    cr = _asked(_cr(running, preemptible=True), planned_nodes(job), at=earlier)
    later = plan(cr, _observed(job, _pods(job), now=ASKED))
    assert not later.delete_job and later.status["phase"] == "Running"


def test_the_next_attempt_keeps_off_the_nodes_asked_for() -> None:
    status, held, _ = _given_back()
    desired = plan(_cr(status, preemptible=True), _observed(None, now=ASKED + timedelta(seconds=5)))
    placed = planned_nodes(_job_child(desired))
    assert len(placed) == 2 and not set(placed) & set(held)  # whole, elsewhere
    assert desired.status["restarts"] == 1
    resumed = _preempted(desired)
    assert resumed["status"] == "False" and resumed["reason"] == "Resumed"


def test_with_only_the_nodes_asked_for_free_it_waits_until_the_requester_took_them() -> None:
    status, held, _ = _given_back()
    only_held = [n for n in _nodes() if n["metadata"]["name"] in held]
    later = ASKED + timedelta(seconds=5)

    waiting = plan(_cr(status, preemptible=True), _observed(None, nodes=only_held, now=later))
    assert not [c for c in waiting.children if c["kind"] == "Job"]
    assert "keeping" in _preempted(waiting)["message"] and _preempted(waiting)["status"] == "True"
    assert "preemption" not in waiting.status  # nothing changed: still held

    # The inference unit's pods took the nodes: the hold ends (recorded), no capacity yet.
    taken = [_gpu_pod(n, f"unit-{i}") for i, n in enumerate(held)]
    observed = _observed(None, nodes=only_held, now=later)
    observed.pods = taken
    busy = plan(_cr(status, preemptible=True), observed)
    assert busy.status["preemption"]["released"] is True
    assert "waiting for capacity" in _preempted(busy)["message"]

    # Inference scaled in again: the job resumes on the same nodes.
    released = {**status, "preemption": busy.status["preemption"]}
    back = plan(_cr(released, preemptible=True), _observed(None, nodes=only_held, now=later))
    assert sorted(planned_nodes(_job_child(back))) == sorted(held)
    assert _preempted(back)["reason"] == "Resumed" and back.status["restarts"] == 1


def test_the_hold_ends_after_the_grace_period_and_a_minute() -> None:
    status, held, _ = _given_back()
    only_held = [n for n in _nodes() if n["metadata"]["name"] in held]
    late = ASKED + timedelta(seconds=300 + 61)
    desired = plan(_cr(status, preemptible=True), _observed(None, nodes=only_held, now=late))
    assert sorted(planned_nodes(_job_child(desired))) == sorted(held)


def test_the_grace_period_reaches_the_pods_and_toggling_preemptible_restarts_nothing() -> None:
    job = _job_child(plan(_cr(terminationGracePeriodSeconds=900), _observed()))
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 900
    default = _job_child(plan(_cr(), _observed()))
    assert default["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 300
    spec = _cr()["spec"]
    from fireflyer.api.training import TrainingJobSpec

    plain = children.revision(TrainingJobSpec.model_validate(spec))
    toggled = children.revision(TrainingJobSpec.model_validate({**spec, "preemptible": True}))
    assert plain == toggled
