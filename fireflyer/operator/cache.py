"""Watch-fed in-memory views of Nodes and Pods (kopf indexes), so that a reconcile reads the
cluster's capacity without listing every pod from the API server."""

from __future__ import annotations

from typing import Any

import kopf

ALL = "all"


def _slim_pod(body: Any) -> dict[str, Any]:
    meta = body.get("metadata", {})
    spec = body.get("spec", {})
    status = body.get("status", {})
    return {
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "labels": dict(meta.get("labels") or {}),
            "creationTimestamp": meta.get("creationTimestamp"),
            "deletionTimestamp": meta.get("deletionTimestamp"),
        },
        "spec": {
            "nodeName": spec.get("nodeName"),
            "containers": [{"resources": dict(c.get("resources") or {})} for c in spec.get("containers", [])],
        },
        "status": {
            "phase": status.get("phase"),
            "conditions": [
                {"type": c.get("type"), "status": c.get("status")} for c in status.get("conditions") or []
            ],
        },
    }


@kopf.index("pods")
def cluster_pods(body: Any, **_: Any) -> dict[str, dict[str, Any]]:
    return {ALL: _slim_pod(body)}


@kopf.index("nodes")
def cluster_nodes(body: Any, **_: Any) -> dict[str, dict[str, Any]]:
    return {
        ALL: {
            "metadata": dict(body.get("metadata", {})),
            "spec": dict(body.get("spec", {})),
            "status": dict(body.get("status", {})),
        }
    }


def snapshot(index: Any) -> list[dict[str, Any]]:
    return [dict(item) for item in index.get(ALL, [])]
