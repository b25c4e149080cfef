"""Stream-K for the persistent FP8 GEMM: when a GEMM has fewer tiles than the GPU has SMs.

A decode-size GEMM (M ≤ 128 rows) has one or two row tiles: DeepSeek-V3's N = 2112 at M = 64 is
17 tiles of 64×128, so a kernel with one CTA per tile streams the weight through 17 of 132 SMs.
Here the K steps of all tiles are laid end to end and cut into P equal runs, one per CTA:

- CTA c walks the global K steps [begin(c), begin(c + 1)) with begin(c) = c·S // P, S = tiles·K;
- a tile whose steps all fall in one CTA's run is stored in BF16 as usual; otherwise each CTA
  stores its fp32 fragment of it to a workspace slot: 2c for the fragment that starts its run,
  2c + 1 for the one that ends it (a run touches at most two partial tiles);
- a fix-up launch sums each split tile's fragments and writes it in BF16.

Only where tiles < SMs: spreading just the last partial wave of a large GEMM was measured slower
(docs/benchmarks.md), because runs at staggered K offsets lose the L2 reuse of the grouped order.
These functions are the plan; the Gluon kernel and the fix-up kernel compute the same quantities
on the device. They are pure, so the CPU tests check that every K step is computed exactly once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class StreamKPlan:
    tiles: int
    k_steps: int
    programs: int
    dp_tiles: int  # tiles computed whole, strided over the CTAs
    sk_steps: int  # K steps of the remaining tiles, shared out evenly (0: no stream-K)

    @property
    def sk_tiles(self) -> int:
        return self.tiles - self.dp_tiles

    def begin(self, program: int) -> int:
        """First global stream-K step of a CTA's run; its run ends where the next CTA's begins."""
        return program * self.sk_steps // self.programs


@dataclass(frozen=True)
class Fragment:
    tile: int  # index among the stream-K tiles (the tile is dp_tiles + tile)
    k_begin: int
    k_end: int
    slot: int | None  # workspace slot for a partial tile; None when the CTA computes it whole


# The shortest run worth a CTA: each run ends with an fp32 fragment written and read back.
MIN_RUN_STEPS = 4


def plan_stream_k(tiles: int, k_steps: int, sms: int) -> StreamKPlan:
    """One CTA per tile while the tiles fill the SMs; otherwise up to one CTA per SM, each running
    at least MIN_RUN_STEPS K steps (so no run is empty and every slot a fix-up reads was written)."""
    programs = min(sms, max(tiles, tiles * k_steps // MIN_RUN_STEPS))
    if tiles >= sms or programs <= tiles:
        return StreamKPlan(tiles, k_steps, max(1, min(tiles, sms)), tiles, 0)
    return StreamKPlan(tiles, k_steps, programs, 0, tiles * k_steps)


def fragments(plan: StreamKPlan, program: int) -> list[Fragment]:
    """The pieces of stream-K tiles one CTA computes, in order."""
    if plan.sk_steps == 0:
        return []
    k = plan.k_steps
    begin, end = plan.begin(program), plan.begin(program + 1)
    first, last = begin // k, (end - 1) // k
    out = []
    for tile in range(first, last + 1):
        k0, k1 = max(begin - tile * k, 0), min(end - tile * k, k)
        whole = k0 == 0 and k1 == k
        out.append(Fragment(tile, k0, k1, None if whole else 2 * program + (tile != first)))
    return out


def owner(plan: StreamKPlan, step: int) -> int:
    """The CTA whose run holds a global stream-K step: the largest c with begin(c) ≤ step."""
    return ((step + 1) * plan.programs + plan.sk_steps - 1) // plan.sk_steps - 1


def contributors(plan: StreamKPlan, tile: int) -> list[tuple[int, int]]:
    """(CTA, workspace slot) of each fragment of a split stream-K tile; empty for a whole one. The
    fix-up kernel computes exactly this."""
    first_step, last_step = tile * plan.k_steps, (tile + 1) * plan.k_steps - 1
    lo, hi = owner(plan, first_step), owner(plan, last_step)
    if lo == hi:
        return []
    return [(c, 2 * c + (plan.begin(c) < first_step)) for c in range(lo, hi + 1)]


@functools.cache
def most_contributors(plan: StreamKPlan) -> int:
    """The most CTAs that share one stream-K tile (what the fix-up must be able to sum)."""
    return max((len(contributors(plan, tile)) for tile in range(plan.sk_tiles)), default=0)
