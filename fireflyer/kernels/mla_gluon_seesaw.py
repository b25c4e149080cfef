"""The "seesaw" structure for the Gluon MLA decode kernel (`mla_gluon`): the two math warpgroups
take turns leading KV tiles, and each owns half of O's 512 columns.

The warpgroup leading tile t computes the whole score tile S(t) = Q·K(t)ᵀ, its softmax (starting
from the running max and sum the other warpgroup left after tile t-1), and hands P(t) and the row
statistics over through shared memory. Each warpgroup then adds two tiles to its half of O: the
other's previous tile, with P(t-1) rescaled to this tile's max, and its own. The score wgmma of
one warpgroup runs while the other computes its softmax, so the tensor cores are not left idle
while the CUDA cores work, and no tile's Q·Kᵀ is computed twice. Only the softmaxes are chained
(each needs the previous tile's max); the two warpgroups never meet at a barrier.

A tile index past the last is a phantom: its scores are all masked, so it adds zeros and
rescales by one; it lets the warpgroup that did not lead the last tile still add that tile to its
half of O. Same contract, loader partition and launch as `mla_gluon`.
"""

from __future__ import annotations

from fireflyer.kernels.mla_gluon import HAVE_GLUON

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from fireflyer.kernels.mla_gluon_parts import (
        BLOCK_M_C,
        D_ROPE_C,
        D_V_C,
        LN2,
        LOADER_REGS_C,
        _load_kv,
        _load_queries,
        _split_tiles,
    )

    MATH_REGS = gl.constexpr(232)  # per math thread (setmaxnreg); the loader warp keeps 40
    HALF_V = gl.constexpr(256)  # O columns per warpgroup

    @gluon.jit
    def _softmax_turn(
        s, m_prev, l_prev, t, first, n_tiles, seqlen, offs_n, query_pos, scale_log2, BLOCK_N: gl.constexpr
    ):  # fmt: skip
        """Tile t's scores (all masked on a phantom turn, t = n_tiles) → P, the new row max, the
        rescale of what came before, and the new row sum."""
        s = s * scale_log2
        pos = (first + t) * BLOCK_N + offs_n
        visible = gl.where(t < n_tiles, seqlen, 0)
        s = gl.where((pos[None, :] < visible) & (pos[None, :] <= query_pos[:, None]), s, float("-inf"))
        m_new = gl.maximum(m_prev, gl.max(s, 1))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_prev - m_safe)
        p = gl.exp2(s - m_safe[:, None])
        return p, m_new, alpha, l_prev * alpha + gl.sum(p, 1)

    @gluon.jit
    def _hand_over(p_smem, stats, full_own, p, m_new, l_new, alpha):
        """Tile t's P and row statistics to the other warpgroup: every warp has read tile t-1's
        before any overwrites them."""
        gl.thread_barrier()
        p_smem.store(p.to(gl.bfloat16))
        stats.index(0).store(m_new)
        stats.index(1).store(l_new)
        stats.index(2).store(alpha)
        gl.thread_barrier()
        mbarrier.arrive(full_own, count=1)

    @gluon.jit
    def _write_half(
        out_at, lse_at, acc, m_i, l_i, rows, pid_m, o_layout: gl.constexpr, S_Q: gl.constexpr,
        H_Q: gl.constexpr, DIRECT: gl.constexpr, WHICH: gl.constexpr,
    ):  # fmt: skip
        """O[:, WHICH·256 : +256] normalised, at out_at, and (warpgroup 0) the lse at lse_at: with
        DIRECT the final output and natural-log lse in [b, h_q, s_q], else a split's partials."""
        l_safe = gl.where(l_i == 0.0, 1.0, l_i)
        lse = gl.where(l_i == 0.0, float("-inf"), m_i + gl.log2(l_safe))
        o_rows_l: gl.constexpr = gl.SliceLayout(1, o_layout)
        out = acc / gl.convert_layout(l_safe, o_rows_l)[:, None]
        o_rows = pid_m * BLOCK_M_C + gl.arange(0, BLOCK_M_C, layout=o_rows_l)
        o_cols = WHICH * HALF_V + gl.arange(0, HALF_V, layout=gl.SliceLayout(0, o_layout))
        op = out_at + o_rows[:, None] * D_V_C + o_cols[None, :]
        row_ok = rows < S_Q * H_Q
        if DIRECT:
            if WHICH == 0:
                gl.store(lse_at + (rows % H_Q) * S_Q + rows // H_Q, lse * LN2, mask=row_ok)
            gl.store(op, out.to(out_at.dtype.element_ty), mask=(o_rows < S_Q * H_Q)[:, None])
        else:
            if WHICH == 0:
                gl.store(lse_at + rows, lse, mask=row_ok)
            gl.store(op, out, mask=(o_rows < S_Q * H_Q)[:, None])

    @gluon.jit
    def _turn(
        q_nope, q_rope, kv_nope, kv_rope, ready, empty, p_smem, stats, full_own, full_other, acc,
        s_zero, offs_n, query_pos, seqlen, first, n_tiles, t, scale_log2, s_layout: gl.constexpr,
        o_layout: gl.constexpr, p_layout: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        WHICH: gl.constexpr,
    ):  # fmt: skip
        """This warpgroup's turn at tile t (t ≡ WHICH mod 2): returns O's half and the row max and
        sum after tile t."""
        rows_l: gl.constexpr = gl.SliceLayout(1, s_layout)
        last = gl.maximum(n_tiles - 1, 0)
        own = gl.minimum(t, last)
        prev = gl.maximum(t - 1, 0)
        k_own = kv_nope.index(own % STAGES)
        mbarrier.wait(ready.index(own % STAGES), (own // STAGES) & 1)
        s = warpgroup_mma(q_nope, k_own.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma(q_rope, kv_rope.index(own % STAGES).permute((1, 0)), s, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))

        # The other warpgroup's tile t-1: its P and the row statistics after it.
        m_prev = gl.full([BLOCK_M_C], float("-inf"), gl.float32, layout=rows_l)
        l_prev = gl.zeros([BLOCK_M_C], gl.float32, layout=rows_l)
        alpha_prev = gl.full([BLOCK_M_C], 1.0, gl.float32, layout=rows_l)
        p_prev = gl.zeros([BLOCK_M_C, BLOCK_N], gl.bfloat16, layout=s_layout)
        if t > 0:
            mbarrier.wait(full_other, ((t - 1) // 2) & 1)
            m_prev = stats.index(0).load(rows_l)
            l_prev = stats.index(1).load(rows_l)
            alpha_prev = stats.index(2).load(rows_l)
            p_prev = p_smem.load(s_layout)

        p, m_new, alpha, l_new = _softmax_turn(
            s, m_prev, l_prev, t, first, n_tiles, seqlen, offs_n, query_pos, scale_log2, BLOCK_N
        )
        _hand_over(p_smem, stats, full_own, p, m_new, l_new, alpha)

        # O (relative to the max after tile t-2) += tile t-1 and tile t, at the max after tile t.
        acc = acc * gl.convert_layout(alpha_prev * alpha, gl.SliceLayout(1, o_layout))[:, None]
        p_prev_op = gl.convert_layout((p_prev.to(gl.float32) * alpha[:, None]).to(gl.bfloat16), p_layout)
        p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        v_prev = kv_nope.index(prev % STAGES).slice(WHICH * HALF_V, HALF_V, dim=1)
        acc = warpgroup_mma(p_prev_op, v_prev, acc, is_async=True)
        acc = warpgroup_mma(p_op, k_own.slice(WHICH * HALF_V, HALF_V, dim=1), acc, is_async=True)
        acc, p_prev_op, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_prev_op, p_op))
        # Each tile's stage is freed by two arrivals: its leader's, and the other's a turn later.
        mbarrier.arrive(empty.index(prev % STAGES), count=1, pred=t > 0)
        mbarrier.arrive(empty.index(own % STAGES), count=1, pred=t < n_tiles)
        return acc, m_new, l_new

    @gluon.jit
    def _seesaw_half(
        OP, LP, q_nope, q_rope, kv_nope, kv_rope, ready, empty, p_smem, stats, full, pid_m, pid_b,
        pid_s, seqlen, first, n_tiles, scale_log2, stride_opb, stride_ops, stride_lpb, stride_lps,
        S_Q: gl.constexpr, H_Q: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        DIRECT: gl.constexpr, WHICH: gl.constexpr,
    ):  # fmt: skip
        """One math warpgroup: its turns at tiles WHICH, WHICH+2, …, and O[:, WHICH·256 : +256]."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF_V, 16]
        )
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        rows_l: gl.constexpr = gl.SliceLayout(1, s_layout)

        rows = pid_m * BLOCK_M_C + gl.arange(0, BLOCK_M_C, layout=rows_l)
        query_pos = seqlen - S_Q + rows // H_Q
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([BLOCK_M_C], float("-inf"), gl.float32, layout=rows_l)
        l_i = gl.zeros([BLOCK_M_C], gl.float32, layout=rows_l)
        acc = gl.zeros([BLOCK_M_C, HALF_V], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BLOCK_M_C, BLOCK_N], gl.float32, layout=s_layout)
        # Turns up to t = n_tiles (a phantom when it is this warpgroup's), none without tiles.
        end = gl.where(n_tiles > 0, n_tiles + 1, 0)
        for t in range(WHICH, end, 2):
            acc, m_i, l_i = _turn(
                q_nope, q_rope, kv_nope, kv_rope, ready, empty, p_smem, stats, full.index(WHICH),
                full.index(1 - WHICH), acc, s_zero, offs_n, query_pos, seqlen, first, n_tiles, t,
                scale_log2, s_layout, o_layout, p_layout, BLOCK_N, STAGES, WHICH,
            )  # fmt: skip

        # With one split the split strides are 0: these are the sequence's output and lse.
        out_at = OP + pid_b * stride_opb + pid_s * stride_ops
        lse_at = LP + pid_b * stride_lpb + pid_s * stride_lps
        _write_half(out_at, lse_at, acc, m_i, l_i, rows, pid_m, o_layout, S_Q, H_Q, DIRECT, WHICH)

    @gluon.jit
    def mla_seesaw_kernel(
        Q, nope_desc, rope_desc, BT, SEQ, OP, LP, scale_log2, stride_qb, stride_btb, stride_opb,
        stride_ops, stride_lpb, stride_lps, S_Q: gl.constexpr, H_Q: gl.constexpr,
        NUM_SPLITS: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    ):  # fmt: skip
        """`mla_gluon._mla_gluon_partial`'s arguments; launched with num_warps=4."""
        pid_m = gl.program_id(0)
        pid_s = gl.program_id(1)
        pid_b = gl.program_id(2)
        seqlen, first, n_tiles = _split_tiles(SEQ, pid_b, pid_s, NUM_SPLITS, BLOCK_N)

        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M_C, D_V_C], gl.bfloat16)
        qr_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M_C, D_ROPE_C], gl.bfloat16)
        p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M_C, BLOCK_N], gl.bfloat16)
        stats_sl: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        q_nope = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M_C, D_V_C], q_sl)
        q_rope = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M_C, D_ROPE_C], qr_sl)
        kv_nope = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D_V_C], nope_desc.layout)
        kv_rope = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D_ROPE_C], rope_desc.layout)
        p_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M_C, BLOCK_N], p_sl)
        stats = gl.allocate_shared_memory(gl.float32, [3, BLOCK_M_C], stats_sl)  # max, sum, rescale
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for st in gl.static_range(STAGES):
            mbarrier.init(ready.index(st), count=1)
            mbarrier.init(empty.index(st), count=2)  # the tile's leader and the other warpgroup
        mbarrier.init(full.index(0), count=1)
        mbarrier.init(full.index(1), count=1)

        # Queries into shared memory before the partitions start.
        q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        _load_queries(Q, q_nope, q_rope, pid_m, pid_b, stride_qb, S_Q, H_Q, q_layout)

        direct: gl.constexpr = NUM_SPLITS == 1
        # Argument tuples are spelled out: constexprs must reach the partitions as constexprs.
        # fmt: off
        gl.warp_specialize(
            [
                (_seesaw_half, (OP, LP, q_nope, q_rope, kv_nope, kv_rope, ready, empty, p_smem, stats, full,
                                pid_m, pid_b, pid_s, seqlen, first, n_tiles, scale_log2, stride_opb,
                                stride_ops, stride_lpb, stride_lps, S_Q, H_Q, BLOCK_N, STAGES, direct, 0)),
                (_seesaw_half, (OP, LP, q_nope, q_rope, kv_nope, kv_rope, ready, empty, p_smem, stats, full,
                                pid_m, pid_b, pid_s, seqlen, first, n_tiles, scale_log2, stride_opb,
                                stride_ops, stride_lpb, stride_lps, S_Q, H_Q, BLOCK_N, STAGES, direct, 1)),
                (_load_kv, (nope_desc, rope_desc, kv_nope, kv_rope, ready, empty, BT, pid_b, stride_btb,
                            first, n_tiles, 0, BLOCK_N, STAGES)),
            ],
            [4, 1],
            [MATH_REGS, LOADER_REGS_C],
        )
        # fmt: on
