"""Which ranks make up a unit and what each of them hosts: pure functions of the serve flags."""

from __future__ import annotations

from dataclasses import dataclass


class UnitShapeError(ValueError):
    """Flags that describe a unit this engine cannot run (the message says which)."""


@dataclass(frozen=True)
class UnitShape:
    """A unit of `nnodes` × `gpus_per_node` ranks; this process is node `node_rank`.

    Attention is data-parallel (every rank holds its own requests and KV cache); the routed
    experts are split over all ranks when `expert_parallel` (EP = the unit's size), otherwise every
    rank hosts every expert and the ranks only share the HTTP front."""

    nnodes: int = 1
    node_rank: int = 0
    gpus_per_node: int = 1
    expert_parallel: bool = False
    dist_init_addr: str | None = None

    @property
    def world(self) -> int:
        return self.nnodes * self.gpus_per_node

    def rank(self, local_rank: int) -> int:
        return self.node_rank * self.gpus_per_node + local_rank

    @property
    def is_leader_node(self) -> bool:
        return self.node_rank == 0

    def init_address(self) -> tuple[str, int]:
        if not self.dist_init_addr:
            raise UnitShapeError(f"a unit of {self.world} ranks needs --dist-init-addr HOST:PORT of rank 0")
        host, sep, port = self.dist_init_addr.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise UnitShapeError(f"--dist-init-addr {self.dist_init_addr!r}: expected HOST:PORT")
        return host.strip("[]"), int(port)


def unit_shape(
    *,
    nnodes: int,
    node_rank: int,
    gpus_per_node: int,
    tensor_parallel: int,
    data_parallel: int,
    expert_parallel: int,
    dist_init_addr: str | None,
) -> UnitShape:
    """The unit the operator's flags describe; UnitShapeError for one this engine cannot run."""
    if nnodes < 1 or gpus_per_node < 1:
        raise UnitShapeError(f"--nnodes ({nnodes}) and --gpus-per-node ({gpus_per_node}) must be ≥ 1")
    if not 0 <= node_rank < nnodes:
        raise UnitShapeError(f"--node-rank {node_rank} is outside 0..{nnodes - 1}")
    world = nnodes * gpus_per_node
    if tensor_parallel != 1:
        raise UnitShapeError(
            f"--tensor-parallel {tensor_parallel}: this engine runs data-parallel attention with"
            " expert parallelism (DeepSeek's serving layout); use parallelism.tensor 1"
        )
    if data_parallel not in (1, world):
        raise UnitShapeError(
            f"--data-parallel {data_parallel}: every rank of this unit of {world} runs its own"
            f" attention, so data parallelism is {world} (or 1, meaning the same)"
        )
    if expert_parallel not in (1, world):
        raise UnitShapeError(
            f"--expert-parallel {expert_parallel}: the experts are split over the whole unit"
            f" ({world} ranks) or not at all (1)"
        )
    shape = UnitShape(nnodes, node_rank, gpus_per_node, expert_parallel > 1, dist_init_addr)
    if world > 1:
        shape.init_address()  # validates it
    return shape


def choose_rank(loads: list[int], running: list[int]) -> int:
    """The data-parallel rank a new request goes to: the least KV load (blocks in use or promised
    to queued requests), then the fewest running sequences, then the lowest rank."""
    if not loads or len(loads) != len(running):
        raise ValueError("one load and one running count per rank")
    return min(range(len(loads)), key=lambda r: (loads[r], running[r], r))


__all__ = ["UnitShape", "UnitShapeError", "choose_rank", "unit_shape"]
