"""What unit pods mount besides their engine configuration, and whether they may start. Pure.

- The role's current ExpertPlacement, as ConfigMap `<deployment>-<role>-placement` (key
  placement.json) at /etc/fireflyer/placement. The kubelet refreshes a ConfigMap volume in place,
  so a new generation reaches running pods without a restart; the ConfigMap's content is no part
  of the unit revision.
- With kvCache: the named ThreeFSCluster's FUSE mount (its clients.mountPoint, a hostPath the
  cluster's FUSE DaemonSet mounts on every client node) at the same path, read-write.
- With router.apiKeySecret (fireflyer engine): the Secret's `api-keys` at /etc/fireflyer/api-keys,
  named by $FIREFLYER_API_KEY_FILE (`fireflyer serve --api-key-file`'s default). The router mounts
  it too (api_keys_volume). The kubelet refreshes it in place: rotating keys restarts nothing.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any

from fireflyer.api import conditions as C
from fireflyer.api.inference import InferenceDeploymentSpec
from fireflyer.api.threefs import Clients
from fireflyer.operator import labels as L
from fireflyer.operator.eplb.placements import PLACEMENT_FILE
from fireflyer.operator.inference import reasons as R
from fireflyer.operator.objects import owner_reference

PLACEMENT_DIR = "/etc/fireflyer/placement"
PLACEMENT_VOLUME = "placement"
KV_VOLUME = "kv-cache"
API_KEYS_VOLUME = "api-keys"
API_KEYS_DIR = "/etc/fireflyer/api-keys"
API_KEYS_SECRET_KEY = "api-keys"  # the Secret's data key: one accepted key per line
API_KEY_FILE = f"{API_KEYS_DIR}/{API_KEYS_SECRET_KEY}"
API_KEY_FILE_ENV = "FIREFLYER_API_KEY_FILE"  # fireflyer.workloads.api_keys.ENV (not imported here)


def placement_config_map_name(deployment: str, role: str) -> str:
    return f"{deployment}-{role}-placement"


def mounts_placement(spec: InferenceDeploymentSpec) -> bool:
    return spec.eplb.mode in ("dynamic", "static")


def placement_config_map(cr: dict[str, Any], role: str, document: dict[str, Any]) -> dict[str, Any]:
    deployment = cr["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": placement_config_map_name(deployment, role),
            "namespace": cr["metadata"]["namespace"],
            "labels": {
                L.DEPLOYMENT: deployment,
                L.COMPONENT: "placement",
                L.ROLE: role,
                L.MANAGED_BY: L.MANAGER,
            },
            "ownerReferences": [owner_reference(cr)],
        },
        # Compact: a DeepSeek-V3 decode table is 58 × 288 numbers, and a ConfigMap holds 1 MiB.
        "data": {PLACEMENT_FILE: json.dumps(document, separators=(",", ":"), sort_keys=True)},
    }


@dataclass(frozen=True)
class KvCacheState:
    """Whether units may start with the KV cache on 3FS, as a condition says it."""

    ready: bool
    reason: str
    message: str
    mount_point: str | None = None
    """The cluster's clients.mountPoint, when the cluster exists."""


def path_under(path: str, directory: str) -> bool:
    path, directory = posixpath.normpath(path), posixpath.normpath(directory)
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def kv_cache_state(spec: InferenceDeploymentSpec, cluster: dict[str, Any] | None) -> KvCacheState | None:
    """None without kvCache; else whether the named ThreeFSCluster exists, holds kvCache.path
    under its mount point, and is Ready."""
    kv = spec.kv_cache
    if kv is None:
        return None
    name = kv.three_fs_cluster
    if cluster is None:
        return KvCacheState(False, R.THREEFS_NOT_FOUND, f"kvCache: ThreeFSCluster {name} does not exist")
    mount = ((cluster.get("spec") or {}).get("clients") or {}).get("mountPoint") or Clients().mount_point
    if not path_under(kv.path, mount):
        return KvCacheState(
            False,
            C.INVALID_SPEC,
            f"kvCache.path {kv.path} is not under ThreeFSCluster {name}'s clients.mountPoint {mount}",
            mount,
        )
    status = cluster.get("status") or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == C.READY), None)
    if not ready or ready.get("status") != "True":
        detail = (ready or {}).get("message") or status.get("phase") or "no status yet"
        return KvCacheState(
            False, R.THREEFS_NOT_READY, f"kvCache: ThreeFSCluster {name} is not Ready ({detail})", mount
        )
    return KvCacheState(True, R.THREEFS_READY, f"ThreeFSCluster {name} is Ready; mounted at {mount}", mount)


def kv_mount_of(sts: dict[str, Any] | None) -> str | None:
    """The 3FS mount point an existing unit StatefulSet mounts (kept while its cluster is away)."""
    volumes = (((sts or {}).get("spec") or {}).get("template") or {}).get("spec", {}).get("volumes") or []
    for volume in volumes:
        if volume.get("name") == KV_VOLUME:
            path = (volume.get("hostPath") or {}).get("path")
            return str(path) if path else None
    return None


def unit_volumes(
    spec: InferenceDeploymentSpec, deployment: str, role: str, kv_mount: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, the engine container's volumeMounts) for the placement, the KV cache and the API
    keys."""
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if mounts_placement(spec):
        # Not optional: the ConfigMap ({} until a placement exists) is applied before the units.
        config = {"name": placement_config_map_name(deployment, role)}
        volumes.append({"name": PLACEMENT_VOLUME, "configMap": config})
        mounts.append({"name": PLACEMENT_VOLUME, "mountPath": PLACEMENT_DIR, "readOnly": True})
    if spec.kv_cache is not None and kv_mount:
        # Directory, not DirectoryOrCreate: on a node without the FUSE client the pod must fail
        # to start rather than write the cache to the node's own disk.
        volumes.append({"name": KV_VOLUME, "hostPath": {"path": kv_mount, "type": "Directory"}})
        # HostToContainer: a FUSE mount that comes back after the pod started is seen.
        mounts.append({"name": KV_VOLUME, "mountPath": kv_mount, "mountPropagation": "HostToContainer"})
    secret = unit_api_keys(spec)
    if secret:
        volume, mount = api_keys_volume(secret)
        volumes.append(volume)
        mounts.append(mount)
    return volumes, mounts


def unit_api_keys(spec: InferenceDeploymentSpec) -> str | None:
    """The Secret the units mount their API keys from: router.apiKeySecret, for the fireflyer
    engine only (another engine's own key options are its engine.args)."""
    return spec.router.api_key_secret if spec.engine.kind == "fireflyer" else None


def unit_env(spec: InferenceDeploymentSpec) -> list[dict[str, Any]]:
    """The engine's environment for its mounts: where its API key file is."""
    return [{"name": API_KEY_FILE_ENV, "value": API_KEY_FILE}] if unit_api_keys(spec) else []


def api_keys_volume(secret: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volume, volumeMount) of the API key file. Only the one data key is projected: a Secret
    without it keeps the pod from starting rather than running without keys."""
    volume = {
        "name": API_KEYS_VOLUME,
        "secret": {
            "secretName": secret,
            "items": [{"key": API_KEYS_SECRET_KEY, "path": API_KEYS_SECRET_KEY}],
            "defaultMode": 0o440,
        },
    }
    return volume, {"name": API_KEYS_VOLUME, "mountPath": API_KEYS_DIR, "readOnly": True}
