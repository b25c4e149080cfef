"""Turn one step's scheduled chunks into the model's flat inputs and batch metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fireflyer.workloads.model.batch import BatchMetadata, PrefillSpan
from fireflyer.workloads.serve.types import BLOCK_TOKENS, ScheduledChunk


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    meta: BatchMetadata
    sample_rows: list[int]  # the batch row whose logits give each sampling chunk's next token
    sampling: list[ScheduledChunk]


def cache_rows(block_table: list[int], start: int, end: int) -> list[int]:
    return [block_table[p // BLOCK_TOKENS] * BLOCK_TOKENS + p % BLOCK_TOKENS for p in range(start, end)]


def build_step(chunks: list[ScheduledChunk], device: torch.device) -> StepInputs:
    """Decode chunks (one token, after a computed prefix) first, then prefill chunks."""
    decodes = [c for c in chunks if c.length == 1 and c.start > 0]
    prefills = [c for c in chunks if not (c.length == 1 and c.start > 0)]
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    sample_rows: list[int] = []
    sampling: list[ScheduledChunk] = []
    for chunk in decodes + prefills:
        seq, end = chunk.seq, chunk.start + chunk.length
        ids.extend(seq.token_ids[chunk.start : end])
        positions.extend(range(chunk.start, end))
        slots.extend(cache_rows(seq.block_table, chunk.start, end))
        if chunk.samples:
            sample_rows.append(len(ids) - 1)
            sampling.append(chunk)
    meta = BatchMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device), num_decode=len(decodes)
    )
    if decodes:
        width = max(len(c.seq.block_table) for c in decodes)
        table = [c.seq.block_table + [0] * (width - len(c.seq.block_table)) for c in decodes]
        meta.decode_block_table = torch.tensor(table, dtype=torch.int32, device=device)
        meta.decode_seqlens = torch.tensor([c.start + 1 for c in decodes], dtype=torch.int32, device=device)
    offset = len(decodes)
    for chunk in prefills:
        end = chunk.start + chunk.length
        rows = torch.tensor(cache_rows(chunk.seq.block_table, 0, end), dtype=torch.long, device=device)
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
