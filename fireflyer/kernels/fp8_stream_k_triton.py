"""The stream-K fix-up launch (see `fp8_stream_k`): one program per stream-K tile sums the fp32
fragments its CTAs left in the workspace and writes the tile in BF16. Tiles computed whole by one
CTA were stored by the GEMM itself and are skipped."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fireflyer.kernels.fp8_stream_k import StreamKPlan, most_contributors

# fp32 values one fix-up program loads: all of a sub-block's fragments at once, so that the loads
# overlap instead of paying the memory latency once per fragment.
_ELEMENTS = 16384


@triton.jit
def _fix_up_kernel(
    ws_ptr,
    c_ptr,
    M,
    N,
    num_m,
    num_n,
    dp_tiles,
    sk_steps,
    k_steps,
    programs,
    BM: tl.constexpr,
    BN: tl.constexpr,
    ROWS: tl.constexpr,
    FRAGS: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    tile = tl.program_id(0)
    first_step = tile * k_steps
    last_step = first_step + k_steps - 1
    # owner(step) of fp8_stream_k: the CTA whose run holds the step.
    lo = ((first_step + 1) * programs + sk_steps - 1) // sk_steps - 1
    hi = ((last_step + 1) * programs + sk_steps - 1) // sk_steps - 1
    if lo < hi:
        local = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        offs = local[:, None] * BN + tl.arange(0, BN)[None, :]
        acc = tl.zeros([ROWS, BN], dtype=tl.float32)
        # Unrolled over the most fragments a tile has, so that the loads are issued together.
        for f in tl.static_range(FRAGS):
            cta = lo + f
            run_begin = cta * sk_steps // programs
            slot = (2 * cta + (run_begin < first_step).to(tl.int32)).to(tl.int64)
            present = cta + tl.zeros([ROWS, BN], dtype=tl.int32) <= hi
            acc += tl.load(ws_ptr + slot * (BM * BN) + offs, mask=present, other=0.0)
        # The GEMM's grouped tile order (fp8_gluon_tiles.tile_at, dense layout).
        t = dp_tiles + tile
        span = GROUP_M * num_n
        first_m = (t // span) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        rows = (first_m + (t % span) % size_m) * BM + local
        cols = ((t % span) // size_m) * BN + tl.arange(0, BN)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        ptrs = c_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(ptrs, acc.to(tl.bfloat16), mask=mask)


def fix_up(
    plan: StreamKPlan, workspace: torch.Tensor, c: torch.Tensor, num_m: int, num_n: int, group_m: int
) -> None:
    """Write the split stream-K tiles of c [M, N] from the workspace [2·programs, BM, BN]."""
    if plan.sk_steps == 0:
        return
    bm, bn = workspace.shape[1], workspace.shape[2]
    frags = most_contributors(plan)
    rows = max(1, min(bm, triton.next_power_of_2(_ELEMENTS // (frags * bn) + 1) // 2))
    _fix_up_kernel[(plan.sk_tiles, bm // rows)](
        workspace,
        c,
        c.shape[0],
        c.shape[1],
        num_m,
        num_n,
        plan.dp_tiles,
        plan.sk_steps,
        plan.k_steps,
        plan.programs,
        BM=bm,
        BN=bn,
        ROWS=rows,
        FRAGS=frags,
        GROUP_M=group_m,
        num_warps=4,
    )
