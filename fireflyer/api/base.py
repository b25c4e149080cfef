"""Shared pieces of the fireflyer.dev/v1alpha1 API: the model base, conditions, CEL helpers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import AliasGenerator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "fireflyer.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


def cel(
    rule: str, message: str, field_path: str | None = None, *, reason: str | None = None
) -> dict[str, str]:
    """One x-kubernetes-validations entry. field_path points the error at the offending field.
    Messages are static: the API server's cost estimate for string(int) in a messageExpression
    exceeds its budget."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are errors."""

    model_config = ConfigDict(
        alias_generator=AliasGenerator(alias=to_camel),
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    """A standard Kubernetes condition (kstatus, Argo CD and Flux read these)."""

    type: str = Field(max_length=316)
    """CamelCase condition type, e.g. Ready."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: str = Field(default="", max_length=1024)
    """CamelCase reason, one of the constants in fireflyer.api.conditions."""
    message: str = Field(default="", max_length=32768)
    """Human-readable detail."""
    last_transition_time: str | None = None
    """When the status last changed (RFC 3339)."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The .metadata.generation the condition was computed for."""


class StatusBase(ApiModel):
    # Live objects may carry fields a newer operator wrote; reading them must not fail.
    model_config = ConfigDict(extra="ignore")

    observed_generation: int | None = Field(default=None, ge=0)
    """The .metadata.generation the operator last reconciled."""
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Ready, Progressing, Degraded and the per-part conditions of the kind."""


class ObjectMeta(ApiModel):
    model_config = ConfigDict(extra="allow")

    name: str | None = None
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Architecture(ApiModel):
    """The MoE model's shape (DeepSeek-V3 by default). The operator sizes expert placement and
    validates parallelism against it."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.routedExperts % self.expertGroups == 0",
                "routedExperts must be divisible by expertGroups",
                ".expertGroups",
            ),
            cel(
                "self.topKGroups <= self.expertGroups",
                "topKGroups must not exceed expertGroups",
                ".topKGroups",
            ),
            cel(
                "self.topK <= self.topKGroups * (self.routedExperts / self.expertGroups)",
                "topK must not exceed the experts in the topKGroups selected groups",
                ".topK",
            ),
            cel(
                "self.firstDenseLayers < self.numLayers",
                "firstDenseLayers must be smaller than numLayers",
                ".firstDenseLayers",
            ),
        )
    )

    num_layers: int = Field(default=61, ge=1, le=512)
    """Transformer layers (DeepSeek-V3: 61)."""
    first_dense_layers: int = Field(default=3, ge=0, le=512)
    """Leading layers with a dense FFN instead of MoE (DeepSeek-V3: 3)."""
    routed_experts: int = Field(default=256, ge=1, le=4096)
    """Routed experts per MoE layer (DeepSeek-V3: 256)."""
    shared_experts: int = Field(default=1, ge=0, le=64)
    """Shared experts per MoE layer, run on every GPU (DeepSeek-V3: 1)."""
    expert_groups: int = Field(default=8, ge=1, le=512)
    """Expert groups for group-limited routing (DeepSeek-V3: 8)."""
    top_k_groups: int = Field(default=4, ge=1, le=512)
    """Groups each token may route to (DeepSeek-V3: 4)."""
    top_k: int = Field(default=8, ge=1, le=64)
    """Experts each token is routed to (DeepSeek-V3: 8)."""
    hidden_size: int = Field(default=7168, ge=64, le=65536)
    """Model hidden size (DeepSeek-V3: 7168)."""

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers


TopologyLevel = Literal["accelerator", "leaf", "spine", "core"]
LEVEL_RANK = {"accelerator": 0, "leaf": 1, "spine": 2, "core": 3}
_LEVEL_MAP = "{'accelerator': 0, 'leaf': 1, 'spine': 2, 'core': 3}"


class Toleration(ApiModel):
    """A Kubernetes toleration (the same fields as a pod's)."""

    key: str | None = Field(default=None, max_length=316)
    """The taint key; empty with operator Exists tolerates every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Equal compares the value; Exists matches any value."""
    value: str | None = Field(default=None, max_length=63)
    """The taint value for operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """The effect matched; empty matches every effect."""
    toleration_seconds: int | None = None
    """For NoExecute: how long the pod stays after the taint appears."""

    def tolerates(self, taint: Mapping[str, Any]) -> bool:
        """The API server's matching rule: an empty key with Exists matches every taint."""
        if self.effect is not None and taint.get("effect") != self.effect:
            return False
        if self.key is None:
            return self.operator == "Exists"
        if taint.get("key") != self.key:
            return False
        return self.operator == "Exists" or (taint.get("value") or "") == (self.value or "")


class Placement(ApiModel):
    """Where units go on the network fabric."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                f"!has(self.preferredLevel) || {_LEVEL_MAP}[self.preferredLevel] <= "
                f"{_LEVEL_MAP}[self.requiredLevel]",
                "preferredLevel must be at or below requiredLevel (accelerator < leaf < spine < core)",
                ".preferredLevel",
            ),
            cel(
                "self.topologyProfile != 'custom' || "
                "(has(self.customLevelKeys) && size(self.customLevelKeys) > 0)",
                "topologyProfile custom needs customLevelKeys (node label keys, lowest level first)",
                ".customLevelKeys",
            ),
        )
    )

    topology_profile: Literal["topograph", "gke", "eks", "coreweave", "custom"] = "topograph"
    """Which node labels describe the fabric: NVIDIA Topograph (network.topology.nvidia.com/*),
    GKE, EKS, CoreWeave, or customLevelKeys."""
    custom_level_keys: list[str] = Field(default_factory=list, max_length=4)
    """For topologyProfile custom: node label keys for accelerator, leaf, spine, core (lowest
    first; fewer keys mean fewer levels)."""
    required_level: TopologyLevel = "spine"
    """A unit never spans more than one domain of this level."""
    preferred_level: TopologyLevel | None = "leaf"
    """The level the planner tries first (the tightest level that fits is always preferred)."""
    spread_units: bool = False
    """Put the units of one role in different domains of the level they land in, for failure
    isolation."""
    scheduler_name: str | None = None
    """Scheduler for unit pods (default: the cluster's default scheduler)."""
    node_selector: dict[str, str] = Field(default_factory=dict, max_length=32)
    """Only nodes with all these labels are considered (e.g. one node pool); pods also carry it
    as their nodeSelector."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Taints the pods tolerate beyond the GPU operator's own; a node tainted with anything else
    is not considered."""
    bind_timeout_seconds: int = Field(default=300, ge=10, le=86400)
    """A unit that is not fully running this long after it was placed is torn down and planned
    again."""


class Network(ApiModel):
    """RDMA fabric access for workload pods."""

    rdma_resource: str = Field(default="rdma/ib", max_length=253)
    """Extended resource name of RDMA devices (rdma/ib, rdma/rdma_shared_device_a,
    nvidia.com/hostdev, …)."""
    rdma_per_pod: int = Field(default=8, ge=0, le=64)
    """RDMA devices requested per pod (0: none)."""
    host_network: bool = False
    """Run pods in the host network namespace (common with RoCE)."""
    preflight: bool = True
    """Run the RDMA preflight (all-to-all and bandwidth check across the ranks) before the workload
    starts; an inference unit (engine fireflyer) whose preflight fails is recreated on other
    nodes."""
    socket_ifname: str = Field(default="eth0", max_length=64)
    """Interface for NCCL/Gloo bootstrap traffic (NCCL_SOCKET_IFNAME)."""


def defaulted(model: type[ApiModel], **extra: Any) -> Any:
    """A nested object the API server defaults to {} so that its own field defaults apply
    (and CEL rules see them) when a user leaves it out."""
    # The API server checks a default against the rules as written, so it must be complete.
    schema_extra = {"default": model().to_wire(), **extra}
    return Field(default_factory=model, json_schema_extra=schema_extra)
