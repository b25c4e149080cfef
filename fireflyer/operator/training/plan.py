"""plan(spec, observed) → the children, deletions, events and status of one TrainingJob. Pure.

One attempt is one indexed Job (children.py says why). The attempt number is status.restarts,
written on the Job as an annotation, so a restarted operator tells a current Job from a stale one
and never counts a failure twice:

- no Job: place the whole job (every node at once, inside one fabric domain) and create the Job;
- a current Job whose pods all run: Running; one that completed: Succeeded (kept as it is);
- a current Job with a failure (a pod failed or exited non-zero, a node of the job is NotReady or
  gone, a pod was deleted or evicted, the pods were not all scheduled within
  placement.bindTimeoutSeconds): a whole-job restart, status.restarts + 1, written before the
  Job is deleted; after restart.maxRestarts restarts the job is Failed instead;
- a stale Job (an older attempt, or the spec changed under it): deleted with its pods (foreground),
  and the next attempt starts once nothing of the old one is left, so two attempts never run at
  once and rank 0's DNS name never points at a dying pod;
- with spec.dataPreparation, an attempt starts only once the preparation Job has succeeded
  (dataprep.py); a failed preparation fails the job;
- a preemptible job asked for its nodes back (preemption.py): the attempt is deleted without
  counting a restart, and the next one starts away from the nodes asked for until the requester
  has them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fireflyer.api import conditions as C
from fireflyer.api.base import LEVEL_RANK
from fireflyer.api.training import TrainingJob, TrainingJobSpec
from fireflyer.operator import labels as L
from fireflyer.operator.planning import Event, format_time
from fireflyer.operator.training import children, dataprep, preemption
from fireflyer.operator.training.failures import failure, job_condition, owner_uid
from fireflyer.operator.training.progress import rank0_final
from fireflyer.operator.training.teardown import teardown_deletes
from fireflyer.placement import UnitRequest, build_topology, plan_units
from fireflyer.placement.planner import CLUSTER
from fireflyer.placement.reservations import planned_nodes, reservations
from fireflyer.placement.topology import level_keys


@dataclass
class Observed:
    nodes: list[dict[str, Any]]
    pods: list[dict[str, Any]]
    """Every pod in the cluster (free capacity); may be the cache's slim copies."""
    job_pods: list[dict[str, Any]]
    """This TrainingJob's pods, whole (container statuses, owner references, pod IP)."""
    job: dict[str, Any] | None
    """The Job of this TrainingJob, if one exists."""
    others: list[dict[str, Any]] = field(default_factory=list)
    """Other gangs' StatefulSets and Jobs: their planned nodes are reserved."""
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    noted: dict[str, str] = field(default_factory=dict)
    """Job uid → a failure seen in a pod event (the pod itself may be gone already)."""
    preparation: dict[str, Any] | None = None
    """The data preparation Job, if one exists."""
    preparation_pods: list[dict[str, Any]] = field(default_factory=list)
    """Its pods (their termination messages say how the preparation ended)."""


@dataclass
class Desired:
    children: list[dict[str, Any]]
    """Applied with server-side apply: the Service always, the Job when an attempt starts."""
    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    delete_job: bool = False
    """Delete the Job and its pods (foreground): a whole-job restart or a stale attempt."""
    delete_pods: dict[str, int | None] = field(default_factory=dict)
    """Pod name → grace seconds of its deletion: 0 where its node is gone or NotReady (no kubelet
    will confirm), FAILED_ATTEMPT_GRACE_SECONDS (teardown) for a failed attempt's survivors, None for the
    pod's own terminationGracePeriodSeconds."""
    suspend_job: bool = False
    """Stop the Job's remaining pods: the job Failed for good."""
    persist_first: bool = False
    """Patch the status before anything is deleted, so that a restart is counted exactly once."""
    delete_preparation: bool = False
    """Delete the data preparation Job and its pod: dataPreparation changed."""


def _conditions(
    placed: tuple[bool, str, str],
    ready: tuple[bool, str, str],
    progressing: tuple[bool, str, str],
    degraded: tuple[bool, str, str],
) -> list[dict[str, Any]]:
    return [
        C.condition(C.PLACED, *placed),
        C.condition(C.READY, *ready),
        C.condition(C.PROGRESSING, *progressing),
        C.condition(C.DEGRADED, *degraded),
    ]


HEALTHY = (False, C.HEALTHY, "")


def _placed_from_job(
    spec: TrainingJobSpec, job: dict[str, Any]
) -> tuple[tuple[bool, str, str], dict[str, Any]]:
    """The Placed condition and status fields of an attempt that exists."""
    nodes = planned_nodes(job)
    domain = (job["metadata"].get("annotations") or {}).get(L.PLACED_DOMAIN, "")
    level = domain.split("/", 1)[0]
    preferred = spec.placement.preferred_level
    above = bool(preferred and level in LEVEL_RANK and LEVEL_RANK[level] > LEVEL_RANK[preferred])
    reason = C.PLACED_ABOVE_PREFERRED_LEVEL if above else C.UNITS_PLACED
    return (True, reason, f"{len(nodes)} nodes in {domain}: {', '.join(nodes)}"), {
        "nodes": nodes,
        "domain": domain,
    }


def finished(cr: dict[str, Any]) -> bool:
    """A Succeeded job keeps its status and pods; a Failed one stays Failed until
    restart.maxRestarts is raised above status.restarts. Nothing needs observing for either."""
    status = cr.get("status") or {}
    if status.get("phase") == "Succeeded":
        return True
    if _ready_reason(status) == dataprep.DATA_PREPARATION_FAILED:
        return False  # a fixed dataPreparation replaces the failed Job: keep watching
    max_restarts = TrainingJob.model_validate(cr).spec.restart.max_restarts
    return status.get("phase") == "Failed" and int(status.get("restarts") or 0) >= max_restarts


def _ready_reason(status: dict[str, Any]) -> str:
    ready: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == C.READY), {})
    return str(ready.get("reason") or "")


def plan(cr: dict[str, Any], observed: Observed) -> Desired:
    spec: TrainingJobSpec = TrainingJob.model_validate(cr).spec
    previous = cr.get("status") or {}
    restarts = int(previous.get("restarts") or 0)
    max_restarts = spec.restart.max_restarts
    phase_before = previous.get("phase") or ""
    nodes = {n["metadata"]["name"]: n for n in observed.nodes}
    service = children.headless_service(cr)
    want = spec.nodes
    job = observed.job

    if finished(cr):
        return _terminal(previous, phase_before)

    attempt = int((job or {}).get("metadata", {}).get("annotations", {}).get(children.ATTEMPT_ANNOTATION, -1))
    stale_revision = job is not None and (job["metadata"].get("labels") or {}).get(
        L.REVISION
    ) != children.revision(spec)
    if job is not None and (
        job["metadata"].get("deletionTimestamp") or attempt != restarts or stale_revision
    ):
        return _tear_down(cr, spec, job, observed, nodes, restarts, previous)
    request = preemption.read_request(cr)
    if job is not None and not job_condition(job, "Complete") and preemption.applies(spec, request, job):
        assert request is not None
        status, events = preemption.give_back(spec, request, previous, restarts)
        return Desired([service], status, events, delete_job=True)

    if job is None:
        leftovers = observed.job_pods
        if leftovers:  # pods of an earlier attempt are still going away: never two attempts at once
            delete = teardown_deletes(leftovers, nodes, restarts)
            message = f"{len(leftovers)} pods of the previous attempt are still terminating"
            return Desired([service], _waiting(restarts, want, message), delete_pods=delete)
        if spec.data_preparation is not None:
            return _prepare_then_start(cr, spec, observed, restarts, service, previous)
        return _start(cr, spec, observed, restarts, service)

    # The current attempt.
    uid = job["metadata"].get("uid")
    pods = [p for p in observed.job_pods if owner_uid(p) == uid]
    placed, where = _placed_from_job(spec, job)
    succeeded = sum(1 for p in pods if p.get("status", {}).get("phase") == "Succeeded")
    if job_condition(job, "Complete") or succeeded >= want:
        events = (
            []
            if phase_before == "Succeeded"
            else [Event("Normal", C.JOB_SUCCEEDED, f"all {want} pods completed")]
        )
        status = {
            "phase": "Succeeded",
            "restarts": restarts,
            "ready": f"{want}/{want}",
            **rank0_final(pods),
            **where,
            "conditions": _conditions(
                placed,
                (True, C.JOB_SUCCEEDED, f"all {want} pods completed"),
                (False, C.JOB_SUCCEEDED, ""),
                HEALTHY,
            ),
        }
        return Desired([service], status, events)

    cause, lost = failure(spec, job, pods, nodes, observed.now, observed.noted.get(str(uid), ""))
    if cause:
        force: dict[str, int | None] = {p: 0 for p in sorted(lost)}
        if restarts < max_restarts:
            message = f"restart {restarts + 1}/{max_restarts}: {cause}"
            status = {
                "phase": "Restarting",
                "restarts": restarts + 1,
                "lastFailure": cause,
                "ready": f"0/{want}",
                **where,
                "conditions": _conditions(
                    (False, C.JOB_RESTARTED, "the failed attempt is being torn down"),
                    (False, C.JOB_RESTARTED, message),
                    (True, C.JOB_RESTARTED, message),
                    (True, C.JOB_RESTARTED, message),
                ),
            }
            event = Event("Warning", C.JOB_RESTARTED, message)
            return Desired(
                [service],
                status,
                [event],
                delete_job=True,
                # The survivors end within seconds; counted as restart restarts + 1 from now on.
                delete_pods={**teardown_deletes(pods, nodes, restarts + 1), **force},
                persist_first=True,
            )
        message = (
            f"{cause}; restart.maxRestarts ({max_restarts}) reached: raise it above {restarts} to "
            "run again (the job resumes from its latest checkpoint with restart.resume: latest)"
        )
        status = {
            "phase": "Failed",
            "restarts": restarts,
            "lastFailure": cause,
            "ready": f"{_running(pods)}/{want}",
            **where,
            "conditions": _conditions(
                placed,
                (False, C.MAX_RESTARTS_EXCEEDED, message),
                (False, C.MAX_RESTARTS_EXCEEDED, message),
                (True, C.MAX_RESTARTS_EXCEEDED, message),
            ),
        }
        events = [] if phase_before == "Failed" else [Event("Warning", C.JOB_FAILED, message)]
        done = job_condition(job, "Complete") or job_condition(job, "Failed")
        suspend = not done and not job.get("spec", {}).get("suspend")
        return Desired([service], status, events, delete_pods=force, suspend_job=suspend)

    running = _running(pods) + succeeded
    if running >= want:
        status = {
            "phase": "Running",
            "restarts": restarts,
            "ready": f"{running}/{want}",
            **where,
            "conditions": _conditions(
                placed,
                (True, C.JOB_RUNNING, f"{running}/{want} pods running"),
                (False, C.RECONCILED, ""),
                HEALTHY,
            ),
        }
        return Desired([service], status)
    message = f"{running}/{want} pods running"
    status = {
        "phase": "Restarting" if restarts else "Pending",
        "restarts": restarts,
        "ready": f"{running}/{want}",
        **where,
        "conditions": _conditions(
            placed, (False, C.PODS_STARTING, message), (True, C.PODS_STARTING, message), HEALTHY
        ),
    }
    return Desired([service], status)


def _running(pods: list[dict[str, Any]]) -> int:
    return sum(
        1
        for p in pods
        if p.get("status", {}).get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    )


def _terminal(previous: dict[str, Any], phase: str) -> Desired:
    """Nothing more to do: the status as it stands, with its conditions kept."""
    keep: dict[str, Any] = {
        k: previous[k]
        for k in ("phase", "restarts", "ready", "lastFailure", "nodes", "domain")
        if k in previous
    }
    conditions = [
        c
        for c in previous.get("conditions") or []
        if c.get("type") in (C.PLACED, C.READY, C.PROGRESSING, C.DEGRADED)
    ]
    if not conditions:
        ok = phase == "Succeeded"
        reason = C.JOB_SUCCEEDED if ok else C.MAX_RESTARTS_EXCEEDED
        conditions = _conditions(
            (True, C.UNITS_PLACED, ""),
            (ok, reason, ""),
            (False, reason, ""),
            (not ok, reason, previous.get("lastFailure", "")),
        )
    strip = ("lastTransitionTime", "observedGeneration")
    keep["conditions"] = [{k: v for k, v in c.items() if k not in strip} for c in conditions]
    return Desired([], keep)


def _waiting(restarts: int, want: int, message: str) -> dict[str, Any]:
    return {
        "phase": "Restarting" if restarts else "Pending",
        "restarts": restarts,
        "ready": f"0/{want}",
        "conditions": _conditions(
            (False, C.JOB_RECREATED, message),
            (False, C.JOB_RECREATED, message),
            (True, C.JOB_RECREATED, message),
            HEALTHY,
        ),
    }


def _tear_down(
    cr: dict[str, Any],
    spec: TrainingJobSpec,
    job: dict[str, Any],
    observed: Observed,
    nodes: dict[str, dict[str, Any]],
    restarts: int,
    previous: dict[str, Any],
) -> Desired:
    """A stale attempt: delete it (once), its pods on lost nodes at once and a failed attempt's
    survivors with a short grace; wait."""
    uid = job["metadata"].get("uid")
    pods = [p for p in observed.job_pods if owner_uid(p) == uid]
    # The Job's deletion ends the other pods with their own grace (a spec change: they checkpoint).
    deletes: dict[str, int | None] = {
        name: grace for name, grace in teardown_deletes(pods, nodes, restarts).items() if grace is not None
    }
    events = []
    deleting = bool(job["metadata"].get("deletionTimestamp"))
    attempt = (job["metadata"].get("annotations") or {}).get(children.ATTEMPT_ANNOTATION)
    if not deleting and attempt == str(restarts):
        events.append(Event("Normal", C.JOB_RECREATED, "the spec changed; recreating the pods"))
    message = f"the previous attempt is being torn down ({len(pods)} pods left)"
    status = _waiting(restarts, spec.nodes, message)
    if restarts and previous.get("lastFailure") and attempt != str(restarts):
        status["conditions"][3] = C.condition(C.DEGRADED, True, C.JOB_RESTARTED, previous["lastFailure"])
    return Desired(
        [children.headless_service(cr)],
        status,
        events,
        delete_job=not deleting,
        delete_pods=deletes,
    )


def _start(
    cr: dict[str, Any],
    spec: TrainingJobSpec,
    observed: Observed,
    restarts: int,
    service: dict[str, Any],
) -> Desired:
    """No attempt exists: place every node of the job at once and create the attempt's Job."""
    name = cr["metadata"]["name"]
    given_back = preemption.waiting_since(cr.get("status") or {})
    topology = build_topology(
        observed.nodes,
        observed.pods,
        spec.placement.topology_profile,
        spec.network.rdma_resource,
        spec.placement.custom_level_keys,
        ignore_pods={L.TRAINING_JOB: children.label_value(name)},
        ignore_namespace=cr["metadata"]["namespace"],
        reserved=reservations(observed.others, observed.pods, spec.network.rdma_resource),
        node_selector=spec.placement.node_selector,
        tolerates=lambda taint: any(t.tolerates(taint) for t in spec.placement.tolerations),
    )
    held, released = preemption.held_nodes(
        given_back, topology, spec.termination_grace_period_seconds, observed.now
    )
    extra: dict[str, Any] = {}
    if given_back is not None and released:
        given_back["released"] = True
        extra["preemption"] = given_back
    request = UnitRequest("train", 0, spec.nodes, spec.gpus_per_node, spec.network.rdma_per_pod)
    placement = plan_units(
        [request],
        preemption.without(topology, held),
        spec.placement.required_level,
        spec.placement.preferred_level,
        False,
    )
    want = spec.nodes
    phase = "Restarting" if restarts else "Pending"
    if not placement.placed:
        why = "; ".join(w for _, w in placement.unplaced)
        status = {
            "phase": phase,
            "restarts": restarts,
            "ready": f"0/{want}",
            **extra,
            "conditions": _conditions(
                (False, C.INSUFFICIENT_CAPACITY, why),
                (False, C.INSUFFICIENT_CAPACITY, "waiting for capacity"),
                (False, C.INSUFFICIENT_CAPACITY, why),
                (True, C.INSUFFICIENT_CAPACITY, why),
            ),
        }
        if given_back is not None:
            waiting = f"keeping {', '.join(held)} free until it has them" if held else "waiting for capacity"
            status["conditions"].append(preemption.preempted(given_back, waiting))
        return Desired([service], status)
    p = placement.placed[0]
    keys = level_keys(spec.placement.topology_profile, spec.placement.custom_level_keys)
    label_key = keys.get(p.level, "") if p.level != CLUSTER else ""
    node_objs = [n for n in observed.nodes if n["metadata"]["name"] in p.nodes]
    job = children.job(
        cr, spec, restarts, p.nodes, (p.level, label_key, p.domain), format_time(observed.now), node_objs
    )
    where = "the whole cluster" if p.level == CLUSTER else f"{p.level} {p.domain}"
    message = f"attempt {restarts}: {want} nodes in {where}: {', '.join(p.nodes)}"
    reason = C.PLACED_ABOVE_PREFERRED_LEVEL if placement.notes else C.UNITS_PLACED
    status = {
        "phase": phase,
        "restarts": restarts,
        "ready": f"0/{want}",
        "nodes": list(p.nodes),
        "domain": f"{p.level}/{p.domain}",
        "conditions": _conditions(
            (True, reason, "; ".join([message, *placement.notes])),
            (False, C.PODS_STARTING, f"0/{want} pods running"),
            (True, C.PODS_STARTING, "the job's pods are starting"),
            HEALTHY,
        ),
    }
    if given_back is not None:
        status["conditions"].append(preemption.resumed(given_back))
        if not given_back.get("released"):
            status["preemption"] = {**given_back, "released": True}
    return Desired([service, job], status, [Event("Normal", C.UNITS_PLACED, message)])


def _prepare_then_start(
    cr: dict[str, Any],
    spec: TrainingJobSpec,
    observed: Observed,
    restarts: int,
    service: dict[str, Any],
    previous: dict[str, Any],
) -> Desired:
    """No attempt exists and the job prepares its data: start the attempt once the preparation
    Job has succeeded; until then it runs (or is replaced); when it failed, the job is Failed."""
    prepared, events, prep_children, replace = dataprep.gate(
        cr, spec, observed.preparation, observed.preparation_pods, previous
    )
    want = spec.nodes
    if prepared["status"] == "True":
        desired = _start(cr, spec, observed, restarts, service)
        desired.status["conditions"].append(prepared)
        desired.events[:0] = events
        return desired
    if prepared["reason"] == dataprep.FAILED:
        cause = f"data preparation failed: {prepared['message']}"
        failed = (False, dataprep.DATA_PREPARATION_FAILED, cause)
        status = {
            "phase": "Failed",
            "restarts": restarts,
            "lastFailure": cause,
            "ready": f"0/{want}",
            "conditions": [
                *_conditions(failed, failed, failed, (True, dataprep.DATA_PREPARATION_FAILED, cause)),
                prepared,
            ],
        }
        return Desired([service], status, events)
    waiting = (False, dataprep.PREPARING_DATA, prepared["message"])
    status = {
        "phase": "Restarting" if restarts else "Pending",
        "restarts": restarts,
        "ready": f"0/{want}",
        "conditions": [
            *_conditions(waiting, waiting, (True, dataprep.PREPARING_DATA, prepared["message"]), HEALTHY),
            prepared,
        ],
    }
    return Desired([service, *prep_children], status, events, delete_preparation=replace)
