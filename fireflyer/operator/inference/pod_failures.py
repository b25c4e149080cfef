"""What unit pod events said about their units, kept until the deployment's next reconcile.

The StatefulSet controller may replace a failed pod before a reconcile lists it, so a pod's
failure or loss is remembered from its event; whether the loss was our own deletion is judged in
the reconcile, from the record on the unit's StatefulSet (recreation.py), which outlives this
process. A failed preflight is remembered by pod uid: the plan also reads it off the pod itself
(the cached pod keeps how its containers ended), and by uid a late event of a replaced pod
matches no current pod.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from fireflyer.operator import labels as L
from fireflyer.operator.inference import preflight
from fireflyer.operator.planning import parse_time

Key = tuple[str, str]  # (namespace, deployment)


class PodFailures:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # events arrive on the informer's thread, reads on workers'
        self._failed_units: dict[Key, dict[str, str]] = defaultdict(dict)  # unit → why
        self._failed_pod_created: dict[Key, dict[str, datetime]] = defaultdict(dict)  # unit → when
        self._preflight: dict[Key, dict[str, str]] = defaultdict(dict)  # pod uid → message

    def note(self, event_type: str, pod: dict[str, Any], namespace: str, deployment: str) -> None:
        """A pod event of `deployment`: its preflight verdict, and for a unit pod that failed or
        was deleted (by someone else, an eviction, the StatefulSet controller — or by us, which
        the plan tells apart) that the whole unit must be recreated. Of several losses of one
        unit the youngest pod's is kept: an older one may be our own deletion, a younger one not."""
        meta = pod.get("metadata") or {}
        key = (namespace, deployment)
        message = "" if event_type == "DELETED" else preflight.failure(pod)
        labels = meta.get("labels") or {}
        why = ""
        if labels.get(L.COMPONENT) == "unit":
            if (pod.get("status") or {}).get("phase") == "Failed":
                why = f"pod {meta.get('name')} failed"
            elif event_type == "DELETED":
                why = f"pod {meta.get('name')} was deleted"
        unit = f"{deployment}-{labels.get(L.ROLE)}-{labels.get(L.UNIT)}"
        created = parse_time(meta.get("creationTimestamp")) or datetime.now(UTC)
        with self._lock:
            if message:
                self._preflight[key][str(meta.get("uid", ""))] = message
            else:
                self._preflight[key].pop(str(meta.get("uid", "")), None)
            if not why:
                return
            known = self._failed_pod_created[key].get(unit)
            if unit not in self._failed_units[key] or known is None or created >= known:
                self._failed_units[key][unit] = why
                self._failed_pod_created[key][unit] = created

    def take(self, namespace: str, deployment: str) -> dict[str, Any]:
        """For a reconcile's Observed: the units lost since the last one (`failed_units`, handed
        over once), when their pods were created (`failed_pod_created`), and the failed
        preflights known now (`preflight_failures`, kept)."""
        key = (namespace, deployment)
        with self._lock:
            return {
                "failed_units": self._failed_units.pop(key, {}),
                "failed_pod_created": self._failed_pod_created.pop(key, {}),
                "preflight_failures": dict(self._preflight.get(key, {})),
            }
