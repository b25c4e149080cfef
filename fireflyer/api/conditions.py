"""Condition types, reasons (CamelCase constants kept in one place) and the transition rule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Types
READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
PLACED = "Placed"
PREFILL_READY = "PrefillReady"
DECODE_READY = "DecodeReady"
ROUTER_READY = "RouterReady"

# Reasons
ALL_UNITS_READY = "AllUnitsReady"
UNITS_NOT_READY = "UnitsNotReady"
NO_UNITS = "NoUnits"
UNITS_PLACED = "UnitsPlaced"
PLACED_ABOVE_PREFERRED_LEVEL = "PlacedAbovePreferredLevel"
INSUFFICIENT_CAPACITY = "InsufficientCapacity"
ROLLING_OUT = "RollingOut"
PLACING = "Placing"
RECONCILED = "Reconciled"
UNIT_RECREATED = "UnitRecreated"
UNIT_BIND_TIMEOUT = "UnitBindTimeout"
ROUTER_AVAILABLE = "RouterAvailable"
ROUTER_UNAVAILABLE = "RouterUnavailable"
HEALTHY = "Healthy"
INVALID_SPEC = "InvalidSpec"
EPLB_HEALTHY = "EplbHealthy"
LOAD_COLLECTED = "LoadCollected"
LOAD_UNAVAILABLE = "LoadUnavailable"
REBALANCE_APPLIED = "RebalanceApplied"
REBALANCE_SKIPPED = "RebalanceSkipped"
JOB_RUNNING = "JobRunning"
JOB_SUCCEEDED = "JobSucceeded"
JOB_RESTARTED = "JobRestarted"
JOB_RECREATED = "JobRecreated"
JOB_FAILED = "JobFailed"
PODS_STARTING = "PodsStarting"
MAX_RESTARTS_EXCEEDED = "MaxRestartsExceeded"


def condition(type_: str, status: bool | str, reason: str, message: str = "") -> dict[str, Any]:
    value = status if isinstance(status, str) else ("True" if status else "False")
    return {"type": type_, "status": value, "reason": reason, "message": message}


def merge(
    previous: Sequence[dict[str, Any]], desired: Sequence[dict[str, Any]], now: str, generation: int
) -> list[dict[str, Any]]:
    """Desired conditions with lastTransitionTime kept unless the status flipped. Conditions of
    types the caller does not set (another controller's) are kept as they are."""
    before = {c.get("type"): c for c in previous}
    setting = {c["type"] for c in desired}
    merged = [c for c in previous if c.get("type") not in setting]
    for cond in desired:
        old = before.get(cond["type"])
        kept = old.get("lastTransitionTime") if old and old.get("status") == cond["status"] else None
        merged.append({**cond, "lastTransitionTime": kept or now, "observedGeneration": generation})
    return merged


def invalid_spec_status(cr: dict[str, Any], message: str, now: str) -> dict[str, Any]:
    """The status of a resource whose spec could not be read: not Ready, Degraded, saying why,
    for this generation (so kstatus and GitOps tools see the failure is about the current spec),
    with the other conditions kept."""
    generation = int(cr["metadata"].get("generation", 0))
    previous = (cr.get("status") or {}).get("conditions") or []
    why = message[:1000]
    desired = [condition(READY, False, INVALID_SPEC, why), condition(DEGRADED, True, INVALID_SPEC, why)]
    return {"conditions": merge(previous, desired, now, generation), "observedGeneration": generation}
