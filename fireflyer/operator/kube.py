"""Kubernetes access for controllers: server-side apply under one field manager, list, delete,
status patches. Synchronous (kopf runs sync handlers in its thread pool)."""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from fireflyer.operator import labels as L
from fireflyer.operator.metrics import API_REQUESTS, API_SECONDS

__all__ = [
    "FIELD_MANAGER",
    "ApiException",
    "api_group_served",
    "apply",
    "configure_watches",
    "create",
    "delete",
    "get",
    "held",
    "list_",
    "patch",
    "patch_status",
    "set_cache",
    "set_scope",
    "watch",
]

FIELD_MANAGER = "fireflyer-operator"

# kind → (API path prefix, plural, namespaced). Static: no discovery round trips.
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "Node": ("/api/v1", "nodes", False),
    "Pod": ("/api/v1", "pods", True),
    "Service": ("/api/v1", "services", True),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "Secret": ("/api/v1", "secrets", True),
    "StatefulSet": ("/apis/apps/v1", "statefulsets", True),
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "DaemonSet": ("/apis/apps/v1", "daemonsets", True),
    "Job": ("/apis/batch/v1", "jobs", True),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets", True),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims", True),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "FoundationDBCluster": ("/apis/apps.foundationdb.org/v1beta2", "foundationdbclusters", True),
    "InferenceDeployment": ("/apis/fireflyer.dev/v1alpha1", "inferencedeployments", True),
    "ThreeFSCluster": ("/apis/fireflyer.dev/v1alpha1", "threefsclusters", True),
    "TrainingJob": ("/apis/fireflyer.dev/v1alpha1", "trainingjobs", True),
    "ExpertPlacement": ("/apis/fireflyer.dev/v1alpha1", "expertplacements", True),
    "InferenceRoleScaler": ("/apis/fireflyer.dev/v1alpha1", "inferencerolescalers", True),
}

_lock = threading.Lock()

# The one namespace the operator watches (--namespace), or None for all. In that mode its Role
# reaches no other namespace, so reads "across all namespaces" cover this one alone.
_scope: str | None = None

# Kinds whose watches are filtered by the API server: every handler of them asks for the
# operator's managed-by label, so nothing else needs to reach the operator. Pods stay unfiltered
# (free GPUs count every pod on a node); Secrets are never watched.
FILTERED_WATCHES = (
    ("batch", "v1", "jobs"),
    ("v1", "services"),
    ("apps", "v1", "statefulsets"),
    ("apps", "v1", "deployments"),
    ("apps", "v1", "daemonsets"),
)


class CacheHooks(NamedTuple):
    """What the informers (fireflyer.operator.cache) answer and learn."""

    serve: Callable[[str, str | None, str | None], list[dict[str, Any]] | None]
    """kind, namespace, selector → the list, or None: ask the API server."""
    current: Callable[[str, str | None, str], dict[str, Any] | None]
    """kind, namespace, name → the object held, or None."""
    written: Callable[[Mapping[str, Any]], None]
    """An object as the API server answered a write of it."""
    holds_all_ours: Callable[[str], bool] = lambda kind: False
    """kind → whether a synced informer holds every object of that kind the operator made: one
    it does not hold does not exist (as of its watch), and asking the API server is not needed."""


_cache: CacheHooks | None = None
# What this process last applied, by (kind, namespace, name) → (digest, resourceVersion and
# metadata.generation answered).
_applied: dict[tuple[str, str, str], tuple[str, str, int | None]] = {}


def set_cache(hooks: CacheHooks | None) -> None:
    global _cache
    _cache = hooks


def _to_cache(answer: Any) -> None:
    """The API server's answer to a write goes to the informers at once, so a pass inside the
    watch's lag sees it."""
    if isinstance(answer, dict) and answer and _cache is not None:
        _cache.written(answer)


def set_scope(namespace: str | None) -> None:
    global _scope
    _scope = namespace


def configure_watches(settings: Any) -> None:
    """Server-side label selectors for the child watches (kopf's handler `labels=` filter only on
    the client). Namespace mode skips kopf's cluster-wide observation of namespaces and CRDs,
    which its Role does not grant: the resources it serves are found once, at start."""
    for resource in FILTERED_WATCHES:
        settings.watching.label_selectors[resource] = f"{L.MANAGED_BY}={L.MANAGER}"
    if _scope is not None:
        settings.scanning.disabled = True


@functools.cache
def api_client() -> client.ApiClient:
    with _lock:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        configuration = client.Configuration.get_default_copy()
        # One connection per thread that may call at once (kopf's workers, the debouncers, the
        # informers' watches): with fewer, each burst opens and discards TLS connections.
        configuration.connection_pool_maxsize = 64
        return client.ApiClient(configuration)


def _path(kind: str, namespace: str | None = None, name: str | None = None, sub: str = "") -> str:
    """namespace None lists across all namespaces."""
    prefix, plural, namespaced = RESOURCES[kind]
    path = prefix
    namespace = namespace or _scope
    if namespaced and namespace:
        path += f"/namespaces/{namespace}"
    path += f"/{plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


def _call(
    method: str,
    path: str,
    body: Any = None,
    query: list[tuple[str, str]] | None = None,
    content_type: str = "application/json",
    timeout: float | tuple[float, float] = 60,
    stream: bool = False,
) -> Any:
    """stream: the open response, unread (a watch)."""
    API_REQUESTS.labels("WATCH" if stream else method).inc()
    api = api_client()
    # The client serialises bodies of JSON content types itself; others must arrive as text.
    data = body if "json" in content_type or body is None else json.dumps(body)
    _, url, headers, payload, post = api.param_serialize(
        method,
        path,
        query_params=query or [],
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        body=data,
        auth_settings=["BearerToken"],
    )
    started = time.perf_counter()
    response = api.call_api(
        method, url, header_params=headers, body=payload, post_params=post, _request_timeout=timeout
    )
    if stream:
        return response
    response.read()
    API_SECONDS.labels(method).observe(time.perf_counter() - started)
    if not 200 <= response.status < 300:
        raise ApiException(http_resp=response)
    raw = response.data
    return json.loads(raw) if raw else None


def apply(obj: dict[str, Any]) -> dict[str, Any]:
    """Server-side apply: re-applying the same object is a no-op; hand edits of fields we own
    are reverted. Skipped, with no request at all, when this process applied the same content
    and the informer holds the object as that apply left what we own (`applied_stands`)."""
    meta = obj["metadata"]
    key = (obj["kind"], meta.get("namespace") or "", meta["name"])
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    last = _applied.get(key)
    if _cache is not None and last is not None and last[0] == digest:
        held = _cache.current(obj["kind"], meta.get("namespace"), meta["name"])
        if held is not None and applied_stands(held, obj, last[1], last[2]):
            return held
    path = _path(obj["kind"], meta.get("namespace"), meta["name"])
    result: dict[str, Any] = _call(
        "PATCH",
        path,
        obj,
        [("fieldManager", FIELD_MANAGER), ("force", "true")],
        "application/apply-patch+yaml",
    )
    if result:
        answered = result.get("metadata", {})
        _applied[key] = (digest, str(answered.get("resourceVersion", "")), answered.get("generation"))
    _to_cache(result)
    return result


def applied_stands(
    held: dict[str, Any], applied: dict[str, Any], version: str, generation: int | None
) -> bool:
    """Whether `held` (the informer's copy) still is what applying `applied` left, as far as we
    own it: the version that apply produced, or — for an object whose controller writes its status
    (a StatefulSet's or Deployment's replica counts move its version many times while pods
    start) — the same spec generation with our labels, annotations and owners in place."""
    meta = held["metadata"]
    if meta.get("resourceVersion") == version:
        return True
    if generation is None or meta.get("generation") != generation:
        return False  # a spec edited since (the generation moved), or a kind without one
    ours = applied["metadata"]
    for field in ("labels", "annotations"):
        if any((meta.get(field) or {}).get(k) != v for k, v in (ours.get(field) or {}).items()):
            return False
    return (meta.get("ownerReferences") or []) == (ours.get("ownerReferences") or [])


def held(kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
    """The informer's copy of an object, or None (not held, or no informer): never a request."""
    return _cache.current(kind, namespace or _scope, name) if _cache is not None else None


def get(
    kind: str, name: str, namespace: str | None = None, *, ours: bool = False, fresh: bool = False
) -> dict[str, Any] | None:
    """From an informer when it holds the object (ours, as recent as its watch), else from the
    API server. ours: the object, if it exists, carries the operator's managed-by label, so an
    informer of our objects that does not hold it answers None without a request (a child not
    created yet is asked for by every pass until it is, on a busy API server). fresh: always the
    API server (a write refused for a stale resourceVersion must not be redone on the same copy)."""
    if _cache is not None and not fresh:
        held = _cache.current(kind, namespace or _scope, name)
        if held is not None or (ours and _cache.holds_all_ours(kind)):
            return held
    try:
        result: dict[str, Any] = _call("GET", _path(kind, namespace, name))
        return result
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def list_(kind: str, namespace: str | None = None, selector: str | None = None) -> list[dict[str, Any]]:
    """Answered by an informer where one holds what is asked (whole-cluster pods, nodes, our
    StatefulSets), else by the API server."""
    if _cache is not None:
        cached = _cache.serve(kind, namespace or _scope, selector)
        if cached is not None:
            return cached
    return list_with_version(kind, selector, namespace)[0]


def list_with_version(
    kind: str, selector: str | None = None, namespace: str | None = None
) -> tuple[list[dict[str, Any]], str]:
    """The items from the API server and the list's resourceVersion (to watch from)."""
    query = [("labelSelector", selector)] if selector else []
    body = _call("GET", _path(kind, namespace), query=query)
    items: list[dict[str, Any]] = body["items"]
    for item in items:  # a list's items carry no kind; the informers key writes by it
        item.setdefault("kind", kind)
    return items, str((body.get("metadata") or {}).get("resourceVersion") or "")


def watch(
    kind: str, version: str, selector: str | None = None, seconds: int = 240
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(type, object) events of `kind` after `version` (across the operator's scope), until the
    server ends the watch after about `seconds`."""
    query = [("watch", "true"), ("resourceVersion", version), ("allowWatchBookmarks", "true")]
    query += [("timeoutSeconds", str(seconds))]
    if selector:
        query.append(("labelSelector", selector))
    response = _call("GET", _path(kind), query=query, timeout=(30, seconds + 30), stream=True)
    try:
        if not 200 <= response.status < 300:
            response.read()
            raise ApiException(http_resp=response)
        pending = b""
        for chunk in response.response.stream(65536, decode_content=True):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip():
                    event = json.loads(line)
                    yield event["type"], event["object"]
    finally:
        response.response.release_conn()


def delete(
    kind: str,
    name: str,
    namespace: str | None = None,
    propagation: str = "Background",
    grace_seconds: int | None = None,
) -> bool:
    """grace_seconds=0 removes a pod whose node is gone (no kubelet will confirm its end)."""
    options: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
    if grace_seconds is not None:
        options["gracePeriodSeconds"] = grace_seconds
    try:
        _call("DELETE", _path(kind, namespace, name), options)
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


def create(obj: dict[str, Any]) -> dict[str, Any] | None:
    """Create, or None when an object of that name exists already (never overwrites)."""
    meta = obj["metadata"]
    try:
        result: dict[str, Any] = _call("POST", _path(obj["kind"], meta.get("namespace")), obj)
    except ApiException as exc:
        if exc.status == 409:
            return None
        raise
    _to_cache(result)
    return result


def api_group_served(path: str) -> bool:
    """Whether the API server serves a group version, e.g. /apis/apps.foundationdb.org/v1beta2."""
    try:
        _call("GET", path)
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


def patch(
    kind: str, name: str, namespace: str | None, body: dict[str, Any], *, field_manager: str | None = None
) -> dict[str, Any]:
    """JSON merge patch of the object itself (metadata, not status)."""
    query = [("fieldManager", field_manager)] if field_manager else None
    result: dict[str, Any] = _call(
        "PATCH", _path(kind, namespace, name), body, query, content_type="application/merge-patch+json"
    )
    _to_cache(result)
    return result


def drop_finalizer(kind: str, cr: dict[str, Any], finalizer: str) -> bool:
    """Remove `finalizer` from the object if it carries it (a JSON patch that tests the list it
    read, so a concurrent change to the finalizers is never lost); whether it was removed."""
    finalizers = list(cr["metadata"].get("finalizers") or [])
    if finalizer not in finalizers:
        return False
    ops = [
        {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
        {"op": "replace", "path": "/metadata/finalizers", "value": [f for f in finalizers if f != finalizer]},
    ]
    try:
        _call(
            "PATCH",
            _path(kind, cr["metadata"].get("namespace"), cr["metadata"]["name"]),
            ops,
            content_type="application/json-patch+json",
        )
    except ApiException as exc:
        if exc.status in (404, 409, 422):  # gone, or the list changed: the next pass sees it
            return False
        raise
    return True


def patch_status(kind: str, name: str, namespace: str, status: dict[str, Any]) -> None:
    """Merge `status` into the object's status (a pass inside the watch's lag then compares with
    the status just written, not write it again)."""
    result = _call(
        "PATCH",
        _path(kind, namespace, name, "status"),
        {"status": status},
        content_type="application/merge-patch+json",
    )
    _to_cache(result)


def invalid_spec(kind: str, cr: dict[str, Any], error: Exception) -> Exception:
    """Say on the resource's status that its spec cannot be read (admission should have caught
    it); → the error that stops kopf from retrying."""
    import kopf

    from fireflyer.api import conditions as C
    from fireflyer.operator.planning import format_time

    now = format_time(datetime.now(UTC))
    meta = cr["metadata"]
    patch_status(kind, meta["name"], meta["namespace"], C.invalid_spec_status(cr, str(error), now))
    return kopf.PermanentError(f"invalid spec: {error}")
