"""What a training checkpoint holds and how a run resumes from one.

State dict (through fireflyer.storage.checkpoint; DP-replicated tensors are written once, by
rank 0)::

    model/<param name>            FP32 weights, the routers' correction biases included
    optim/<param name>/<key>      AdamW's exp_avg, exp_avg_sq, step
    rng/torch, rng/cuda           each rank's generator state, one row per rank (sharded on dim 0)
    trainer/{step, samples, seed, seqLen, globalBatch}   JSON: steps done, samples consumed

With expert parallelism the routed experts' weights and AdamW moments are sharded on dim 0 (the
expert) over the ranks of expert group 0, which alone save (experts.py); loaded with world 1 the
checkpoint is the same as one saved without expert parallelism. With --zero 1 the AdamW state is
one flat vector sharded over the ranks (zero.py).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fireflyer.storage import checkpoint
from fireflyer.workloads.train import parallel
from fireflyer.workloads.train.config import TrainError
from fireflyer.workloads.train.experts import local_rows
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
    optim_state: dict[str, Any],
    position: Position,
    meta: dict[str, Any],
    device: torch.device,
    sharded: dict[str, int] | None = None,
) -> tuple[dict[str, Any], dict[str, int]]:
    """(state dict, shard dims) of this rank for checkpoint.save_async. `optim_state` goes under
    optim/; `sharded` names the state-dict paths split over the checkpoint's ranks (→ their dim)."""
    rng = rng_state(device)
    state = {
        "model": {name: p.detach() for name, p in model.named_parameters()},
        "optim": optim_state,
        "rng": rng,
        "trainer": {"step": position.step, "samples": position.samples, **meta},
    }
    return state, {f"rng/{key}": 0 for key in rng} | (sharded or {})


LoadOptimizer = Callable[[dict[str, Any]], None]  # restores the optimizer from the optim/ subtree


def _restore(
    loaded: dict[str, Any],
    model: nn.Module,
    load_optimizer: LoadOptimizer,
    device: torch.device,
    rows: dict[str, range],
) -> None:
    params = dict(model.named_parameters())
    saved = loaded.get("model", {})
    missing = sorted(set(params) - set(saved))
    if missing:
        raise TrainError(f"checkpoint lacks model tensors, e.g. {', '.join(missing[:3])} (another model?)")
    with torch.no_grad():
        for name, param in params.items():
            value = local_rows(name, saved[name], param, rows)
            if tuple(value.shape) != tuple(param.shape):
                shapes = f"{tuple(saved[name].shape)}, model {tuple(param.shape)}"
                raise TrainError(f"checkpoint {name}: shape {shapes}")
            param.copy_(value)
    saved_optim = loaded.get("optim", {})
    for name, moments in saved_optim.items():
        if name in rows and isinstance(moments, dict):
            saved_optim[name] = {
                key: local_rows(name, value, params[name], rows) if key != "step" else value
                for key, value in moments.items()
            }
    load_optimizer(saved_optim)
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
    load_optimizer: LoadOptimizer,
    identity: tuple[int, int] | None = None,
    rows: dict[str, range] | None = None,
) -> tuple[Position, dict[str, Any]]:
    """Load the newest intact checkpoint into model and optimizer (→ its position and trainer
    metadata), or Position() when there is none. `identity`: this rank's (rank, world) in the
    checkpoint's world (default: the job's); `rows`: expert weights → the expert ids this rank
    holds. Checkpoint directories past the one loaded (incomplete, or corrupt) are removed, so the
    run can write those steps again."""
    ckpt_rank, ckpt_world = identity or (rank.rank, rank.world)
    try:
        found = checkpoint.load_latest(directory, rank=ckpt_rank, world=ckpt_world)
    except checkpoint.CheckpointError as error:
        raise TrainError(f"--checkpoint-dir {directory}: no intact checkpoint to resume ({error})") from None
    position, meta = Position(), {}
    if found is not None:
        _, loaded = found
        meta = dict(loaded.get("trainer", {}))
        position = Position(int(meta["step"]), int(meta["samples"]))
        _restore(loaded, model, load_optimizer, rank.device, rows or {})
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
