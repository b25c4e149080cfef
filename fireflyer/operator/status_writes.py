"""Status writes to a resource that more than one writer updates (a reconcile, a timer).

A merge patch replaces the whole conditions list, so each writer merges its own condition types
into the live list and sends it with the resourceVersion it read: a write that raced another one
is refused (409) and redone on the newer object, never dropping the other writer's conditions.
Fields a writer does not send are left as they are.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fireflyer.api import conditions as C
from fireflyer.operator import kube

ATTEMPTS = 5


def patch_status(
    kind: str,
    name: str,
    namespace: str,
    fields: dict[str, Any],
    conditions: list[dict[str, Any]],
    generation: int,
    uid: str | None = None,
    read: dict[str, Any] | None = None,
) -> None:
    """Merge-patch `fields` into status, with `conditions` merged into the live ones. uid: the
    object the fields were planned for; another one of the same name is left alone. read: the
    object as the caller read it, tried first instead of reading it again (a GET less per pass;
    if it is stale the write is refused and redone on a fresh read)."""
    path = kube._path(kind, namespace, name, "status")
    for attempt in range(ATTEMPTS):
        # A retry follows a refused write: the informer's copy may be the stale one it was built on.
        live = (
            read if attempt == 0 and read is not None else kube.get(kind, name, namespace, fresh=attempt > 0)
        )
        if live is None or (uid is not None and live["metadata"].get("uid") != uid):
            return
        status = dict(fields)
        if conditions:
            now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            previous = (live.get("status") or {}).get("conditions") or []
            status["conditions"] = C.merge(previous, conditions, now, generation)
        body = {"metadata": {"resourceVersion": live["metadata"]["resourceVersion"]}, "status": status}
        try:
            kube._call("PATCH", path, body, content_type="application/merge-patch+json")
            return
        except kube.ApiException as exc:
            if exc.status != 409 or attempt == ATTEMPTS - 1:
                raise
