"""The seesaw on 64-token tiles (`mla_gluon` config `w64s2`): two math warpgroups take turns
leading KV tiles, as in `mla_gluon_seesaw`, with no loader warp; each warpgroup issues the TMA
loads of the shared memory it has just finished reading.

Why: with a one-warp loader the CTA is launched with 384 threads, so no thread gets more than 232
registers, and a 64-token seesaw turn (half of O, the score tile, two P tiles) spills there. Two
warpgroups alone are 256 threads, which may use 255 each. A 64-token score tile also runs Q·Kᵀ
as one N = 64 wgmma per warpgroup instead of two N = 32 halves, so Q is read from shared memory
once per tile instead of twice.

Shared memory: Q (72 KiB, resident) and two stages; stage w holds the tiles that warpgroup w
leads (t ≡ w mod 2), as three buffers: the latent's columns 0–255 ("half 0", O's columns of
warpgroup 0), 256–511 ("half 1") and the rope part. Each stage has two load groups with one
mbarrier each: group w is half w plus the rope, group 1-w is half 1-w, and warpgroup g always
loads group g. A tile t of stage w is read by warpgroup w (all of it for S(t), half w for its
P·V) and by warpgroup 1-w (half 1-w, for its P·V a turn later), so each warpgroup refills a
group as soon as its own last read of it is done:

- after its P·V on the other's tile t-1 (its half of stage 1-w): group w of tile t+1;
- after its P·V on its own tile t (its half and the rope of stage w): group w of tile t+2.

The turn of warpgroup w at tile t: S(t) = Q·K(t)ᵀ (rope, own half, other half, each as soon as
its group has landed), the other's P(t-1) and row statistics, the softmax of S(t) from them,
P(t) and the statistics handed over, then O_w (relative to the max after tile t-2) += P(t-1)·
V(t-1)_w + P(t)·V(t)_w at the max after tile t. One warpgroup's Q·Kᵀ and P·V run while the
other computes its softmax. Tile n (one past the last) is a phantom turn with every score masked,
so that the warpgroup that did not lead the last tile still adds it to its half of O.
"""

from __future__ import annotations

from fireflyer.kernels.mla_gluon import HAVE_GLUON

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from fireflyer.kernels.mla_gluon_parts import BLOCK_M_C, D_ROPE_C, D_V_C, PAGE_C, _split_tiles
    from fireflyer.kernels.mla_gluon_seesaw import HALF_V, _hand_over, _softmax_turn, _write_half

    TILE = gl.constexpr(64)  # KV tokens per tile: one page
    MATH_REGS = gl.constexpr(256)  # the worker warpgroup's registers (256 threads in all)

    @gluon.jit
    def _load_group(half_desc, rope_desc, kv_half, kv_rope, ready, block, tile, n_tiles, G: gl.constexpr):
        """Group G of tile `tile` (in cache block `block`) into its stage (tile % 2): half G, and
        the rope when G leads the tile."""
        if tile < n_tiles:
            stage = tile % 2
            row = block * PAGE_C
            bar = ready.index(stage * 2 + G)
            with_rope = stage == G
            if with_rope:
                mbarrier.expect(bar, half_desc.block_type.nbytes + rope_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(rope_desc, [row, 0], bar, kv_rope.index(stage))
            else:
                mbarrier.expect(bar, half_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(half_desc, [row, G * HALF_V], bar, kv_half.index(stage * 2 + G))

    @gluon.jit
    def _block(table, first, tile, n_tiles):
        """The cache block of tile `tile` (one page each), or 0 past the last tile."""
        return gl.load(table + first + tile, mask=tile < n_tiles, other=0)

    @gluon.jit
    def _scores(q_half, q_rope_buf, kv_half, kv_rope, ready, tile, s_zero, W: gl.constexpr):
        """S(tile) = Q·K(tile)ᵀ over the rope, this warpgroup's half, then the other's."""
        stage = tile % 2
        phase = (tile // 2) & 1
        own = kv_half.index(stage * 2 + W)
        other = kv_half.index(stage * 2 + 1 - W)
        # An index the compiler cannot fold (tile < 2³⁰): the Q descriptors are then built per
        # tile instead of being held, 36 of them, in registers through the loop.
        opaque = tile >> 30
        q_own = q_half.index(W + opaque)
        q_other = q_half.index(1 - W + opaque)
        q_rope = q_rope_buf.index(opaque)
        mbarrier.wait(ready.index(stage * 2 + W), phase)
        s = warpgroup_mma(q_rope, kv_rope.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma(q_own, own.permute((1, 0)), s, is_async=True)
        mbarrier.wait(ready.index(stage * 2 + 1 - W), phase)
        s = warpgroup_mma(q_other, other.permute((1, 0)), s, is_async=True)
        return warpgroup_mma_wait(num_outstanding=0, deps=(s,))

    @gluon.jit
    def _seesaw64_half(
        out_at, lse_at, half_desc, rope_desc, q_half, q_rope, kv_half, kv_rope, ready, p_smem, stats,
        full, table, pid_m, seqlen, first, n_tiles, scale_log2, S_Q: gl.constexpr, H_Q: gl.constexpr,
        DIRECT: gl.constexpr, W: gl.constexpr,
    ):  # fmt: skip
        """Math warpgroup W: its turns at tiles W, W+2, …, its loads, and O[:, W·256 : +256] of
        this program's output (out_at) and, from warpgroup 0, the lse (lse_at). Few arguments:
        a worker partition holds each in a register for its whole life."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, TILE, 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF_V, 16]
        )
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        rows_l: gl.constexpr = gl.SliceLayout(1, s_layout)

        # Group W of the first two tiles; later ones as this warpgroup frees their buffers. The
        # block table is read a turn ahead, so that no refill waits for it.
        for tile in gl.static_range(2):
            block = _block(table, first, tile, n_tiles)
            _load_group(half_desc, rope_desc, kv_half, kv_rope, ready, block, tile, n_tiles, W)
        block_1 = _block(table, first, W + 1, n_tiles)
        block_2 = _block(table, first, W + 2, n_tiles)

        rows = pid_m * BLOCK_M_C + gl.arange(0, BLOCK_M_C, layout=rows_l)
        query_pos = seqlen - S_Q + rows // H_Q
        offs_n = gl.arange(0, TILE, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([BLOCK_M_C], float("-inf"), gl.float32, layout=rows_l)
        l_i = gl.zeros([BLOCK_M_C], gl.float32, layout=rows_l)
        acc = gl.zeros([BLOCK_M_C, HALF_V], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BLOCK_M_C, TILE], gl.float32, layout=s_layout)
        # Turns up to t = n_tiles (a phantom when it is this warpgroup's), none without tiles.
        end = gl.where(n_tiles > 0, n_tiles + 1, 0)
        for t in range(W, end, 2):
            block_3 = _block(table, first, t + 3, n_tiles)
            block_4 = _block(table, first, t + 4, n_tiles)
            s = s_zero
            if t < n_tiles:
                s = _scores(q_half, q_rope, kv_half, kv_rope, ready, t, s_zero, W)

            # The other warpgroup's tile t-1: its P and the row statistics after it.
            m_prev = gl.full([BLOCK_M_C], float("-inf"), gl.float32, layout=rows_l)
            l_prev = gl.zeros([BLOCK_M_C], gl.float32, layout=rows_l)
            alpha_prev = gl.full([BLOCK_M_C], 1.0, gl.float32, layout=rows_l)
            p_prev = gl.zeros([BLOCK_M_C, TILE], gl.bfloat16, layout=s_layout)
            if t > 0:
                mbarrier.wait(full.index(1 - W), ((t - 1) // 2) & 1)
                m_prev = stats.index(0).load(rows_l)
                l_prev = stats.index(1).load(rows_l)
                alpha_prev = stats.index(2).load(rows_l)

            p, m_new, alpha, l_new = _softmax_turn(
                s, m_prev, l_prev, t, first, n_tiles, seqlen, offs_n, query_pos, scale_log2, TILE
            )
            # P(t-1) only now, so that it is not live through the softmax.
            if t > 0:
                p_prev = p_smem.load(s_layout)
            _hand_over(p_smem, stats, full.index(W), p, m_new, l_new, alpha)

            # O (relative to the max after tile t-2) += tile t-1 and tile t, at the max after t.
            # Tile t-1 lies in the other stage; before the first turn there is none, and the
            # product (with P = 0) reads this turn's own, already loaded, half instead.
            acc = acc * gl.convert_layout(alpha_prev * alpha, gl.SliceLayout(1, o_layout))[:, None]
            p_prev_op = gl.convert_layout((p_prev.to(gl.float32) * alpha[:, None]).to(gl.bfloat16), p_layout)
            p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
            # A phantom turn reads the last tile's stage: never refilled, and loaded.
            own_stage = gl.minimum(t, n_tiles - 1) % 2
            prev_stage = own_stage
            if t > 0:
                prev_stage = (t - 1) % 2
            v_prev = kv_half.index(prev_stage * 2 + W)
            v_own = kv_half.index(own_stage * 2 + W)
            acc = warpgroup_mma(p_prev_op, v_prev, acc, is_async=True)
            acc = warpgroup_mma(p_op, v_own, acc, is_async=True)
            p_prev_op = warpgroup_mma_wait(num_outstanding=1, deps=(p_prev_op,))
            if t > 0:
                _load_group(half_desc, rope_desc, kv_half, kv_rope, ready, block_1, t + 1, n_tiles, W)
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
            _load_group(half_desc, rope_desc, kv_half, kv_rope, ready, block_2, t + 2, n_tiles, W)
            block_1 = block_3
            block_2 = block_4
            m_i = m_new
            l_i = l_new

        _write_half(out_at, lse_at, acc, m_i, l_i, rows, pid_m, o_layout, S_Q, H_Q, DIRECT, W)

    @gluon.jit
    def mla_seesaw64_kernel(
        Q, half_desc, rope_desc, BT, SEQ, OP, LP, scale_log2, stride_qb, stride_btb, stride_opb,
        stride_ops, stride_lpb, stride_lps, S_Q: gl.constexpr, H_Q: gl.constexpr,
        NUM_SPLITS: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    ):  # fmt: skip
        """`mla_gluon._mla_gluon_partial`'s arguments, with the latent's descriptor over
        [64, 256] boxes; launched with num_warps=4 (BLOCK_N 64 and STAGES 2 are fixed)."""
        pid_m = gl.program_id(0)
        pid_s = gl.program_id(1)
        pid_b = gl.program_id(2)
        seqlen, first, n_tiles = _split_tiles(SEQ, pid_b, pid_s, NUM_SPLITS, TILE)

        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M_C, HALF_V], gl.bfloat16)
        qr_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M_C, D_ROPE_C], gl.bfloat16)
        p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M_C, TILE], gl.bfloat16)
        stats_sl: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        # Q's columns 0–255 and 256–511, and its rope part.
        q_half = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_M_C, HALF_V], q_sl)
        q_rope = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_M_C, D_ROPE_C], qr_sl)
        # Index stage·2 + half.
        kv_half = gl.allocate_shared_memory(gl.bfloat16, [4, TILE, HALF_V], half_desc.layout)
        kv_rope = gl.allocate_shared_memory(gl.bfloat16, [2, TILE, D_ROPE_C], rope_desc.layout)
        p_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M_C, TILE], p_sl)
        stats = gl.allocate_shared_memory(gl.float32, [3, BLOCK_M_C], stats_sl)  # max, sum, rescale
        ready = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())  # stage·2 + group
        full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(4):
            mbarrier.init(ready.index(i), count=1)
        mbarrier.init(full.index(0), count=1)
        mbarrier.init(full.index(1), count=1)

        # Queries into shared memory before the partitions start.
        q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        q_rows = pid_m * BLOCK_M_C + gl.arange(0, BLOCK_M_C, layout=gl.SliceLayout(1, q_layout))
        q_ok = (q_rows < S_Q * H_Q)[:, None]
        q_base = Q + pid_b * stride_qb + q_rows[:, None] * (D_V_C + D_ROPE_C)
        offs_h = gl.arange(0, HALF_V, layout=gl.SliceLayout(0, q_layout))[None, :]
        offs_r = gl.arange(0, D_ROPE_C, layout=gl.SliceLayout(0, q_layout))[None, :]
        q_half.index(0).store(gl.load(q_base + offs_h, mask=q_ok, other=0.0))
        q_half.index(1).store(gl.load(q_base + HALF_V + offs_h, mask=q_ok, other=0.0))
        q_rope.index(0).store(gl.load(q_base + D_V_C + offs_r, mask=q_ok, other=0.0))
        fence_async_shared()
        gl.thread_barrier()

        direct: gl.constexpr = NUM_SPLITS == 1
        out_at = OP + pid_b * stride_opb + pid_s * stride_ops
        lse_at = LP + pid_b * stride_lpb + pid_s * stride_lps
        table = BT + pid_b * stride_btb
        # Argument tuples are spelled out: constexprs must reach the partitions as constexprs.
        # fmt: off
        gl.warp_specialize(
            [
                (_seesaw64_half, (out_at, lse_at, half_desc, rope_desc, q_half, q_rope, kv_half,
                                  kv_rope, ready, p_smem, stats, full, table, pid_m, seqlen, first, n_tiles,
                                  scale_log2, S_Q, H_Q, direct, 0)),
                (_seesaw64_half, (out_at, lse_at, half_desc, rope_desc, q_half, q_rope, kv_half,
                                  kv_rope, ready, p_smem, stats, full, table, pid_m, seqlen, first, n_tiles,
                                  scale_log2, S_Q, H_Q, direct, 1)),
            ],
            [4],
            [MATH_REGS],
        )
        # fmt: on
