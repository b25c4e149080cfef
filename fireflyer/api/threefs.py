"""ThreeFSCluster: a 3FS file system (FoundationDB, mgmtd, meta, storage, FUSE clients, monitor)."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from fireflyer.api.base import ApiModel, ObjectMeta, StatusBase, Toleration, cel, defaulted, validations

# 3FS chunk sizes are powers of two; CEL has no bitwise operators, so the allowed set is listed.
CHUNK_SIZES = [1 << shift for shift in range(16, 27)]  # 64 KiB … 64 MiB

# Host directories a ThreeFSCluster may not put a FUSE mount or a storage disk under: a mount
# there would replace the node's own programs or configuration, and a disk path there would hand
# host files (/proc/1 → the host's root) to the storage pods and to the disk-wipe Job.
SYSTEM_DIRS = (
    "bin", "boot", "dev", "etc", "home", "lib", "lib32", "lib64", "libx32", "nix", "opt", "proc",
    "root", "run", "sbin", "snap", "sys", "usr", "var",
)  # fmt: skip
_SYSTEM_DIR_RE = f"^/({'|'.join(SYSTEM_DIRS)})(/|$)"
_SYSTEM_DIR_LIST = ", ".join(f"/{d}" for d in SYSTEM_DIRS)
# The client nodes of a ThreeFSCluster whose clients.nodeSelector is left out: nodes an
# administrator labelled, never every node (the FUSE pod is privileged).
CLIENT_NODE_LABEL = "fireflyer.dev/3fs-client"


class ManagedFoundationDB(ApiModel):
    replicas: int = Field(default=3, ge=1, le=9)
    """FoundationDB server pods (coordinators are chosen among them)."""
    storage: str = Field(default="100Gi", max_length=64)
    """Persistent volume size per FoundationDB pod."""
    storage_class_name: str | None = Field(default=None, max_length=253)
    """Storage class for FoundationDB volumes (default: the cluster default)."""


class ExternalFoundationDB(ApiModel):
    cluster_file: str = Field(min_length=1, max_length=4096)
    """Contents of the fdb.cluster file of an existing FoundationDB cluster
    (description:id@host:port,…)."""


class FoundationDB(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.managed) != has(self.external)",
                "set exactly one of foundationdb.managed and foundationdb.external",
                ".managed",
            ),
        )
    )

    managed: ManagedFoundationDB | None = None
    """Run FoundationDB as part of this cluster."""
    external: ExternalFoundationDB | None = None
    """Use an existing FoundationDB cluster."""


class Replicated(ApiModel):
    replicas: int = Field(default=1, ge=1, le=64)
    """Pods of this service."""


class Mgmtd(ApiModel):
    replicas: int = Field(default=3, ge=1, le=3)
    """mgmtd servers; 3FS elects one primary among them."""


class ErasureCoding(ApiModel):
    data_shards: int = Field(ge=1, le=32)
    """Data shards per EC chain."""
    parity_shards: int = Field(ge=1, le=8)
    """Parity shards per EC chain."""


class Storage(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.chainTableType != 'CR' || has(self.replicationFactor)",
                "storage.replicationFactor is required for chainTableType CR",
                ".replicationFactor",
            ),
            cel(
                "!has(self.replicationFactor) || self.replicationFactor <= self.nodes",
                "storage.replicationFactor must not exceed storage.nodes",
                ".replicationFactor",
            ),
            cel(
                "self.chainTableType != 'EC' || !has(self.replicationFactor)",
                "chainTableType EC takes storage.erasureCoding, not storage.replicationFactor",
                ".replicationFactor",
            ),
            cel(
                "self.chainTableType != 'EC' || has(self.erasureCoding)",
                "chainTableType EC needs storage.erasureCoding {dataShards, parityShards}",
                ".erasureCoding",
            ),
            cel(
                "!has(self.erasureCoding) || self.erasureCoding.dataShards + "
                "self.erasureCoding.parityShards <= self.nodes",
                "erasureCoding.dataShards + parityShards must not exceed storage.nodes",
                ".erasureCoding",
            ),
            cel(
                f"self.chunkSize in {CHUNK_SIZES}",
                "storage.chunkSize must be a power of two between 64KiB (65536) and 64MiB (67108864)",
                ".chunkSize",
            ),
            cel(
                "(self.nodes * self.targetsPerDisk) % "
                "(has(self.replicationFactor) ? self.replicationFactor : "
                "(has(self.erasureCoding) ? "
                "self.erasureCoding.dataShards + self.erasureCoding.parityShards : 1)) == 0",
                "storage.nodes × storage.targetsPerDisk must be a multiple of the chain width "
                "(replicationFactor, or dataShards + parityShards) so that every target joins a chain",
                ".targetsPerDisk",
            ),
            cel(
                "self.nodes == oldSelf.nodes && self.disksPerNode == oldSelf.disksPerNode && "
                "self.targetsPerDisk == oldSelf.targetsPerDisk && "
                "self.chainTableType == oldSelf.chainTableType && "
                "self.chunkSize == oldSelf.chunkSize && self.stripeSize == oldSelf.stripeSize && "
                "self.diskPathTemplate == oldSelf.diskPathTemplate && "
                "has(self.replicationFactor) == has(oldSelf.replicationFactor) && "
                "(!has(self.replicationFactor) || self.replicationFactor == oldSelf.replicationFactor)",
                "the storage layout (nodes, disks, targets, chain table type and width, chunk and "
                "stripe size, disk paths) is fixed once the file system exists; "
                "create a new ThreeFSCluster to change it",
            ),
            # Kubernetes evicts after the shortest tolerationSeconds of the matching tolerations,
            # which would override the storage pods' unlimited one for a lost node.
            cel(
                "!has(self.tolerations) || self.tolerations.all(t, !has(t.tolerationSeconds) || "
                "(has(t.effect) && t.effect != 'NoExecute') || (has(t.key) && t.key != '' && "
                "t.key != 'node.kubernetes.io/not-ready' && t.key != 'node.kubernetes.io/unreachable'))",
                "storage.tolerations must not put a tolerationSeconds on a toleration of the "
                "node.kubernetes.io/not-ready or unreachable taints: storage pods stay on a lost node "
                "until the replacement procedure moves them",
                ".tolerations",
            ),
            cel(
                "self.diskPathTemplate.contains('{disk}')",
                "storage.diskPathTemplate must contain the {disk} placeholder",
                ".diskPathTemplate",
            ),
            # Host paths of the storage pods and of the disk-wipe Job, which deletes their contents.
            cel(
                "self.diskPathTemplate.matches('^(/[A-Za-z0-9._{}-]+)+$') && "
                "!self.diskPathTemplate.matches('(^|/)[.][.]?(/|$)')",
                "storage.diskPathTemplate must be an absolute path of letters, digits, '.', '_', '-' "
                "and {disk}, with no '.' or '..' segments",
                ".diskPathTemplate",
            ),
            cel(
                f"!self.diskPathTemplate.matches('{_SYSTEM_DIR_RE}')",
                f"storage.diskPathTemplate must not be under a system directory ({_SYSTEM_DIR_LIST})",
                ".diskPathTemplate",
            ),
            cel(
                "self.stripeSize * (has(self.replicationFactor) ? self.replicationFactor : "
                "(has(self.erasureCoding) ? self.erasureCoding.dataShards + "
                "self.erasureCoding.parityShards : 1)) <= self.nodes * self.disksPerNode * "
                "self.targetsPerDisk",
                "storage.stripeSize must not exceed the number of chains "
                "(nodes × disksPerNode × targetsPerDisk / replicas)",
                ".stripeSize",
            ),
        )
    )

    nodes: int = Field(ge=1, le=4096)
    """Storage nodes (one storage pod per node)."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Labels that pick the storage nodes."""
    disks_per_node: int = Field(ge=1, le=64)
    """NVMe disks per storage node."""
    disk_path_template: str = Field(default="/storage/data{disk}", max_length=1024)
    """Host path of each disk; {disk} is replaced by the disk index (0-based). Not under a
    system directory (/etc, /proc, /usr, /var, …)."""
    targets_per_disk: int = Field(default=1, ge=1, le=99)
    """Storage targets on each disk."""
    replication_factor: int | None = Field(default=None, ge=1, le=16)
    """Replicas per chain for CR (chain replication)."""
    erasure_coding: ErasureCoding | None = None
    """Shards per chain for EC."""
    chain_table_type: Literal["CR", "EC"] = "CR"
    """CR (CRAQ chain replication) or EC (erasure coding)."""
    chunk_size: int = Field(default=1048576, ge=65536, le=67108864)
    """File chunk size in bytes (a power of two)."""
    stripe_size: int = Field(default=16, ge=1, le=4096)
    """Chains a file is striped across."""
    replacement_grace_period_seconds: int = Field(default=300, ge=0, le=86400)
    """How long a storage node may stay NotReady before its targets move to a spare node."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Taints of the storage nodes that storage pods and disk-wipe Jobs tolerate."""

    @property
    def chain_width(self) -> int:
        """Targets per chain: the replication factor (CR) or data + parity shards (EC)."""
        if self.chain_table_type == "EC" and self.erasure_coding is not None:
            return self.erasure_coding.data_shards + self.erasure_coding.parity_shards
        return self.replication_factor or 1


class Clients(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.mountPoint.startsWith('/')",
                "clients.mountPoint must be an absolute path",
                ".mountPoint",
            ),
            # The FUSE pods share the mount point with the host (Bidirectional) and the path
            # reaches a shell line: a plain path of two levels or more, never the host's top level.
            cel(
                "self.mountPoint.matches('^(/[A-Za-z0-9._-]+){2,}$') && "
                "!self.mountPoint.contains('/..') && !self.mountPoint.matches('/[.](/|$)')",
                "clients.mountPoint must have at least two levels below / (e.g. /3fs/stage) of "
                "letters, digits, '.', '_' and '-', with no '.' or '..' segments",
                ".mountPoint",
            ),
            cel(
                f"!self.mountPoint.matches('{_SYSTEM_DIR_RE}')",
                "clients.mountPoint must not be under a system directory "
                f"({_SYSTEM_DIR_LIST}): the FUSE mount would replace the node's own files",
                ".mountPoint",
            ),
            cel(
                "size(self.nodeSelector) > 0",
                "clients.nodeSelector must pick the client nodes (the FUSE pods are privileged); "
                f"leave it out to use nodes labelled {CLIENT_NODE_LABEL}=true",
                ".nodeSelector",
            ),
        )
    )

    mount_point: str = Field(default="/3fs/stage", max_length=1024)
    """Where the FUSE client mounts the file system on each client node; only this directory is
    shared with the host."""
    node_selector: dict[str, str] = Field(default={CLIENT_NODE_LABEL: "true"})
    """Labels that pick the client nodes, where the privileged FUSE pods run (default: nodes
    labelled fireflyer.dev/3fs-client=true). Never empty."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Taints of the client nodes that the FUSE pods tolerate."""


class Monitor(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.clickhouse != 'external' || has(self.externalAddress)",
                "monitor.externalAddress is required when monitor.clickhouse is external",
                ".externalAddress",
            ),
        )
    )

    clickhouse: Literal["managed", "external", "disabled"] = "managed"
    """Where the monitor collector writes metrics."""
    external_address: str | None = Field(default=None, max_length=1024)
    """host:port of an existing ClickHouse for clickhouse: external."""


class ThreeFSNetwork(ApiModel):
    transport: Literal["rdma", "tcp"] = "rdma"
    """RDMA (InfiniBand/RoCE) or TCP between 3FS services."""
    ib_devices: list[str] = Field(default_factory=list, max_length=16)
    """RDMA device names each service uses (device_filter); empty: all."""
    host_network: bool = True
    """Run 3FS services in the host network namespace."""


class ThreeFSClusterSpec(ApiModel):
    image: str = Field(min_length=1, max_length=1024)
    """3FS image holding the service binaries and admin_cli."""
    foundationdb: FoundationDB
    """Metadata store."""
    mgmtd: Mgmtd = defaulted(Mgmtd)
    """Management service."""
    meta: Replicated = defaulted(Replicated)
    """Metadata service (stateless over FoundationDB)."""
    storage: Storage
    """Storage service and chain table layout."""
    clients: Clients = defaulted(Clients)
    """FUSE clients."""
    monitor: Monitor = defaulted(Monitor)
    """Monitor collector."""
    network: ThreeFSNetwork = defaulted(ThreeFSNetwork)
    """Transport between services."""
    reclaim_policy: Literal["Retain", "Delete"] = "Retain"
    """What happens to disks and FoundationDB data when the cluster is deleted."""
    failover_seconds: int = Field(default=60, ge=0, le=3600)
    """How long an mgmtd, meta or monitor pod stays on a node that is NotReady or unreachable
    before it is evicted and started on a live node (Kubernetes' default is 300 s). The default
    is mgmtd's own lease_length and heartbeat_fail_interval: by then a silent primary's lease has
    run out and mgmtd counts a silent service as failed. Storage pods never move this way:
    storage.replacementGracePeriodSeconds governs them."""


class ChainSummary(ApiModel):
    total: int = 0
    serving: int = 0
    degraded: int = 0


class ReplacementStatus(ApiModel):
    ordinal: int
    """Storage pod ordinal being replaced."""
    node_name: str
    """Kubernetes node that failed."""
    old_node_id: int
    """3FS node id of the failed storage node."""
    new_node_id: int
    """3FS node id given to the replacement."""
    step: str
    """remove, reschedule, add, sync or unregister."""
    removed_targets: list[list[int]] = Field(default_factory=list)
    """[chain id, target id, disk] of every target taken out of its chain."""
    started_at: str = ""
    sync_since: str = ""
    """When the replacement targets joined their chains; health after this decides the sync."""


class ThreeFSClusterStatus(StatusBase):
    phase: str = ""
    """Bootstrapping, Ready, Degraded, Deleting."""
    bootstrap_steps: list[str] = Field(default_factory=list)
    """Bootstrap steps already finished (a restarted operator resumes after them)."""
    chains: ChainSummary | None = None
    targets: dict[str, int] = Field(default_factory=dict)
    """Targets by state (serving, syncing, waiting, lastsrv, offline)."""
    mgmtd_addresses: list[str] = Field(default_factory=list)
    storage_ready: str = ""
    """Ready/desired storage nodes (printer column)."""
    storage_node_ids: dict[str, int] = Field(default_factory=dict)
    """3FS node id of each storage pod ordinal (a replaced node gets a new id)."""
    used_bytes: int = 0
    """Bytes used on all targets, from the last health check."""
    health_sequence: int = 0
    """Health checks run so far."""
    health_checked_at: str = ""
    replacement: ReplacementStatus | None = None
    """The storage node replacement in progress."""
    replacements_completed: int = 0
    last_admin_error: str = ""
    """Output of the last admin step that failed."""
    last_admin_error_at: str = ""
    """When it failed; the step is retried after a pause."""


class ThreeFSCluster(ApiModel):
    api_version: Literal["fireflyer.dev/v1alpha1"] = "fireflyer.dev/v1alpha1"
    kind: Literal["ThreeFSCluster"] = "ThreeFSCluster"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: ThreeFSClusterSpec
    status: ThreeFSClusterStatus | None = None
