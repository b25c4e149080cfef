"""TrainingJob: an MoE training run with DP/EP/PP (DualPipe) and checkpoints on 3FS."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from fireflyer.api.base import (
    ApiModel,
    Architecture,
    Network,
    ObjectMeta,
    Placement,
    StatusBase,
    cel,
    defaulted,
    validations,
)


class TrainingParallelism(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.schedule != 'dualpipe' || self.pipeline % 2 == 0",
                "schedule dualpipe needs an even parallelism.pipeline",
                ".pipeline",
            ),
            cel(
                "self.schedule != 'none' || self.pipeline == 1",
                "parallelism.pipeline > 1 needs a pipeline schedule (dualpipe or 1f1b)",
                ".schedule",
            ),
            cel(
                "(self.data * self.tensor) % self.expert == 0",
                "parallelism.expert must divide parallelism.data × parallelism.tensor",
                ".expert",
            ),
        )
    )

    data: int = Field(default=1, ge=1, le=65536)
    """Data-parallel size."""
    tensor: int = Field(default=1, ge=1, le=64)
    """Tensor-parallel size."""
    expert: int = Field(default=1, ge=1, le=4096)
    """Expert-parallel size, carved out of data × tensor ranks."""
    pipeline: int = Field(default=1, ge=1, le=512)
    """Pipeline-parallel stages."""
    schedule: Literal["dualpipe", "1f1b", "none"] = "none"
    """Pipeline schedule."""


class TrainingModel(ApiModel):
    architecture: Architecture = defaulted(Architecture)
    """The model's shape."""


class Dataset(ApiModel):
    path: str = Field(min_length=1, max_length=2048)
    """Training data directory (usually on a 3FS mount)."""


class Checkpoint(ApiModel):
    path: str = Field(min_length=1, max_length=2048)
    """Checkpoint directory (usually on a 3FS mount)."""
    interval_steps: int = Field(default=1000, ge=1)
    """Steps between checkpoints."""
    keep: int = Field(default=3, ge=1, le=1000)
    """Checkpoints kept; older ones are removed."""


class Restart(ApiModel):
    max_restarts: int = Field(default=3, ge=0, le=1000)
    """Whole-job restarts after a failure before the job is marked Failed."""
    resume: Literal["latest", "none"] = "latest"
    """Resume from the latest complete checkpoint on restart."""


class TrainingJobSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.parallelism.data * self.parallelism.tensor * self.parallelism.pipeline == "
                "self.nodes * self.gpusPerNode",
                "parallelism.data × tensor × pipeline must equal nodes × gpusPerNode",
                ".parallelism",
            ),
            cel(
                "self.model.architecture.routedExperts % self.parallelism.expert == 0",
                "parallelism.expert must divide model.architecture.routedExperts",
                ".parallelism.expert",
            ),
            cel(
                "self.parallelism.pipeline <= self.model.architecture.numLayers",
                "parallelism.pipeline must not exceed model.architecture.numLayers",
                ".parallelism.pipeline",
            ),
            cel(
                "self.restart.resume != 'latest' || has(self.checkpoint)",
                "restart.resume latest needs checkpoint.path",
                ".checkpoint",
            ),
        )
    )

    image: str = Field(min_length=1, max_length=1024)
    """Workload image (torch and the fireflyer trainer)."""
    command: list[str] = Field(default_factory=list, max_length=64)
    """Entrypoint override (default: fireflyer-train)."""
    args: list[str] = Field(default_factory=list, max_length=256)
    """Arguments to the command."""
    nodes: int = Field(ge=1, le=8192)
    """Nodes in the job (one pod per node)."""
    gpus_per_node: int = Field(default=8, ge=1, le=16)
    """GPUs each pod uses."""
    parallelism: TrainingParallelism = defaulted(TrainingParallelism)
    """Data, tensor, expert and pipeline parallel layout."""
    model: TrainingModel = defaulted(TrainingModel)
    """The model being trained."""
    dataset: Dataset | None = None
    """Training data."""
    checkpoint: Checkpoint | None = None
    """Where and how often to checkpoint."""
    restart: Restart = defaulted(Restart)
    """Failure handling."""
    placement: Placement = defaulted(Placement)
    """RDMA-aware placement of the job's nodes."""
    network: Network = defaulted(Network)
    """RDMA and bootstrap networking."""


class TrainingJobStatus(StatusBase):
    phase: str = ""
    """Pending, Running, Succeeded, Failed."""
    restarts: int = 0
    last_checkpoint_step: int | None = None
    ready: str = ""
    """Running/desired nodes (printer column)."""


class TrainingJob(ApiModel):
    api_version: Literal["fireflyer.dev/v1alpha1"] = "fireflyer.dev/v1alpha1"
    kind: Literal["TrainingJob"] = "TrainingJob"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: TrainingJobSpec
    status: TrainingJobStatus | None = None
