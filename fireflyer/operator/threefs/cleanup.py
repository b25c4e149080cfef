"""Deleting a ThreeFSCluster with reclaimPolicy Delete: stop storage, then wipe each node's disks."""

from __future__ import annotations

import json
from typing import Any

from fireflyer.api.threefs import ThreeFSClusterSpec
from fireflyer.operator import kube
from fireflyer.operator import labels as L
from fireflyer.operator.threefs import children as K

WIPE_NODES = "fireflyer.dev/wipe-nodes"
WIPE = "fireflyer.dev/wipe"


def wipe_job_name(cluster: str, node: str) -> str:
    return f"{cluster}-wipe-{node}"[:63].rstrip("-.")


def wipe_job(namespace: str, cluster: str, node: str, spec: ThreeFSClusterSpec) -> dict[str, Any]:
    paths = [
        spec.storage.disk_path_template.replace("{disk}", str(d)) for d in range(spec.storage.disks_per_node)
    ]
    volumes = [{"name": f"disk{i}", "hostPath": {"path": p}} for i, p in enumerate(paths)]
    mounts = [{"name": f"disk{i}", "mountPath": f"/wipe/disk{i}"} for i in range(len(paths))]
    # Only the contents go: the mount points (often real disks) stay for the next file system.
    script = 'set -e; for d in /wipe/disk*; do find "$d" -mindepth 1 -delete; done'
    labels = {K.CLUSTER: cluster, WIPE: "true", L.MANAGED_BY: L.MANAGER}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": wipe_job_name(cluster, node), "namespace": namespace, "labels": labels},
        "spec": {
            "backoffLimit": 3,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "nodeName": node,
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [
                        {
                            "name": "wipe",
                            "image": spec.image,
                            "command": ["/bin/sh", "-c", script],
                            "securityContext": {"privileged": True},
                            "volumeMounts": mounts,
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }


def cleanup_pending(
    namespace: str, cluster: str, spec: ThreeFSClusterSpec, meta: dict[str, Any]
) -> list[str]:
    """What deletion still waits for (empty when the disks are wiped)."""
    annotations = meta.get("annotations") or {}
    storage_pods = kube.list_("Pod", namespace, f"{K.CLUSTER}={cluster},{L.COMPONENT}=storage")
    if WIPE_NODES not in annotations:
        nodes = sorted({p["spec"]["nodeName"] for p in storage_pods if p["spec"].get("nodeName")})
        kube.patch(
            "ThreeFSCluster",
            cluster,
            namespace,
            {"metadata": {"annotations": {WIPE_NODES: json.dumps(nodes)}}},
        )
        kube.delete("StatefulSet", K.name_of(cluster, "storage"), namespace, propagation="Foreground")
        return ["storage pods to stop"]
    if storage_pods:
        kube.delete("StatefulSet", K.name_of(cluster, "storage"), namespace, propagation="Foreground")
        return [f"{len(storage_pods)} storage pod(s) to stop"]
    pending = []
    for node in json.loads(annotations[WIPE_NODES]):
        job = kube.get("Job", wipe_job_name(cluster, node), namespace)
        if job is None:
            kube.create(wipe_job(namespace, cluster, node, spec))
            pending.append(node)
        elif not (job.get("status") or {}).get("succeeded"):
            pending.append(node)
    return pending


def cleanup_jobs(namespace: str, cluster: str, *, delete: bool) -> None:
    if delete:
        for job in kube.list_("Job", namespace, f"{K.CLUSTER}={cluster},{WIPE}=true"):
            kube.delete("Job", job["metadata"]["name"], namespace)
