"""Which admin step objects belong to this ThreeFSCluster, by owner UID. Pure.

Step Jobs and result ConfigMaps are named after the cluster, and a cluster deleted and created
again under the same name finds its predecessor's ones until the garbage collector removes them:
read by name, a finished step of the old cluster would count as done for the new one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    return any(o.get("uid") == uid for o in obj.get("metadata", {}).get("ownerReferences") or [])


@dataclass
class StepObjects:
    jobs: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    stale: list[tuple[str, str]] = field(default_factory=list)
    """(kind, name) of another owner's step objects: deleted before any step runs."""


def step_objects(uid: str, jobs: list[dict[str, Any]], results: list[dict[str, Any]]) -> StepObjects:
    found = StepObjects()
    for kind, items, ours in (("Job", jobs, found.jobs), ("ConfigMap", results, found.results)):
        for item in items:
            if owned_by(item, uid):
                ours.append(item)
            else:
                found.stale.append((kind, item["metadata"]["name"]))
    return found


def blank_token_patch(owner: dict[str, Any]) -> dict[str, Any]:
    """A merge patch that empties an existing token Secret and makes it this cluster's (a
    predecessor's token must never reach this cluster's admin Jobs or clients)."""
    return {"metadata": {"ownerReferences": [owner]}, "data": None}
