"""What a training checkpoint holds and how a run resumes from one.

State dict (through fireflyer.storage.checkpoint; DP-replicated tensors are written once, by
rank 0)::

    model/<param name>            FP32 weights, the routers' correction biases included
    optim/<param name>/<key>      AdamW's exp_avg, exp_avg_sq, step
    rng/torch, rng/cuda           each rank's generator state, one row per rank (sharded on dim 0)
    trainer/{step, samples, seed, seqLen, globalBatch}   JSON: steps done, samples consumed
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fireflyer.storage import checkpoint
from fireflyer.workloads.train import optim, parallel
from fireflyer.workloads.train.config import TrainError
from fireflyer.workloads.train.parallel import Rank

log = logging.getLogger(__name__)

RNG_KEYS = ("rng/torch", "rng/cuda")


@dataclass(frozen=True)
class Position:
    """Where training stands: `step` steps done, `samples` samples consumed."""

    step: int = 0
    samples: int = 0


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()[None]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)[None]
    return state


def state_dict(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    named: list[tuple[str, nn.Parameter]],
    position: Position,
    meta: dict[str, Any],
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, int]]:
    """(state dict, shard dims) of this rank for checkpoint.save_async."""
    rng = rng_state(device)
    state = {
        "model": {name: p.detach() for name, p in model.named_parameters()},
        "optim": optim.optimizer_state(optimizer, named),
        "rng": rng,
        "trainer": {"step": position.step, "samples": position.samples, **meta},
    }
    return state, {f"rng/{key}": 0 for key in rng}


def _restore(
    loaded: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    named: list[tuple[str, nn.Parameter]],
    device: torch.device,
) -> None:
    params = dict(model.named_parameters())
    saved = loaded.get("model", {})
    missing = sorted(set(params) - set(saved))
    if missing:
        raise TrainError(f"checkpoint lacks model tensors, e.g. {', '.join(missing[:3])} (another model?)")
    with torch.no_grad():
        for name, param in params.items():
            if tuple(saved[name].shape) != tuple(param.shape):
                shapes = f"{tuple(saved[name].shape)}, model {tuple(param.shape)}"
                raise TrainError(f"checkpoint {name}: shape {shapes}")
            param.copy_(saved[name])
    optim.load_optimizer_state(optimizer, named, loaded.get("optim", {}))
    rng = loaded.get("rng", {})
    # One row per rank: restored only when the world size is the one that saved it.
    if "torch" in rng and rng["torch"].shape[0] == 1:
        torch.set_rng_state(rng["torch"][0].contiguous())
    if device.type == "cuda" and "cuda" in rng and rng["cuda"].shape[0] == 1:
        torch.cuda.set_rng_state(rng["cuda"][0].contiguous(), device)


def resume(
    directory: Path,
    rank: Rank,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    named: list[tuple[str, nn.Parameter]],
) -> tuple[Position, dict[str, Any]]:
    """Load the newest intact checkpoint into model and optimizer (→ its position and trainer
    metadata), or Position() when there is none. Checkpoint directories past the one loaded
    (incomplete, or corrupt) are removed, so the run can write those steps again."""
    try:
        found = checkpoint.load_latest(directory, rank=rank.rank, world=rank.world)
    except checkpoint.CheckpointError as error:
        raise TrainError(f"--checkpoint-dir {directory}: no intact checkpoint to resume ({error})") from None
    position, meta = Position(), {}
    if found is not None:
        _, loaded = found
        meta = dict(loaded.get("trainer", {}))
        position = Position(int(meta["step"]), int(meta["samples"]))
        _restore(loaded, model, optimizer, named, rank.device)
    if not parallel.same_everywhere(rank, position.step):
        raise TrainError(f"--checkpoint-dir {directory}: ranks found different latest checkpoints")
    parallel.barrier(rank)  # every rank is done reading before rank 0 removes anything
    if rank.is_leader:
        for step in checkpoint.list_steps(directory):
            if step > position.step:
                log.warning("removing checkpoint step %d (incomplete or corrupt)", step)
                path = checkpoint.step_dir(directory, step)
                (path / checkpoint.MANIFEST).unlink(missing_ok=True)
                shutil.rmtree(path, ignore_errors=True)
    parallel.barrier(rank)
    return position, meta
