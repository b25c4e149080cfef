"""Pieces of the Gluon FP8 GEMM (`fp8_gluon_kernel`) that its partitions share: the tile order,
the producer's ring loads, and a CTA's stream-K run (`fp8_stream_k`)."""

from __future__ import annotations

# Imported only from fp8_gluon_kernel, inside its guard: without Gluon this import fails there.
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma


@gluon.jit
def tile_at(
    t,
    num_m,
    num_n,
    idx_ptr,
    M,
    N,
    M_MAX,
    stride_bsg,
    BM: gl.constexpr,
    BN: gl.constexpr,
    GROUP_M: gl.constexpr,
    MODE: gl.constexpr,
):
    """Tile t → (has work, A row, B row, output column, scale base of the weight, row end, is a
    padding tile). Both partitions call this, so they agree on every tile."""
    per_group = num_m * num_n
    g = 0
    if MODE == 2:
        g = t // per_group
        t = t % per_group
    # Grouped order: consecutive tiles share B column blocks in L2.
    span = GROUP_M * num_n
    first_m = (t // span) * GROUP_M
    size_m = gl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (t % span) % size_m
    pid_n = (t % span) // size_m
    row = pid_m * BM
    col = pid_n * BN
    active = True
    padding = False
    b_row = col
    bs_base = 0
    row_end = M
    if MODE == 1:
        expert = gl.load(idx_ptr + row)
        padding = expert < 0
        active = expert >= 0
        b_row = expert * N + col
        bs_base = expert * stride_bsg
    if MODE == 2:
        valid = gl.load(idx_ptr + g)
        active = row < valid
        row = g * M_MAX + row
        b_row = g * N + col
        bs_base = g * stride_bsg
        row_end = g * M_MAX + valid
    return active, row, b_row, col, bs_base, row_end, padding


@gluon.jit
def load_steps(
    a_desc,
    b_desc,
    a_smem,
    b_smem,
    ready,
    empty,
    row,
    b_row,
    k_begin,
    k_end,
    it,
    nbytes: gl.constexpr,
    STAGES: gl.constexpr,
    K_PER_STAGE: gl.constexpr,
):
    """Loads K steps [k_begin, k_end) of one tile into the ring, K_PER_STAGE per stage. A step
    past K (odd step counts) is loaded out of bounds, which TMA fills with zeros and still counts
    in full; a step past k_end inside K is loaded and then weighted 0 by the consumers."""
    for kk in range(k_begin, k_end, K_PER_STAGE):
        s = it % STAGES
        # The first pass over the ring finds every slot free (parity trick).
        mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), nbytes)
        for j in gl.static_range(K_PER_STAGE):
            slot = s * K_PER_STAGE + j
            k = (kk + j) * 128
            bar = ready.index(s)
            tma.async_copy_global_to_shared(a_desc, [row, k], bar, a_smem.index(slot))
            tma.async_copy_global_to_shared(b_desc, [b_row, k], bar, b_smem.index(slot))
        it += 1
    return it


@gluon.jit
def stream_k_run(program, programs, sk_steps):
    """[begin, end) of a CTA's stream-K steps: StreamKPlan.begin of it and of the next CTA."""
    return program * sk_steps // programs, (program + 1) * sk_steps // programs
