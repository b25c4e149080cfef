"""fireflyer.dev/v1alpha1: pydantic models, the single source of truth for every CRD."""

from fireflyer.api.base import API_VERSION, GROUP, VERSION
from fireflyer.api.expertplacement import ExpertPlacement
from fireflyer.api.inference import InferenceDeployment
from fireflyer.api.threefs import ThreeFSCluster
from fireflyer.api.training import TrainingJob

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "ExpertPlacement",
    "InferenceDeployment",
    "ThreeFSCluster",
    "TrainingJob",
]
