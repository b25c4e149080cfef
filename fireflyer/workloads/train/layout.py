"""Which rank does what: the world splits into P-stage pipelines × D data-parallel replicas.

    rank = replica × P + position

Expert parallelism (E) is carved out of the data-parallel replicas: replicas [g·E, (g+1)·E) form
expert group g, whose ranks exchange tokens over all-to-all and hold the routed experts
[e·N/E, (e+1)·N/E) with e = replica mod E; the D/E ranks with the same e hold the same experts.

A pipeline's ranks are consecutive, so with NPROC_PER_NODE a multiple of P its point-to-point
traffic stays inside a node and only the data-parallel reductions cross nodes. Position s holds
stage s (1F1B), or stages s and P−1−s (DualPipe). Ranks that hold the same stages form a replica
group: they sum their gradients and MoE loads. Pure Python: the CLI checks sizes before any rank
starts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from fireflyer.workloads.train.config import TrainError


@dataclass(frozen=True)
class Layout:
    world: int
    pipeline: int = 1
    schedule: str = "none"
    expert: int = 1

    def __post_init__(self) -> None:
        if self.world % self.pipeline:
            raise TrainError(
                f"--pipeline {self.pipeline} does not divide the {self.world} ranks"
                " (world = pipeline × data parallel; NNODES × NPROC_PER_NODE ranks)"
            )
        if self.data % self.expert:
            raise TrainError(
                f"--expert-parallel {self.expert} does not divide the {self.data} data-parallel ranks"
                " (expert parallelism is carved out of data parallelism)"
            )

    @property
    def data(self) -> int:
        """Data-parallel replicas: each runs the whole model as one pipeline."""
        return self.world // self.pipeline

    @property
    def dual(self) -> bool:
        return self.schedule == "dualpipe" and self.pipeline > 1

    def position(self, rank: int) -> int:
        return rank % self.pipeline

    def replica(self, rank: int) -> int:
        return rank // self.pipeline

    def rank_at(self, replica: int, position: int) -> int:
        return replica * self.pipeline + position

    def stages(self, position: int) -> tuple[int, ...]:
        """The stages position `position` holds, by direction."""
        if self.dual:
            return (position, self.pipeline - 1 - position)
        return (position,)

    def replica_group(self, rank: int) -> tuple[int, ...]:
        """Every rank holding the same stages as `rank` (itself included), ascending."""
        position = self.position(rank)
        positions = {position, self.pipeline - 1 - position} if self.dual else {position}
        return tuple(sorted(self.rank_at(r, p) for r in range(self.data) for p in positions))

    def expert_rank(self, rank: int) -> int:
        """Which share of the routed experts `rank` holds: [e·N/E, (e+1)·N/E)."""
        return self.replica(rank) % self.expert

    def expert_group(self, rank: int) -> tuple[int, ...]:
        """The ranks `rank` exchanges tokens with (itself included), ascending."""
        first = self.replica(rank) // self.expert * self.expert
        return tuple(self.rank_at(first + e, self.position(rank)) for e in range(self.expert))

    def expert_replicas(self, rank: int) -> tuple[int, ...]:
        """The ranks holding the same experts as `rank` (itself included), ascending."""
        mine = self.expert_rank(rank)
        return tuple(self.rank_at(r, self.position(rank)) for r in range(mine, self.data, self.expert))

    def expert_groups(self) -> list[tuple[int, ...]]:
        return sorted({self.expert_group(rank) for rank in range(self.world)})

    def expert_replica_groups(self) -> list[tuple[int, ...]]:
        return sorted({self.expert_replicas(rank) for rank in range(self.world)})

    def replica_groups(self) -> list[tuple[int, ...]]:
        """All distinct replica groups, in one order every rank agrees on."""
        return sorted({self.replica_group(rank) for rank in range(self.world)})


def split_layers(layers: int, stages: int) -> list[range]:
    """Contiguous layer ranges, as even as possible (later stages take the extra layers). The
    first stage also runs the embedding, the last the final norm, LM head and loss."""
    if layers < stages:
        raise TrainError(f"--pipeline {stages}: the model has {layers} layers, fewer than one per stage")
    return [range(s * layers // stages, (s + 1) * layers // stages) for s in range(stages)]


# Checkpoint directories: D/step-N (one stage) or D/stage-S-of-P/step-N (pipeline_state.py).
STAGE_DIR = re.compile(r"^stage-(\d{3})-of-(\d{3})$")
STEP_DIR = re.compile(r"^step-\d{12}$")


def stage_dir(root: Path, stage: int, stages: int) -> Path:
    return root / f"stage-{stage:03d}-of-{stages:03d}"


def check_checkpoint_layout(root: Path, stages: int) -> None:
    """Refuse a checkpoint directory written with another --pipeline: its stages would not fit."""
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        return
    found = {int(m.group(2)) for m in map(STAGE_DIR.match, names) if m}
    if stages == 1 and found:
        written = max(found)
    elif stages > 1 and any(STEP_DIR.match(name) for name in names):
        written = 1
    elif stages > 1 and found - {stages}:
        written = max(found - {stages})
    else:
        return
    raise TrainError(
        f"--checkpoint-dir {root}: holds a run of --pipeline {written}; resume it with --pipeline"
        f" {written}, or use another directory"
    )
