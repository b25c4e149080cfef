"""The Gluon kernel behind `fp8_gluon` (see there for the design): one persistent, warp-specialised
FP8 block-scaled GEMM for sm_90 with a TMA producer warp and two consumer warpgroups, serving the
dense (MODE 0), grouped-contiguous (1) and grouped-masked (2) layouts."""

from __future__ import annotations

import triton

from fireflyer.kernels.gluon_release import gluon_release_supported

try:  # Gluon ships inside Triton ≥ 3.4; the operator and CPU-only machines never need it.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    HAVE_GLUON = gluon_release_supported(triton.__version__)
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False


if HAVE_GLUON:

    @gluon.jit
    def _tile(
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
    def _produce(
        a_desc,
        b_desc,
        a_smem,
        b_smem,
        ready,
        empty,
        idx_ptr,
        M,
        N,
        M_MAX,
        stride_bsg,
        k_steps,
        num_m,
        num_n,
        num_tiles,
        BM: gl.constexpr,
        BN: gl.constexpr,
        GROUP_M: gl.constexpr,
        STAGES: gl.constexpr,
        MODE: gl.constexpr,
        K_PER_STAGE: gl.constexpr,
    ):
        # A stage holds K_PER_STAGE 128-wide K steps; a step past K (odd step counts) is loaded
        # out of bounds, which TMA fills with zeros and still counts in full.
        nbytes: gl.constexpr = (BM + BN) * 128 * K_PER_STAGE
        it = 0
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            active, row, b_row, _col, _bs_base, _row_end, _padding = _tile(
                t, num_m, num_n, idx_ptr, M, N, M_MAX, stride_bsg, BM, BN, GROUP_M, MODE
            )
            if active:
                for kk in range(0, k_steps, K_PER_STAGE):
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

    @gluon.jit
    def _operands(
        a_smem,
        b_smem,
        s,
        SUB_M: gl.constexpr,
        SUB_N: gl.constexpr,
        ROW_OFF: gl.constexpr,
        COL_OFF: gl.constexpr,
        SPLIT_N: gl.constexpr,
    ):
        """This consumer's [SUB_M, 128] slice of A and [128, SUB_N] (K-major) view of B in slot s."""
        a_tile = a_smem.index(s)
        b_tile = b_smem.index(s)
        if not SPLIT_N:
            a_tile = a_tile.slice(ROW_OFF, SUB_M)
        if SPLIT_N:
            b_tile = b_tile.slice(COL_OFF, SUB_N)
        return a_tile, b_tile

    @gluon.jit
    def _scales(a_scale_ptrs, row_ok, b_scale_ptr, k):
        """Step k's activation scales (one per row) and weight-block scale, as loaded: multiplying
        them here would make the loads' latency due at once instead of at the promotion."""
        return gl.load(a_scale_ptrs + k, mask=row_ok, other=0.0), gl.load(b_scale_ptr + k)

    @gluon.jit
    def _mainloop(
        a_smem,
        b_smem,
        ready,
        empty,
        a_scale_ptrs,
        row_ok,
        b_scale_ptr,
        k_steps,
        it,
        zero,
        SUB_M: gl.constexpr,
        SUB_N: gl.constexpr,
        ROW_OFF: gl.constexpr,
        COL_OFF: gl.constexpr,
        SPLIT_N: gl.constexpr,
        STAGES: gl.constexpr,
        K_PER_STAGE: gl.constexpr,
        PREFETCH: gl.constexpr,
        LATE_RELEASE: gl.constexpr,
    ):
        """Per K step: wgmma, wait, promote; the other consumer's wgmma hides this one's promotion.
        A stage's K_PER_STAGE steps share one wait on its ready barrier and one release: each
        wait and release costs the warpgroup a barrier of its own (the compiler syncs its four
        warps around them), so fewer, larger stages spend less time there.

        PREFETCH loads each step's scales two steps ahead (global loads take longer than one
        wgmma); LATE_RELEASE frees a stage after its promotions, so the release's warpgroup
        barrier sits next to the following wait's."""
        acc = zero
        last = k_steps - 1
        if PREFETCH:
            a_s0, b_s0 = _scales(a_scale_ptrs, row_ok, b_scale_ptr, 0)
            a_s1, b_s1 = _scales(a_scale_ptrs, row_ok, b_scale_ptr, gl.minimum(1, last))
        for kk in range(0, k_steps, K_PER_STAGE):
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            for j in gl.static_range(K_PER_STAGE):
                if PREFETCH:
                    a_s, b_s = a_s0, b_s0
                    a_s0, b_s0 = a_s1, b_s1
                    a_s1, b_s1 = _scales(a_scale_ptrs, row_ok, b_scale_ptr, gl.minimum(kk + j + 2, last))
                else:
                    # A step past K holds zeros; it reads the last step's scales.
                    a_s, b_s = _scales(a_scale_ptrs, row_ok, b_scale_ptr, gl.minimum(kk + j, last))
                a_tile, b_tile = _operands(
                    a_smem, b_smem, s * K_PER_STAGE + j, SUB_M, SUB_N, ROW_OFF, COL_OFF, SPLIT_N
                )
                part = warpgroup_mma(a_tile, b_tile.permute((1, 0)), zero, use_acc=False, is_async=True)
                part, _, _ = warpgroup_mma_wait(num_outstanding=0, deps=(part, a_tile, b_tile))
                if j == K_PER_STAGE - 1 and not LATE_RELEASE:
                    mbarrier.arrive(empty.index(s), count=1)
                acc += part * (a_s * b_s)[:, None]
            if LATE_RELEASE:
                mbarrier.arrive(empty.index(s), count=1)
            it += 1
        return acc, it

    @gluon.jit
    def _mainloop_wide(
        a_smem,
        b_smem,
        ready,
        empty,
        a_scale_ptrs,
        row_ok,
        b_scale_ptr,
        b_scale_step,
        k_steps,
        it,
        zero,
        SUB_M: gl.constexpr,
        ROW_OFF: gl.constexpr,
        STAGES: gl.constexpr,
    ):
        """A [SUB_M, 256] sub-tile as two 128-column chunks, each with its own weight-block scale.
        The second chunk's wgmma is issued after the first chunk is promoted, so one fp32 partial
        at a time lives beside the two accumulators."""
        acc0 = zero
        acc1 = zero
        for kk in range(k_steps):
            s = it % STAGES
            a_s = gl.load(a_scale_ptrs + kk, mask=row_ok, other=0.0)
            scale0 = a_s * gl.load(b_scale_ptr + kk)
            scale1 = a_s * gl.load(b_scale_ptr + b_scale_step + kk)
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            a_tile = a_smem.index(s).slice(ROW_OFF, SUB_M)
            b_tile = b_smem.index(s)
            b0 = b_tile.slice(0, 128)
            b1 = b_tile.slice(128, 128)
            part = warpgroup_mma(a_tile, b0.permute((1, 0)), zero, use_acc=False, is_async=True)
            part, _, _ = warpgroup_mma_wait(num_outstanding=0, deps=(part, a_tile, b0))
            acc0 += part * scale0[:, None]
            part = warpgroup_mma(a_tile, b1.permute((1, 0)), zero, use_acc=False, is_async=True)
            part, _, _ = warpgroup_mma_wait(num_outstanding=0, deps=(part, a_tile, b1))
            mbarrier.arrive(empty.index(s), count=1)
            acc1 += part * scale1[:, None]
            it += 1
        return acc0, acc1, it

    @gluon.jit
    def _consume(
        a_smem,
        b_smem,
        ready,
        empty,
        c_smem,
        c_desc,
        c_ptr,
        as_ptr,
        bs_ptr,
        idx_ptr,
        M,
        N,
        M_MAX,
        stride_asm,
        stride_bsg,
        stride_bsn,
        k_steps,
        num_m,
        num_n,
        num_tiles,
        WHICH: gl.constexpr,
        SUB_M: gl.constexpr,
        SUB_N: gl.constexpr,
        SPLIT_N: gl.constexpr,
        GROUP_M: gl.constexpr,
        STAGES: gl.constexpr,
        MODE: gl.constexpr,
        K_PER_STAGE: gl.constexpr,
        PREFETCH: gl.constexpr,
        LATE_RELEASE: gl.constexpr,
    ):
        BM: gl.constexpr = SUB_M if SPLIT_N else 2 * SUB_M
        BN: gl.constexpr = 2 * SUB_N if SPLIT_N else SUB_N
        ROW_OFF: gl.constexpr = 0 if SPLIT_N else WHICH * SUB_M
        COL_OFF: gl.constexpr = WHICH * SUB_N if SPLIT_N else 0
        WIDE: gl.constexpr = SUB_N == 256  # two 128-column chunks (split "m" only)
        CHUNK_N: gl.constexpr = 128 if WIDE else SUB_N
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, CHUNK_N, 32]
        )
        rows_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
        cols_layout: gl.constexpr = gl.SliceLayout(0, mma_layout)
        zero = gl.zeros([SUB_M, CHUNK_N], gl.float32, mma_layout)
        n_blocks = (N + 127) // 128
        it = 0
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            active, row, _b_row, col, bs_base, row_end, padding = _tile(
                t, num_m, num_n, idx_ptr, M, N, M_MAX, stride_bsg, BM, BN, GROUP_M, MODE
            )
            row = row + ROW_OFF
            col = col + COL_OFF
            rows = row + gl.arange(0, SUB_M, layout=rows_layout)
            row_ok = rows < row_end
            a_scale_ptrs = as_ptr + rows.to(gl.int64) * stride_asm
            # A (chunk of a) sub-tile never straddles two 128-column weight blocks: one scale per
            # K step. Columns past N read the last block's scale (their outputs are dropped).
            b_block = gl.minimum(col // 128, n_blocks - 1)
            b_scale_ptr = bs_ptr + bs_base + b_block * stride_bsn
            b_scale_step = (gl.minimum(col // 128 + 1, n_blocks - 1) - b_block) * stride_bsn
            acc = zero
            acc1 = zero
            if active:
                if WIDE:
                    acc, acc1, it = _mainloop_wide(
                        a_smem,
                        b_smem,
                        ready,
                        empty,
                        a_scale_ptrs,
                        row_ok,
                        b_scale_ptr,
                        b_scale_step,
                        k_steps,
                        it,
                        zero,
                        SUB_M,
                        ROW_OFF,
                        STAGES,
                    )
                else:
                    acc, it = _mainloop(
                        a_smem,
                        b_smem,
                        ready,
                        empty,
                        a_scale_ptrs,
                        row_ok,
                        b_scale_ptr,
                        k_steps,
                        it,
                        zero,
                        SUB_M,
                        SUB_N,
                        ROW_OFF,
                        COL_OFF,
                        SPLIT_N,
                        STAGES,
                        K_PER_STAGE,
                        PREFETCH,
                        LATE_RELEASE,
                    )
            # Masked layout: a sub-tile reaching past the expert's row count is stored through
            # pointers, so the rows after it stay untouched; whole sub-tiles go through TMA.
            partial_rows = False
            if MODE == 2:
                partial_rows = row + SUB_M > row_end
                if active and partial_rows:
                    cols = col + gl.arange(0, CHUNK_N, layout=cols_layout)
                    ptrs = c_ptr + rows.to(gl.int64)[:, None] * N + cols[None, :]
                    gl.store(ptrs, acc.to(gl.bfloat16), mask=row_ok[:, None] & (cols < N)[None, :])
                    if WIDE:
                        mask1 = row_ok[:, None] & (cols + 128 < N)[None, :]
                        gl.store(ptrs + 128, acc1.to(gl.bfloat16), mask=mask1)
            if (active and not partial_rows) or padding:
                # The previous tile's store must have left the staging buffer.
                tma.store_wait(pendings=0)
                c_smem.slice(0, SUB_M).store(acc.to(gl.bfloat16))
                if WIDE:
                    c_smem.slice(SUB_M, SUB_M).store(acc1.to(gl.bfloat16))
                fence_async_shared()
                tma.async_copy_shared_to_global(c_desc, [row, col], c_smem.slice(0, SUB_M))
                if WIDE:
                    tma.async_copy_shared_to_global(c_desc, [row, col + 128], c_smem.slice(SUB_M, SUB_M))
        tma.store_wait(pendings=0)

    _RUNTIME_ARGS = [
        "c_ptr", "as_ptr", "bs_ptr", "idx_ptr", "M", "N", "M_MAX", "stride_asm", "stride_bsg", "stride_bsn",
        "k_steps", "num_m", "num_n", "num_tiles",
    ]  # fmt: skip

    @gluon.jit(do_not_specialize=_RUNTIME_ARGS, do_not_specialize_on_alignment=_RUNTIME_ARGS)
    def fp8_gemm_kernel(
        a_desc,
        b_desc,
        c_desc,
        c_ptr,
        as_ptr,
        bs_ptr,
        idx_ptr,
        M,
        N,
        M_MAX,
        stride_asm,
        stride_bsg,
        stride_bsn,
        k_steps,
        num_m,
        num_n,
        num_tiles,
        SUB_M: gl.constexpr,
        SUB_N: gl.constexpr,
        SPLIT_N: gl.constexpr,
        GROUP_M: gl.constexpr,
        STAGES: gl.constexpr,
        MODE: gl.constexpr,
        K_PER_STAGE: gl.constexpr,
        PREFETCH: gl.constexpr,
        LATE_RELEASE: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
    ):
        BM: gl.constexpr = SUB_M if SPLIT_N else 2 * SUB_M
        BN: gl.constexpr = 2 * SUB_N if SPLIT_N else SUB_N
        a_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES * K_PER_STAGE, BM, 128], a_desc.layout)
        b_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES * K_PER_STAGE, BN, 128], b_desc.layout)
        # Each consumer stages its BF16 output as SUB_N // 128 (or one) [SUB_M, ≤128] pieces.
        CHUNKS: gl.constexpr = 2 if SUB_N == 256 else 1
        c0 = gl.allocate_shared_memory(gl.bfloat16, [CHUNKS * SUB_M, SUB_N // CHUNKS], c_desc.layout)
        c1 = gl.allocate_shared_memory(gl.bfloat16, [CHUNKS * SUB_M, SUB_N // CHUNKS], c_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # one arrival per consumer warpgroup
        fence_async_shared()
        # Argument tuples are spelled out: constexprs must reach the partitions as constexprs.
        # fmt: off
        gl.warp_specialize(
            [
                (_consume, (a_smem, b_smem, ready, empty, c0, c_desc, c_ptr, as_ptr, bs_ptr, idx_ptr,
                            M, N, M_MAX, stride_asm, stride_bsg, stride_bsn, k_steps, num_m, num_n, num_tiles,
                            0, SUB_M, SUB_N, SPLIT_N, GROUP_M, STAGES, MODE, K_PER_STAGE,
                            PREFETCH, LATE_RELEASE)),
                (_consume, (a_smem, b_smem, ready, empty, c1, c_desc, c_ptr, as_ptr, bs_ptr, idx_ptr,
                            M, N, M_MAX, stride_asm, stride_bsg, stride_bsn, k_steps, num_m, num_n, num_tiles,
                            1, SUB_M, SUB_N, SPLIT_N, GROUP_M, STAGES, MODE, K_PER_STAGE,
                            PREFETCH, LATE_RELEASE)),
                (_produce, (a_desc, b_desc, a_smem, b_smem, ready, empty, idx_ptr, M, N, M_MAX, stride_bsg,
                            k_steps, num_m, num_n, num_tiles, BM, BN, GROUP_M, STAGES, MODE, K_PER_STAGE)),
            ],
            [4, 1],
            [CONSUMER_REGS, 40],
        )
        # fmt: on
