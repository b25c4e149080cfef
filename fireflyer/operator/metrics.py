"""Prometheus metrics of the operator process (docs/observability.md lists every name).

Counters and histograms of what the operator does live here; gauges read from the resources'
status live in fireflyer.operator.object_metrics."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from fireflyer.operator import labels as L
from fireflyer.operator.inference import reasons as R
from fireflyer.operator.planning import Event

RECONCILES = Counter("fireflyer_reconcile_total", "Reconciles by kind and outcome", ["kind", "outcome"])
RECONCILE_SECONDS = Histogram(
    "fireflyer_reconcile_duration_seconds",
    "Reconcile duration by kind",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
QUEUE_SECONDS = Histogram(
    "fireflyer_reconcile_queue_seconds",
    "Time a queued reconcile waited for a worker before it started, by kind",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
# Reconciles run on kopf's worker threads, one deployment at a time under the placement lock:
# a count that stays above 1 is a queue forming behind that lock.
IN_FLIGHT = Gauge("fireflyer_reconciles_in_flight", "Reconciles started and not yet finished", ["kind"])
PLAN_SECONDS = Histogram(
    "fireflyer_plan_duration_seconds",
    "The pure plan step of a reconcile (topology, gang placement, children), by kind",
    ["kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
PHASE_SECONDS = Histogram(
    "fireflyer_reconcile_phase_seconds",
    "Where a reconcile's time goes, by kind and phase (lock waits, reads, plan, writes)",
    ["kind", "phase"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
API_SECONDS = Histogram(
    "fireflyer_api_request_duration_seconds",
    "One request of the controllers to the API server, by verb (watches aside)",
    ["verb"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
API_REQUESTS = Counter(
    "fireflyer_api_requests_total",
    "Requests the controllers sent to the API server (kopf's own watches and patches aside), by verb",
    ["verb"],
)
CACHE_OBJECTS = Gauge(
    "fireflyer_cache_objects",
    "Objects held by the operator's informers (fireflyer.operator.cache), by kind",
    ["kind"],
)
UNIT_RECREATIONS = Counter(
    "fireflyer_unit_recreations_total",
    "Inference units whose pods the operator deleted to recreate the unit whole, by reason",
    ["namespace", "deployment", "role", "reason"],
)
EPLB_COLLECTIONS = Counter(
    "fireflyer_eplb_collections_total",
    "Load windows collected from every unit of a role and used for a rebalance decision",
    ["namespace", "deployment", "role"],
)
EPLB_MEASURED = Gauge(
    "fireflyer_eplb_measured_balancedness",
    "Balancedness of the placement the role runs, on the last collected load window",
    ["namespace", "deployment", "role"],
)
EPLB_PREDICTED = Gauge(
    "fireflyer_eplb_predicted_balancedness",
    "Balancedness the rebalance algorithm predicts for its best placement on the same window",
    ["namespace", "deployment", "role"],
)
EPLB_GENERATION = Gauge(
    "fireflyer_eplb_placement_generation",
    "The newest ExpertPlacement generation of the role (0: the default even split)",
    ["namespace", "deployment", "role"],
)

# Why a unit is recreated, from the plan's reasons (fireflyer.operator.inference.plan): a label
# with a fixed set of values, never the free text (it names pods and nodes).
RECREATION_REASONS = (
    "node_unusable",
    "pod_failed",
    "pod_deleted",
    "bind_timeout",
    "preflight_failed",
    "rollout",
    "other",
)

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
log = logging.getLogger(__name__)
# A reconcile slower than this logs where its time went (its phases).
SLOW_RECONCILE_SECONDS = 1.0
# The phases of the reconcile running on this thread: name → seconds (None outside a reconcile).
_phases = threading.local()


@contextlib.contextmanager
def phase(kind: str, name: str) -> Iterator[None]:
    """Time one phase of the reconcile running on this thread (a phase entered twice adds up)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - started
        PHASE_SECONDS.labels(kind, name).observe(seconds)
        current: dict[str, float] | None = getattr(_phases, "current", None)
        if current is not None:
            current[name] = current.get(name, 0.0) + seconds


@contextlib.contextmanager
def holding(kind: str, name: str, lock: Any) -> Iterator[None]:
    """Hold `lock`, its wait timed as phase `name`."""
    with phase(kind, name):
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def phase_summary(phases: Mapping[str, float], total: float) -> str:
    """ "0.42 s: placement_wait 0.30, children 0.10, other 0.02" — the slowest phases first."""
    other = max(0.0, total - sum(phases.values()))
    parts = sorted({**phases, "other": other}.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{name} {seconds:.2f}" for name, seconds in parts if seconds >= 0.005)
    return f"{total:.2f} s: {shown}"


def timed(kind: str) -> Callable[[F], F]:
    """Count and time a reconcile handler (outcome: ok, retry, error)."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            outcome = "error"
            IN_FLIGHT.labels(kind).inc()
            outer = getattr(_phases, "current", None)  # a reconcile may run one inline (drain)
            phases: dict[str, float] = {}
            _phases.current = phases
            try:
                result = func(*args, **kwargs)
                outcome = "ok"
                return result
            except Exception as exc:
                outcome = "retry" if type(exc).__name__ == "TemporaryError" else "error"
                raise
            finally:
                _phases.current = outer
                seconds = time.perf_counter() - started
                IN_FLIGHT.labels(kind).dec()
                RECONCILES.labels(kind, outcome).inc()
                RECONCILE_SECONDS.labels(kind).observe(seconds)
                if seconds >= SLOW_RECONCILE_SECONDS:
                    what = "/".join(a for a in args[:2] if isinstance(a, str))
                    summary = phase_summary(phases, seconds)
                    log.info("slow %s reconcile of %s (%s): %s", kind, what, outcome, summary)

        return wrapper  # type: ignore[return-value]

    return decorate


def timed_plan(kind: str, plan: Callable[[Any, Any], T], cr: Any, observed: Any) -> T:
    """plan(cr, observed), timed (observe's I/O is not: it ran to build `observed`)."""
    started = time.perf_counter()
    try:
        with phase(kind, "plan"):
            return plan(cr, observed)
    finally:
        PLAN_SECONDS.labels(kind).observe(time.perf_counter() - started)


def recreation_reason(why: str, preflight: bool = False) -> str:
    """The bounded label for a unit's recreation, from the plan's free-text reason."""
    if preflight:
        return "preflight_failed"
    if "rolling out" in why or "two revisions" in why:
        return "rollout"
    if why.startswith("node "):
        return "node_unusable"
    if "running within" in why:
        return "bind_timeout"
    if "was deleted" in why:
        return "pod_deleted"
    if why.endswith(" failed") or "replaced on its own" in why:
        return "pod_failed"
    return "other"


def unit_recreated(
    cr: Mapping[str, Any],
    unit: str,
    why: str,
    events: Iterable[Event],
    pods: Iterable[Mapping[str, Any]],
) -> bool:
    """Count one recreation of `unit` when this pass deletes live pods of it: a pass that only
    finds its pods already terminating (the previous pass's recreation) counts nothing. Returns
    whether it counted."""
    live = [
        p
        for p in pods
        if p["metadata"]["name"].rsplit("-", 1)[0] == unit and not p["metadata"].get("deletionTimestamp")
    ]
    if not live:
        return False
    meta = cr["metadata"]
    role = str((live[0]["metadata"].get("labels") or {}).get(L.ROLE, ""))
    preflight = any(e.reason == R.PREFLIGHT_FAILED and e.message.startswith(f"{unit}:") for e in events)
    UNIT_RECREATIONS.labels(meta["namespace"], meta["name"], role, recreation_reason(why, preflight)).inc()
    return True


def eplb_decision(
    namespace: str, deployment: str, role: str, measured: float, predicted: float, generation: int
) -> None:
    """One collected window and the rebalance decision made on it."""
    EPLB_COLLECTIONS.labels(namespace, deployment, role).inc()
    EPLB_MEASURED.labels(namespace, deployment, role).set(measured)
    EPLB_PREDICTED.labels(namespace, deployment, role).set(predicted)
    EPLB_GENERATION.labels(namespace, deployment, role).set(generation)
