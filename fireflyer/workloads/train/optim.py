"""FP32 master weights, AdamW, the warmup + cosine learning rate, gradient clipping and the
compute precision.

The model itself holds the FP32 weights (they are the master copy the optimizer updates); BF16
compute comes from autocast around the forward pass, so no second copy of the weights is kept.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from fireflyer.errors import FireflyerError

# Not trained by gradients: the router's correction bias follows the balance rule (balance.py).
FROZEN = ("e_score_correction_bias",)


class OptimError(FireflyerError):
    """A model or setting the optimizer cannot train."""


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to `peak · min_ratio` at
    `total`; a pure function of the (0-based) step, so a resumed run needs no scheduler state."""

    peak: float
    warmup: int
    total: int
    min_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        floor = self.peak * self.min_ratio
        return floor + (self.peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Mark the weights trainable (the serving model loads them frozen) and return them by name.
    Training needs FP32 weights: FP8 checkpoints are refused rather than trained in a format the
    optimizer cannot update."""
    params = []
    for name, param in model.named_parameters():
        if param.dtype != torch.float32:
            raise OptimError(
                f"{name} is {param.dtype}: training needs a BF16 or FP32 checkpoint (dequantise FP8 first)"
            )
        trainable = name.rsplit(".", 1)[-1] not in FROZEN
        param.requires_grad_(trainable)
        if trainable:
            params.append((name, param))
    return params


def build_optimizer(
    named: list[tuple[str, nn.Parameter]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> torch.optim.AdamW:
    """AdamW over the FP32 weights; norms and other vectors are not decayed."""
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: the per-tensor loop is the same arithmetic on every device and run.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)


class HasParamGroups(Protocol):
    param_groups: list[dict[str, Any]]


def set_lr(optimizer: HasParamGroups, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_gradients(
    params: list[nn.Parameter],
    max_norm: float,
    sharded: list[nn.Parameter] | None = None,
    sum_sharded: Callable[[torch.Tensor], None] | None = None,
) -> float:
    """Scale gradients to a total L2 norm of at most `max_norm` (0: no clipping); → the norm before.
    `params` are the same on every rank; `sharded` ones are this rank's part of weights split over
    ranks, whose squared norm `sum_sharded` sums over the ranks that hold the whole."""
    grads = [p.grad for p in params if p.grad is not None]
    parts = [p.grad for p in sharded or [] if p.grad is not None]
    if not grads and not parts:
        return 0.0
    if sharded is None:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    else:
        device = (grads or parts)[0].device
        split_sq = torch.stack([torch.linalg.vector_norm(g) ** 2 for g in parts]).sum() if parts else None
        split_sq = split_sq if split_sq is not None else torch.zeros((), device=device)
        if sum_sharded is not None:
            sum_sharded(split_sq)
        whole_sq = torch.stack([torch.linalg.vector_norm(g) ** 2 for g in grads]).sum() if grads else 0.0
        norm = torch.sqrt(whole_sq + split_sq)
    grads = grads + parts
    if max_norm > 0:
        factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(factor)
    return float(norm)


def _ordered_names(optimizer: torch.optim.Optimizer, named: list[tuple[str, nn.Parameter]]) -> list[str]:
    """Parameter names in the optimizer's own numbering (group by group)."""
    by_id = {id(p): name for name, p in named}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(
    optimizer: torch.optim.Optimizer, named: list[tuple[str, nn.Parameter]]
) -> dict[str, dict[str, Any]]:
    """AdamW's per-parameter state keyed by parameter name (checkpoint keys must be strings)."""
    state = optimizer.state_dict()["state"]
    return {name: dict(state[i]) for i, name in enumerate(_ordered_names(optimizer, named)) if i in state}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    named: list[tuple[str, nn.Parameter]],
    saved: dict[str, dict[str, Any]],
) -> None:
    """Inverse of `optimizer_state`; hyperparameters come from the flags, not the checkpoint."""
    names = _ordered_names(optimizer, named)
    unknown = sorted(set(saved) - set(names))
    if unknown:
        raise OptimError(f"checkpoint has optimizer state for unknown parameters: {', '.join(unknown[:3])}")
    full = optimizer.state_dict()
    full["state"] = {i: saved[name] for i, name in enumerate(names) if name in saved}
    optimizer.load_state_dict(full)


def compute_dtype(flag: str, device: torch.device) -> torch.dtype:
    """--dtype: auto is BF16 on CUDA, FP32 on CPU (CPU BF16 matmuls are slow and not bit-stable)."""
    if flag == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[flag]


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """BF16 autocast over the FP32 weights, or nothing for FP32."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield
