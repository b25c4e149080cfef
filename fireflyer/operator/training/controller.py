"""observe → plan → apply → status for one TrainingJob, its kopf handlers, and the timer that
reads the trainer's progress from rank 0."""

from __future__ import annotations

import json
import logging
import urllib.request
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from fireflyer.api import conditions as C
from fireflyer.api.base import GROUP, VERSION
from fireflyer.api.training import TrainingJob
from fireflyer.operator import cache, events, kube, metrics, object_metrics, status_writes
from fireflyer.operator import labels as L
from fireflyer.operator.debounce import Debouncer
from fireflyer.operator.locks import PLACEMENT
from fireflyer.operator.metrics import timed
from fireflyer.operator.resync import Resync
from fireflyer.operator.training import children, dataprep
from fireflyer.operator.training.plan import Desired, Observed, finished, plan
from fireflyer.operator.training.progress import progress_changes, rank0_address

KIND = "TrainingJob"
PLURAL = "trainingjobs"
RESYNC_SECONDS = 20.0
POLL_SECONDS = 15.0
POLL_TIMEOUT_SECONDS = 2.0

log = logging.getLogger(__name__)

# Failures seen in pod events, by (namespace, job) → Job uid → cause: a deleted pod is gone by
# the time a reconcile lists the pods. Keyed by the Job's uid, so that the teardown of one
# attempt never counts against the next.
_noted: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)


def observe(
    cr: dict[str, Any], nodes: list[dict[str, Any]] | None, pods: list[dict[str, Any]] | None
) -> Observed:
    name = cr["metadata"]["name"]
    namespace = cr["metadata"]["namespace"]
    job = kube.get("Job", children.child_name(name), namespace)
    preparation = None
    if TrainingJob.model_validate(cr).spec.data_preparation is not None:
        preparation = kube.get("Job", dataprep.job_name(name), namespace)
    for child in (job, preparation):
        if child is not None and not any(
            o.get("uid") == cr["metadata"]["uid"] for o in child["metadata"].get("ownerReferences") or []
        ):
            raise kopf.PermanentError(
                f"Job {namespace}/{child['metadata']['name']} exists and is not this TrainingJob's"
            )
    label = children.label_value(name)
    managed = f"{L.MANAGED_BY}={L.MANAGER}"
    others = []
    for kind, selector in (
        ("StatefulSet", f"{L.COMPONENT}=unit,{managed}"),
        ("Job", f"{L.COMPONENT}={children.COMPONENT},{managed}"),
    ):
        for item in kube.list_(kind, None, selector):
            if kind == "Job" and item["metadata"].get("uid") == (job or {}).get("metadata", {}).get("uid"):
                continue
            others.append({**item, "kind": kind})  # list items carry no kind
    return Observed(
        nodes=nodes if nodes is not None else kube.list_("Node"),
        pods=pods if pods is not None else kube.list_("Pod"),
        job_pods=kube.list_("Pod", namespace, f"{L.TRAINING_JOB}={label},{L.COMPONENT}={children.COMPONENT}"),
        job=job,
        others=others,
        now=datetime.now(UTC),
        noted=_noted.pop((namespace, name), {}),
        preparation=preparation,
        preparation_pods=(
            kube.list_("Pod", namespace, f"{L.TRAINING_JOB}={label},{L.COMPONENT}={dataprep.COMPONENT}")
            if preparation is not None
            else []
        ),
    )


def apply(cr: dict[str, Any], desired: Desired) -> None:
    name = cr["metadata"]["name"]
    namespace = cr["metadata"]["namespace"]
    generation = cr["metadata"].get("generation", 0)
    previous = (cr.get("status") or {}).get("conditions", [])
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    status = dict(desired.status)
    own_conditions = status.pop("conditions", [])
    status["observedGeneration"] = generation
    uid = cr["metadata"].get("uid")

    def write_status() -> None:
        # Only the reconcile's fields and conditions, merged into the live object under its
        # resourceVersion: the progress poll's step and loss are never written back stale.
        status_writes.patch_status(KIND, name, namespace, status, own_conditions, generation, uid)

    if desired.persist_first:
        # The restart is counted before anything is deleted: an operator that dies between the
        # two finds the old attempt stale (its attempt annotation is behind) and does not count
        # the same failure again.
        write_status()
    job_name = children.child_name(name)
    for pod, grace in sorted(desired.delete_pods.items()):
        kube.delete("Pod", pod, namespace, grace_seconds=grace)
    if desired.delete_job:
        kube.delete("Job", job_name, namespace, propagation="Foreground")
    if desired.delete_preparation:
        kube.delete("Job", dataprep.job_name(name), namespace, propagation="Foreground")
    if desired.suspend_job:
        kube.patch("Job", job_name, namespace, {"spec": {"suspend": True}})
    for child in desired.children:
        try:
            kube.apply(child)
        except kube.ApiException as exc:
            if exc.status != 422:
                raise
            # The spec renders into something the API server refuses (a pod label, say).
            invalid = [C.condition(C.READY, False, C.INVALID_SPEC, f"{child['kind']}: {exc.body}"[:1000])]
            kube.patch_status(
                KIND, name, namespace, {"conditions": C.merge(previous, invalid, now, generation)}
            )
            raise kopf.PermanentError(
                f"{child['kind']} {child['metadata']['name']} rejected: {exc.body}"
            ) from exc
    for event in desired.events:  # after the changes they announce have been made
        events.post(cr, event.type, event.reason, event.message)
    current = cr.get("status") or {}
    merged = C.merge(previous, own_conditions, now, generation)
    changed = any(current.get(k) != v for k, v in status.items()) or merged != previous
    if not desired.persist_first and changed:
        write_status()


@timed(KIND)
def reconcile(
    namespace: str, name: str, cluster_nodes: Any = None, cluster_pods: Any = None
) -> Desired | None:
    """One full pass for one TrainingJob."""
    # Training and inference place onto the same GPUs: one planner at a time.
    with PLACEMENT:
        # From the API server: a preemption request written a moment ago must not wait for the
        # informer's watch (the next pass would be a resync away).
        cr = kube.get(KIND, name, namespace, fresh=True)
        if cr is None or cr["metadata"].get("deletionTimestamp"):
            _noted.pop((namespace, name), None)
            return None  # the children go with it (owner references)
        kube.drop_finalizer(KIND, cr, L.FINALIZER)  # left by an older release: deletion must not wait for us
        try:
            nodes = cache.snapshot(cluster_nodes) if cluster_nodes is not None else None
            pods = cache.snapshot(cluster_pods) if cluster_pods is not None else None
            observed = Observed([], [], [], None) if finished(cr) else observe(cr, nodes, pods)
            desired = metrics.timed_plan(KIND, plan, cr, observed)
        except ValidationError as exc:  # admission should have caught it; say so, do not retry
            raise kube.invalid_spec(KIND, cr, exc) from exc
        apply(cr, desired)
        object_metrics.training(cr, desired)
        return desired


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def on_change(namespace: str | None, name: str, **kwargs: Any) -> None:
    namespace = namespace or "default"
    arm_periodic(namespace, name, kwargs)
    reconcile(namespace, name, kwargs.get("cluster_nodes"), kwargs.get("cluster_pods"))


# No kopf timers: they would put a finalizer on every job (fireflyer.operator.resync).
_resync = Resync("training resync", RESYNC_SECONDS)
_poll = Resync("training progress", POLL_SECONDS)


def arm_periodic(namespace: str, name: str, kwargs: dict[str, Any]) -> None:
    """Drift repair and the deadlines nothing else wakes us for (bind timeout), and the progress
    poll, for as long as the job exists."""

    def resync() -> bool:
        try:
            return (
                reconcile(namespace, name, kwargs.get("cluster_nodes"), kwargs.get("cluster_pods"))
                is not None
            )
        except kopf.PermanentError:  # an invalid spec, reported; its next update re-arms us anyway
            return True

    def poll() -> bool:
        cr = kube.get(KIND, name, namespace)
        if cr is None or cr["metadata"].get("deletionTimestamp"):
            return False
        poll_progress(namespace, name, cr.get("status"))
        return True

    _resync.arm((namespace, name), resync)
    _poll.arm((namespace, name), poll)


_debounce = Debouncer(window=1.0)


def _kick(namespace: str, job: str, urgent: bool, kwargs: dict[str, Any]) -> None:
    def run() -> None:
        try:
            reconcile(namespace, job, kwargs.get("cluster_nodes"), kwargs.get("cluster_pods"))
        except kube.ApiException as exc:
            if exc.status == 403 and "being terminated" in str(exc.body):
                log.debug("namespace %s is being deleted; %s goes with it", namespace, job)
                return
            log.warning("reconcile of training job %s/%s after a child event failed: %s", namespace, job, exc)
        except kopf.PermanentError as exc:
            log.warning("reconcile of training job %s/%s after a child event failed: %s", namespace, job, exc)

    _debounce.request((namespace, job), run, urgent=urgent)


def _owner(body: Any) -> str | None:
    """The TrainingJob that owns a child (the label may be a shortened name)."""
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND:
            return str(ref.get("name"))
    return None


def on_pod_change(event_type: str, pod: dict[str, Any]) -> None:
    """A pod of a job started, failed or went away (from the Pod informer, not a second watch of
    our pods through kopf): reconcile its job soon (at once on failure)."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    job, namespace = labels.get(L.TRAINING_JOB), meta.get("namespace")
    if not job or labels.get(L.MANAGED_BY) != L.MANAGER or not namespace:
        return
    job_uid = next((o.get("uid") for o in meta.get("ownerReferences") or [] if o.get("kind") == "Job"), None)
    phase = (pod.get("status") or {}).get("phase")
    if event_type == "DELETED" and phase not in ("Succeeded", "Failed") and job_uid:
        _noted[(namespace, job)].setdefault(str(job_uid), f"pod {meta.get('name')} was deleted")
    if (
        event_type == "DELETED"
        or phase in ("Failed", "Running", "Succeeded")
        or meta.get("deletionTimestamp")
    ):
        _kick(namespace, job, phase == "Failed" or event_type == "DELETED", {})


@kopf.on.event("batch", "v1", "jobs", labels={L.TRAINING_JOB: kopf.PRESENT, L.MANAGED_BY: L.MANAGER})
def on_child_event(type: str, body: Any, namespace: str | None, **kwargs: Any) -> None:
    """The Job finished, failed or went away (the end of a teardown)."""
    job = _owner(body)
    if type is None or namespace is None or not job:
        return
    conditions = body.get("status", {}).get("conditions") or []
    finished = any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions)
    if type == "DELETED" or finished:
        _kick(namespace, job, True, kwargs)


def on_service_change(event_type: str, service: dict[str, Any]) -> None:
    """A job's Service was deleted (from the Service informer, not a second watch through kopf)."""
    labels = (service.get("metadata") or {}).get("labels") or {}
    job, namespace = _owner(service), (service.get("metadata") or {}).get("namespace")
    if event_type == "DELETED" and job and namespace and L.TRAINING_JOB in labels:
        _kick(namespace, job, True, {})


def _node_unusable(body: Any) -> bool:
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (body.get("status", {}) or {}).get("conditions", []) or []
    )
    return not ready


def on_node_event(type: str, body: dict[str, Any]) -> None:
    """A node went NotReady or away: restart the jobs with a rank on it now, before the taint
    manager evicts the ranks one by one."""
    if type is None or not (type == "DELETED" or _node_unusable(body)):
        return
    name = body["metadata"]["name"]
    owners = {
        (p["metadata"]["namespace"], p["metadata"]["labels"][L.TRAINING_JOB])
        for p in kube.list_("Pod")
        if p["spec"].get("nodeName") == name
        and (p["metadata"].get("labels") or {}).get(L.COMPONENT) == children.COMPONENT
        and L.TRAINING_JOB in (p["metadata"].get("labels") or {})
        and p.get("status", {}).get("phase") not in ("Succeeded", "Failed")
    }
    for namespace, job in sorted(owners):
        _kick(namespace, job, True, {})


# Through the Node informer, not a kopf watch: a second watch of every node decoded each
# heartbeat of a large fabric twice, on the handlers' event loop.
cache.listen("Node", on_node_event)
cache.listen("Pod", on_pod_change)
cache.listen("Service", on_service_change)


# -- progress ---------------------------------------------------------------------------------


def fetch_progress(
    address: str, port: int = children.STATUS_PORT, timeout: float = POLL_TIMEOUT_SECONDS
) -> dict[str, Any] | None:
    """GET http://<address>:29600/status; None when the trainer does not answer (yet)."""
    url = f"http://{address}:{port}/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = json.loads(response.read(65536))
    except (OSError, ValueError) as exc:
        log.debug("no progress from %s: %s", url, exc)
        return None
    return data if isinstance(data, dict) else None


def poll_progress(namespace: str | None, name: str, status: Any, **_: Any) -> None:
    """Step, loss and the last checkpoint from rank 0, while the job runs. Failures are
    tolerated: a trainer still loading, or a pod the operator cannot reach, leaves the last
    values in place."""
    if (status or {}).get("phase") not in ("Running", "Restarting"):
        return
    namespace = namespace or "default"
    pods = kube.list_(
        "Pod",
        namespace,
        f"{L.TRAINING_JOB}={children.label_value(name)},{L.ATTEMPT}={(status or {}).get('restarts', 0)}",
    )
    address = rank0_address(pods)
    if address is None:
        return
    polled = fetch_progress(address)
    if polled is None:
        return
    changes = progress_changes(dict(status or {}), polled)
    if changes:
        kube.patch_status(KIND, name, namespace, changes)
