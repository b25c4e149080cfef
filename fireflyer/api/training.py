"""TrainingJob: an MoE training run with DP/EP/PP (DualPipe) and checkpoints on 3FS."""

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
    source: str | None = Field(default=None, min_length=1, max_length=2048)
    """Hugging Face checkpoint directory the trainer starts from (config.json, tokenizer and
    safetensors weights), usually on a 3FS mount: --model."""
    architecture: Architecture = defaulted(Architecture)
    """The model's shape."""


class Dataset(ApiModel):
    path: str = Field(min_length=1, max_length=2048)
    """Training data directory (usually on a 3FS mount)."""


class DataPreparation(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.maxTokens) || self.maxTokens >= self.minTokens",
                "dataPreparation.maxTokens must be at least minTokens",
                ".maxTokens",
            ),
        )
    )

    input: str = Field(min_length=1, max_length=2048)
    """Directory of raw documents: *.jsonl files with a `text` field per line and *.parquet files
    with a `text` column (usually on a 3FS mount)."""
    output: str | None = Field(default=None, min_length=1, max_length=2048)
    """Where the tokenized shards go; default dataset.path, where the trainer reads them."""
    tokenizer: str | None = Field(default=None, min_length=1, max_length=2048)
    """Model directory whose tokenizer.json tokenizes the text; default model.source."""
    min_tokens: int = Field(default=1, ge=0, le=1_000_000_000)
    """Documents with fewer tokens are dropped."""
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000_000)
    """Documents with more tokens are dropped (none: no upper bound)."""
    dedup: bool = True
    """Drop documents whose text repeats an earlier one (exact match, first occurrence kept)."""
    args: list[str] = Field(default_factory=list, max_length=64)
    """Extra `fireflyer prepare` arguments (e.g. --shard-tokens)."""
    image: str | None = Field(default=None, min_length=1, max_length=1024)
    """Image of the preparation Job; default the job's image (it needs the `prepare` extra)."""
    resources: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """The preparation pod's resources (default: requests of 2 CPUs and 8Gi)."""
    node_selector: dict[str, str] = Field(default_factory=dict, max_length=32)
    """Nodes the preparation pod may run on."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Taints the preparation pod tolerates."""
    backoff_limit: int = Field(default=1, ge=0, le=10)
    """Times a failed preparation pod is retried before the TrainingJob is Failed."""


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
    """latest: a restarted job continues from the newest complete checkpoint in checkpoint.path.
    The trainer finds it by itself; the operator starts every attempt with the same
    arguments."""


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
            cel(
                "(has(self.command) && size(self.command) > 0) || "
                "(has(self.model.source) && has(self.dataset))",
                "the default command (fireflyer train) needs model.source and dataset.path",
                ".model.source",
            ),
            cel(
                "!has(self.dataPreparation) || has(self.dataPreparation.output) || has(self.dataset)",
                "dataPreparation needs dataPreparation.output or dataset.path",
                ".dataPreparation",
            ),
            cel(
                "!has(self.dataPreparation) || has(self.dataPreparation.tokenizer) || has(self.model.source)",
                "dataPreparation needs dataPreparation.tokenizer or model.source",
                ".dataPreparation",
            ),
            cel(
                "!has(self.microBatches) || self.microBatches >= self.parallelism.pipeline",
                "microBatches must be at least parallelism.pipeline (one per stage in flight)",
                ".microBatches",
            ),
            cel(
                "!has(self.microBatches) || self.parallelism.schedule != 'dualpipe' || "
                "self.microBatches >= 2 * self.parallelism.pipeline",
                "schedule dualpipe needs microBatches of at least 2 × parallelism.pipeline",
                ".microBatches",
            ),
            cel(
                "!has(self.microBatches) || self.parallelism.schedule != 'dualpipe' || "
                "self.microBatches % 2 == 0",
                "schedule dualpipe needs an even microBatches (half enter from each end)",
                ".microBatches",
            ),
        )
    )

    image: str = Field(min_length=1, max_length=1024)
    """Workload image (torch and the fireflyer trainer)."""
    command: list[str] = Field(default_factory=list, max_length=64)
    """Entrypoint override (default: fireflyer train). It receives the rendered trainer
    arguments."""
    args: list[str] = Field(default_factory=list, max_length=256)
    """Extra arguments appended after the ones rendered from the spec."""
    steps: int = Field(default=1000, ge=1, le=1_000_000_000)
    """Optimizer steps to train for (--steps); a resumed run continues up to the same step."""
    micro_batches: int | None = Field(default=None, ge=1, le=65536)
    """Micro-batches per step and pipeline (--micro-batches); default 2 × parallelism.pipeline
    with a pipeline, else 1."""
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
    data_preparation: DataPreparation | None = None
    """Raw documents turned into dataset.path's shards by a `fireflyer prepare` Job before the
    training pods start; skipped (at once) when the output is already prepared."""
    checkpoint: Checkpoint | None = None
    """Where and how often to checkpoint."""
    restart: Restart = defaulted(Restart)
    """Failure handling."""
    placement: Placement = defaulted(Placement)
    """RDMA-aware placement of the job's nodes."""
    network: Network = defaulted(Network)
    """RDMA and bootstrap networking."""
    pod_labels: dict[str, str] = Field(default_factory=dict, max_length=32)
    """Labels added to every pod of the job (network policies, cost attribution, queues)."""
    preemptible: bool = False
    """The job may be asked to give its nodes back to an InferenceDeployment whose unit cannot
    be placed otherwise: its pods are deleted (the trainer checkpoints the step it is in), no
    restart is counted, and it resumes from that checkpoint once it can be placed again."""
    termination_grace_period_seconds: int = Field(default=300, ge=1, le=86400)
    """How long a deleted pod has to finish its step and write its checkpoint before it is
    killed (the pods' terminationGracePeriodSeconds): longer than a step plus a checkpoint."""

    @property
    def preparation_output(self) -> str:
        prep = self.data_preparation
        return (prep.output if prep else None) or (self.dataset.path if self.dataset else "")

    @property
    def preparation_tokenizer(self) -> str:
        prep = self.data_preparation
        return (prep.tokenizer if prep else None) or self.model.source or ""

    @property
    def effective_micro_batches(self) -> int:
        if self.micro_batches is not None:
            return self.micro_batches
        return 2 * self.parallelism.pipeline if self.parallelism.pipeline > 1 else 1


TrainingPhase = Literal["", "Pending", "Running", "Restarting", "Succeeded", "Failed"]

# On a TrainingJob, written by the inference controller: JSON {"at", "by", "unit", "nodes"}, a
# request that the job give those nodes back (spec.preemptible jobs only).
PREEMPTION_REQUESTED = "fireflyer.dev/preemption-requested"


class Preemption(ApiModel):
    requested_at: str
    """When the nodes were asked back (the request's time)."""
    by: str
    """The InferenceDeployment that asked, namespace/name, and its unit."""
    nodes: list[str] = Field(default_factory=list)
    """The nodes it asked for: kept free for it until it has taken them."""
    step: int | None = None
    """The trainer's step when the job was asked."""
    released: bool = False
    """The requester has taken the nodes (or stopped waiting): the job may use them again."""


class TrainingJobStatus(StatusBase):
    phase: TrainingPhase = ""
    """Pending (preparing data, placing, pods starting), Running, Restarting (a whole-job
    restart is under way), Succeeded (every pod exited 0), Failed (restart.maxRestarts used up,
    or the data preparation failed)."""
    restarts: int = Field(default=0, ge=0)
    """Whole-job restarts so far (a pod failed, a node was lost, or the pods did not bind in
    time)."""
    last_failure: str | None = None
    """Why the job last restarted or failed, e.g. "pod x-1 exited 1" or "node y NotReady"."""
    ready: str = ""
    """Running/desired nodes (printer column)."""
    nodes: list[str] = Field(default_factory=list)
    """The nodes the current attempt is placed on."""
    domain: str | None = None
    """The fabric domain the current attempt is placed in, level/name."""
    step: int | None = None
    """The trainer's current step (from rank 0's /status)."""
    loss: float | None = None
    """The trainer's latest training loss (from rank 0's /status)."""
    last_checkpoint_step: int | None = None
    """The step of the latest complete checkpoint (from rank 0's /status)."""
    tokens_per_second: float | None = None
    """Training throughput of the whole job (from rank 0's /status)."""
    preemptions: int = Field(default=0, ge=0)
    """Times the job gave its nodes back to inference (not counted as restarts)."""
    preemption: Preemption | None = None
    """The latest preemption."""


class TrainingJob(ApiModel):
    api_version: Literal["fireflyer.dev/v1alpha1"] = "fireflyer.dev/v1alpha1"
    kind: Literal["TrainingJob"] = "TrainingJob"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: TrainingJobSpec
    status: TrainingJobStatus | None = None
