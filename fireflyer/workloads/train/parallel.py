"""Data parallelism: the process group of one rank and the collectives the trainer needs (gloo on
CPU, NCCL on CUDA). With one rank no process group exists and every collective is a no-op."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

BUCKET_BYTES = 25 << 20  # gradients are all-reduced in flat buckets of about this size
TIMEOUT = datetime.timedelta(minutes=30)  # a first checkpoint load on a slow file system takes a while


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def pick_device(flag: str, local_rank: int) -> torch.device:
    """--device auto: this rank's GPU when CUDA is present, else the CPU."""
    if flag == "cpu" or (flag == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from fireflyer.workloads.train.config import TrainError

        raise TrainError("--device cuda: no CUDA device is visible")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def init(rank: int, world: int, local_rank: int, device: torch.device, master: str) -> Rank:
    """Join the process group at tcp://master (host:port) when there is more than one rank."""
    if world > 1:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://{master}",
            rank=rank,
            world_size=world,
            timeout=TIMEOUT,
            device_id=device if device.type == "cuda" else None,
        )
    return Rank(rank, world, local_rank, device)


def close(rank: Rank) -> None:
    if rank.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(rank: Rank, tensor: torch.Tensor) -> None:
    if rank.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def all_reduce_mean(rank: Rank, tensor: torch.Tensor) -> None:
    if rank.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(rank.world)


def barrier(rank: Rank) -> None:
    if rank.distributed:
        dist.barrier()


def same_everywhere(rank: Rank, value: int) -> bool:
    """Whether every rank passed the same integer (one MIN/MAX pair of all-reduces)."""
    if not rank.distributed:
        return True
    low = torch.tensor([value], dtype=torch.int64, device=rank.device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return int(low) == int(high)


def average_gradients(rank: Rank, params: list[nn.Parameter], bucket_bytes: int = BUCKET_BYTES) -> None:
    """grad ← mean over ranks, bucket by bucket: a few large all-reduces instead of one per tensor.
    A parameter without a gradient this step (an expert no token chose) gets zeros, with one rank
    or many, so that every rank issues the same collectives and AdamW treats it the same way."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not rank.distributed:
        return
    reduce_buckets([p.grad for p in params if p.grad is not None], None, rank.world, bucket_bytes)


def reduce_buckets(
    grads: list[torch.Tensor],
    group: dist.ProcessGroup | None,
    divisor: int,
    bucket_bytes: int = BUCKET_BYTES,
) -> None:
    """grads ← (sum over `group`, the world when None) ÷ divisor, in flat buckets of about
    `bucket_bytes`: a few large all-reduces instead of one per tensor."""
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads:
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= bucket_bytes:
            _reduce_bucket(bucket, group, divisor)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket, group, divisor)


def _reduce_bucket(grads: list[torch.Tensor], group: dist.ProcessGroup | None, divisor: int) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    if divisor != 1:
        flat.div_(divisor)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
