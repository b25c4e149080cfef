"""The building blocks of the Gluon MLA decode kernels (`mla_gluon`, `mla_gluon_runs`,
`mla_gluon_seesaw`): a split's tiles, the resident queries, the loader partition, the online
softmax step, the math partition over one sequence's tiles, and the program's shared-memory ring.
Imported only inside those modules' guard, so a Triton without Gluon's Hopper API fails there."""

from __future__ import annotations

import math

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from fireflyer.kernels.mla import D_QK, D_ROPE, D_V, PAGE

# mla_gluon defines these before it imports this module.
from fireflyer.kernels.mla_gluon import BLOCK_M, LOADER_REGS

# Module constants a Gluon kernel reads must be constexpr.
PAGE_C = gl.constexpr(PAGE)
D_QK_C = gl.constexpr(D_QK)
D_V_C = gl.constexpr(D_V)
D_ROPE_C = gl.constexpr(D_ROPE)
LOADER_REGS_C = gl.constexpr(LOADER_REGS)
BLOCK_M_C = gl.constexpr(BLOCK_M)
LN2 = gl.constexpr(math.log(2.0))


@gluon.jit
def _split_tiles(SEQ, pid_b, pid_s, NUM_SPLITS: gl.constexpr, BLOCK_N: gl.constexpr):
    """(sequence length, first KV tile, tile count) of split pid_s of sequence pid_b."""
    seqlen = gl.load(SEQ + pid_b)
    tiles = gl.cdiv(seqlen, BLOCK_N)
    per_split = gl.cdiv(tiles, NUM_SPLITS)
    first = pid_s * per_split
    return seqlen, first, gl.maximum(gl.minimum(first + per_split, tiles) - first, 0)


@gluon.jit
def _load_queries(
    Q, q_nope, q_rope, pid_m, pid_b, stride_qb, S_Q: gl.constexpr, H_Q: gl.constexpr,
    q_layout: gl.constexpr,
):  # fmt: skip
    """This program's 64 query rows into shared memory; rows past s_q·h_q (another
    sequence's, or none) are zeros and never stored."""
    q_rows = pid_m * BLOCK_M_C + gl.arange(0, BLOCK_M_C, layout=gl.SliceLayout(1, q_layout))
    q_ok = q_rows < S_Q * H_Q
    q_base = Q + pid_b * stride_qb + q_rows * D_QK_C
    offs_v = gl.arange(0, D_V_C, layout=gl.SliceLayout(0, q_layout))
    offs_r = gl.arange(0, D_ROPE_C, layout=gl.SliceLayout(0, q_layout))
    q_nope.store(gl.load(q_base[:, None] + offs_v[None, :], mask=q_ok[:, None], other=0.0))
    q_rope.store(gl.load(q_base[:, None] + D_V_C + offs_r[None, :], mask=q_ok[:, None], other=0.0))
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _load_kv(
    nope_desc,
    rope_desc,
    kv_nope,
    kv_rope,
    ready,
    empty,
    BT,
    pid_b,
    stride_btb,
    first,
    n_tiles,
    k0,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
):
    """Loader partition: one TMA load of the latent and one of the rope part per KV tile,
    into the ring from its k0-th use on. The block-table entry of the next tile is read while
    this one waits for its slot, so the table's latency never sits between a slot coming free
    and its refill."""
    nbytes: gl.constexpr = nope_desc.block_type.nbytes + rope_desc.block_type.nbytes
    table = BT + pid_b * stride_btb
    last = gl.maximum(n_tiles - 1, 0)
    # A split past the sequence's end has no tiles, and its first entry may lie past the table.
    block_next = gl.load(table + (first * BLOCK_N) // PAGE_C, mask=n_tiles > 0, other=0)
    for i in range(n_tiles):
        stage = (k0 + i) % STAGES
        token = (first + i) * BLOCK_N
        block = block_next
        block_next = gl.load(table + ((first + gl.minimum(i + 1, last)) * BLOCK_N) // PAGE_C)
        # A fresh barrier passes a wait on parity 1, so the first lap does not block.
        mbarrier.wait(empty.index(stage), (((k0 + i) // STAGES) & 1) ^ 1)
        row = block * PAGE_C + token % PAGE_C
        mbarrier.expect(ready.index(stage), nbytes)
        tma.async_copy_global_to_shared(nope_desc, [row, 0], ready.index(stage), kv_nope.index(stage))
        tma.async_copy_global_to_shared(rope_desc, [row, 0], ready.index(stage), kv_rope.index(stage))


@gluon.jit
def _softmax_step(
    s, m_i, l_i, offs_n, query_pos, seqlen, tile, scale_log2, o_layout: gl.constexpr,
    p_layout: gl.constexpr, BLOCK_N: gl.constexpr,
):  # fmt: skip
    """One KV tile's scores → (P as the PV operand, the accumulator's rescale, new max, sum)."""
    s = s * scale_log2
    pos = tile * BLOCK_N + offs_n
    keep = (pos[None, :] < seqlen) & (pos[None, :] <= query_pos[:, None])
    s = gl.where(keep, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1))
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_safe)
    p = gl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + gl.sum(p, 1)
    alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))
    p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
    return p_op, alpha_o, m_new, l_i


@gluon.jit
def _attend(
    Q,
    out_at,
    lse_at,
    q_nope,
    q_rope,
    kv_nope,
    kv_rope,
    ready,
    empty,
    pid_m,
    pid_b,
    seqlen,
    first,
    n_tiles,
    k0,
    scale_log2,
    stride_qb,
    S_Q: gl.constexpr,
    H_Q: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
    DIRECT: gl.constexpr,
):
    """Math partition (two warpgroups): Q of sequence pid_b into shared memory, then the
    online softmax over its KV tiles [first, first + n_tiles), which the ring holds from its
    k0-th use on; writes the normalised output at out_at and the log2-sum-exp at lse_at (or,
    DIRECT, the final output and natural-log lse of the sequence)."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, BLOCK_N // 2, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, 256, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [8, 1], [1, 0])
    rows_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    cols_l: gl.constexpr = gl.SliceLayout(0, s_layout)

    _load_queries(Q, q_nope, q_rope, pid_m, pid_b, stride_qb, S_Q, H_Q, q_layout)

    rows = pid_m * BLOCK_M_C + gl.arange(0, BLOCK_M_C, layout=rows_l)
    query_pos = seqlen - S_Q + rows // H_Q
    offs_n = gl.arange(0, BLOCK_N, layout=cols_l)
    m_i = gl.full([BLOCK_M_C], float("-inf"), gl.float32, layout=rows_l)
    l_i = gl.zeros([BLOCK_M_C], gl.float32, layout=rows_l)
    acc = gl.zeros([BLOCK_M_C, D_V_C], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M_C, BLOCK_N], gl.float32, layout=s_layout)
    for i in range(n_tiles):
        stage = (k0 + i) % STAGES
        mbarrier.wait(ready.index(stage), ((k0 + i) // STAGES) & 1)
        k_nope = kv_nope.index(stage)
        s = warpgroup_mma(q_nope, k_nope.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma(q_rope, kv_rope.index(stage).permute((1, 0)), s, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        p_op, alpha_o, m_i, l_i = _softmax_step(
            s, m_i, l_i, offs_n, query_pos, seqlen, first + i, scale_log2, o_layout, p_layout, BLOCK_N
        )
        acc = acc * alpha_o[:, None]
        acc = warpgroup_mma(p_op, k_nope, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        # Both warpgroups are done reading this stage before the loader refills it.
        gl.thread_barrier()
        mbarrier.arrive(empty.index(stage), count=1)

    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    lse = gl.where(l_i == 0.0, float("-inf"), m_i + gl.log2(l_safe))
    o_rows_l: gl.constexpr = gl.SliceLayout(1, o_layout)
    l_o = gl.convert_layout(l_safe, o_rows_l)
    out = acc / l_o[:, None]
    o_rows = pid_m * BLOCK_M_C + gl.arange(0, BLOCK_M_C, layout=o_rows_l)
    o_cols = gl.arange(0, D_V_C, layout=gl.SliceLayout(0, o_layout))
    op = out_at + o_rows[:, None] * D_V_C + o_cols[None, :]
    if DIRECT:
        # One split: the final output in the query's dtype and the natural-log lse in its
        # [b, h_q, s_q] layout, with no partials to merge.
        lse_rows = (rows % H_Q) * S_Q + rows // H_Q
        gl.store(lse_at + lse_rows, lse * LN2, mask=rows < S_Q * H_Q)
        gl.store(op, out.to(out_at.dtype.element_ty), mask=(o_rows < S_Q * H_Q)[:, None])
    else:
        gl.store(lse_at + rows, lse, mask=rows < S_Q * H_Q)
        gl.store(op, out, mask=(o_rows < S_Q * H_Q)[:, None])


@gluon.jit
def _kv_ring(nope_desc, rope_desc, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """A program's shared memory: its 64 query rows (resident) and the ring of STAGES KV
    stages with their ready/empty mbarriers, initialised (one arrival each)."""
    q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M_C, D_V_C], gl.bfloat16)
    qr_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M_C, D_ROPE_C], gl.bfloat16)
    q_nope = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M_C, D_V_C], q_sl)
    q_rope = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M_C, D_ROPE_C], qr_sl)
    kv_nope = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D_V_C], nope_desc.layout)
    kv_rope = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D_ROPE_C], rope_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for st in gl.static_range(STAGES):
        mbarrier.init(ready.index(st), count=1)
        mbarrier.init(empty.index(st), count=1)
    fence_async_shared()
    return q_nope, q_rope, kv_nope, kv_rope, ready, empty


@gluon.jit
def _release_ring(ready, empty, STAGES: gl.constexpr):
    for st in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(st))
        mbarrier.invalidate(empty.index(st))
