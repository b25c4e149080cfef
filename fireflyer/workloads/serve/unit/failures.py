"""Which transport a unit's failed step broke on, for `fireflyer_serve_collective_errors_total`.

The leader knows where it was: in the control group's broadcast or gather (gloo: a rank gone or
stuck), or in its own model step, whose MoE layers dispatch and combine over NCCL or NVSHMEM
(DeepEP); there the error's text names the library."""

from __future__ import annotations

from enum import Enum

BACKENDS = ("nccl", "gloo", "nvshmem", "other")


class Phase(Enum):
    CONTROL = "control"  # the leader's broadcast of the command, or its gather of the reports
    STEP = "step"  # rank 0's own model step (its MoE layers' collectives)
    REPORTS = "reports"  # the reports arrived; applying them is not a transport's doing


def collective_backend(error: BaseException, phase: Phase, *, distributed_error: bool = False) -> str | None:
    """The `backend` label of a failed step, or None when no collective failed (a model error,
    an interrupt). `distributed_error`: the error is a torch.distributed one (DistError)."""
    if not isinstance(error, Exception) or phase is Phase.REPORTS:
        return None
    if phase is Phase.CONTROL:
        return "gloo"  # the control group is always gloo (unit/launch.py)
    text = f"{type(error).__name__} {error}".lower()
    if "nvshmem" in text or "deep_ep" in text or "deepep" in text:
        return "nvshmem"
    if "nccl" in text:
        return "nccl"
    if "gloo" in text:
        return "gloo"
    return "other" if distributed_error else None


__all__ = ["BACKENDS", "Phase", "collective_backend"]
