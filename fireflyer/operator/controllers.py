"""Every per-kind controller. Importing this module registers their kopf handlers."""

from fireflyer.operator import cache
from fireflyer.operator.eplb import controller as eplb_controller
from fireflyer.operator.inference import controller as inference_controller
from fireflyer.operator.threefs import controller as threefs_controller
from fireflyer.operator.training import controller as training_controller

__all__ = ["cache", "eplb_controller", "inference_controller", "threefs_controller", "training_controller"]
