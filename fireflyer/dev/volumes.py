"""Storage for the dev cluster: a default StorageClass and a pool of pre-made volumes.

The dev cluster has no volume provisioner, so claims (FoundationDB's, ClickHouse's) bind to
these PersistentVolumes through the controller manager's binder, as on a cluster with
statically provisioned local disks. Nothing is written to them: kwok runs no containers.
"""

from __future__ import annotations

from typing import Any

STORAGE_CLASS = "fireflyer-local"
VOLUMES = 64
VOLUME_SIZE = "2Ti"


def storage_class() -> dict[str, Any]:
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": STORAGE_CLASS,
            "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
        },
        "provisioner": "kubernetes.io/no-provisioner",
        "volumeBindingMode": "Immediate",
        "reclaimPolicy": "Retain",
    }


def persistent_volumes(count: int = VOLUMES) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"{STORAGE_CLASS}-{i:03d}", "labels": {"fireflyer.dev/dev-volume": "true"}},
            "spec": {
                "capacity": {"storage": VOLUME_SIZE},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": STORAGE_CLASS,
                "hostPath": {"path": f"/var/lib/fireflyer/volumes/{i:03d}"},
            },
        }
        for i in range(count)
    ]
