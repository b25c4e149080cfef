"""DeepSeek-V3's expert load balancing for training.

- Auxiliary-loss-free balancing: the router's `e_score_correction_bias` only steers which experts
  are chosen. After each step every bias moves by `speed` towards balance: up for an expert that got
  fewer tokens than the mean, down for one that got more (V3 paper §2.1.2, γ = bias update speed).
  The load is what the forward passes counted through `MoE.load`, summed over data-parallel ranks,
  so every rank applies the same update.
- The complementary sequence-wise balance loss: α · Σ_i f_i · P_i per sequence, with
  f_i = N_r / (K_r · T) · #tokens that chose expert i and P_i = mean over tokens of the normalised
  affinity s_i / Σ_j s_j; averaged over the sequences of the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fireflyer.workloads.model.moe import MoE

AllReduce = Callable[[torch.Tensor], None]  # sums a tensor over the data-parallel ranks in place


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def start_counting(model: nn.Module) -> None:
    """Zero every MoE layer's load counter; the forward passes of the step add to it."""
    for moe in moe_layers(model):
        experts = moe.gate.e_score_correction_bias.shape[0]
        moe.load = torch.zeros(experts, dtype=torch.int64, device=moe.gate.weight.device)


@torch.no_grad()
def update_bias(model: nn.Module, speed: float, all_reduce: AllReduce | None = None) -> torch.Tensor:
    """bias += speed · sign(mean load − load) for every MoE layer; → the loads [layers, experts]
    the update used (summed over ranks). Counting must have been started for the step."""
    layers = moe_layers(model)
    if not layers:
        return torch.zeros(0, 0)
    loads = []
    for moe in layers:
        if moe.load is None:
            raise RuntimeError("update_bias needs start_counting before the step's forward passes")
        loads.append(moe.load)
    stacked = torch.stack(loads)
    if all_reduce is not None:
        all_reduce(stacked)  # one collective for every layer
    counts = stacked.float()
    step = speed * torch.sign(counts.mean(dim=1, keepdim=True) - counts)
    for moe, delta in zip(layers, step, strict=True):
        moe.gate.e_score_correction_bias.add_(delta)
    return stacked.cpu()


def sequence_balance_loss(scores: torch.Tensor, ids: torch.Tensor, alpha: float) -> torch.Tensor:
    """α · Σ_i f_i P_i averaged over sequences.

    scores: sigmoid affinities [B, T, N_r] (differentiable: the loss trains the router weights);
    ids: the chosen experts [B, T, K_r]."""
    batch, tokens, experts = scores.shape
    top_k = ids.shape[-1]
    chosen = torch.zeros(batch, experts, device=scores.device, dtype=torch.float32)
    chosen.scatter_add_(1, ids.reshape(batch, -1), torch.ones(batch, tokens * top_k, device=scores.device))
    f = chosen * (experts / (top_k * tokens))
    p = (scores.float() / scores.float().sum(-1, keepdim=True)).mean(dim=1)
    return alpha * (f * p).sum(-1).mean()
