"""The EPLB agent's apply side: the placement the operator mounts (`<placement dir>/placement.json`,
a copy of the role's current ExpertPlacement), validated, and switched to by every rank of the
unit at the same step.

A rank reloads the experts its new slots hold from the checkpoint (every rank can read it) and
routes through a new Dispatcher built from the placement's table; the KV cache and the requests in
flight are untouched, so generation goes on with the same outputs."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PLACEMENT_FILE = "placement.json"


class PlacementError(ValueError):
    """A placement this unit cannot apply (the message says why); the previous one is kept."""


@dataclass(frozen=True)
class Placement:
    generation: int
    slots_per_gpu: int
    phy2log: list[list[int]]  # per MoE layer: the logical expert of each physical slot

    def slots(self, layer: int, rank: int) -> list[int]:
        """The logical experts rank `rank` hosts in MoE layer `layer`, slot by slot."""
        per = self.slots_per_gpu
        return self.phy2log[layer][rank * per : (rank + 1) * per]


def validate_placement(data: Any, *, layers: int, experts: int, gpus: int) -> Placement:
    """The placement a mounted ExpertPlacement copy describes, checked against this unit."""
    if not isinstance(data, dict):
        raise PlacementError("expected a JSON object")
    try:
        generation = int(data["generation"])
        slots_per_gpu = int(data["slotsPerGpu"])
        phy2log = [[int(e) for e in row] for row in data["phy2log"]]
        declared = (int(data["layers"]), int(data["logicalExperts"]), int(data["gpus"]))
    except (KeyError, TypeError, ValueError) as error:
        raise PlacementError(f"missing or malformed field: {error}") from error
    if generation < 1 or slots_per_gpu < 1:
        raise PlacementError("generation and slotsPerGpu must be at least 1")
    if declared != (layers, experts, gpus):
        raise PlacementError(
            f"it is for {declared[0]} MoE layers × {declared[1]} experts on {declared[2]} GPUs;"
            f" this unit runs {layers} × {experts} on {gpus}"
        )
    if len(phy2log) != layers:
        raise PlacementError(f"phy2log has {len(phy2log)} rows for {layers} MoE layers")
    for layer, row in enumerate(phy2log):
        if len(row) != gpus * slots_per_gpu:
            raise PlacementError(f"layer {layer}: {len(row)} slots, expected {gpus} × {slots_per_gpu}")
        if any(not 0 <= e < experts for e in row):
            raise PlacementError(f"layer {layer}: expert ids must be in 0..{experts - 1}")
        missing = sorted(set(range(experts)) - set(row))
        if missing:
            raise PlacementError(f"layer {layer}: experts {missing[:8]} have no slot")
    return Placement(generation, slots_per_gpu, phy2log)


class PlacementWatch:
    """The leader's view of the mounted file: re-read when it changes (kubelet swaps ConfigMap
    volumes in place), a new valid generation handed out once, a bad one reported and kept out."""

    def __init__(self, directory: Path, *, layers: int, experts: int, gpus: int) -> None:
        self.path = directory / PLACEMENT_FILE
        self.shape = {"layers": layers, "experts": experts, "gpus": gpus}
        self.generation: int | None = None  # the generation the unit runs (None: the even split)
        self.error: str | None = None  # why the newest file was refused
        self._seen: bytes | None = None

    def poll(self) -> Placement | None:
        """A placement to switch to, when the file holds a new, valid, higher generation."""
        try:
            raw = self.path.read_bytes()
        except OSError:
            return None  # nothing mounted yet, or mid-swap
        if raw == self._seen:
            return None
        self._seen = raw
        try:
            data = json.loads(raw)
            if data == {}:
                return None  # the operator has no placement for this role yet
            placement = validate_placement(data, **self.shape)
        except (json.JSONDecodeError, PlacementError) as error:
            self.error = f"{self.path}: {error}"
            log.error("placement refused, keeping generation %s: %s", self.generation, self.error)
            return None
        if self.generation is not None and placement.generation <= self.generation:
            return None
        self.error = None
        return placement


def apply_placement(
    model: Any, model_dir: Path, placement: Placement, rank: int, make_dispatcher: Any
) -> None:
    """Switch this rank's MoE layers to `placement`: new expert slots loaded from the checkpoint,
    and a dispatcher per layer built from the layer's table (`make_dispatcher(phy2log_row)`)."""
    from fireflyer.workloads.model.loader import load_expert_slots
    from fireflyer.workloads.model.moe import Experts, MoE

    moe_blocks = [
        (index, block.mlp) for index, block in enumerate(model.blocks) if isinstance(block.mlp, MoE)
    ]
    for moe_layer, (layer, moe) in enumerate(moe_blocks):
        old = moe.experts
        experts = Experts(
            model.config,
            placement.slots(moe_layer, rank),
            dtype=model.dtype,
            device=model.device,
            gemm_backend=old.gemm_backend,
        )
        load_expert_slots(model_dir, layer, experts)
        moe.experts = experts
        moe.dispatcher = make_dispatcher(placement.phy2log[moe_layer])


__all__ = ["Placement", "PlacementError", "PlacementWatch", "apply_placement", "validate_placement"]
