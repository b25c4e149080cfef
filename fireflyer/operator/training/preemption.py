"""A preemptible TrainingJob giving its nodes back to inference. Pure.

The inference controller asks by writing the PREEMPTION_REQUESTED annotation (when, who, which
unit, which nodes) on the job. A request applies to the attempt placed before it was made: that
attempt's Job is deleted with its pods, whose trainers checkpoint the step they are in within
spec.terminationGracePeriodSeconds, and no restart is counted. Until the requester has taken
the nodes it asked for (they are in use by someone else), or HOLD_AFTER_GRACE_SECONDS after the
grace period have passed, the job does not place onto them again; it resumes from its latest
checkpoint on whatever whole set of nodes is free, or waits.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from fireflyer.api import conditions as C
from fireflyer.api.training import PREEMPTION_REQUESTED, TrainingJobSpec
from fireflyer.operator import labels as L
from fireflyer.operator.planning import Event, parse_time
from fireflyer.placement.topology import ClusterTopology

PREEMPTED = "Preempted"  # condition type
NODES_TAKEN_BACK = "NodesTakenBack"
RESUMED = "Resumed"
HOLD_AFTER_GRACE_SECONDS = 60
HELD = "kept free for the inference unit that asked for it"


@dataclass(frozen=True)
class Request:
    at: datetime
    at_text: str
    by: str
    """namespace/deployment"""
    unit: str
    nodes: tuple[str, ...]

    @property
    def requester(self) -> str:
        return f"{self.by} (unit {self.unit})" if self.unit else self.by


def read_request(cr: dict[str, Any]) -> Request | None:
    """The job's preemption request; None when there is none or it is unreadable."""
    raw = (cr["metadata"].get("annotations") or {}).get(PREEMPTION_REQUESTED)
    if not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    at = parse_time(str(doc.get("at") or ""))
    if at is None:
        return None
    nodes = tuple(str(n) for n in doc.get("nodes") or [] if isinstance(n, str))
    return Request(at, str(doc["at"]), str(doc.get("by") or "?"), str(doc.get("unit") or ""), nodes)


def applies(spec: TrainingJobSpec, request: Request | None, job: dict[str, Any]) -> bool:
    """Whether the running attempt must give its nodes back: the job is preemptible and was
    placed no later than the request (a later attempt was placed knowing of it)."""
    if not spec.preemptible or request is None:
        return False
    placed_at = parse_time((job["metadata"].get("annotations") or {}).get(L.PLACED_AT))
    return placed_at is None or placed_at <= request.at


def record(request: Request, previous: dict[str, Any]) -> dict[str, Any]:
    """status.preemption for this request (the step the job had reached when asked)."""
    return {
        "requestedAt": request.at_text,
        "by": request.requester,
        "nodes": list(request.nodes),
        "step": previous.get("step"),
        "released": False,
    }


def is_new(request: Request, previous: dict[str, Any]) -> bool:
    """Not yet acted on (counted, announced)."""
    return ((previous.get("preemption") or {}).get("requestedAt")) != request.at_text


def describe(preemption: dict[str, Any]) -> str:
    step = preemption.get("step")
    at = f" at step {step}" if step is not None else ""
    return f"nodes taken back by {preemption.get('by', '?')}{at}"


def preempted(preemption: dict[str, Any], waiting: str) -> dict[str, Any]:
    """The Preempted condition while the job waits to be placed again."""
    return C.condition(PREEMPTED, True, NODES_TAKEN_BACK, f"{describe(preemption)}; {waiting}")


def resumed(preemption: dict[str, Any]) -> dict[str, Any]:
    return C.condition(
        PREEMPTED, False, RESUMED, f"placed again after {describe(preemption)}; resuming from its checkpoint"
    )


def held_nodes(
    preemption: dict[str, Any] | None, topology: ClusterTopology, grace_seconds: int, now: datetime
) -> tuple[tuple[str, ...], bool]:
    """(nodes the job must not place onto now, whether the hold just ended). The hold ends once
    the requester holds any of the nodes (their GPUs are in use: this job has no pods left when
    it places) or HOLD_AFTER_GRACE_SECONDS after the grace period."""
    if not preemption or preemption.get("released"):
        return (), False
    nodes = tuple(preemption.get("nodes") or ())
    asked = parse_time(preemption.get("requestedAt"))
    expired = asked is None or now > asked + timedelta(seconds=grace_seconds + HOLD_AFTER_GRACE_SECONDS)
    infos = [topology.nodes[n] for n in nodes if n in topology.nodes]
    taken = any(info.free_gpus < info.gpus for info in infos)
    if expired or taken or not nodes:
        return (), True
    return nodes, False


def without(topology: ClusterTopology, nodes: Iterable[str]) -> ClusterTopology:
    """The topology with these nodes unusable for this placement."""
    held = set(nodes)
    if not held:
        return topology
    infos = {
        name: dataclasses.replace(info, usable=False, why_unusable=HELD) if name in held else info
        for name, info in topology.nodes.items()
    }
    return ClusterTopology(infos, topology.levels, topology.level_keys)


def give_back(
    spec: TrainingJobSpec, request: Request, previous: dict[str, Any], restarts: int
) -> tuple[dict[str, Any], list[Event]]:
    """(status, events) of an attempt deleted because inference asked for its nodes: the
    restart count is left alone. Repeated passes delete again but count and announce once."""
    new = is_new(request, previous)
    preemption = record(request, previous) if new else dict(previous["preemption"])
    stopping = f"{describe(preemption)}; the pods checkpoint the step they are in and stop"
    status = {
        "phase": "Restarting" if restarts else "Pending",
        "restarts": restarts,
        "ready": f"0/{spec.nodes}",
        "preemptions": int(previous.get("preemptions") or 0) + (1 if new else 0),
        "preemption": preemption,
        "conditions": [
            C.condition(C.PLACED, False, NODES_TAKEN_BACK, stopping),
            C.condition(C.READY, False, NODES_TAKEN_BACK, stopping),
            C.condition(C.PROGRESSING, True, NODES_TAKEN_BACK, stopping),
            C.condition(C.DEGRADED, False, C.HEALTHY, ""),
            preempted(preemption, "the pods checkpoint the step they are in and stop"),
        ],
    }
    grace = spec.termination_grace_period_seconds
    message = f"{describe(preemption)}: deleting the pods ({grace}s to checkpoint)"
    return status, ([Event("Normal", PREEMPTED, message)] if new else [])


def waiting_since(previous: dict[str, Any]) -> dict[str, Any] | None:
    """status.preemption while the job has not been placed again since it gave its nodes back."""
    current = next((c for c in previous.get("conditions") or [] if c.get("type") == PREEMPTED), None)
    if previous.get("preemption") and current is not None and current.get("status") == "True":
        return dict(previous["preemption"])
    return None
