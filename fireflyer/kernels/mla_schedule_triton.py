"""`mla_schedule.balanced_schedule` as one Triton launch on a CUDA device.

The torch version is about 45 small tensor operations: 250–360 µs of launches in an eager decode
step on an H200, and as many nodes in a graphed one. Here one program computes the same tensors:
the sequences' tile counts and their running sums, chunk by chunk with a carry, then for every run
the sequence holding its first and last tile. `searchsorted(ends, x, right=True)` over the sorted
tile ends is the count of ends ≤ x, and the start of that sequence is the largest end ≤ x, so
both are sums and maxima that chunks accumulate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fireflyer.kernels.mla_schedule import MlaSchedule

BLOCK_SEQS = 32


@triton.jit
def _tile_counts(lens_ptr, seqs, b, tile_tokens):
    n = tl.load(lens_ptr + seqs, mask=seqs < b, other=0)
    return (tl.maximum(n, 0) + tile_tokens - 1) // tile_tokens


@triton.jit
def _schedule_kernel(
    lens_ptr,
    runs_ptr,
    offset_ptr,
    count_ptr,
    first_run_ptr,
    b,
    parts,
    tile_tokens,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    chunk = tl.arange(0, BLOCK_B)
    # Pass 1: the total, which sets every run's length.
    total = 0
    for base in range(0, b, BLOCK_B):
        total += tl.sum(_tile_counts(lens_ptr, base + chunk, b, tile_tokens), 0)
    per = tl.maximum((total + parts - 1) // parts, 1)
    run_ids = tl.arange(0, BLOCK_P)
    run_start = tl.minimum(run_ids * per, total)
    run_end = tl.minimum(run_start + per, total)
    last_tile = tl.maximum(run_end - 1, 0)
    # Pass 2: each sequence's slots, and per run the count and the largest of the ends ≤ its
    # first and its last tile.
    carry_tiles = 0
    carry_slots = 0
    start_of_last = 0  # where the last sequence's tiles start
    start_before_last = 0  # and the one before it (the first, for one sequence)
    first_count = tl.zeros([BLOCK_P], dtype=tl.int32)
    last_count = tl.zeros([BLOCK_P], dtype=tl.int32)
    first_start = tl.zeros([BLOCK_P], dtype=tl.int32)
    last_start = tl.zeros([BLOCK_P], dtype=tl.int32)
    for base in range(0, b, BLOCK_B):
        seqs = base + chunk
        valid = seqs < b
        tiles = _tile_counts(lens_ptr, seqs, b, tile_tokens)
        ends = tl.cumsum(tiles, 0) + carry_tiles
        starts = ends - tiles
        first_run = starts // per
        count = tl.where(tiles > 0, (ends - 1) // per - first_run + 1, 0)
        tl.store(offset_ptr + seqs, tl.cumsum(count, 0) - count + carry_slots, mask=valid)
        tl.store(count_ptr + seqs, count, mask=valid)
        tl.store(first_run_ptr + seqs, first_run, mask=valid)
        carry_tiles += tl.sum(tiles, 0)
        carry_slots += tl.sum(count, 0)
        start_of_last += tl.sum(tl.where(seqs < b - 1, tiles, 0), 0)
        start_before_last += tl.sum(tl.where(seqs < b - 2, tiles, 0), 0)
        before_first = valid[None, :] & (ends[None, :] <= run_start[:, None])
        before_last = valid[None, :] & (ends[None, :] <= last_tile[:, None])
        first_count += tl.sum(before_first.to(tl.int32), 1)
        last_count += tl.sum(before_last.to(tl.int32), 1)
        first_start = tl.maximum(first_start, tl.max(tl.where(before_first, ends[None, :], 0), 1))
        last_start = tl.maximum(last_start, tl.max(tl.where(before_last, ends[None, :], 0), 1))
    # A run with tiles starts and ends inside the batch (counts below b). An empty one starts at
    # the total: as in the torch version, its first sequence is the last, its last the one before.
    empty = run_end <= run_start
    first_seq = tl.where(empty, b - 1, first_count)
    first_start = tl.where(empty, start_of_last, first_start)
    last_seq = tl.where(empty, b - 2, last_count)
    last_start = tl.where(empty, start_before_last, last_start)
    live = run_ids < parts
    row = runs_ptr + run_ids * 4
    tl.store(row, first_seq, mask=live)
    tl.store(row + 1, run_start - first_start, mask=live)
    tl.store(row + 2, last_seq, mask=live)
    tl.store(row + 3, run_end - last_start, mask=live)


def balanced_schedule_triton(cache_seqlens: torch.Tensor, parts: int, tile_tokens: int) -> MlaSchedule:
    """The same schedule as `mla_schedule.balanced_schedule` (which checks the arguments and calls
    this on a CUDA device)."""
    b = cache_seqlens.shape[0]
    device = cache_seqlens.device
    runs = torch.empty(parts, 4, dtype=torch.int32, device=device)
    offset, count, first_run = (torch.empty(b, dtype=torch.int32, device=device) for _ in range(3))
    _schedule_kernel[(1,)](
        cache_seqlens,
        runs,
        offset,
        count,
        first_run,
        b,
        parts,
        tile_tokens,
        BLOCK_B=BLOCK_SEQS,
        BLOCK_P=triton.next_power_of_2(parts),
        num_warps=8,
    )
    return MlaSchedule(tile_tokens, runs, offset, count, first_run)
