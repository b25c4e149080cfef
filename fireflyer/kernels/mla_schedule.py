"""Length-balanced work for paged MLA decode.

A uniform split gives every sequence the same number of KV splits, so in a batch of one 32K
sequence and many short ones the long sequence's few programs run long after the rest of the GPU
is idle. Here the batch's KV tiles are laid end to end (sequence after sequence) and cut into
`parts` runs of equal length; each program along the KV axis attends one run, which may end one
sequence, cover several whole ones and start another. A sequence covered by k runs has k partial
results, merged by the combine step; a run crosses at most `parts - 1` sequence boundaries, so a
batch of b sequences has at most b + parts - 1 partials.

The schedule is computed on the device from `cache_seqlens` (no host synchronisation, fixed shapes
for a batch size and `parts`): one Triton launch on a CUDA device, tensor operations elsewhere. It
is captured in CUDA graphs with the decode step and computed once per step for every layer, like
FlashMLA's metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# Balanced runs pay a combine pass that uniform splits skip when each sequence fits one program:
# on an H200, 128 equal 4K sequences ran 3-9 % slower balanced, while one 32K sequence among 1K
# ones ran 14x faster (docs/benchmarks.md). Uniform splits take as long as the longest sequence,
# balanced runs as the mean, so the gain is about longest / mean; balance above this ratio.
BALANCE_RATIO = 1.25


@dataclass(frozen=True)
class MlaSchedule:
    """Which KV tiles each program attends and where its partial result goes.

    runs [parts, 4] int32: first sequence, its first tile, last sequence (inclusive), and the
      end tile (exclusive) in the last sequence; a run with no tiles has last < first.
    split_offset [b] int32: the first partial slot of each sequence.
    split_count [b] int32: the sequence's partials (0: no KV, the row is zeros with lse −∞).
    first_run [b] int32: the run that holds the sequence's first tile; run r writes slot
      split_offset + r − first_run.
    """

    tile_tokens: int
    runs: torch.Tensor
    split_offset: torch.Tensor
    split_count: torch.Tensor
    first_run: torch.Tensor

    @property
    def parts(self) -> int:
        return int(self.runs.shape[0])

    @property
    def slots(self) -> int:
        """Partial slots to allocate: enough for any lengths of this batch size."""
        return int(self.split_offset.shape[0]) + self.parts


def balanced_schedule(cache_seqlens: torch.Tensor, parts: int, tile_tokens: int) -> MlaSchedule:
    """Cut the batch's `tile_tokens`-token KV tiles into `parts` equal runs (the last ones may be
    shorter or empty)."""
    if parts < 1 or tile_tokens < 1:
        raise ValueError(f"parts and tile_tokens must be positive, got {parts} and {tile_tokens}")
    if cache_seqlens.dim() != 1 or cache_seqlens.numel() == 0:
        raise ValueError("cache_seqlens must hold one length per sequence")
    if cache_seqlens.is_cuda:
        from fireflyer.kernels.mla_schedule_triton import balanced_schedule_triton

        return balanced_schedule_triton(cache_seqlens.to(torch.int32).contiguous(), parts, tile_tokens)
    return balanced_schedule_torch(cache_seqlens, parts, tile_tokens)


def balanced_schedule_torch(cache_seqlens: torch.Tensor, parts: int, tile_tokens: int) -> MlaSchedule:
    """The schedule in tensor operations: on any device, and the definition the one-launch Triton
    version (mla_schedule_triton) is tested against."""
    device = cache_seqlens.device
    tiles = (cache_seqlens.long().clamp(min=0) + tile_tokens - 1) // tile_tokens
    ends = torch.cumsum(tiles, 0)
    starts = ends - tiles
    total = ends[-1:]
    per = torch.clamp((total + parts - 1) // parts, min=1)
    run_ids = torch.arange(parts, device=device)
    run_start = torch.minimum(run_ids * per, total)
    run_end = torch.minimum(run_start + per, total)
    last = tiles.numel() - 1
    # The sequence holding a position: the first whose tiles end after it (empty ones are passed).
    first_seq = torch.searchsorted(ends, run_start, right=True).clamp(max=last)
    last_seq = torch.searchsorted(ends, (run_end - 1).clamp(min=0), right=True).clamp(max=last)
    empty = run_end <= run_start
    last_seq = torch.where(empty, first_seq - 1, last_seq)
    runs = torch.stack(
        [first_seq, run_start - starts[first_seq], last_seq, run_end - starts[last_seq.clamp(min=0)]], dim=1
    )
    first_run = starts // per
    count = torch.where(tiles > 0, (ends - 1) // per - first_run + 1, 0)
    offset = torch.cumsum(count, 0) - count
    return MlaSchedule(
        tile_tokens,
        runs.to(torch.int32).contiguous(),
        offset.to(torch.int32),
        count.to(torch.int32),
        first_run.to(torch.int32),
    )


def worth_balancing(lengths: Sequence[int]) -> bool:
    """Whether a decode batch's KV lengths (known on the host when the step is built) are unequal
    enough for balanced runs to beat uniform splits."""
    return len(lengths) > 1 and max(lengths) * len(lengths) > BALANCE_RATIO * sum(lengths)


@dataclass
class StepSchedules:
    """One decode step's balanced schedules, each made on first use and shared by every layer:
    all layers attend the same lengths. Keyed by what the kernel that asks tiles and launches."""

    cache_seqlens: torch.Tensor
    made: dict[tuple[int, int], MlaSchedule] = field(default_factory=dict)

    def get(self, parts: int, tile_tokens: int) -> MlaSchedule:
        key = (parts, tile_tokens)
        if key not in self.made:
            self.made[key] = balanced_schedule(self.cache_seqlens, parts, tile_tokens)
        return self.made[key]


def runs_of(schedule: MlaSchedule, cache_seqlens: torch.Tensor) -> list[list[tuple[int, int, int, int]]]:
    """Each run's work as (sequence, first tile, end tile, slot): what its programs do, read on
    the host (for tests and inspection)."""
    tiles = [(int(n) + schedule.tile_tokens - 1) // schedule.tile_tokens for n in cache_seqlens.tolist()]
    offset, first_run = schedule.split_offset.tolist(), schedule.first_run.tolist()
    work = []
    for r, (fs, ft, ls, et) in enumerate(schedule.runs.tolist()):
        pieces = []
        for seq in range(fs, ls + 1):
            begin = ft if seq == fs else 0
            end = et if seq == ls else tiles[seq]
            if end > begin:
                pieces.append((seq, begin, end, offset[seq] + r - first_run[seq]))
        work.append(pieces)
    return work
