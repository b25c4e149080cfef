"""Turn one step's scheduled chunks into the model's flat inputs and batch metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fireflyer.kernels.mla_schedule import StepSchedules, worth_balancing
from fireflyer.workloads.model.batch import BatchMetadata, PrefillSpan
from fireflyer.workloads.serve.types import BLOCK_TOKENS, ScheduledChunk


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    meta: BatchMetadata
    sample_rows: list[int]  # the batch row whose logits give each sampling chunk's next token
    sampling: list[ScheduledChunk]


def cache_rows(block_table: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Flat cache rows (block · 64 + offset) of positions [start, end)."""
    positions = torch.arange(start, end)
    return block_table[positions // BLOCK_TOKENS] * BLOCK_TOKENS + positions % BLOCK_TOKENS


def build_step(chunks: list[ScheduledChunk], device: torch.device, balance: bool = True) -> StepInputs:
    """Decode chunks (one token, after a computed prefix) first, then prefill chunks. With
    `balance`, decodes of unequal lengths get length-balanced MLA schedules."""
    decodes = [c for c in chunks if c.length == 1 and c.start > 0]
    prefills = [c for c in chunks if not (c.length == 1 and c.start > 0)]
    ids: list[int] = []
    positions: list[int] = []
    slots: list[torch.Tensor] = []
    sample_rows: list[int] = []
    sampling: list[ScheduledChunk] = []
    tables = {id(c.seq): torch.tensor(c.seq.block_table, dtype=torch.long) for c in chunks}
    for chunk in decodes + prefills:
        seq, end = chunk.seq, chunk.start + chunk.length
        ids.extend(seq.token_ids[chunk.start : end])
        positions.extend(range(chunk.start, end))
        slots.append(cache_rows(tables[id(seq)], chunk.start, end))
        if chunk.samples:
            sample_rows.append(len(ids) - 1)
            sampling.append(chunk)
    slot_mapping = torch.cat(slots) if slots else torch.zeros(0, dtype=torch.long)
    meta = BatchMetadata(slot_mapping=slot_mapping.to(device), num_decode=len(decodes))
    if decodes:
        width = max(len(c.seq.block_table) for c in decodes)
        table = [c.seq.block_table + [0] * (width - len(c.seq.block_table)) for c in decodes]
        meta.decode_block_table = torch.tensor(table, dtype=torch.int32, device=device)
        lengths = [c.start + 1 for c in decodes]
        meta.decode_seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
        if balance and worth_balancing(lengths):
            meta.decode_schedules = StepSchedules(meta.decode_seqlens)
    offset = len(decodes)
    for chunk in prefills:
        end = chunk.start + chunk.length
        rows = cache_rows(tables[id(chunk.seq)], 0, end).to(device)
        meta.prefills.append(
            PrefillSpan(start=offset, length=chunk.length, context=chunk.start, kv_rows=rows)
        )
        offset += chunk.length
    return StepInputs(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        meta=meta,
        sample_rows=sample_rows,
        sampling=sampling,
    )
