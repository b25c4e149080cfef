"""Checkpoints of a pipeline-parallel run: one checkpoint directory per stage.

    D/stage-000-of-004/step-000000000100/   stage 0's weights, AdamW state, trainer record and
    D/stage-001-of-004/step-000000000100/   the random state of the ranks at position 0, …

Position s saves stage s (for DualPipe: its first-direction chunk, so each stage is saved once
although two ranks hold it); inside a stage directory the ranks of that position across the data-
parallel replicas save as one `fireflyer.storage.checkpoint` world (replicated tensors written by
replica 0). 1F1B and DualPipe runs of the same P read each other's checkpoints.

A step counts as saved when every stage directory has it complete. On resume the ranks agree on
the newest such step (a crash can leave one stage a checkpoint ahead), and each loads its chunks
from their stages' directories. Retention is applied here rather than by the checkpoint writer: a
stage deletes old steps only once every stage has finished the newer one, so some step is always
complete everywhere.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fireflyer.storage import checkpoint
from fireflyer.workloads.train import optim, parallel
from fireflyer.workloads.train.config import TrainError
from fireflyer.workloads.train.layout import Layout, stage_dir
from fireflyer.workloads.train.parallel import Rank
from fireflyer.workloads.train.stages import StageChunk
from fireflyer.workloads.train.state import Position, rng_state

log = logging.getLogger(__name__)


def _complete(directory: Path) -> list[int]:
    return [
        s
        for s in checkpoint.list_steps(directory)
        if (checkpoint.step_dir(directory, s) / checkpoint.MANIFEST).exists()
    ]


def _chunk_state(chunk: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in chunk.named_parameters()}


def save(
    root: Path,
    layout: Layout,
    rank: Rank,
    chunks: list[StageChunk],
    optimizer: torch.optim.Optimizer,
    named: list[tuple[str, nn.Parameter]],
    position: Position,
    meta: dict[str, Any],
) -> checkpoint.PendingSave:
    """Snapshot this rank's stage (its first chunk) and write it in the background."""
    chunk = chunks[0]
    own = {name for name, _ in chunk.named_parameters()}
    rng = rng_state(rank.device)
    state = {
        "model": _chunk_state(chunk),
        "optim": {k: v for k, v in optim.optimizer_state(optimizer, named).items() if k in own},
        "rng": rng,
        "trainer": {"step": position.step, "samples": position.samples, **meta},
    }
    return checkpoint.save_async(
        stage_dir(root, chunk.stage, layout.pipeline),
        state,
        position.step,
        rank=layout.replica(rank.rank),
        world=layout.data,
        shard_dims={f"rng/{key}": 0 for key in rng},
    )


def prune(root: Path, layout: Layout, rank: Rank, stage: int, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints of `stage` (0: all). Call on every rank once
    every rank's saves are done (the barrier here makes sure), so no stage drops a step that
    another stage still needs."""
    parallel.barrier(rank)
    if keep and layout.replica(rank.rank) == 0:
        directory = stage_dir(root, stage, layout.pipeline)
        for step in _complete(directory)[:-keep]:
            _remove(directory, step)


def _remove(directory: Path, step: int) -> None:
    path = checkpoint.step_dir(directory, step)
    (path / checkpoint.MANIFEST).unlink(missing_ok=True)  # first: a cut-short delete leaves it incomplete
    shutil.rmtree(path, ignore_errors=True)


def _all_min(rank: Rank, value: int) -> int:
    tensor = torch.tensor([value], dtype=torch.int64, device=rank.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor)


def resume(
    root: Path,
    layout: Layout,
    rank: Rank,
    chunks: list[StageChunk],
    optimizer: torch.optim.Optimizer,
    named: list[tuple[str, nn.Parameter]],
) -> tuple[Position, dict[str, Any]]:
    """Load the newest step saved by every stage into this rank's chunks and optimizer (→ its
    position and trainer record), or Position() when there is none. Steps past it are removed
    from this rank's stage directory."""
    own = stage_dir(root, chunks[0].stage, layout.pipeline)
    steps = _complete(own)
    bound, step = 1 << 62, 0
    loaded: list[dict[str, Any]] = []
    while True:
        mine = max((s for s in steps if s <= bound), default=0)
        step = _all_min(rank, mine)
        if step == 0:
            loaded = []
            break
        if not _all_min(rank, int(step in steps)):
            bound = step - 1  # another stage lacks this step: look further back
            continue
        try:
            loaded = [
                checkpoint.load(
                    stage_dir(root, chunk.stage, layout.pipeline),
                    step,
                    rank=layout.replica(rank.rank),
                    world=layout.data,
                )
                for chunk in chunks
            ]
            ok = 1
        except checkpoint.CorruptCheckpointError as error:
            log.warning("checkpoint step %d of %s cannot be read: %s", step, own, error)
            ok = 0
        if _all_min(rank, ok):
            break
        bound = step - 1
    position, meta = Position(), {}
    if loaded:
        meta = dict(loaded[0].get("trainer", {}))
        position = Position(int(meta["step"]), int(meta["samples"]))
        _restore(loaded, chunks, optimizer, named, rank.device)
    parallel.barrier(rank)  # every rank is done reading before any stage removes anything
    if layout.replica(rank.rank) == 0:
        for later in checkpoint.list_steps(own):
            if later > position.step:
                log.warning(
                    "removing checkpoint step %d of %s (incomplete, or not saved by every stage)", later, own
                )
                _remove(own, later)
    parallel.barrier(rank)
    return position, meta


def _restore(
    loaded: list[dict[str, Any]],
    chunks: list[StageChunk],
    optimizer: torch.optim.Optimizer,
    named: list[tuple[str, nn.Parameter]],
    device: torch.device,
) -> None:
    saved_optim: dict[str, Any] = {}
    for state, chunk in zip(loaded, chunks, strict=True):
        saved = state.get("model", {})
        with torch.no_grad():
            for name, param in chunk.named_parameters():
                if name not in saved:
                    raise TrainError(f"checkpoint of stage {chunk.stage} lacks {name} (another model?)")
                if tuple(saved[name].shape) != tuple(param.shape):
                    raise TrainError(
                        f"checkpoint {name}: shape {tuple(saved[name].shape)}, model {tuple(param.shape)}"
                    )
                param.copy_(saved[name])
        saved_optim |= state.get("optim", {})
    optim.load_optimizer_state(optimizer, named, saved_optim)
    rng = loaded[0].get("rng", {})  # this position's own rows (the second chunk's are its mirror's)
    if "torch" in rng and rng["torch"].shape[0] == 1:
        torch.set_rng_state(rng["torch"][0].contiguous())
    if device.type == "cuda" and "cuda" in rng and rng["cuda"].shape[0] == 1:
        torch.cuda.set_rng_state(rng["cuda"][0].contiguous(), device)
