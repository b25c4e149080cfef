"""observe → plan → apply → status for one ThreeFSCluster, and its kopf handlers."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from fireflyer.api.base import GROUP, VERSION
from fireflyer.api.threefs import ThreeFSClusterSpec
from fireflyer.operator import cache, events, kube, object_metrics, status_writes
from fireflyer.operator import labels as L
from fireflyer.operator.debounce import Debouncer
from fireflyer.operator.metrics import timed
from fireflyer.operator.objects import owner_reference
from fireflyer.operator.threefs import children as K
from fireflyer.operator.threefs.admin_jobs import RESULT_COMPONENT, StepResult, has_result, read_result
from fireflyer.operator.threefs.cleanup import cleanup_jobs, cleanup_pending
from fireflyer.operator.threefs.ownership import blank_token_patch, step_objects
from fireflyer.operator.threefs.plan import Desired, Observed, plan
from fireflyer.threefs.admin import Health

KIND = "ThreeFSCluster"
PLURAL = "threefsclusters"
CHILD_KINDS = ("StatefulSet", "Deployment", "DaemonSet", "Service", "ConfigMap", "PodDisruptionBudget")
RESYNC_SECONDS = 10.0
FDB_OPERATOR_API = "/apis/apps.foundationdb.org/v1beta2"

log = logging.getLogger(__name__)
_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()
# The last health check read per cluster (result Secrets are removed once read).
_health: dict[tuple[str, str], tuple[Health, datetime]] = {}


def _lock(key: tuple[str, str]) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


_fdb_api: tuple[float, bool] | None = None
FDB_API_RECHECK_SECONDS = 60.0


def _fdb_operator_served() -> bool:
    """Whether the FoundationDB operator's API is installed (rechecked once a minute)."""
    global _fdb_api
    if _fdb_api is None or time.monotonic() - _fdb_api[0] > FDB_API_RECHECK_SECONDS:
        _fdb_api = (time.monotonic(), kube.api_group_served(FDB_OPERATOR_API))
    return _fdb_api[1]


def observe(cr: dict[str, Any]) -> Observed:
    name, namespace = cr["metadata"]["name"], cr["metadata"]["namespace"]
    selector = f"{K.CLUSTER}={name},{L.MANAGED_BY}={L.MANAGER}"
    workloads: dict[str, dict[str, Any]] = {}
    for kind in ("StatefulSet", "Deployment", "DaemonSet"):
        for item in kube.list_(kind, namespace, selector):
            item["kind"] = kind
            workloads[item["metadata"]["labels"][L.COMPONENT]] = item
    found = step_objects(
        cr["metadata"]["uid"],
        kube.list_("Job", namespace, f"{K.CLUSTER}={name},{K.STEP}"),
        kube.list_("ConfigMap", namespace, f"{K.CLUSTER}={name},{L.COMPONENT}={RESULT_COMPONENT}"),
    )
    jobs = {j["metadata"]["labels"][K.STEP]: j for j in found.jobs}
    results: dict[str, StepResult | str] = {}
    for result in found.results:
        if not has_result(result):
            continue  # the step's Job has not written it yet
        step = result["metadata"]["labels"][K.STEP]
        try:
            results[step] = read_result(result)
        except ValueError as error:
            results[step] = str(error)
    for step, job in jobs.items():
        # A Job that ended without writing its result (image lacks curl, API unreachable, …).
        failed = any(
            c.get("type") == "Failed" and c.get("status") == "True"
            for c in (job.get("status") or {}).get("conditions") or []
        )
        if failed and step not in results:
            results[step] = "the admin Job failed without reporting a result (see its pod's log)"
    spec = ThreeFSClusterSpec.model_validate(cr["spec"])
    fdb_operator = spec.foundationdb.managed is not None and _fdb_operator_served()
    connection = None
    if fdb_operator:
        fdb = kube.get("FoundationDBCluster", K.name_of(name, "fdb"), namespace)
        connection = ((fdb or {}).get("status") or {}).get("connectionString")
    monitor = kube.get("Service", K.name_of(name, "monitor"), namespace)
    health = _health.get((namespace, name))
    return Observed(
        now=datetime.now(UTC),
        nodes={n["metadata"]["name"]: n for n in kube.list_("Node")},
        pods=kube.list_("Pod", namespace, f"{K.CLUSTER}={name}"),
        workloads=workloads,
        jobs=jobs,
        results=results,
        fdb_operator=fdb_operator,
        fdb_connection_string=connection,
        monitor_ip=((monitor or {}).get("spec") or {}).get("clusterIP"),
        health=health[0] if health else None,
        health_taken_at=health[1] if health else None,
        stale=found.stale,
    )


def apply(cr: dict[str, Any], desired: Desired) -> None:
    """Children, then status, then cleanup and the next admin step: a finished step is recorded
    in status before its result is deleted, so no crash can make it run twice."""
    name, namespace = cr["metadata"]["name"], cr["metadata"]["namespace"]
    for obj in desired.create_once:
        kube.create(obj)
    if desired.claim_token and kube.create(K.token_secret(cr)) is None:
        kube.patch("Secret", K.token_secret_name(name), namespace, blank_token_patch(owner_reference(cr)))
    for child in desired.children:
        kube.apply(child)
    status = dict(desired.status)
    generation = cr["metadata"].get("generation", 0)
    conditions = status.pop("conditions")
    status["observedGeneration"] = generation
    # Only this controller's fields and condition types, on the object it planned for.
    status_writes.patch_status(KIND, name, namespace, status, conditions, generation, cr["metadata"]["uid"])
    if desired.health is not None and desired.health_taken_at is not None:
        _health[(namespace, name)] = (desired.health, desired.health_taken_at)
    wanted = {(c["kind"], c["metadata"]["name"]) for c in desired.children}
    for kind in CHILD_KINDS:
        for existing in kube.list_(kind, namespace, f"{K.CLUSTER}={name},{L.MANAGED_BY}={L.MANAGER}"):
            if K.STEP in (existing["metadata"].get("labels") or {}):
                continue  # admin step objects go through cleanup
            owners = existing["metadata"].get("ownerReferences") or []
            ours = any(o.get("uid") == cr["metadata"]["uid"] for o in owners)
            if ours and (kind, existing["metadata"]["name"]) not in wanted:
                kube.delete(kind, existing["metadata"]["name"], namespace)
    for kind, child_name in desired.cleanup:
        kube.delete(kind, child_name, namespace, propagation="Background")
    for obj in desired.launch:
        kube.apply(obj)
    for pod in desired.delete_pods:
        kube.delete("Pod", pod, namespace, grace_seconds=0)
    for event in desired.events:
        events.post(cr, event.type, event.reason, event.message)


@timed(KIND)
def reconcile(namespace: str, name: str) -> Desired | None:
    with _lock((namespace, name)):
        cr = kube.get(KIND, name, namespace)
        if cr is None or cr["metadata"].get("deletionTimestamp"):
            return None
        try:
            desired = plan(cr, observe(cr))
        except ValidationError as exc:
            raise kube.invalid_spec(KIND, cr, exc) from exc
        apply(cr, desired)
        object_metrics.threefs(cr, desired)
        return desired


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def on_change(namespace: str | None, name: str, **_: Any) -> None:
    reconcile(namespace or "default", name)


@kopf.timer(GROUP, VERSION, PLURAL, interval=RESYNC_SECONDS, sharp=False)
def resync(namespace: str | None, name: str, **_: Any) -> None:
    """Admin steps advance, health is read, failed storage nodes are noticed."""
    reconcile(namespace or "default", name)


_debounce = Debouncer(window=0.5)


# No watch on Secrets or ConfigMaps: an admin Job ends only after writing its result, and its end
# arrives as a Job event (the resync timer covers a missed one).
@kopf.on.event("batch", "v1", "jobs", labels={K.CLUSTER: kopf.PRESENT, L.MANAGED_BY: L.MANAGER})
@kopf.on.event("apps", "v1", "daemonsets", labels={K.CLUSTER: kopf.PRESENT, L.MANAGED_BY: L.MANAGER})
def on_child_event(type: str, body: Any, namespace: str | None, **_: Any) -> None:
    """An admin Job finished, a service became ready: advance soon."""
    cluster = (body.get("metadata", {}).get("labels") or {}).get(K.CLUSTER)
    if not cluster or namespace is None or type is None:
        return
    _kick(namespace, cluster)


def on_cached_change(event_type: str, obj: dict[str, Any]) -> None:
    """A pod or StatefulSet of a cluster changed (from their informers, not second watches
    through kopf): advance soon."""
    meta = obj.get("metadata") or {}
    cluster = (meta.get("labels") or {}).get(K.CLUSTER)
    if cluster and meta.get("namespace"):
        _kick(meta["namespace"], cluster)


cache.listen("Pod", on_cached_change)
cache.listen("StatefulSet", on_cached_change)  # the informer holds only ours (managed-by)


def _kick(namespace: str, cluster: str) -> None:
    def run() -> None:
        try:
            reconcile(namespace, cluster)
        except kube.ApiException as exc:
            log.warning("reconcile of %s/%s after a child event failed: %s", namespace, cluster, exc)

    _debounce.request((namespace, cluster), run)


@kopf.on.delete(GROUP, VERSION, PLURAL)
def on_delete(namespace: str | None, name: str, spec: Any, meta: Any, **_: Any) -> None:
    """reclaimPolicy Delete: wipe the storage disks with one Job per storage node, and wait for
    them (FoundationDB volumes go with their StatefulSet's retention policy). Retain: nothing."""
    namespace = namespace or "default"
    parsed = ThreeFSClusterSpec.model_validate(dict(spec))
    if parsed.reclaim_policy != "Delete":
        return
    pending = cleanup_pending(namespace, name, parsed, dict(meta))
    if pending:
        raise kopf.TemporaryError(f"waiting for disk cleanup on {', '.join(pending)}", delay=3)
    cleanup_jobs(namespace, name, delete=True)
