"""ThreeFSCluster status: the readiness of each component, the conditions and the phase that
`plan` writes on every pass. No I/O."""

from __future__ import annotations

from typing import Any

from fireflyer.api import conditions as C
from fireflyer.api.threefs import ThreeFSClusterSpec

# Conditions and reasons particular to 3FS.
FDB_READY = "FoundationDBReady"
MGMTD_READY = "MgmtdReady"
META_READY = "MetaReady"
STORAGE_READY = "StorageReady"
CHAIN_TABLE_READY = "ChainTableReady"
CLIENTS_READY = "ClientsReady"


def ready_count(workload: dict[str, Any] | None) -> tuple[int, int]:
    """(ready, wanted) pods of a StatefulSet, Deployment or DaemonSet; (0, 0) when absent."""
    if workload is None:
        return 0, 0
    spec, status = workload.get("spec") or {}, workload.get("status") or {}
    if workload["kind"] == "DaemonSet":
        return int(status.get("numberReady", 0)), int(status.get("desiredNumberScheduled", 0))
    return int(status.get("readyReplicas", 0)), int(spec.get("replicas", 1))


def all_ready(workload: dict[str, Any] | None) -> bool:
    ready, wanted = ready_count(workload)
    return workload is not None and wanted > 0 and ready >= wanted


def write_status(
    spec: ThreeFSClusterSpec,
    workloads: dict[str, dict[str, Any]],
    status: dict[str, Any],
    done: list[str],
    order: list[str],
    fdb_ready: bool,
    mgmtd_ready: bool,
    storage_ready: bool,
    bootstrapped: bool,
) -> None:
    """Writes the component counts, the *Ready conditions, Ready/Progressing/Degraded and the
    phase into `status`."""
    ready_storage, _ = ready_count(workloads.get("storage"))
    status["storageReady"] = f"{ready_storage}/{spec.storage.nodes}"
    meta_ready = all_ready(workloads.get("meta"))
    fuse = workloads.get("fuse")
    clients_ready = all_ready(fuse)
    chains = status.get("chains") or {}
    serving = bool(chains) and chains.get("serving") == chains.get("total")
    table_ready = "upload-chain-table" in done

    def pods_ready(service: str) -> str:
        workload = workloads.get(service)
        if workload is None:
            return f"no {service} workload yet"
        ready, wanted = ready_count(workload)
        return f"{ready}/{wanted} {service} pods ready"

    conditions = [
        C.condition(FDB_READY, fdb_ready, "Available" if fdb_ready else "Starting", pods_ready("fdb")),
        C.condition(
            MGMTD_READY, mgmtd_ready, "Available" if mgmtd_ready else "Starting", pods_ready("mgmtd")
        ),
        C.condition(META_READY, meta_ready, "Available" if meta_ready else "Starting", pods_ready("meta")),
        C.condition(
            STORAGE_READY,
            storage_ready,
            "Available" if storage_ready else "Starting",
            f"{ready_storage}/{spec.storage.nodes} storage nodes ready",
        ),
        C.condition(
            CHAIN_TABLE_READY,
            table_ready and (serving or not chains),
            "Serving" if table_ready and serving else ("Uploaded" if table_ready else "NotUploaded"),
            f"{chains.get('serving', 0)}/{chains.get('total', 0)} chains serving" if chains else "",
        ),
        C.condition(
            CLIENTS_READY,
            clients_ready,
            "Mounted" if clients_ready else "NotMounted",
            "no client nodes match clients.nodeSelector"
            if fuse is not None and ready_count(fuse)[1] == 0
            else "",
        ),
    ]
    replacement = status.get("replacement")
    degraded_reason = status.pop("_degraded", None)
    ready = (
        bootstrapped
        and fdb_ready
        and mgmtd_ready
        and meta_ready
        and storage_ready
        and clients_ready
        and serving
    )
    if not bootstrapped:
        pending = [s for s in order if s not in done]
        phase, message = "Bootstrapping", f"next bootstrap step: {pending[0]}" if pending else ""
    elif replacement:
        phase, message = (
            "Replacing",
            f"replacing storage node {replacement['oldNodeId']}: {replacement['step']}",
        )
    elif ready:
        phase, message = "Ready", ""
    else:
        not_ready = [
            name
            for name, ok in (
                ("fdb", fdb_ready),
                ("mgmtd", mgmtd_ready),
                ("meta", meta_ready),
                ("storage", storage_ready),
                ("clients", clients_ready),
                ("chains", serving),
            )
            if not ok
        ]
        phase = "Degraded"
        message = (
            degraded_reason[1]
            if degraded_reason
            else f"not ready: {', '.join(not_ready)} (see the matching *Ready conditions)"
        )
    status["phase"] = phase
    conditions.append(C.condition(C.READY, ready, "Ready" if ready else phase, message))
    conditions.append(
        C.condition(C.PROGRESSING, not ready and phase in ("Bootstrapping", "Replacing"), phase, message)
    )
    degraded = phase in ("Degraded", "Replacing") or degraded_reason is not None
    conditions.append(
        C.condition(
            C.DEGRADED,
            degraded,
            degraded_reason[0] if degraded_reason else phase if degraded else "Healthy",
            degraded_reason[1] if degraded_reason else "",
        )
    )
    status["conditions"] = conditions
