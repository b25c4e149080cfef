"""ZeRO-1 (`--zero 1`): AdamW whose state is sharded over the data-parallel ranks.

The trainable weights, in the trainer's parameter order, form one flat FP32 vector of n values;
rank r of D owns the contiguous slice [start_r, stop_r) (`shard_bounds`, the rule
`fireflyer.storage.checkpoint` uses to re-split a sharded tensor, so a checkpoint loads under any
D). Per step:

1. gradients are flattened and reduce-scattered: each rank gets the sum of its slice over the
   ranks, divided by D (slices padded to one length for the collective);
2. the global gradient norm is the square root of the slices' squared norms summed over ranks;
3. the rank clips its slice and applies AdamW (the same arithmetic as torch's single-tensor AdamW,
   decoupled decay only on matrices) to its slice of the weights, with exp_avg and exp_avg_sq only
   for that slice: per rank 2·n/D FP32 values of state instead of 2·n;
4. the updated slices are all-gathered into every rank's weights.

The model's own FP32 weights stay whole on every rank (they are both what the forward reads and
the master copy each rank updates its slice of). Checkpoints hold optim/zero/{exp_avg, exp_avg_sq}
sharded on dim 0 over the ranks, optim/zero/step and optim/zero/numel (n, checked on resume).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fireflyer.workloads.train.config import TrainError
from fireflyer.workloads.train.parallel import Rank

STATE_KEYS = ("exp_avg", "exp_avg_sq")


def shard_bounds(total: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s slice of `total` values: the first total mod world ranks take one
    more."""
    base, remainder = divmod(total, world)
    start = rank * base + min(rank, remainder)
    return start, start + base + (1 if rank < remainder else 0)


class ShardedAdamW:
    def __init__(
        self,
        named: list[tuple[str, nn.Parameter]],
        rank: Rank,
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
    ) -> None:
        self.rank = rank
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.param_groups: list[dict[str, Any]] = [{"lr": lr}]  # what optim.set_lr changes
        self.numel = sum(p.numel() for p in self.params)
        world = rank.world
        self.bounds = [shard_bounds(self.numel, r, world) for r in range(world)]
        self.start, self.stop = self.bounds[rank.rank]
        self.chunk = math.ceil(self.numel / world)  # the collectives' slice length, padded
        device = self.params[0].device if self.params else rank.device
        size = self.stop - self.start
        self.exp_avg = torch.zeros(size, device=device)
        self.exp_avg_sq = torch.zeros(size, device=device)
        self.step_count = 0
        # Decoupled weight decay applies to matrices only (optim.build_optimizer's groups).
        decays = torch.cat([torch.full((p.numel(),), p.dim() >= 2, dtype=torch.bool) for p in self.params])
        self.decay = decays[self.start : self.stop].to(device)
        self.grad: torch.Tensor | None = None  # this rank's slice of the averaged gradient

    # --- the step ------------------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self.grad = None

    def _flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def _padded(self, flat: torch.Tensor) -> torch.Tensor:
        """flat → [world · chunk]: slice r at r · chunk, zeros after its end."""
        if self.chunk * self.rank.world == self.numel:
            return flat
        out = flat.new_zeros(self.chunk * self.rank.world)
        for r, (start, stop) in enumerate(self.bounds):
            out[r * self.chunk : r * self.chunk + stop - start] = flat[start:stop]
        return out

    def reduce_gradients(self) -> None:
        """This rank's slice of the gradient, summed over the ranks and divided by their number (a
        weight without a gradient this step takes part with zeros)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = self._flat(grads)
        for p in self.params:
            p.grad = None  # the full gradients are not needed past this point
        if not self.rank.distributed:
            self.grad = flat
            return
        mine = flat.new_empty(self.chunk)
        dist.reduce_scatter_tensor(mine, self._padded(flat), op=dist.ReduceOp.SUM)
        self.grad = mine[: self.stop - self.start].div_(self.rank.world)

    def clip(self, max_norm: float) -> float:
        """Scale the gradient to a global L2 norm of at most `max_norm` (0: off); → the norm before."""
        assert self.grad is not None, "reduce_gradients first"
        squares = torch.linalg.vector_norm(self.grad).square().reshape(1)
        if self.rank.distributed:
            dist.all_reduce(squares, op=dist.ReduceOp.SUM)
        norm = squares.sqrt()[0]
        if max_norm > 0:
            self.grad.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))
        return float(norm)

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on this rank's slice, then every rank's slice into every rank's weights."""
        assert self.grad is not None, "reduce_gradients first"
        lr = self.param_groups[0]["lr"]
        beta1, beta2 = self.betas
        self.step_count += 1
        weights = self._flat([p.detach() for p in self.params])[self.start : self.stop].clone()
        weights.mul_(torch.where(self.decay, 1 - lr * self.weight_decay, 1.0))
        self.exp_avg.lerp_(self.grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(self.grad, self.grad, value=1 - beta2)
        step_size = lr / (1 - beta1**self.step_count)
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(1 - beta2**self.step_count)).add_(self.eps)
        weights.addcdiv_(self.exp_avg, denom, value=-step_size)
        self.grad = None
        if self.rank.distributed:
            mine = weights.new_zeros(self.chunk)
            mine[: weights.numel()] = weights
            gathered = weights.new_empty(self.chunk * self.rank.world)
            dist.all_gather_into_tensor(gathered, mine)
            flat = torch.cat(
                [gathered[r * self.chunk : r * self.chunk + b - a] for r, (a, b) in enumerate(self.bounds)]
            )
        else:
            flat = weights
        offset = 0
        for p in self.params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    # --- state ---------------------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank keeps."""
        return (self.exp_avg.numel() + self.exp_avg_sq.numel()) * self.exp_avg.element_size()

    def state(self) -> dict[str, Any]:
        """The optim/ subtree of a checkpoint; `shard_dims` says which entries are split."""
        return {
            "zero": {
                "exp_avg": self.exp_avg,
                "exp_avg_sq": self.exp_avg_sq,
                "step": torch.tensor(float(self.step_count)),
                "numel": torch.tensor(self.numel, dtype=torch.int64),
            }
        }

    @staticmethod
    def shard_dims() -> dict[str, int]:
        return {f"optim/zero/{key}": 0 for key in STATE_KEYS}

    def load(self, saved: dict[str, Any]) -> None:
        """Restore from a checkpoint's optim/ subtree: a ZeRO one (this rank's slice, loaded as
        rank r of D), or one of per-weight AdamW state, which every rank loads whole and slices."""
        if not saved:
            return
        if "zero" in saved:
            zero = saved["zero"]
            if int(zero["numel"]) != self.numel:
                raise TrainError(
                    f"checkpoint's ZeRO optimizer state covers {int(zero['numel'])} weights, the model"
                    f" has {self.numel} (another model?)"
                )
            self.exp_avg.copy_(zero["exp_avg"])
            self.exp_avg_sq.copy_(zero["exp_avg_sq"])
            self.step_count = int(zero["step"])
            return
        missing = [name for name in self.names if name not in saved]
        if missing:
            raise TrainError(f"checkpoint lacks AdamW state for {', '.join(missing[:3])}")
        for key, target in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            flat = self._flat([saved[name][key].to(target.device) for name in self.names])
            target.copy_(flat[self.start : self.stop])
        self.step_count = int(saved[self.names[0]]["step"])
