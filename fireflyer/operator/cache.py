"""Watch-fed in-memory views of Pods, Nodes and our unit StatefulSets (informers), so that a
reconcile reads the cluster's capacity without listing it from the API server.

Each informer is one thread doing list + watch; it never waits for kopf's handler threads, so
its view keeps up with the cluster while reconciles queue (an index updated by kopf handlers
lagged minutes behind under load, and units whose pods ran were judged never bound). Once an
informer has synced, `fireflyer.operator.kube.list_` answers the whole-cluster lists it covers
from it; objects the operator applies are written through at once, so the next plan sees them
before their watch event arrives."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from fireflyer.operator import kube
from fireflyer.operator import labels as L
from fireflyer.operator.metrics import CACHE_OBJECTS

log = logging.getLogger(__name__)

Slim = Callable[[Mapping[str, Any]], dict[str, Any]]
Listener = Callable[[str, dict[str, Any]], None]
# kind → callables told of each change an informer sees (event type, the slim object): the
# controllers' node handlers, without a second watch of every node through kopf.
_listeners: dict[str, list[Listener]] = {}
WATCH_SECONDS = 240
RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 30.0
PROMISE_SECONDS = 60.0
SYNC_WAIT_SECONDS = 60.0


def _slim_state(state: Mapping[str, Any] | None) -> dict[str, Any]:
    """A container state's kind, and a termination's exit code and message (the preflight's and
    the trainer's reports travel in it)."""
    state = state or {}
    slim: dict[str, Any] = {kind: {} for kind in ("waiting", "running") if kind in state}
    if "terminated" in state:
        terminated = state["terminated"] or {}
        slim["terminated"] = {
            "exitCode": terminated.get("exitCode"),
            "message": terminated.get("message") or "",
        }
    return slim


def _slim_containers(statuses: Any) -> list[dict[str, Any]]:
    return [
        {"state": _slim_state(c.get("state")), "lastState": _slim_state(c.get("lastState"))}
        for c in statuses or []
    ]


def slim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    """What planning and the controllers' pod listeners read of a pod: labels, owners, node,
    requests, phase, readiness and how its containers ended. An unscheduled pod's node name is ""
    (never null)."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    return {
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
            "labels": dict(meta.get("labels") or {}),
            "ownerReferences": [
                {"kind": o.get("kind"), "name": o.get("name"), "uid": o.get("uid")}
                for o in meta.get("ownerReferences") or []
            ],
            "creationTimestamp": meta.get("creationTimestamp"),
            "deletionTimestamp": meta.get("deletionTimestamp"),
        },
        "spec": {
            "nodeName": spec.get("nodeName") or "",
            "containers": [
                {"resources": dict(c.get("resources") or {})} for c in spec.get("containers") or []
            ],
        },
        "status": {
            "phase": status.get("phase"),
            "conditions": [
                {"type": c.get("type"), "status": c.get("status")} for c in status.get("conditions") or []
            ],
            "initContainerStatuses": _slim_containers(status.get("initContainerStatuses")),
            "containerStatuses": _slim_containers(status.get("containerStatuses")),
        },
    }


def slim_node(body: Mapping[str, Any]) -> dict[str, Any]:
    """What placement and the controllers read of a node: labels, annotations (the NIC list),
    taints, cordon, allocatable and capacity, and its conditions (no heartbeat times); not its
    images, addresses or system info, which make up most of a Node."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    return {
        "kind": "Node",
        "metadata": {
            key: meta[key]
            for key in ("name", "uid", "resourceVersion", "labels", "annotations", "creationTimestamp")
            if key in meta
        },
        "spec": {key: spec[key] for key in ("taints", "unschedulable") if key in spec},
        "status": {
            "allocatable": dict(status.get("allocatable") or {}),
            "capacity": dict(status.get("capacity") or {}),
            "conditions": [
                {key: c[key] for key in ("type", "status", "reason", "lastTransitionTime") if key in c}
                for c in status.get("conditions") or []
            ],
        },
    }


def without_managed_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """The object less metadata.managedFields (often half its size, never read by a plan)."""
    obj = dict(body)
    obj["metadata"] = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    return obj


def _version(obj: Mapping[str, Any]) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:  # opaque to clients in principle; etcd's are integers
        return 0


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


def parse_selector(selector: str | None) -> dict[str, str | None] | None:
    """`k=v,k2` → {k: v, k2: None (present)}; None for forms an informer does not answer."""
    wanted: dict[str, str | None] = {}
    for term in (selector or "").split(","):
        term = term.strip()
        if not term:
            continue
        if any(op in term for op in ("!", " in ", " notin ", "(")):
            return None
        key, eq, value = term.partition("=")
        wanted[key.strip()] = value.lstrip("=").strip() if eq else None
    return wanted


def matches(labels: Mapping[str, str], wanted: Mapping[str, str | None]) -> bool:
    return all(k in labels and (v is None or labels[k] == v) for k, v in wanted.items())


class Informer:
    """One kind (optionally label-filtered on the server) kept in memory by list + watch."""

    def __init__(self, kind: str, selector: str | None = None, slim: Slim = without_managed_fields) -> None:
        self.kind = kind
        self.selector = selector
        self.filter = parse_selector(selector) or {}
        self.slim = slim
        self.synced = threading.Event()
        self._items: dict[tuple[str, str], dict[str, Any]] = {}
        # Promised objects: key → (until when, what was held before the promise).
        self._promised: dict[tuple[str, str], tuple[float, dict[str, Any] | None]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"informer {self.kind}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            self._expire()
            return list(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def upsert(self, body: Mapping[str, Any]) -> None:
        """Keep `body` unless a newer version of it is held already (a write seen after its event)."""
        obj = self.slim(body)
        key = _key(obj)
        with self._lock:
            held = self._items.get(key)
            if held is None or _version(obj) >= _version(held):
                self._items[key] = obj
                self._promised.pop(key, None)

    def promise(self, body: Mapping[str, Any], seconds: float) -> None:
        """Hold `body`, about to be written, until the API server's version of it arrives (its
        answer or its watch event), or for `seconds` at most: a write that never happened
        leaves what was held before."""
        obj = self.slim(body)
        key = _key(obj)
        with self._lock:
            held = self._items.get(key)
            _, before = self._promised.get(key, (0.0, held))
            obj["metadata"]["resourceVersion"] = (held or {}).get("metadata", {}).get("resourceVersion", "0")
            self._items[key] = obj
            self._promised[key] = (time.monotonic() + seconds, before)

    def retract(self, body: Mapping[str, Any]) -> None:
        """A promised write that failed: hold again what was held before the promise (a write
        that did happen has already replaced the promise and is kept)."""
        key = _key(body)
        with self._lock:
            if key not in self._promised:
                return
            _, before = self._promised.pop(key)
            if before is None:
                self._items.pop(key, None)
            else:
                self._items[key] = before

    def get(self, namespace: str | None, name: str) -> dict[str, Any] | None:
        with self._lock:
            self._expire()
            return self._items.get((namespace or "", name))

    def remove(self, body: Mapping[str, Any]) -> None:
        with self._lock:
            self._items.pop(_key(body), None)
            self._promised.pop(_key(body), None)

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, (until, _) in self._promised.items() if until < now]:
            _, before = self._promised.pop(key)
            if before is None:
                self._items.pop(key, None)
            else:
                self._items[key] = before

    def _relist(self) -> str:
        items, version = kube.list_with_version(self.kind, self.selector)
        fresh = {}
        for body in items:
            obj = self.slim(body)
            fresh[_key(obj)] = obj
        with self._lock:
            self._items = fresh
            self._promised.clear()
        self.synced.set()  # a (re)list tells no listener: the resync passes cover a watch's gap
        return version

    def _tell(self, event_type: str, body: Mapping[str, Any]) -> None:
        listeners = _listeners.get(self.kind)
        if not listeners:
            return
        obj = self.slim(body)
        for listener in listeners:
            try:
                listener(event_type, obj)
            except Exception:  # a listener's failure must not stop the watch
                log.exception("%s informer: a listener failed on %s", self.kind, event_type)

    def _run(self) -> None:
        version = ""
        retry = RETRY_SECONDS
        while not self._stop.is_set():
            try:
                if not version:
                    version = self._relist()
                for event_type, body in kube.watch(self.kind, version, self.selector, WATCH_SECONDS):
                    if self._stop.is_set():
                        return
                    if event_type == "ERROR":  # 410 Gone: our version is too old, list again
                        version = ""
                        break
                    retry = RETRY_SECONDS
                    version = (body.get("metadata") or {}).get("resourceVersion") or version
                    if event_type == "DELETED":
                        self.remove(body)
                    elif event_type in ("ADDED", "MODIFIED"):
                        self.upsert(body)
                    else:
                        continue
                    self._tell(event_type, body)
            except Exception as exc:  # the API server restarted, a timeout: list again
                if self._stop.is_set():
                    return
                log.warning("%s informer: %s; listing again in %.0f s", self.kind, exc, retry)
                version = ""
                self._stop.wait(retry)
                retry = min(retry * 2, MAX_RETRY_SECONDS)


ALL = "all"
MANAGED = f"{L.MANAGED_BY}={L.MANAGER}"
_informers: dict[str, Informer] = {}


def listen(kind: str, listener: Listener) -> None:
    """Call `listener(event type, slim object)` on each change the `kind` informer sees (on its
    thread: keep it quick, hand work to a queue)."""
    _listeners.setdefault(kind, []).append(listener)


def start() -> None:
    """Start the informers and route kube.list_ and kube.apply through them."""
    if _informers:
        return
    _informers["Pod"] = Informer("Pod", slim=slim_pod)
    _informers["Node"] = Informer("Node", slim=slim_node)
    # Children the operator made (the planner reserves the nodes of other deployments' unit
    # StatefulSets; a reconcile reads, prunes and applies its own): its managed-by label only.
    # ConfigMaps too: without a copy to compare with, every forced pass re-applied each of them.
    for kind in ("StatefulSet", "Service", "Deployment", "ConfigMap"):
        _informers[kind] = Informer(kind, MANAGED)
    # Read by every inference plan (under the placement lock): never a request per pass.
    # TrainingJobs: what the inference plan may borrow nodes from (lending). InferenceDeployments:
    # read by the EPLB timer every few seconds and by the autoscaler, per deployment (the
    # reconcile reads its deployment from the API server: a spec change is planned as written).
    for kind in ("ExpertPlacement", "InferenceRoleScaler", "TrainingJob", "InferenceDeployment"):
        _informers[kind] = Informer(kind)
    for informer in _informers.values():
        informer.start()
        CACHE_OBJECTS.labels(informer.kind).set_function(informer.__len__)
    kube.set_cache(kube.CacheHooks(serve, current, written, holds_all_ours))
    # Handlers start after this returns: their first plans must already see every reservation.
    deadline = time.monotonic() + SYNC_WAIT_SECONDS
    for informer in (_informers[kind] for kind in ("Pod", "Node", "StatefulSet")):
        if not informer.synced.wait(max(0.0, deadline - time.monotonic())):
            log.warning("%s informer not synced yet: its lists go to the API server", informer.kind)


def stop() -> None:
    kube.set_cache(None)
    for informer in _informers.values():
        informer.stop()
    _informers.clear()


def _namespace_of(kind: str, namespace: str | None) -> str | None:
    """None for cluster-scoped kinds: the operator's own namespace (namespace mode) is no filter
    for Nodes."""
    return namespace if kube.RESOURCES[kind][2] else None


def serve(kind: str, namespace: str | None, selector: str | None) -> list[dict[str, Any]] | None:
    """The answer to kube.list_ from an informer, or None where it must go to the API server:
    the informer is not synced, or holds less than asked (pods are slim, so only the
    whole-cluster pod list is served; StatefulSets only under our managed-by filter)."""
    informer = _informers.get(kind)
    if informer is None or not informer.synced.is_set():
        return None
    if kind == "Pod" and (namespace or selector):
        return None
    namespace = _namespace_of(kind, namespace)
    wanted = parse_selector(selector)
    if wanted is None or any(wanted.get(k, "") != v for k, v in informer.filter.items()):
        return None
    return [
        obj
        for obj in informer.items()
        if (namespace is None or obj["metadata"].get("namespace") == namespace)
        and matches(obj["metadata"].get("labels") or {}, wanted)
    ]


def promise(obj: Mapping[str, Any]) -> None:
    """An object the operator is about to apply: plans made before its write returns already
    see it (a StatefulSet's planned nodes are reserved without waiting for the API server)."""
    informer = _informers.get(str(obj.get("kind", "")))
    if informer is not None and matches(obj.get("metadata", {}).get("labels") or {}, informer.filter):
        informer.promise(obj, PROMISE_SECONDS)


def retract(obj: Mapping[str, Any]) -> None:
    """Withdraw the promise of an object whose write failed (a namespace being deleted refuses
    it, say): its nodes must not stay reserved for the promise's lifetime."""
    informer = _informers.get(str(obj.get("kind", "")))
    if informer is not None:
        informer.retract(obj)


def current(kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
    """A copy of the object an informer holds (never a pod: those are slim), or None."""
    informer = _informers.get(kind)
    if kind == "Pod" or informer is None or not informer.synced.is_set():
        return None
    held = informer.get(_namespace_of(kind, namespace), name)
    return copy.deepcopy(held) if held is not None else None


def holds_all_ours(kind: str) -> bool:
    """Whether a synced informer holds every object of `kind` the operator made (its filter, if
    any, is no narrower than our managed-by label)."""
    informer = _informers.get(kind)
    if kind == "Pod" or informer is None or not informer.synced.is_set():
        return False
    return all(k == L.MANAGED_BY and v == L.MANAGER for k, v in informer.filter.items())


def written(obj: Mapping[str, Any]) -> None:
    """An object the operator just wrote (the API server's answer)."""
    informer = _informers.get(str(obj.get("kind", "")))
    if informer is not None and matches(obj.get("metadata", {}).get("labels") or {}, informer.filter):
        informer.upsert(obj)


def snapshot(index: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The items of a kopf index keyed by ALL (callers handed one by kopf)."""
    return [dict(item) for item in index.get(ALL, [])]
