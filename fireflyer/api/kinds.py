"""The kinds of fireflyer.dev/v1alpha1 and their CRD presentation."""

from __future__ import annotations

from dataclasses import dataclass, field

from fireflyer.api.base import ApiModel
from fireflyer.api.expertplacement import ExpertPlacement
from fireflyer.api.inference import InferenceDeployment
from fireflyer.api.scaler import InferenceRoleScaler
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
    scale: dict[str, str] | None = None
    """The scale subresource's paths, for kinds that `kubectl scale` and an HPA move."""

    @property
    def singular(self) -> str:
        return self.kind.lower()


def _ready() -> dict[str, object]:
    return {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'}


def _reason() -> dict[str, object]:
    """Why the resource is (not) Ready, in -o wide: the condition's message is in describe."""
    return {
        "name": "Reason",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
        "priority": 1,
    }


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
            _reason(),
            {
                "name": "Placement",
                "type": "integer",
                "jsonPath": ".status.decode.placementGeneration",
                "priority": 1,
            },
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
            _reason(),
            {
                "name": "Degraded Chains",
                "type": "integer",
                "jsonPath": ".status.chains.degraded",
                "priority": 1,
            },
            {
                "name": "Replaced",
                "type": "integer",
                "jsonPath": ".status.replacementsCompleted",
                "priority": 1,
            },
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
            {"name": "Tokens/s", "type": "number", "jsonPath": ".status.tokensPerSecond", "priority": 1},
            {"name": "Last Failure", "type": "string", "jsonPath": ".status.lastFailure", "priority": 1},
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
            {"name": "Applied", "type": "integer", "jsonPath": ".status.appliedUnits"},
            {
                "name": "Previous",
                "type": "number",
                "jsonPath": ".status.previousBalancedness",
                "priority": 1,
            },
            _age(),
        ],
    ),
    Kind(
        "InferenceRoleScaler",
        "inferencerolescalers",
        "irs",
        InferenceRoleScaler,
        "The scale subresource of one role of an InferenceDeployment: kubectl scale, an HPA or "
        "the built-in autoscaler set the role's live units here.",
        [
            {"name": "Deployment", "type": "string", "jsonPath": ".spec.deployment"},
            {"name": "Role", "type": "string", "jsonPath": ".spec.role"},
            {"name": "Desired", "type": "integer", "jsonPath": ".spec.replicas"},
            {"name": "Current", "type": "integer", "jsonPath": ".status.replicas"},
            {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
            {"name": "Selector", "type": "string", "jsonPath": ".status.selector", "priority": 1},
            _age(),
        ],
        scale={
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    ),
)

BY_KIND = {k.kind: k for k in KINDS}
