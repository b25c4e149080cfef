"""InferenceDeployment: a DeepSeek-V3/R1-style MoE service with prefill/decode disaggregation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from fireflyer.api.base import (
    ApiModel,
    Architecture,
    Network,
    ObjectMeta,
    Placement,
    StatusBase,
    Toleration,
    cel,
    defaulted,
    validations,
)

KernelBackend = Literal["auto", "triton", "torch", "official"]


class ModelSource(ApiModel):
    name: str = Field(min_length=1, max_length=253)
    """Served model name (what clients ask for)."""
    source: str = Field(min_length=1, max_length=2048)
    """Where the weights are: a path on a mounted volume or 3FS (/3fs/models/DeepSeek-V3), or
    hf://org/name for engines that download themselves."""
    architecture: Architecture = defaulted(
        Architecture,
        **validations(cel("self == oldSelf", "model.architecture is immutable; create a new deployment")),
    )
    """The model's shape; it fixes expert counts for placement and validation."""


class Engine(ApiModel):
    kind: Literal["fireflyer", "sglang", "vllm"] = "fireflyer"
    """Which inference engine runs the units."""
    image: str | None = Field(default=None, max_length=1024)
    """Container image; required for sglang and vllm, defaults to the fireflyer workload image."""
    args: list[str] = Field(default_factory=list, max_length=256)
    """Extra engine arguments appended to the rendered command line."""


class Kernels(ApiModel):
    attention: KernelBackend = "auto"
    """MLA decode kernel backend (official = FlashMLA when installed)."""
    gemm: KernelBackend = "auto"
    """FP8 GEMM backend (official = DeepGEMM when installed)."""
    dispatch: KernelBackend = "auto"
    """Expert-parallel dispatch/combine backend (official = DeepEP when installed)."""


class Parallelism(ApiModel):
    tensor: int = Field(default=1, ge=1, le=1024)
    """Tensor-parallel size of attention."""
    data: int = Field(ge=1, le=4096)
    """Data-parallel size of attention (DP attention)."""
    expert: int = Field(ge=1, le=4096)
    """Expert-parallel size: the GPUs one unit spreads its experts over."""


Weekday = Literal["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
_CLOCK = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"


class ScheduleWindow(ApiModel):
    """A daily window (in autoscaling.timeZone) with its own unit bounds, e.g. the day peak."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.minUnits) || !has(self.maxUnits) || self.minUnits <= self.maxUnits",
                "schedule window minUnits must not exceed maxUnits",
                ".minUnits",
            ),
            cel("self.start != self.end", "schedule window start and end must differ", ".end"),
        )
    )

    start: str = Field(pattern=_CLOCK)
    """Local time the window opens, HH:MM."""
    end: str = Field(pattern=_CLOCK)
    """Local time it closes, HH:MM (exclusive); earlier than start: the window runs past midnight."""
    days: list[Weekday] = Field(default_factory=list, max_length=7)
    """Days on which the window opens (an overnight window belongs to the day it opens); empty:
    every day."""
    min_units: int | None = Field(default=None, ge=0, le=1024)
    """Lower bound while the window is open (default: autoscaling.minUnits)."""
    max_units: int | None = Field(default=None, ge=0, le=1024)
    """Upper bound while the window is open (default: autoscaling.maxUnits)."""


class Autoscaling(ApiModel):
    """The built-in autoscaler of a role: whole units, from a metric the units export."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.minUnits <= self.maxUnits", "autoscaling.minUnits must not exceed maxUnits", ".minUnits"
            ),
        )
    )

    metric: Literal["queueTime", "kvBlockUsage", "tokensPerSecondPerUnit"]
    """queueTime: mean seconds a request waits before its first token at the router;
    kvBlockUsage: mean fraction of KV-cache blocks in use per unit; tokensPerSecondPerUnit: mean
    generated tokens per second per unit."""
    target: float = Field(ge=1e-6)
    """The metric value one unit should run at; units = ceil(units × value / target)."""
    min_units: int = Field(default=1, ge=0, le=1024)
    """Fewest units outside schedule windows."""
    max_units: int = Field(ge=0, le=1024)
    """Most units outside schedule windows."""
    tolerance: float = Field(default=0.1, ge=0, le=1)
    """No change while value / target is within 1 ± tolerance (no flapping around the target)."""
    scale_up_stabilization_seconds: int = Field(default=0, ge=0, le=86400)
    """Scale up only to the lowest recommendation of this window."""
    scale_down_stabilization_seconds: int = Field(default=300, ge=0, le=86400)
    """Scale down only to the highest recommendation of this window."""
    interval_seconds: int = Field(default=30, ge=5, le=3600)
    """How often the metric is read and a decision taken."""
    time_zone: str = Field(default="UTC", min_length=1, max_length=64)
    """IANA time zone of the schedule windows, e.g. Asia/Shanghai."""
    schedule: list[ScheduleWindow] = Field(default_factory=list, max_length=16)
    """Windows with their own bounds; the first open one applies."""


class Role(ApiModel):
    """One role (prefill or decode): identical units, each placed whole on the fabric."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.parallelism.expert == self.nodesPerUnit * self.gpusPerNode",
                "parallelism.expert must equal nodesPerUnit × gpusPerNode",
                ".parallelism.expert",
            ),
            cel(
                "self.parallelism.tensor * self.parallelism.data == self.nodesPerUnit * self.gpusPerNode",
                "parallelism.tensor × parallelism.data must equal nodesPerUnit × gpusPerNode",
                ".parallelism.data",
            ),
        )
    )

    units: int = Field(default=1, ge=0, le=1024)
    """Number of units of this role: the intent; the role's InferenceRoleScaler holds the live
    value (kubectl scale, an HPA, autoscaling), reset to this whenever it changes."""
    nodes_per_unit: int = Field(ge=1, le=1024)
    """Nodes in one unit (DeepSeek-V3: prefill 4, decode 18)."""
    gpus_per_node: int = Field(default=8, ge=1, le=16)
    """GPUs each pod of a unit uses (one pod per node)."""
    parallelism: Parallelism
    """Parallel layout inside a unit."""
    dispatch_mode: Literal["normal", "lowLatency"] | None = None
    """Expert dispatch kernels: normal (throughput) or lowLatency (decode). Default: normal for
    prefill, lowLatency for decode."""
    max_unavailable_units: int = Field(default=1, ge=1, le=1024)
    """Units that may be down at once during a rollout."""
    resources: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """Extra pod resources (requests/limits). GPU and RDMA requests are added by the operator."""
    autoscaling: Autoscaling | None = None
    """The built-in autoscaler (off when absent): it sets the live units through the role's
    InferenceRoleScaler."""


class Router(ApiModel):
    replicas: int = Field(default=2, ge=0, le=64)
    """Router replicas in front of the units."""
    policy: Literal["round-robin", "least-load", "cache-aware"] = "cache-aware"
    """How requests are spread over prefill and decode units."""
    service_type: Literal["ClusterIP", "LoadBalancer", "NodePort"] = "ClusterIP"
    """The router Service's type; with LoadBalancer, status.endpoints.router is the address the
    load balancer publishes."""
    node_selector: dict[str, str] = Field(default_factory=dict, max_length=32)
    """Node labels the router pods need (they use no GPU)."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Taints the router pods tolerate."""
    drain_timeout_seconds: int = Field(default=300, ge=0, le=86400)
    """Scale-in drains a unit through the router first: the router sends it no new requests and
    the unit is removed once no request is in flight on it, or after this many seconds (also when
    the router's counts cannot be read). 0 removes surplus units at once."""
    api_key_secret: str | None = Field(
        default=None, min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
    )
    """Name of a Secret in the deployment's namespace whose data key `api-keys` holds the accepted
    API keys, one per line. The router then answers only requests that carry one (`Authorization:
    Bearer KEY`; /health and /metrics stay open), and the fireflyer engine's units ask for a key
    too (the router sends its own). Edits of the Secret take effect without a restart; setting or
    clearing the field recreates the fireflyer engine's units."""


class Eplb(ApiModel):
    """Expert-parallel load balancing, managed by the operator."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.windowSeconds >= self.intervalSeconds",
                "eplb.windowSeconds must be at least eplb.intervalSeconds",
                ".windowSeconds",
            ),
        )
    )

    mode: Literal["dynamic", "static", "off"] = "dynamic"
    """dynamic: the operator rewrites ExpertPlacements from measured load; static: a
    user-written ExpertPlacement is used as is; off: no redundant placement."""
    interval_seconds: int = Field(default=600, ge=10, le=86400)
    """How often a dynamic rebalance is considered."""
    window_seconds: int = Field(default=600, ge=10, le=86400)
    """The load window the rebalance looks at."""
    redundant_experts: int = Field(default=32, ge=0, le=4096)
    """Extra expert replicas per MoE layer, spread over the unit's GPUs."""
    policy: Literal["auto", "hierarchical", "global"] = "auto"
    """Rebalance policy: hierarchical when expert groups divide evenly by nodes (auto)."""
    min_gain: float = Field(default=0.02, ge=0, le=1)
    """Publish a new placement only when predicted balancedness improves by at least this."""


EPLB_LOAD_URL_ANNOTATION = "eplb.fireflyer.dev/load-url"
"""Annotation on an InferenceDeployment: a URL serving the load contract (GET → {"layers",
"experts", "windowSeconds", "tokens"}) that replaces the unit leaders as the load source, e.g. an
aggregator in front of many units."""


class KvCache(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("self.path.startsWith('/')", "kvCache.path must be an absolute path", ".path"),
        )
    )

    three_fs_cluster: str = Field(alias="threeFSCluster", min_length=1, max_length=253)
    """Name of a ThreeFSCluster in the same namespace whose FUSE mount holds the KV cache; unit
    pods mount its clients.mountPoint, and units are created only once it is Ready."""
    path: str = Field(default="/3fs/stage/kvcache", max_length=1024)
    """Directory for KV-cache blocks; must lie under that cluster's clients.mountPoint."""


def _divides(role: str) -> dict[str, str]:
    return cel(
        f"(self.model.architecture.routedExperts + self.eplb.redundantExperts) "
        f"% self.{role}.parallelism.expert == 0",
        f"routedExperts + eplb.redundantExperts must be divisible by {role}.parallelism.expert",
        f".{role}.parallelism.expert",
    )


class InferenceDeploymentSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=validations(
            _divides("prefill"),
            _divides("decode"),
            cel(
                "self.prefill.units + self.decode.units >= 1",
                "at least one prefill or decode unit is needed",
                ".decode.units",
            ),
            cel(
                "self.engine.kind == 'fireflyer' || has(self.engine.image)",
                "engine.image is required for sglang and vllm engines",
                ".engine.image",
            ),
        )
    )

    model: ModelSource
    """The model served and its architecture."""
    engine: Engine = defaulted(Engine)
    """The inference engine and its extra arguments."""
    kernels: Kernels = defaulted(Kernels)
    """Kernel backends for the fireflyer engine."""
    prefill: Role
    """Prefill units (DeepSeek-V3: 4 nodes, EP32, normal dispatch)."""
    decode: Role
    """Decode units (DeepSeek-V3: 18 nodes, EP144, low-latency dispatch)."""
    router: Router = defaulted(Router)
    """The request router in front of the units."""
    eplb: Eplb = defaulted(Eplb)
    """Expert-parallel load balancing."""
    placement: Placement = defaulted(Placement)
    """RDMA-aware gang placement of units."""
    network: Network = defaulted(Network)
    """RDMA and bootstrap networking of unit pods."""
    kv_cache: KvCache | None = None
    """Optional KV-cache offload to a 3FS cluster."""


class UnitStatus(ApiModel):
    role: Literal["prefill", "decode"]
    index: int = Field(ge=0)
    domain: str = ""
    """The topology domain the unit is placed in (e.g. leaf-03)."""
    nodes: list[str] = Field(default_factory=list)
    """Nodes holding the unit's pods, by rank."""
    ready: bool = False
    """All pods of the unit are Running and Ready."""
    leader: str = ""
    """Address of rank 0."""
    avoid_nodes: list[str] = Field(default_factory=list)
    """Nodes the unit's next placements avoid: its RDMA preflight failed there."""
    avoid_until: str | None = None
    """When avoidNodes expire (RFC 3339)."""
    draining: bool = False
    """The unit is surplus after a scale-in: the router sends it no new requests and it is
    removed once its requests in flight are done (or router.drainTimeoutSeconds passes)."""
    draining_since: str | None = None
    """When its drain began (RFC 3339)."""
    drain_message: str = ""
    """Why it is still there, e.g. "decode unit 1 draining: 3 requests in flight"."""


class RecommendationRecord(ApiModel):
    time: str
    """RFC 3339."""
    units: int = Field(ge=0)


class MetricSampleRecord(ApiModel):
    time: str
    """RFC 3339."""
    value: float


class AutoscalerStatus(ApiModel):
    desired_units: int = Field(ge=0)
    """The units the autoscaler last decided on."""
    reason: str = ""
    """Why, in words (metric, ratio, bounds, stabilisation)."""
    metric_value: float | None = None
    """The metric value that decision read (absent: no value)."""
    last_scale_time: str | None = None
    """When the autoscaler last changed the units (RFC 3339)."""
    history: list[RecommendationRecord] = Field(default_factory=list, max_length=64)
    """The recommendations the stabilisation windows still look at (oldest first), kept here so
    that an operator restart does not reset them."""
    last_sample: MetricSampleRecord | None = None
    """The last metric value read, and when."""
    last_run_time: str | None = None
    """When the autoscaler last decided for this role (RFC 3339)."""


class RoleStatus(ApiModel):
    units: int = 0
    ready_units: int = 0
    placement_generation: int | None = None
    """The ExpertPlacement generation published to the role's units (mounted into their pods)."""
    applied_placement_generation: int | None = None
    """The lowest placement generation any unit of the role reports running (0: the default even
    split); absent while no unit reports one."""
    balancedness: float | None = None
    """Mean over layers of mean GPU load / max GPU load for the current placement."""
    last_rebalance_check: str | None = None
    """When the EPLB controller last collected load for this role (RFC 3339)."""
    autoscaler: AutoscalerStatus | None = None
    """The built-in autoscaler's last decision (autoscaling set)."""


class InferenceDeploymentStatus(StatusBase):
    prefill: RoleStatus | None = None
    decode: RoleStatus | None = None
    prefill_ready: str = ""
    """Ready/desired prefill units, e.g. 4/4 (printer column)."""
    decode_ready: str = ""
    """Ready/desired decode units (printer column)."""
    balancedness: str = ""
    """Decode balancedness, printed with two decimals."""
    units: list[UnitStatus] = Field(default_factory=list)
    endpoints: dict[str, str] = Field(default_factory=dict)
    """Router and unit leader addresses."""


class InferenceDeployment(ApiModel):
    api_version: Literal["fireflyer.dev/v1alpha1"] = "fireflyer.dev/v1alpha1"
    kind: Literal["InferenceDeployment"] = "InferenceDeployment"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: InferenceDeploymentSpec
    status: InferenceDeploymentStatus | None = None
