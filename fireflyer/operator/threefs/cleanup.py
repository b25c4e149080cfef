"""Deleting a ThreeFSCluster with reclaimPolicy Delete: stop storage, then wipe each node's disks."""

from __future__ import annotations

import json
from typing import Any

from fireflyer.api.base import API_VERSION
from fireflyer.api.threefs import ThreeFSClusterSpec
from fireflyer.operator import kube
from fireflyer.operator import labels as L
from fireflyer.operator.objects import owner_reference
from fireflyer.operator.threefs import children as K

WIPE_NODES = "fireflyer.dev/wipe-nodes"
WIPE = "fireflyer.dev/wipe"
KIND = "ThreeFSCluster"


def wipe_job_name(cluster: str, node: str) -> str:
    return f"{cluster}-wipe-{node}"[:63].rstrip("-.")


def wipe_job(cr: dict[str, Any], node: str, spec: ThreeFSClusterSpec) -> dict[str, Any]:
    """One node's disk wipe: owned by the ThreeFSCluster (garbage-collected with it), on that
    node only, tolerating only the taints the cluster's storage pods tolerate."""
    cluster, namespace = cr["metadata"]["name"], cr["metadata"]["namespace"]
    paths = [
        spec.storage.disk_path_template.replace("{disk}", str(d)) for d in range(spec.storage.disks_per_node)
    ]
    volumes = [{"name": f"disk{i}", "hostPath": {"path": p}} for i, p in enumerate(paths)]
    mounts = [{"name": f"disk{i}", "mountPath": f"/wipe/disk{i}"} for i in range(len(paths))]
    # Only the contents go: the mount points (often real disks) stay for the next file system.
    script = 'set -e; for d in /wipe/disk*; do find "$d" -mindepth 1 -delete; done'
    labels = {K.CLUSTER: cluster, WIPE: "true", L.MANAGED_BY: L.MANAGER}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "OnFailure",
        "nodeName": node,
        "automountServiceAccountToken": False,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {
                "name": "wipe",
                "image": spec.image,
                "command": ["/bin/sh", "-c", script],
                # Not privileged: root, for the files the storage service wrote as root, with
                # only the capabilities that deleting them in any directory mode needs.
                "securityContext": {
                    "runAsUser": 0,
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"], "add": ["DAC_OVERRIDE", "FOWNER"]},
                },
                "volumeMounts": mounts,
            }
        ],
        "volumes": volumes,
    }
    if spec.storage.tolerations:
        pod_spec["tolerations"] = K.tolerations(spec.storage.tolerations)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": wipe_job_name(cluster, node),
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [owner_reference(cr)],
        },
        "spec": {"backoffLimit": 3, "template": {"metadata": {"labels": labels}, "spec": pod_spec}},
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
            KIND,
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
            owner = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {**meta, "namespace": namespace}}
            kube.create(wipe_job(owner, node, spec))
            pending.append(node)
        elif not (job.get("status") or {}).get("succeeded"):
            pending.append(node)
    return pending


def cleanup_jobs(namespace: str, cluster: str, *, delete: bool) -> None:
    if delete:
        for job in kube.list_("Job", namespace, f"{K.CLUSTER}={cluster},{WIPE}=true"):
            kube.delete("Job", job["metadata"]["name"], namespace)
