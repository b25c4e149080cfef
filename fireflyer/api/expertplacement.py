"""ExpertPlacement: the expert-to-GPU assignment of one role of one deployment, per generation."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from fireflyer.api.base import ApiModel, ObjectMeta, StatusBase, cel, validations

# Bounds keep the CEL rules' estimated cost within the API server's budget.
MAX_LAYERS = 128
MAX_SLOTS = 1024


class ExpertPlacementSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("size(self.phy2log) == self.layers", "phy2log must have `layers` rows", ".phy2log"),
            cel(
                "self.phy2log.all(row, size(row) == self.gpus * self.slotsPerGpu)",
                "every phy2log row must have gpus × slotsPerGpu entries",
                ".phy2log",
            ),
            cel(
                "self.phy2log.all(row, row.all(e, e < self.logicalExperts))",
                "phy2log entries must be logical expert ids below logicalExperts",
                ".phy2log",
            ),
            cel(
                "self.gpus * self.slotsPerGpu >= self.logicalExperts",
                "gpus × slotsPerGpu must be at least logicalExperts (every expert needs a slot)",
                ".slotsPerGpu",
            ),
        )
    )

    deployment: str = Field(min_length=1, max_length=253)
    """The InferenceDeployment this placement belongs to."""
    role: Literal["prefill", "decode"]
    """The role of the deployment this placement is for."""
    generation: int = Field(ge=1)
    """Placement generation; workloads switch to higher generations."""
    layers: int = Field(ge=1, le=MAX_LAYERS)
    """MoE layers."""
    logical_experts: int = Field(ge=1, le=MAX_SLOTS)
    """Routed experts per layer."""
    gpus: int = Field(ge=1, le=MAX_SLOTS)
    """GPUs in one unit (the expert-parallel size)."""
    slots_per_gpu: int = Field(ge=1, le=256)
    """Physical expert slots per GPU; slot s lives on GPU s // slotsPerGpu."""
    phy2log: list[list[int]] = Field(
        alias="phy2log",
        max_length=MAX_LAYERS,
        json_schema_extra={
            "items": {"type": "array", "maxItems": MAX_SLOTS, "items": {"type": "integer", "minimum": 0}}
        },
    )
    """layers × (gpus·slotsPerGpu) table: the logical expert held by each physical slot."""


class ExpertPlacementStatus(StatusBase):
    balancedness: float | None = None
    """Predicted mean GPU load / max GPU load for this placement, on the load it was built from."""
    previous_balancedness: float | None = None
    """The same figure for the generation it replaced."""
    applied_units: int = 0
    """Units of the role whose leader reports running this generation (GET /v1/eplb/load)."""


class ExpertPlacement(ApiModel):
    api_version: Literal["fireflyer.dev/v1alpha1"] = "fireflyer.dev/v1alpha1"
    kind: Literal["ExpertPlacement"] = "ExpertPlacement"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: ExpertPlacementSpec
    status: ExpertPlacementStatus | None = None
