"""InferenceRoleScaler: the scale subresource of one role of an InferenceDeployment.

A CRD has one scale subresource, and an InferenceDeployment has two roles that scale apart, so
each role gets an object of its own (named <deployment>-<role>, owned by the deployment) that
`kubectl scale`, a HorizontalPodAutoscaler, KEDA or the built-in autoscaler move."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from fireflyer.api.base import ApiModel, ObjectMeta


class InferenceRoleScalerSpec(ApiModel):
    deployment: str = Field(min_length=1, max_length=253)
    """The InferenceDeployment whose role this scales."""
    role: Literal["prefill", "decode"]
    """The role it scales."""
    replicas: int = Field(ge=0, le=1024)
    """Live desired units of the role (whole units, never pods)."""


class InferenceRoleScalerStatus(ApiModel):
    model_config = ConfigDict(extra="ignore")

    replicas: int = Field(default=0, ge=0)
    """Units of the role that exist now."""
    ready_replicas: int = Field(default=0, ge=0)
    """Units of the role that are ready."""
    selector: str = ""
    """Label selector of the role's unit pods (what an HPA reads pod metrics by)."""
    deployment_units: int | None = Field(default=None, ge=0)
    """The role's units in the InferenceDeployment when the scaler was last set from it: when
    the deployment's units change, they win over the live value again."""


class InferenceRoleScaler(ApiModel):
    api_version: Literal["fireflyer.dev/v1alpha1"] = "fireflyer.dev/v1alpha1"
    kind: Literal["InferenceRoleScaler"] = "InferenceRoleScaler"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: InferenceRoleScalerSpec
    status: InferenceRoleScalerStatus | None = None
