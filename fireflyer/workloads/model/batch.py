"""What one forward pass over a mixed batch needs to know about its sequences and the cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fireflyer.kernels.mla_schedule import StepSchedules


@dataclass
class PrefillSpan:
    """Tokens [start, start + length) of the batch are positions [context, context + length) of one
    sequence; kv_rows are the flat cache rows of its positions [0, context + length)."""

    start: int
    length: int
    context: int
    kv_rows: torch.Tensor  # int64


@dataclass
class BatchMetadata:
    """Decode tokens (one per sequence) come first in the batch, then prefill spans.

    slot_mapping[t] is the flat cache row (block · 64 + offset) where token t's latent is written.
    decode_block_table / decode_seqlens describe the decode sequences for the paged MLA kernel
    (seqlens include the token being decoded); decode_schedules, set when those lengths are
    unequal enough (mla_schedule.worth_balancing), has the kernel attend length-balanced runs.
    decode_official_schedules holds FlashMLA's split schedule for these lengths, made by the first
    layer that runs it and reused by the others (mla.mla_decode)."""

    slot_mapping: torch.Tensor  # int64 [T]
    num_decode: int = 0
    decode_block_table: torch.Tensor | None = None  # int32 [decodes, max blocks]
    decode_seqlens: torch.Tensor | None = None  # int32 [decodes]
    decode_schedules: StepSchedules | None = None
    decode_official_schedules: dict[int, Any] = field(default_factory=dict)
    prefills: list[PrefillSpan] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])
