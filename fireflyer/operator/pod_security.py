"""Security contexts of the pods the operator creates (pure builders), and what each needs of its
namespace's Pod Security Admission level (docs/security.md).

Every pod: seccomp RuntimeDefault, no privilege escalation, all capabilities dropped, a writable
emptyDir at /tmp.

- The router: uid/gid 65532, read-only root file system, no capability: it fits `restricted`.
- Engine and trainer pods run as uid 0 inside the container, with no capability but IPC_LOCK when
  they get RDMA devices. Registering memory with an RDMA device pins it, beyond RLIMIT_MEMLOCK
  unless the process holds IPC_LOCK; Kubernetes grants an added capability to uid 0 only (a
  non-root process would need ambient capabilities, which pods cannot ask for). The node paths they
  write (checkpoints, a 3FS KV cache) are created by the kubelet as root. Our own programs get a
  read-only root file system, with $HOME in /tmp for the caches written there (Triton, CUDA,
  DeepGEMM); another engine's image, or a trainer's own command, keeps a writable one, since what
  it writes is not known here. IPC_LOCK, hostPath volumes and hostNetwork each need `privileged`;
  without them these pods fit `baseline`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fireflyer.api.base import Network

NON_ROOT_ID = 65532  # as the operator image's USER ("nonroot" in distroless images)
TMP_VOLUME = "tmp"
TMP_DIR = "/tmp"


def pod_security_context(*, non_root: bool) -> dict[str, Any]:
    context: dict[str, Any] = {"seccompProfile": {"type": "RuntimeDefault"}}
    if non_root:
        # runAsUser too: the workload image's own user is root, which runAsNonRoot alone refuses.
        # fsGroup: Secret files of mode 0440 stay readable.
        ids = {"runAsUser": NON_ROOT_ID, "runAsGroup": NON_ROOT_ID, "fsGroup": NON_ROOT_ID}
        context.update(runAsNonRoot=True, **ids)
    return context


def container_security_context(*, read_only_root: bool, add: Sequence[str] = ()) -> dict[str, Any]:
    capabilities: dict[str, Any] = {"drop": ["ALL"]}
    if add:
        capabilities["add"] = sorted(set(add))
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": read_only_root,
        "capabilities": capabilities,
    }


def rdma_capabilities(network: Network) -> list[str]:
    """IPC_LOCK for pods that get RDMA devices (memory registration), none otherwise."""
    return ["IPC_LOCK"] if network.rdma_per_pod else []


def tmp_volume() -> dict[str, Any]:
    return {"name": TMP_VOLUME, "emptyDir": {}}


def tmp_mount() -> dict[str, Any]:
    """First among a container's mounts: a path under /tmp mounted from elsewhere (a checkpoint
    directory, say) must land on top of this one, not under it."""
    return {"name": TMP_VOLUME, "mountPath": TMP_DIR}


def read_only_root_env() -> list[dict[str, Any]]:
    """Caches kept under $HOME (Triton, CUDA's JIT, DeepGEMM) go to the writable /tmp."""
    return [{"name": "HOME", "value": TMP_DIR}]


__all__ = [
    "NON_ROOT_ID",
    "TMP_DIR",
    "TMP_VOLUME",
    "container_security_context",
    "pod_security_context",
    "rdma_capabilities",
    "read_only_root_env",
    "tmp_mount",
    "tmp_volume",
]
