"""The four kinds of fireflyer.dev/v1alpha1 and their CRD presentation."""

from __future__ import annotations

from dataclasses import dataclass, field

from fireflyer.api.base import ApiModel
from fireflyer.api.expertplacement import ExpertPlacement
from fireflyer.api.inference import InferenceDeployment
from fireflyer.api.threefs import ThreeFSCluster
from fireflyer.api.training import TrainingJob

CATEGORY = "fireflyer"


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    short_name: str
    model: type[ApiModel]
    description: str
    printer_columns: list[dict[str, object]] = field(default_factory=list)

    @property
    def singular(self) -> str:
        return self.kind.lower()


def _ready() -> dict[str, object]:
    return {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'}


def _age() -> dict[str, object]:
    return {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


KINDS: tuple[Kind, ...] = (
    Kind(
        "InferenceDeployment",
        "inferencedeployments",
        "infd",
        InferenceDeployment,
        "A DeepSeek-V3/R1-style MoE inference service: prefill and decode units placed whole on "
        "the RDMA fabric, a router, and managed EPLB.",
        [
            _ready(),
            {"name": "Prefill", "type": "string", "jsonPath": ".status.prefillReady"},
            {"name": "Decode", "type": "string", "jsonPath": ".status.decodeReady"},
            {"name": "Balancedness", "type": "string", "jsonPath": ".status.balancedness"},
            {"name": "Engine", "type": "string", "jsonPath": ".spec.engine.kind", "priority": 1},
            _age(),
        ],
    ),
    Kind(
        "ThreeFSCluster",
        "threefsclusters",
        "tfs",
        ThreeFSCluster,
        "A 3FS file system: FoundationDB, mgmtd, meta, storage, FUSE clients and monitor.",
        [
            _ready(),
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Storage", "type": "string", "jsonPath": ".status.storageReady"},
            {"name": "Chains", "type": "integer", "jsonPath": ".status.chains.total"},
            {"name": "Serving", "type": "integer", "jsonPath": ".status.chains.serving"},
            _age(),
        ],
    ),
    Kind(
        "TrainingJob",
        "trainingjobs",
        "tj",
        TrainingJob,
        "An MoE training run with data, expert and pipeline (DualPipe) parallelism and checkpoints on 3FS.",
        [
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Step", "type": "integer", "jsonPath": ".status.step"},
            {"name": "Loss", "type": "number", "jsonPath": ".status.loss"},
            {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
            {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
            {
                "name": "Checkpoint",
                "type": "integer",
                "jsonPath": ".status.lastCheckpointStep",
                "priority": 1,
            },
            _age(),
        ],
    ),
    Kind(
        "ExpertPlacement",
        "expertplacements",
        "xp",
        ExpertPlacement,
        "The expert-to-GPU assignment of one role of one InferenceDeployment, one generation per object.",
        [
            {"name": "Deployment", "type": "string", "jsonPath": ".spec.deployment"},
            {"name": "Role", "type": "string", "jsonPath": ".spec.role"},
            {"name": "Generation", "type": "integer", "jsonPath": ".spec.generation"},
            {"name": "Balancedness", "type": "number", "jsonPath": ".status.balancedness"},
            _age(),
        ],
    ),
)

BY_KIND = {k.kind: k for k in KINDS}
