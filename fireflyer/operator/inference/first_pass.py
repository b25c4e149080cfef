"""A new InferenceDeployment's first pass: what it plans from and writes its status against.

The first pass runs on a queue of its own (controller.py), after kopf's create handler has
returned. It plans from the newest copy known without a request, as nothing of ours is written on
the object yet; kopf annotates the object as its handler returns, so the status is written against
the informer's copy when only that moved."""

from __future__ import annotations

import copy
from typing import Any

from fireflyer.operator import kube

KIND = "InferenceDeployment"


def from_event(reason: Any, retry: int, body: Any) -> dict[str, Any] | None:
    """The creation event's object, when the pass may plan from it instead of reading the object
    again (a round trip less for every new deployment): the first try of the create handler, on
    an object with no status yet. Anything later reads it fresh, as our own status writes may be
    ahead of the event."""
    if getattr(reason, "value", reason) != "create" or retry or body is None or body.get("status"):
        return None
    return copy.deepcopy(dict(body))


def newest_known(created: dict[str, Any]) -> dict[str, Any] | None:
    """What a new deployment's queued first pass plans from: the informer's copy when it holds
    the object, else its creation event; None (read it from the API server) once a pass of ours
    has written its status (observedGeneration), as that write may be ahead of the watch. Other
    writers' fields (the autoscaler's, EPLB's) are no reason to read again: if the copy is
    behind them, the status write is refused and redone on a fresh read. kopf annotates the
    object when the create handler returns: planned from the event, the pass's status write
    would be refused for a stale version and redone (two more round trips)."""
    meta = created["metadata"]
    held = kube.held(KIND, meta["name"], meta.get("namespace"))
    if held is None or held["metadata"].get("uid") != meta.get("uid"):
        return created
    return None if (held.get("status") or {}).get("observedGeneration") is not None else held


def status_read(cr: dict[str, Any]) -> dict[str, Any]:
    """What a first pass writes its status against: the informer's copy when it is the same
    object, spec and (empty) status as `cr`. kopf annotates a new object as its create handler
    returns, during the pass: written against `cr`, the status would be refused for a stale
    version and redone on a fresh read. A copy planned from is never newer than the informer's."""
    meta = cr["metadata"]
    held = kube.held(KIND, meta["name"], meta.get("namespace"))
    if held is None:
        return cr
    same = all(held["metadata"].get(k) == meta.get(k) for k in ("uid", "generation"))
    return held if same and held.get("status") == cr.get("status") else cr
