"""The Gluon kernel behind `fp8_gluon` (see there for the design): one persistent, warp-specialised
FP8 block-scaled GEMM for sm_90 with a TMA producer warp and two consumer warpgroups, serving the
dense (MODE 0), grouped-contiguous (1) and grouped-masked (2) layouts."""

from __future__ import annotations

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

    from fireflyer.kernels.fp8_gluon_tiles import load_steps, stream_k_run, tile_at

    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False


if HAVE_GLUON:

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
        dp_tiles,
        sk_steps,
        BM: gl.constexpr,
        BN: gl.constexpr,
        GROUP_M: gl.constexpr,
        STAGES: gl.constexpr,
        MODE: gl.constexpr,
        K_PER_STAGE: gl.constexpr,
    ):
        nbytes: gl.constexpr = (BM + BN) * 128 * K_PER_STAGE
        it = 0
        for t in range(gl.program_id(0), dp_tiles, gl.num_programs(0)):
            active, row, b_row, _col, _bs_base, _row_end, _padding = tile_at(
                t, num_m, num_n, idx_ptr, M, N, M_MAX, stride_bsg, BM, BN, GROUP_M, MODE
            )
            if active:
                it = load_steps(
                    a_desc, b_desc, a_smem, b_smem, ready, empty, row, b_row, 0, k_steps, it, nbytes,
                    STAGES, K_PER_STAGE,
                )  # fmt: skip
        if MODE == 0:  # noqa: SIM102 (compiled for the dense layout only)
            if sk_steps > 0:  # this CTA's stream-K run (fp8_stream_k)
                begin, end = stream_k_run(gl.program_id(0), gl.num_programs(0), sk_steps)
                for tt in range(begin // k_steps, (end - 1) // k_steps + 1):
                    _active, row, b_row, _col, _bs_base, _row_end, _padding = tile_at(
                        dp_tiles + tt, num_m, num_n, idx_ptr, M, N, M_MAX, stride_bsg, BM, BN, GROUP_M, MODE
                    )
                    k0 = gl.maximum(begin - tt * k_steps, 0)
                    k1 = gl.minimum(end - tt * k_steps, k_steps)
                    it = load_steps(
                        a_desc, b_desc, a_smem, b_smem, ready, empty, row, b_row, k0, k1, it, nbytes,
                        STAGES, K_PER_STAGE,
                    )  # fmt: skip

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
    def _mainloop(
        a_smem,
        b_smem,
        ready,
        empty,
        a_scale_ptrs,
        row_ok,
        b_scale_ptr,
        k_begin,
        k_end,
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
    ):
        """Per K step: wgmma, wait, promote; the other consumer's wgmma hides this one's promotion.
        A stage's K_PER_STAGE steps share one wait on its ready barrier and one release: each
        wait and release costs the warpgroup a barrier of its own (the compiler syncs its four
        warps around them), so fewer, larger stages spend less time there."""
        acc = zero
        for kk in range(k_begin, k_end, K_PER_STAGE):
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            for j in gl.static_range(K_PER_STAGE):
                # A step past k_end (zeros past K, another run's step inside it) is weighted 0.
                k = gl.minimum(kk + j, k_steps - 1)
                weight = (kk + j < k_end).to(gl.float32)
                b_scale = gl.load(b_scale_ptr + k) * weight
                scale = gl.load(a_scale_ptrs + k, mask=row_ok, other=0.0) * b_scale
                a_tile, b_tile = _operands(
                    a_smem, b_smem, s * K_PER_STAGE + j, SUB_M, SUB_N, ROW_OFF, COL_OFF, SPLIT_N
                )
                part = warpgroup_mma(a_tile, b_tile.permute((1, 0)), zero, use_acc=False, is_async=True)
                part, _, _ = warpgroup_mma_wait(num_outstanding=0, deps=(part, a_tile, b_tile))
                if j == K_PER_STAGE - 1:
                    mbarrier.arrive(empty.index(s), count=1)
                acc += part * scale[:, None]
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
        ws_ptr,
        dp_tiles,
        sk_steps,
        WHICH: gl.constexpr,
        SUB_M: gl.constexpr,
        SUB_N: gl.constexpr,
        SPLIT_N: gl.constexpr,
        GROUP_M: gl.constexpr,
        STAGES: gl.constexpr,
        MODE: gl.constexpr,
        K_PER_STAGE: gl.constexpr,
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
        for t in range(gl.program_id(0), dp_tiles, gl.num_programs(0)):
            active, row, _b_row, col, bs_base, row_end, padding = tile_at(
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
                        0,
                        k_steps,
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
        # Compiled for the dense layout only (the outer conditions are resolved at compile time).
        if MODE == 0:  # noqa: SIM102
            if not WIDE:  # noqa: SIM102
                if sk_steps > 0:  # this CTA's stream-K run (fp8_stream_k)
                    begin, end = stream_k_run(gl.program_id(0), gl.num_programs(0), sk_steps)
                    first = begin // k_steps
                    for tt in range(first, (end - 1) // k_steps + 1):
                        tile = dp_tiles + tt
                        _active, row, _b_row, col, _bs_base, row_end, _padding = tile_at(
                            tile, num_m, num_n, idx_ptr, M, N, M_MAX, stride_bsg, BM, BN, GROUP_M, MODE
                        )
                        row = row + ROW_OFF
                        col = col + COL_OFF
                        rows = row + gl.arange(0, SUB_M, layout=rows_layout)
                        a_scale_ptrs = as_ptr + rows.to(gl.int64) * stride_asm
                        b_scale_ptr = bs_ptr + gl.minimum(col // 128, n_blocks - 1) * stride_bsn
                        k0 = gl.maximum(begin - tt * k_steps, 0)
                        k1 = gl.minimum(end - tt * k_steps, k_steps)
                        acc, it = _mainloop(
                            a_smem, b_smem, ready, empty, a_scale_ptrs, rows < row_end, b_scale_ptr, k0, k1,
                            k_steps, it, zero, SUB_M, SUB_N, ROW_OFF, COL_OFF, SPLIT_N, STAGES, K_PER_STAGE,
                        )  # fmt: skip
                        if k0 == 0 and k1 == k_steps:  # the whole tile is this CTA's
                            tma.store_wait(pendings=0)
                            c_smem.slice(0, SUB_M).store(acc.to(gl.bfloat16))
                            fence_async_shared()
                            tma.async_copy_shared_to_global(c_desc, [row, col], c_smem.slice(0, SUB_M))
                        else:  # a fragment: fp32 into the slot that the fix-up reads
                            slot = 2 * gl.program_id(0) + (tt != first).to(gl.int32)
                            r = ROW_OFF + gl.arange(0, SUB_M, layout=rows_layout)
                            c = COL_OFF + gl.arange(0, SUB_N, layout=cols_layout)
                            offs = slot.to(gl.int64) * (BM * BN) + r[:, None] * BN + c[None, :]
                            gl.store(ws_ptr + offs, acc)
        tma.store_wait(pendings=0)

    _RUNTIME_ARGS = [
        "c_ptr", "as_ptr", "bs_ptr", "idx_ptr", "M", "N", "M_MAX", "stride_asm", "stride_bsg", "stride_bsn",
        "k_steps", "num_m", "num_n", "num_tiles", "ws_ptr", "dp_tiles", "sk_steps",
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
        ws_ptr,
        dp_tiles,
        sk_steps,
        SUB_M: gl.constexpr,
        SUB_N: gl.constexpr,
        SPLIT_N: gl.constexpr,
        GROUP_M: gl.constexpr,
        STAGES: gl.constexpr,
        MODE: gl.constexpr,
        K_PER_STAGE: gl.constexpr,
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
                            ws_ptr, dp_tiles, sk_steps,
                            0, SUB_M, SUB_N, SPLIT_N, GROUP_M, STAGES, MODE, K_PER_STAGE)),
                (_consume, (a_smem, b_smem, ready, empty, c1, c_desc, c_ptr, as_ptr, bs_ptr, idx_ptr,
                            M, N, M_MAX, stride_asm, stride_bsg, stride_bsn, k_steps, num_m, num_n, num_tiles,
                            ws_ptr, dp_tiles, sk_steps,
                            1, SUB_M, SUB_N, SPLIT_N, GROUP_M, STAGES, MODE, K_PER_STAGE)),
                (_produce, (a_desc, b_desc, a_smem, b_smem, ready, empty, idx_ptr, M, N, M_MAX, stride_bsg,
                            k_steps, num_m, num_n, num_tiles, dp_tiles, sk_steps,
                            BM, BN, GROUP_M, STAGES, MODE, K_PER_STAGE)),
            ],
            [4, 1],
            [CONSUMER_REGS, 40],
        )
        # fmt: on
