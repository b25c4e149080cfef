"""One pipeline stage of the model: a contiguous run of layers, plus the embedding on the first
stage and the final norm, LM head and loss on the last. Parameter names are the whole model's
(`layers.3.mlp…`, `embed_tokens.weight`), so checkpoints and comparisons need no renaming."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fireflyer.workloads.model.model import Block, DeepseekV3
from fireflyer.workloads.train.forward import block_forward


class StageChunk(nn.Module):
    def __init__(self, model: DeepseekV3, stage: int, stages: int, layers: range) -> None:
        super().__init__()
        self.stage = stage
        self.first = stage == 0
        self.last = stage == stages - 1
        self.embed_tokens = model.embed_tokens if self.first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if self.last else None
        self.lm_head = model.lm_head if self.last else None
        # The rotary tables are buffers, not parameters: shared, and kept out of this module's
        # state so that only weights are saved and reduced.
        self._rotary = (model.rotary,)

    def forward(self, x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, T] (first stage) or hidden states [B, T, hidden] → (hidden states, or
        FP32 logits on the last stage; the stage's summed sequence-wise balance loss)."""
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)
        positions = torch.arange(x.shape[1], device=x.device)
        balance = torch.zeros((), device=x.device)
        for block in self.layers.values():
            assert isinstance(block, Block)
            x, layer_balance = block_forward(block, x, positions, self._rotary[0], alpha)
            if layer_balance is not None:
                balance = balance + layer_balance
        if self.norm is not None and self.lm_head is not None:
            x = F.linear(self.norm(x), self.lm_head).float()
        return x, balance


def build_chunks(model: DeepseekV3, stages: tuple[int, ...], ranges: list[range]) -> list[StageChunk]:
    """The chunks of `stages` (in the given order) cut from a loaded model."""
    return [StageChunk(model, stage, len(ranges), ranges[stage]) for stage in stages]


@dataclass
class StageLosses:
    """What one micro-batch's forward through a chunk leaves for its backward."""

    output: torch.Tensor  # hidden states to send on, or the scalar loss to start the backward from
    balance: torch.Tensor  # this chunk's balance loss, already divided by the micro-batch count


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, as the one-stage trainer computes it."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
