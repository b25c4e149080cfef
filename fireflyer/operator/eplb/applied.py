"""Which placement generation the units run, from what their leaders report. Pure.

A unit's leader adds `"generation"` to its GET /v1/eplb/load answer: the placement generation all
its ranks run, null while they run the default even split (counted as generation 0 here). An
engine that predates the field, or a leader that cannot be reached, is unknown: it counts for no
generation and never fails the collection.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from fireflyer.api import conditions as C
from fireflyer.operator.inference import reasons as R

DEFAULT_SPLIT = 0


def reported_generation(payload: Any) -> int | None:
    """The generation a load window reports (0: the default even split); None when unknown."""
    if not isinstance(payload, dict) or "generation" not in payload:
        return None
    generation = payload["generation"]
    if generation is None:
        return DEFAULT_SPLIT
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
        return None
    return generation


def lowest(generations: Iterable[int | None]) -> int | None:
    """The role's applied generation: the lowest any unit reports (None when none reports)."""
    return min((g for g in generations if g is not None), default=None)


def applied_units(placements: Iterable[dict[str, Any]], generations: Iterable[int | None]) -> dict[str, int]:
    """ExpertPlacement name → units reporting its generation, for those whose status.appliedUnits
    differs (the writes to make)."""
    counts = Counter(g for g in generations if g is not None)
    changes = {}
    for placement in placements:
        count = counts.get(int((placement.get("spec") or {}).get("generation") or 0), 0)
        if int((placement.get("status") or {}).get("appliedUnits") or 0) != count:
            changes[placement["metadata"]["name"]] = count
    return changes


def combine_health(conds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One EplbHealthy from the roles' own: unhealthy when any role is."""
    if not conds:
        return None
    bad = [c for c in conds if c["status"] == "False"]
    said = bad or conds
    message = "; ".join(dict.fromkeys(c["message"] for c in said))[:2000]
    # A role without a placement of its own (the default split) does not name the whole.
    reason = next((c["reason"] for c in said if c["reason"] != R.NO_PLACEMENT), said[0]["reason"])
    return C.condition(C.EPLB_HEALTHY, not bad, reason, message)
