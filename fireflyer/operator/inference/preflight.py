"""A unit whose RDMA preflight failed: how it is recognised, and which nodes its next placement
avoids for a while. Pure.

The fireflyer engine runs the preflight (all-to-all and bandwidth across the unit's ranks) before
it serves; when it fails, the engine writes a termination message starting `preflight failed:`
(which rank or link failed) and exits non-zero. The operator then recreates the unit elsewhere.
The nodes to avoid are remembered in the unit's status entry (avoidNodes, avoidUntil), so that an
operator restart, or the unit fitting nowhere for a while, does not forget them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from fireflyer.operator.planning import format_time, parse_time
from fireflyer.placement.topology import ClusterTopology

PREFIX = "preflight failed:"
AVOID_SECONDS = 600.0
AVOIDED = "avoided after a failed RDMA preflight"


def failure(pod: Mapping[str, Any]) -> str:
    """The message of a container of the pod that ended with a failed preflight ("" when none).
    A container running again has passed or is retrying its preflight: its last state is history."""
    status = pod.get("status") or {}
    for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        state = container.get("state") or {}
        candidates = [state.get("terminated")]
        if "waiting" in state:  # crash-loop back-off: the failure is the last termination
            candidates.append((container.get("lastState") or {}).get("terminated"))
        for terminated in candidates:
            message = str((terminated or {}).get("message") or "").strip()
            if message.startswith(PREFIX):
                return message
    return ""


def unit_failure(pods: Iterable[Mapping[str, Any]], seen: Mapping[str, str] | None = None) -> str:
    """A unit's preflight failure, on one of its current pods: read from the pod, or `seen` (pod
    uid → message) where the pod at hand lacks its container statuses. Keyed by uid, a failure of
    a pod that a recreation already replaced applies to nothing."""
    for pod in pods:
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            continue  # the previous recreation's pods
        message = failure(pod) or (seen or {}).get(str(meta.get("uid")), "")
        if message:
            return message
    return ""


@dataclass(frozen=True)
class Avoidance:
    nodes: tuple[str, ...]
    until: datetime

    def status(self) -> dict[str, Any]:
        return {"avoidNodes": list(self.nodes), "avoidUntil": format_time(self.until)}


def remembered(units: Iterable[Mapping[str, Any]], now: datetime) -> dict[str, Avoidance]:
    """Unexpired avoidances from the previous status.units, by unit key (role-index)."""
    result = {}
    for unit in units:
        until = parse_time(unit.get("avoidUntil"))
        nodes = tuple(unit.get("avoidNodes") or ())
        if nodes and until is not None and until > now:
            result[f"{unit.get('role')}-{unit.get('index')}"] = Avoidance(nodes, until)
    return result


def extend(previous: Avoidance | None, nodes: Iterable[str], now: datetime) -> Avoidance:
    """Avoid these nodes too, for AVOID_SECONDS from now."""
    union = set(previous.nodes if previous else ()) | {n for n in nodes if n}
    return Avoidance(tuple(sorted(union)), now + timedelta(seconds=AVOID_SECONDS))


def without(topology: ClusterTopology, nodes: Iterable[str]) -> ClusterTopology:
    """The topology with these nodes unusable for new placements."""
    avoided = set(nodes)
    if not avoided:
        return topology
    infos = {
        name: dataclasses.replace(info, usable=False, why_unusable=AVOIDED)
        if name in avoided and info.usable
        else info
        for name, info in topology.nodes.items()
    }
    return ClusterTopology(infos, topology.levels, topology.level_keys)
