"""observe → plan → apply → status for one InferenceDeployment, and its kopf handlers."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import Any

import kopf
from pydantic import ValidationError

from fireflyer.api import conditions as C
from fireflyer.api.base import GROUP, VERSION
from fireflyer.api.defaulting import status_as_stored
from fireflyer.operator import cache, events, kube, metrics, object_metrics, parallel_writes, status_writes
from fireflyer.operator import labels as L
from fireflyer.operator.debounce import Debouncer
from fireflyer.operator.inference import drain, drain_reader, first_pass, lending_writes, scaling
from fireflyer.operator.inference.deleted_units import DeletedUnits
from fireflyer.operator.inference.plan import Desired, Observed, plan
from fireflyer.operator.inference.pod_failures import PodFailures
from fireflyer.operator.inference.status import status_changed
from fireflyer.operator.locks import OBJECTS, PLACEMENT
from fireflyer.operator.metrics import timed
from fireflyer.operator.resync import Resync
from fireflyer.placement.reservations import planned_nodes

KIND = "InferenceDeployment"
PLURAL = "inferencedeployments"
# Kinds this controller creates, for pruning children that are no longer desired.
CHILD_KINDS = ("StatefulSet", "Service", "Deployment", "ConfigMap")
RESYNC_SECONDS = 20.0

_placement_lock = PLACEMENT  # shared with the training controller
log = logging.getLogger(__name__)


_pod_failures = PodFailures()  # what unit pod events said, until the next reconcile
_deleted_units = DeletedUnits()


def observe(
    cr: dict[str, Any],
    nodes: list[dict[str, Any]] | None = None,
    pods: list[dict[str, Any]] | None = None,
    router_load: drain.RouterLoad | None = None,
) -> Observed:
    """Nodes and pods come from the watch-fed cache when the caller has it; router_load was read
    before (outside the placement lock: it asks the routers over HTTP)."""
    name = cr["metadata"]["name"]
    namespace = cr["metadata"]["namespace"]
    all_units = kube.list_("StatefulSet", None, f"{L.COMPONENT}=unit,{L.MANAGED_BY}={L.MANAGER}")
    ours = [
        s
        for s in all_units
        if s["metadata"].get("namespace") == namespace
        and (s["metadata"].get("labels") or {}).get(L.DEPLOYMENT) == name
    ]
    # A unit removed by an earlier pass may still be listed by a lagging watch: planned as
    # present, a draining one would be applied again, which recreates it.
    deleted = _deleted_units.still_listed(all_units)
    spec = cr.get("spec") or {}
    # A user's static placement need not carry our labels: the plan matches spec.deployment.
    eplb_on = (spec.get("eplb") or {}).get("mode", "dynamic") != "off"
    cluster = (spec.get("kvCache") or {}).get("threeFSCluster")
    return Observed(
        placements=kube.list_("ExpertPlacement", namespace) if eplb_on else [],
        threefs=kube.get("ThreeFSCluster", cluster, namespace) if cluster else None,
        nodes=nodes if nodes is not None else kube.list_("Node"),
        pods=pods if pods is not None else kube.list_("Pod"),
        statefulsets=drain.without_deleted({s["metadata"]["name"]: s for s in ours}, deleted),
        other_units=[s for s in all_units if s not in ours],
        router=kube.get("Deployment", f"{name}-router", namespace, ours=True),
        router_service=kube.get("Service", f"{name}-router", namespace, ours=True),
        now=datetime.now(UTC),
        **_pod_failures.take(namespace, name),  # after the reads above: a failed one loses nothing
        scalers=kube.list_("InferenceRoleScaler", namespace, f"{L.DEPLOYMENT}={name}"),
        router_load=router_load,
        training_jobs=lending_writes.training_jobs(pods),  # lending: preemptible jobs' nodes
    )


# What this process last applied, by (kind, namespace, name) → digest. An event-driven pass
# skips children it already applied unchanged; forced passes (spec changes, resync, a deleted
# child) apply everything, which is what repairs drift.
_applied: dict[tuple[str, str, str], str] = {}
_wanted: dict[tuple[str, str], set[tuple[str, str]]] = {}


def _digest(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def apply(cr: dict[str, Any], desired: Desired, force: bool = True, first: bool = False) -> None:
    """Write what the plan wants. first: a new deployment's first pass (its status is written
    against the newest copy the informer holds, `first_pass.status_read`)."""
    name = cr["metadata"]["name"]
    namespace = cr["metadata"]["namespace"]
    wanted = {(c["kind"], c["metadata"]["name"]) for c in desired.children}
    due = []
    for child in desired.children:
        key = (child["kind"], namespace, child["metadata"]["name"])
        digest = _digest(child)
        if force or _applied.get(key) != digest:
            due.append((key, digest, child))
    # Pruning lists ConfigMaps from the API server: only when the wanted set changed since the
    # last complete prune (a new deployment, a spec change, a restart). The lists run beside the
    # children's writes: they only look for children that are not wanted.
    kinds: tuple[str, ...] = () if _wanted.get((namespace, name)) == wanted else CHILD_KINDS
    selector = f"{L.DEPLOYMENT}={name},{L.MANAGED_BY}={L.MANAGER}"
    listing = (
        parallel_writes.start(lambda: [kube.list_(kind, namespace, selector) for kind in kinds])
        if kinds
        else None
    )
    # The scalers (a new deployment creates each role's, then writes its status) refer to no
    # child: their round trips run beside the children's writes instead of after them.
    scalers = parallel_writes.started(scaling.scaler_writes(cr, desired.scales))
    try:
        with metrics.phase(KIND, "apply_children"):  # independent children: written at once
            parallel_writes.each([child for _, _, child in due], kube.apply)
    except BaseException:
        parallel_writes.finish(scalers)  # none left running behind a failed pass
        raise
    for key, digest, _ in due:
        _applied[key] = digest
    listed: list[list[dict[str, Any]]] = []
    if listing is not None:
        with metrics.phase(KIND, "list_children"):  # what of the lists outlasted the writes
            listed = listing.result()
    for kind, children in zip(kinds, listed, strict=True):
        for existing in children:
            owners = existing["metadata"].get("ownerReferences") or []
            ours = any(o.get("uid") == cr["metadata"]["uid"] for o in owners)
            if ours and (kind, existing["metadata"]["name"]) not in wanted:
                gone = kube.delete(kind, existing["metadata"]["name"], namespace)
                if gone and kind == "StatefulSet":
                    _deleted_units.note(existing["metadata"].get("uid", ""))
    _wanted[(namespace, name)] = wanted
    pods = (
        kube.list_("Pod", namespace, f"{L.DEPLOYMENT}={name}")
        if desired.recreate or desired.force_delete
        else []
    )
    for unit, why in sorted(desired.recreate.items()):
        for pod in pods:
            pod_name = pod["metadata"]["name"]
            if pod_name.rsplit("-", 1)[0] == unit:
                kube.delete(
                    "Pod", pod_name, namespace, grace_seconds=0 if pod_name in desired.force_delete else None
                )
        metrics.unit_recreated(cr, unit, why, desired.events, pods)
        log.info("recreated unit %s/%s: %s", namespace, unit, why)
    for pod in pods:  # stuck Terminating on a dead node (deleted by anyone): finish the deletion
        pod_name = pod["metadata"]["name"]
        if pod_name in desired.replace_now or (
            pod["metadata"].get("deletionTimestamp") and pod_name in desired.force_delete
        ):
            kube.delete("Pod", pod_name, namespace, grace_seconds=0)
    with metrics.phase(KIND, "scalers_lending"):  # what of the scalers' writes outlasted the children's
        parallel_writes.finish(scalers)
        lending_writes.request(cr, desired.preemptions, datetime.now(UTC))
    previous = (cr.get("status") or {}).get("conditions", [])
    status = dict(desired.status)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    generation = cr["metadata"].get("generation", 0)
    conditions = status.pop("conditions")
    status["observedGeneration"] = generation
    current = cr.get("status") or {}
    merged = C.merge(previous, conditions, now, generation)
    # The Events and the status are independent round trips: the pass's last one, sent at once.
    last: list[Callable[[], None]] = [
        partial(events.post, cr, e.type, e.reason, e.message) for e in desired.events
    ]
    # Written only when it changes, forced passes too: an unchanged status costs two requests.
    if current.get("conditions") != merged or status_changed(current, status_as_stored(KIND, status)):
        # The EPLB timer writes this status too: its conditions are kept (writes.py).
        write = status_writes.patch_status
        read = first_pass.status_read(cr) if first else cr
        last.append(partial(write, KIND, name, namespace, status, conditions, generation, read=read))
    with metrics.phase(KIND, "status"):
        parallel_writes.each(last, lambda write: write())


@timed(KIND)
def reconcile(
    namespace: str,
    name: str,
    cluster_nodes: Any = None,
    cluster_pods: Any = None,
    force: bool = True,
    created: dict[str, Any] | None = None,
) -> Desired | None:
    """One full pass for one deployment; serialised per deployment. `created`: the object as its
    creation event carried it, for the first pass (nothing of ours is written on it yet)."""
    with metrics.holding(KIND, "object_lock_wait", OBJECTS.of((KIND, namespace, name))):
        with metrics.phase(KIND, "read"):
            # From the API server, not the informer: the event that started this pass may be
            # ahead of the informer's watch, and a spec change must be planned as written. A
            # creation event is the object as written, with no status of ours to be behind on.
            cr = created if created is not None else kube.get(KIND, name, namespace, fresh=True)
            if cr is None or cr["metadata"].get("deletionTimestamp"):
                return None
            # Left by an older release: deletion must not wait for us.
            kube.drop_finalizer(KIND, cr, L.FINALIZER)
            asked = drain_reader.drain_possible(cr, _deleted_units.uids())
            load = drain_reader.read_router_load(cr) if asked else None
        promised: list[dict[str, Any]] = []
        try:
            first = observe(cr, *_snapshots(cluster_nodes, cluster_pods), load)
            desired = _plan_unlocked(cr, first)
            if desired is None:
                # One plan at a time: two deployments planned at once could pick the same free
                # nodes. Once the planned StatefulSets are promised to the cache, the next plan
                # reserves their nodes: applying them, and the rest of the pass, runs beside other
                # deployments' passes.
                with metrics.holding(KIND, "placement_lock_wait", _placement_lock):
                    observed = observe(cr, *_snapshots(cluster_nodes, cluster_pods), load)
                    desired = metrics.timed_plan(KIND, plan, cr, carried_over(first, observed))
                    promised = [child for child in desired.children if child["kind"] == "StatefulSet"]
                    for child in promised:
                        cache.promise(child)
        except ValidationError as exc:  # admission should have caught it; say so, do not retry
            raise kube.invalid_spec(KIND, cr, exc) from exc
        try:
            apply(cr, desired, force, first=created is not None)
        except BaseException:
            for child in promised:  # the writes that did not happen reserve no nodes
                cache.retract(child)
            raise
        object_metrics.inference(cr, desired)
        if desired.draining:  # nothing in the cluster changes when the last request ends: look again soon
            _drain_recheck.arm((namespace, name), lambda: _still_draining(namespace, name))
        return desired


def _snapshots(cluster_nodes: Any, cluster_pods: Any) -> tuple[Any, Any]:
    nodes = cache.snapshot(cluster_nodes) if cluster_nodes is not None else None
    pods = cache.snapshot(cluster_pods) if cluster_pods is not None else None
    return nodes, pods


def _plan_unlocked(cr: dict[str, Any], observed: Observed) -> Desired | None:
    """The plan of a deployment whose units all stand, made without the placement lock, when it
    keeps every unit on the nodes it has (the steady state: every resync pass of every
    deployment); None when the pass must plan under the lock (a unit to place or move). A plan
    that reserves no node cannot take one from another deployment's plan."""
    if not observed.statefulsets:  # a new deployment: it places, so plan once, under the lock
        return None
    desired = metrics.timed_plan(KIND, plan, cr, observed)
    return desired if places_nothing(desired, observed.statefulsets) else None


def carried_over(first: Observed, again: Observed) -> Observed:
    """`again` with the pod failures that the first observation took from the event queues
    (observing takes them): the plan under the lock must still see them."""
    return replace(
        again,
        failed_units={**first.failed_units, **again.failed_units},
        failed_pod_created={**first.failed_pod_created, **again.failed_pod_created},
    )


def places_nothing(desired: Desired, statefulsets: dict[str, dict[str, Any]]) -> bool:
    """Whether a plan keeps every unit StatefulSet on the nodes it already has, recreates none
    and asks no job for nodes."""
    if desired.recreate or desired.preemptions:
        return False
    for child in desired.children:
        if child["kind"] != "StatefulSet":
            continue
        held = statefulsets.get(child["metadata"]["name"])
        if held is None or planned_nodes(held) != planned_nodes(child):
            return False
    return True


_drain_recheck = Resync("inference drain", drain.RECHECK_SECONDS)


def _still_draining(namespace: str, name: str) -> bool:
    desired = reconcile(namespace, name, force=False)
    return desired is not None and bool(desired.draining)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def on_change(namespace: str | None, name: str, **kwargs: Any) -> None:
    namespace = namespace or "default"
    arm_resync(namespace, name, kwargs)
    scaling.arm_autoscaler(namespace, name, kwargs.get("body") or {})
    nodes, pods = kwargs.get("cluster_nodes"), kwargs.get("cluster_pods")
    created = first_pass.from_event(kwargs.get("reason"), kwargs.get("retry", 0), kwargs.get("body"))
    if created is None:
        reconcile(namespace, name, nodes, pods)
        return
    queued = time.perf_counter()

    def run_first_pass() -> None:
        metrics.QUEUE_SECONDS.labels(KIND).observe(time.perf_counter() - queued)
        _first_pass_queued.discard((namespace, name))
        try:
            reconcile(namespace, name, nodes, pods, created=first_pass.newest_known(created))
        except kopf.PermanentError as exc:  # its status says so already
            log.warning("InferenceDeployment %s/%s: %s", namespace, name, exc)

    # Not on kopf's handler threads: a burst of new deployments would hold every one of them, and
    # with them the child events of the deployments already running. A failed first pass is
    # logged and redone by the resync armed above.
    _first_pass_queued.add((namespace, name))
    _creations.request((namespace, name), run_first_pass, urgent=True)


# New deployments' first passes (each writes a dozen objects) run two at a time: 16 at once on a
# busy API server made each take seconds, as they waited for one another's writes (4 at once:
# the burst's p99 2.3 s; 2: 1.9 s, and all Ready 3 s later; docs/benchmarks.md).
_creations = Debouncer(window=0.0, workers=int(os.environ.get("FIREFLYER_CREATION_WORKERS", "2")))
# Deployments whose first pass waits on that queue; their resync must not run it meanwhile.
_first_pass_queued: set[tuple[str, str]] = set()


_resync = Resync("inference resync", RESYNC_SECONDS)


def arm_resync(namespace: str, name: str, kwargs: dict[str, Any]) -> None:
    """Drift repair and unit health every RESYNC_SECONDS: a deleted child comes back, broken
    units are recreated. cluster_nodes and cluster_pods are kopf's watch-fed indexes
    (fireflyer.operator.cache), live views kept from the handler that armed the run."""

    def run() -> bool:
        if (namespace, name) in _first_pass_queued:
            return True  # its first pass is still queued: creating it here would jump the queue
        try:
            return (
                reconcile(namespace, name, kwargs.get("cluster_nodes"), kwargs.get("cluster_pods"))
                is not None
            )
        except kopf.PermanentError:  # an invalid spec, reported; its next update re-arms us anyway
            return True

    _resync.arm((namespace, name), run)


def on_child_change(event_type: str, child: dict[str, Any]) -> None:
    """A Service, unit StatefulSet or router Deployment of a deployment changed (from their
    informers, not second watches through kopf; the router's availability is part of Ready and
    lags its pods' readiness): reconcile the deployment soon, at once when the child is gone."""
    meta = child.get("metadata") or {}
    labels = meta.get("labels") or {}
    deployment, namespace = labels.get(L.DEPLOYMENT), meta.get("namespace")
    if deployment and namespace and labels.get(L.MANAGED_BY) == L.MANAGER:
        _kick(namespace, deployment, event_type == "DELETED", {})


def on_pod_change(event_type: str, pod: dict[str, Any]) -> None:
    """A pod of a deployment changed (from the Pod informer: a second watch of our pods through
    kopf decoded each of their events twice). Its preflight failure and its loss are noted; a
    pod that failed, started running or went away gets its deployment reconciled."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    deployment, namespace = labels.get(L.DEPLOYMENT), meta.get("namespace")
    if not deployment or labels.get(L.MANAGED_BY) != L.MANAGER or not namespace:
        return
    _pod_failures.note(event_type, pod, namespace, deployment)
    phase = (pod.get("status") or {}).get("phase")
    if event_type == "DELETED" or phase in ("Failed", "Running"):
        _kick(namespace, deployment, phase == "Failed" or event_type == "DELETED", {})


_debounce = Debouncer(window=1.0)


def _kick(namespace: str, deployment: str, urgent: bool, kwargs: dict[str, Any]) -> None:
    """Reconcile soon. Many pod events arrive together: one reconcile per second per deployment,
    and a dropped event always leads to one more reconcile after the window (trailing edge)."""

    def run() -> None:
        if OBJECTS.of((KIND, namespace, deployment)).busy():
            # A pass of this deployment is running (its creation, a resync): one more after it
            # covers this event, and no worker waits for it meanwhile.
            _debounce.again((namespace, deployment))
            return
        try:
            reconcile(namespace, deployment, kwargs.get("cluster_nodes"), kwargs.get("cluster_pods"), urgent)
        except kube.ApiException as exc:
            log.warning("reconcile of %s/%s after a child event failed: %s", namespace, deployment, exc)

    _debounce.request((namespace, deployment), run, urgent=urgent)


def _node_unusable(body: Any) -> bool:
    spec = body.get("spec", {}) or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (body.get("status", {}) or {}).get("conditions", []) or []
    )
    return not ready or bool(spec.get("unschedulable"))


def on_node_event(type: str, body: dict[str, Any]) -> None:
    """A node went NotReady or was cordoned: reconcile the deployments with unit pods on it now,
    before the taint manager evicts them one by one."""
    if type is None or not (type == "DELETED" or _node_unusable(body)):
        return
    name = body["metadata"]["name"]
    owners = {
        (p["metadata"]["namespace"], p["metadata"]["labels"][L.DEPLOYMENT])
        for p in kube.list_("Pod")
        if p["spec"].get("nodeName") == name
        and (p["metadata"].get("labels") or {}).get(L.COMPONENT) == "unit"
        and L.DEPLOYMENT in (p["metadata"].get("labels") or {})
    }
    for namespace, deployment in sorted(owners):
        # On the work queue, never on the informer's thread: when many nodes fail at once, the
        # reconciles must not hold up the watch of every other node.
        _kick(namespace, deployment, True, {})


# Through the Node informer, not a kopf watch: a second watch of every node decoded each
# heartbeat of a large fabric twice, on the handlers' event loop.
cache.listen("Node", on_node_event)
cache.listen("Pod", on_pod_change)
for _kind in ("Service", "StatefulSet", "Deployment"):
    cache.listen(_kind, on_child_change)


@kopf.on.event(GROUP, VERSION, "expertplacements")
def on_placement_event(type: str, body: Any, namespace: str | None, **kwargs: Any) -> None:
    """A placement was published, edited or removed: the role's placement ConfigMap follows."""
    deployment = (body.get("spec") or {}).get("deployment")
    if type is None or namespace is None or not deployment:
        return
    _kick(namespace, deployment, False, kwargs)


@kopf.on.event(GROUP, VERSION, "inferencerolescalers")
def on_scaler_event(type: str, body: Any, namespace: str | None, **kwargs: Any) -> None:
    """kubectl scale, an HPA or the autoscaler moved a role's live units: reconcile now."""
    deployment = (body.get("spec") or {}).get("deployment")
    if type is None or namespace is None or not deployment:
        return
    _kick(namespace, deployment, False, kwargs)


@kopf.on.event(GROUP, VERSION, "threefsclusters")
def on_threefs_event(type: str, body: Any, namespace: str | None, name: str, **kwargs: Any) -> None:
    """Units with kvCache wait for their 3FS cluster to be Ready: re-check the deployments that
    name it when it changes (the resync timer covers a missed event)."""
    if type is None or namespace is None:
        return
    for cr in kube.list_(KIND, namespace):
        if ((cr.get("spec") or {}).get("kvCache") or {}).get("threeFSCluster") == name:
            _kick(namespace, cr["metadata"]["name"], False, kwargs)
