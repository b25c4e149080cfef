"""Scale-in through the router: which surplus units drain, which go now, and why the others wait.
Pure.

When a role's live units drop, the units with the highest indexes are surplus. Each is first
marked draining: its StatefulSet carries DRAINING_SINCE (so a restarted operator resumes the
drain where it was) and the router's backends file lists it with `"draining": true`, so the
router sends it no new request while the open ones, streams included, finish. A surplus unit is
removed once every router replica reports it draining with nothing in flight, or once the
role's drain timeout has passed (an unknown answer waits for the timeout). A scale back up
while a unit drains cancels its drain: the unit is kept as it is, not restarted. Without a
router there is nobody to drain through, and surplus units go at once.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from fireflyer.operator import labels as L
from fireflyer.operator.inference import children
from fireflyer.operator.planning import Event, format_time, parse_time
from fireflyer.placement.reservations import reservations

DRAINING_SINCE = "fireflyer.dev/draining-since"
"""Annotation on a unit's StatefulSet: when its drain began (RFC 3339)."""

UNIT_DRAINING = "UnitDraining"
UNIT_DRAINED = "UnitDrained"
DRAIN_TIMED_OUT = "DrainTimedOut"
DRAIN_CANCELLED = "DrainCancelled"

StatefulSet = TypeVar("StatefulSet", bound=Mapping[str, Any])

RECHECK_SECONDS = 2.0
"""How soon a waiting drain is looked at again."""

WAIT_UNKNOWN = "the router's in-flight counts are unknown"
WAIT_UNREAD = "the router has not read its drain yet"
WAIT_IN_FLIGHT = "requests in flight"
"""The kinds of wait: an Event says when a unit's wait changes kind; the live count is status's."""


@dataclass(frozen=True)
class UnitLoad:
    """One unit as the router replicas see it."""

    in_flight: int
    """Requests open on the unit, summed over the router replicas."""
    draining: bool
    """Every router replica has read the unit's drain (a replica that does not list the unit at
    all sends it nothing, which counts as drained too)."""


RouterLoad = Mapping[str, UnitLoad]
"""Unit URL → its load; a unit the routers do not list has none."""


@dataclass(frozen=True)
class Surplus:
    """A unit above its role's live count, still present."""

    role: str
    index: int
    name: str
    url: str
    """The unit's URL in the router's backends file."""
    since: datetime | None
    """When its drain began (None: it begins now)."""


@dataclass
class DrainPlan:
    draining: dict[str, datetime] = field(default_factory=dict)
    """Unit name → when its drain began: kept, listed draining, DRAINING_SINCE set."""
    waiting: dict[str, str] = field(default_factory=dict)
    """Unit name → why it is not removed yet, in words."""
    removed: dict[str, str] = field(default_factory=dict)
    """Unit name → why it goes now (its StatefulSet is not desired any more)."""
    events: list[Event] = field(default_factory=list)


def merge_router_answers(answers: Iterable[Mapping[str, Any] | None]) -> dict[str, UnitLoad] | None:
    """One reading over the router replicas' `/health` answers ({"units": [{"url", "in_flight",
    "draining"}]}); None (unknown) when there is no answer, or any replica did not answer."""
    merged: dict[str, UnitLoad] = {}
    seen = 0
    per_replica: list[dict[str, tuple[int, bool]]] = []
    for answer in answers:
        if answer is None or not isinstance(answer.get("units"), list):
            return None
        seen += 1
        units: dict[str, tuple[int, bool]] = {}
        for unit in answer["units"]:
            if isinstance(unit, dict) and isinstance(unit.get("url"), str):
                units[unit["url"]] = (int(unit.get("in_flight") or 0), bool(unit.get("draining")))
        per_replica.append(units)
    if seen == 0:
        return None
    for url in {u for units in per_replica for u in units}:
        listed = [units[url] for units in per_replica if url in units]
        merged[url] = UnitLoad(sum(n for n, _ in listed), all(d for _, d in listed))
    return merged


def _leaving(sts: Mapping[str, Any]) -> bool:
    """Being deleted: it takes no part in a drain (applying it again would bring it back)."""
    return bool((sts.get("metadata") or {}).get("deletionTimestamp"))


def without_deleted(
    statefulsets: Mapping[str, StatefulSet], deleted_uids: Collection[str]
) -> dict[str, StatefulSet]:
    """The StatefulSets less those this operator deleted and a lagging watch still lists."""
    return {
        name: sts
        for name, sts in statefulsets.items()
        if (sts.get("metadata") or {}).get("uid") not in deleted_uids
    }


def wait_kind(message: str) -> str:
    """The kind of wait a drain message states (its live count left out); "" for none."""
    for kind in (WAIT_UNKNOWN, WAIT_UNREAD):
        if message.endswith(kind):
            return kind
    return WAIT_IN_FLIGHT if message.endswith(" in flight") else ""


def surplus_units(
    statefulsets: Mapping[str, Mapping[str, Any]],
    live_units: Mapping[str, int],
    url_of: Any,
) -> list[Surplus]:
    """The role units whose index is at or above the role's live count, lowest first (those
    being deleted left out). url_of(role, index) → the unit's URL in the backends file."""
    found = []
    for name, sts in statefulsets.items():
        if _leaving(sts):
            continue
        meta = sts.get("metadata") or {}
        labels = meta.get("labels") or {}
        role, index = str(labels.get(L.ROLE)), str(labels.get(L.UNIT))
        if role not in live_units or not index.isdigit():
            continue
        if int(index) < live_units[role]:
            continue
        since = parse_time((meta.get("annotations") or {}).get(DRAINING_SINCE))
        found.append(Surplus(role, int(index), name, url_of(role, int(index)), since))
    return sorted(found, key=lambda s: (s.role, s.index))


def drain_due(statefulsets: Iterable[Mapping[str, Any]], live_units: Mapping[str, int]) -> bool:
    """Whether a unit drains, or sits at or above its role's live count (a scale-in): only then
    are the routers asked for their in-flight counts."""
    for sts in statefulsets:
        if _leaving(sts):
            continue
        meta = sts.get("metadata") or {}
        if DRAINING_SINCE in (meta.get("annotations") or {}):
            return True
        labels = meta.get("labels") or {}
        role, index = str(labels.get(L.ROLE)), str(labels.get(L.UNIT))
        if role in live_units and index.isdigit() and int(index) >= live_units[role]:
            return True
    return False


def cancelled(statefulsets: Mapping[str, Mapping[str, Any]], live_units: Mapping[str, int]) -> list[str]:
    """Units within their role's live count that still carry a drain: a scale back up."""
    names = []
    for name, sts in sorted(statefulsets.items()):
        if _leaving(sts):
            continue
        meta = sts.get("metadata") or {}
        labels = meta.get("labels") or {}
        role, index = str(labels.get(L.ROLE)), str(labels.get(L.UNIT))
        below = role in live_units and index.isdigit() and int(index) < live_units[role]
        if below and DRAINING_SINCE in (meta.get("annotations") or {}):
            names.append(name)
    return names


def _label(unit: Surplus) -> str:
    return f"{unit.role} unit {unit.index}"


def plan_drain(
    surplus: Iterable[Surplus],
    load: RouterLoad | None,
    *,
    has_router: bool,
    timeout_seconds: int,
    now: datetime,
    cancelled_units: Iterable[str] = (),
    previous_waiting: Mapping[str, str] | None = None,
) -> DrainPlan:
    """What happens to each surplus unit now. `load` None: the routers' answer is unknown.
    previous_waiting: unit name → the wait message the status last showed (an Event is posted
    only when the kind of wait changes: the live count is in the status, not in Events)."""
    result = DrainPlan()
    before = previous_waiting or {}
    for name in cancelled_units:
        result.events.append(
            Event("Normal", DRAIN_CANCELLED, f"{name}: its role scaled back up; drain cancelled, unit kept")
        )
    for unit in surplus:
        if not has_router or timeout_seconds == 0:
            why = "no router to drain through" if not has_router else "drainTimeoutSeconds is 0"
            result.removed[unit.name] = why
            result.events.append(Event("Normal", UNIT_DRAINED, f"{_label(unit)} removed: {why}"))
            continue
        since = unit.since or now
        elapsed = (now - since).total_seconds()
        if unit.since is None:
            result.events.append(
                Event(
                    "Normal",
                    UNIT_DRAINING,
                    f"{_label(unit)} draining: scale-in; the router sends it no new requests",
                )
            )
        seen = None if load is None else load.get(unit.url, UnitLoad(0, True))
        if seen is None:
            kind = wait = WAIT_UNKNOWN
        elif not seen.draining:
            kind = wait = WAIT_UNREAD
        elif seen.in_flight > 0:
            plural = "request" if seen.in_flight == 1 else "requests"
            kind, wait = WAIT_IN_FLIGHT, f"{seen.in_flight} {plural} in flight"
        else:
            result.removed[unit.name] = "drained: no request in flight"
            result.events.append(Event("Normal", UNIT_DRAINED, f"{_label(unit)} drained; removing it"))
            continue
        if elapsed >= timeout_seconds:
            why = f"drain timed out after {timeout_seconds}s ({wait})"
            result.removed[unit.name] = why
            result.events.append(Event("Warning", DRAIN_TIMED_OUT, f"{_label(unit)}: {why}; removing it"))
            continue
        result.draining[unit.name] = since
        result.waiting[unit.name] = f"{_label(unit)} draining: {wait}"
        if unit.since is not None and wait_kind(before.get(unit.name, "")) != kind:
            waiting_for = "waiting for the requests in flight to finish" if kind == WAIT_IN_FLIGHT else kind
            result.events.append(Event("Normal", UNIT_DRAINING, f"{_label(unit)} draining: {waiting_for}"))
    return result


def mark(sts: Mapping[str, Any], since: datetime) -> dict[str, Any]:
    """The desired StatefulSet of a draining unit: the observed one as it is (nothing about the
    unit changes while it drains), with the drain's start recorded. Only our annotations are
    carried: server-side apply would otherwise take over other writers' ones."""
    meta = sts.get("metadata") or {}
    ours = {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith("fireflyer.dev/")}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": meta["name"],
            "namespace": meta.get("namespace"),
            "labels": dict(meta.get("labels") or {}),
            "annotations": {**ours, DRAINING_SINCE: format_time(since)},
            "ownerReferences": list(meta.get("ownerReferences") or []),
        },
        "spec": sts.get("spec") or {},
    }


@dataclass
class ScaleIn:
    """A deployment's drains, as the plan uses them."""

    plan: DrainPlan
    kept: dict[str, Surplus]
    """The draining units that stay for now, by name."""
    statefulsets: dict[str, Mapping[str, Any]]
    """Their observed StatefulSets."""

    def reserved(
        self, others: Mapping[str, tuple[int, int]], rdma_resource: str
    ) -> dict[str, tuple[int, int]]:
        """`others` plus the nodes of the draining units: their pods are this deployment's (the
        plan does not count them as used) but stay until the drain ends."""
        mine = reservations(self.statefulsets.values(), [], rdma_resource)
        merged = dict(others)
        for node, (gpus, rdma) in mine.items():
            before = merged.get(node, (0, 0))
            merged[node] = (before[0] + gpus, before[1] + rdma)
        return merged

    def children(self, cr: Mapping[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for name, unit in self.kept.items():
            out.append(mark(self.statefulsets[name], self.plan.draining[name]))
            out.append(children.headless_service(dict(cr), unit.role, unit.index))
        return out

    def leaders(self, namespace: str, deployment: str) -> dict[str, list[str]]:
        """Role → the leader hosts of its draining units (the router lists them as draining)."""
        hosts: dict[str, list[str]] = {}
        for unit in self.kept.values():
            hosts.setdefault(unit.role, []).append(
                children.leader_host(deployment, unit.role, unit.index, namespace)
            )
        return hosts

    def unit_status(self, namespace: str, deployment: str) -> list[dict[str, Any]]:
        return [
            {
                "role": unit.role,
                "index": unit.index,
                "ready": False,
                "leader": children.leader_host(deployment, unit.role, unit.index, namespace),
                "draining": True,
                "drainingSince": format_time(self.plan.draining[name]),
                "drainMessage": self.plan.waiting[name],
            }
            for name, unit in self.kept.items()
        ]


def scale_in(
    cr: Mapping[str, Any],
    live_units: Mapping[str, int],
    statefulsets: Mapping[str, Mapping[str, Any]],
    load: RouterLoad | None,
    *,
    has_router: bool,
    timeout_seconds: int,
    now: datetime,
) -> ScaleIn:
    """The deployment's drains now: live_units are the units each role runs."""
    name, namespace = cr["metadata"]["name"], cr["metadata"]["namespace"]

    def url_of(role: str, index: int) -> str:
        return children.backend_url(children.leader_host(name, role, index, namespace))

    surplus = surplus_units(statefulsets, live_units, url_of)
    previous = {
        children.unit_name(name, u.get("role", ""), int(u.get("index", 0))): u["drainMessage"]
        for u in (cr.get("status") or {}).get("units") or []
        if u.get("drainMessage")
    }
    planned = plan_drain(
        surplus,
        load,
        has_router=has_router,
        timeout_seconds=timeout_seconds,
        now=now,
        cancelled_units=cancelled(statefulsets, live_units),
        previous_waiting=previous,
    )
    kept = {u.name: u for u in surplus if u.name in planned.draining}
    return ScaleIn(planned, kept, {n: statefulsets[n] for n in kept})
