"""Kubernetes Events about a custom resource, postable from any thread.

kopf.event needs the handler's context; reconciles also run from debounce timers, so events go
straight to the API. A failure to post is logged, never raised: an event is never worth a
half-applied reconcile.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from fireflyer.operator import kube

COMPONENT = "fireflyer-operator"
log = logging.getLogger(__name__)


def post(cr: dict[str, Any], type_: str, reason: str, message: str) -> None:
    meta = cr["metadata"]
    namespace = meta.get("namespace") or "default"
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": namespace},
        "involvedObject": {
            "apiVersion": cr.get("apiVersion"),
            "kind": cr.get("kind"),
            "name": meta["name"],
            "namespace": namespace,
            "uid": meta.get("uid"),
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": COMPONENT,
        "firstTimestamp": now[:19] + "Z",
        "lastTimestamp": now[:19] + "Z",
        "count": 1,
    }
    try:
        kube._call("POST", f"/api/v1/namespaces/{namespace}/events", event)
    except Exception as error:  # events are best effort
        log.warning("could not post event %s on %s/%s: %s", reason, namespace, meta["name"], error)
