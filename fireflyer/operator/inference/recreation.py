"""The record of a unit's last recreation, kept on its StatefulSet. Pure.

The operator recreates a unit by deleting its pods; their DELETED events arrive later, possibly
to a restarted operator that remembers nothing. A pod lost no later than the unit's recorded
recreation is one of ours; a later loss is a failure (someone else deleted it, or it failed).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fireflyer.operator.planning import format_time, parse_time

RECREATED_AT = "fireflyer.dev/recreated-at"
RECREATED_WHY = "fireflyer.dev/recreated-why"


def recreated_at(sts: dict[str, Any] | None) -> datetime | None:
    """When the unit's pods were last deleted by the operator (None: never)."""
    annotations = (sts or {}).get("metadata", {}).get("annotations") or {}
    return parse_time(annotations.get(RECREATED_AT))


def is_own_deletion(sts: dict[str, Any] | None, pod_created: datetime | None) -> bool:
    """A lost pod created no later than the unit's last recreation went in that recreation."""
    at = recreated_at(sts)
    return at is not None and pod_created is not None and pod_created <= at


def record(child: dict[str, Any], observed: dict[str, Any] | None, why: str | None, now: datetime) -> None:
    """Put the recreation record on the desired StatefulSet: a new one when the unit is recreated
    now (`why`), else the observed one carried over (server-side apply drops what is not sent)."""
    annotations = child["metadata"].setdefault("annotations", {})
    if why is not None:
        annotations[RECREATED_AT] = format_time(now)
        annotations[RECREATED_WHY] = why
        return
    previous = (observed or {}).get("metadata", {}).get("annotations") or {}
    for key in (RECREATED_AT, RECREATED_WHY):
        if key in previous:
            annotations[key] = previous[key]
