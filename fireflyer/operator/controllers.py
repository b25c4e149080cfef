"""Every per-kind controller. Importing this module registers their kopf handlers."""

from fireflyer.operator.inference import controller as inference_controller

__all__ = ["inference_controller"]
