"""Triton paged MLA decode over the FP8 latent cache (layout: fireflyer.kernels.mla_fp8).

The same split-KV partial attention and combine as the BF16 kernel (mla_triton), but each page
is read as 656 bytes per token: the e4m3 latent, its 4 fp32 tile scales and the BF16 RoPE part,
through three typed views of the same bytes, so HBM carries 0.57× the BF16 cache's bytes.

The tile scales never touch the [64, 512] latent tile. A token's score is Σ_t scale_t · (q_t · k_t)
over its 4 tiles, so each tile's raw e4m3 values go to the tensor cores as BF16 (an exact
conversion) and the scale multiplies the [heads, 64] partial scores; the value side scales P's
columns instead: out_t = (P ∘ scale_t) · v_t. This keeps the per-page register work at a few
[heads, 64] products, and the scores as exact as the fp32 reference's up to summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fireflyer.kernels.mla import PAGE, num_splits
from fireflyer.kernels.mla_fp8 import D_ROPE, FP8, ROPE_AT, SCALES_AT, TILE, TILES, TOKEN_BYTES
from fireflyer.kernels.mla_triton import LOG2E, combine_splits

D_V = TILES * TILE
# Head rows per program: at most 64 (one wgmma tile of rows); fewer heads take a smaller block.
MAX_BLOCK_H = 64
CONFIG = {"num_warps": 4, "num_stages": 2, "waves": 2}


@triton.jit
def _tile_scores(q_t, KV8, row_bytes, KVS, row_f32, t: tl.constexpr, TILE_W: tl.constexpr):
    """One 128-wide tile of a page: its raw latent [PAGE, TILE] in the query's dtype, its scale
    per token, and the scaled partial scores q_t · k_tᵀ [heads, PAGE]."""
    offs_c = tl.arange(0, TILE_W)
    k_t = tl.load(KV8 + row_bytes[:, None] + t * TILE_W + offs_c[None, :]).to(q_t.dtype)
    scale_t = tl.load(KVS + row_f32 + t)
    return k_t, scale_t, tl.dot(q_t, tl.trans(k_t)) * scale_t[None, :]


@triton.jit
def _mla_fp8_partial(
    Q,
    KV8,
    KVS,
    KVR,
    BT,
    SEQ,
    OP,
    LP,
    scale_log2,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kvblk,
    stride_btb,
    stride_opb,
    stride_ops,
    stride_lpb,
    stride_lps,
    S_Q: tl.constexpr,
    H_Q: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    TILE_W: tl.constexpr,
    DR: tl.constexpr,
    ROW_BYTES: tl.constexpr,
    SCALES_OFF: tl.constexpr,
    ROPE_OFF: tl.constexpr,
):
    # KV8, KVS and KVR view the same bytes as e4m3, fp32 and bf16; stride_kvblk is in bytes.
    # The 4 latent tiles are spelled out (q0..q3, acc0..acc3): each is its own tensor-core operand.
    DV: tl.constexpr = TILE_W * 4
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2)
    rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < S_Q * H_Q
    sq = rows // H_Q
    hh = rows % H_Q
    seqlen = tl.load(SEQ + pid_b)
    pages = tl.cdiv(seqlen, PAGE_SIZE)
    per_split = tl.cdiv(pages, NUM_SPLITS)
    first = pid_s * per_split
    last = tl.minimum(first + per_split, pages)
    offs_c = tl.arange(0, TILE_W)
    offs_r = tl.arange(0, DR)
    q_rows = (Q + pid_b * stride_qb + sq * stride_qs + hh * stride_qh)[:, None]
    q0 = tl.load(q_rows + 0 * TILE_W + offs_c[None, :], mask=row_ok[:, None], other=0.0)
    q1 = tl.load(q_rows + 1 * TILE_W + offs_c[None, :], mask=row_ok[:, None], other=0.0)
    q2 = tl.load(q_rows + 2 * TILE_W + offs_c[None, :], mask=row_ok[:, None], other=0.0)
    q3 = tl.load(q_rows + 3 * TILE_W + offs_c[None, :], mask=row_ok[:, None], other=0.0)
    q_pe = tl.load(q_rows + DV + offs_r[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc0 = tl.zeros([BLOCK_H, TILE_W], tl.float32)
    acc1 = tl.zeros([BLOCK_H, TILE_W], tl.float32)
    acc2 = tl.zeros([BLOCK_H, TILE_W], tl.float32)
    acc3 = tl.zeros([BLOCK_H, TILE_W], tl.float32)
    offs_n = tl.arange(0, PAGE_SIZE)
    query_pos = seqlen - S_Q + sq
    for page in range(first, last):
        blk = tl.load(BT + pid_b * stride_btb + page).to(tl.int64)
        row_bytes = blk * stride_kvblk + offs_n * ROW_BYTES  # [PAGE] byte offset of each token
        # The same rows in fp32 and bf16 elements (every offset is a multiple of the width).
        row_f32 = blk * (stride_kvblk // 4) + offs_n * (ROW_BYTES // 4) + SCALES_OFF // 4
        row_bf16 = blk * (stride_kvblk // 2) + offs_n * (ROW_BYTES // 2) + ROPE_OFF // 2
        k_pe = tl.load(KVR + row_bf16[:, None] + offs_r[None, :]).to(q_pe.dtype)
        k0, sc0, s0 = _tile_scores(q0, KV8, row_bytes, KVS, row_f32, 0, TILE_W)
        k1, sc1, s1 = _tile_scores(q1, KV8, row_bytes, KVS, row_f32, 1, TILE_W)
        k2, sc2, s2 = _tile_scores(q2, KV8, row_bytes, KVS, row_f32, 2, TILE_W)
        k3, sc3, s3 = _tile_scores(q3, KV8, row_bytes, KVS, row_f32, 3, TILE_W)
        s = (tl.dot(q_pe, tl.trans(k_pe)) + s0 + s1 + s2 + s3) * scale_log2
        pos = page * PAGE_SIZE + offs_n
        keep = (pos[None, :] < seqlen) & (pos[None, :] <= query_pos[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc0 = acc0 * alpha[:, None] + tl.dot((p * sc0[None, :]).to(k0.dtype), k0)
        acc1 = acc1 * alpha[:, None] + tl.dot((p * sc1[None, :]).to(k1.dtype), k1)
        acc2 = acc2 * alpha[:, None] + tl.dot((p * sc2[None, :]).to(k2.dtype), k2)
        acc3 = acc3 * alpha[:, None] + tl.dot((p * sc3[None, :]).to(k3.dtype), k3)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    op = OP + pid_b * stride_opb + pid_s * stride_ops + rows[:, None] * DV + offs_c[None, :]
    tl.store(op + 0 * TILE_W, acc0 / l_safe[:, None], mask=row_ok[:, None])
    tl.store(op + 1 * TILE_W, acc1 / l_safe[:, None], mask=row_ok[:, None])
    tl.store(op + 2 * TILE_W, acc2 / l_safe[:, None], mask=row_ok[:, None])
    tl.store(op + 3 * TILE_W, acc3 / l_safe[:, None], mask=row_ok[:, None])
    tl.store(LP + pid_b * stride_lpb + pid_s * stride_lps + rows, lse, mask=row_ok)


def block_rows(rows: int) -> int:
    """Head rows per program: the query rows rounded up to a power of two, 16 to 64 (a tensor-core
    tile needs 16 rows; more than 64 makes each program's accumulators spill)."""
    return max(16, min(MAX_BLOCK_H, triton.next_power_of_2(rows)))


def mla_decode_fp8_triton(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    splits: int | None = None,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [b, s_q, h_q, 576] BF16 (or fp32), kv_cache uint8 [blocks, 64, 1, 656]."""
    cfg = {**CONFIG, **(config or {})}
    b, s_q, h_q, _ = q.shape
    q = q.contiguous()
    kv_cache = kv_cache.contiguous()
    rows = s_q * h_q
    block_h = cfg.get("BLOCK_H") or block_rows(rows)
    head_blocks = triton.cdiv(rows, block_h)
    if splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        splits = num_splits(b, head_blocks, block_table.shape[1], sms, waves=cfg["waves"])
    out_part = torch.empty(b, splits, rows, D_V, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(b, splits, rows, dtype=torch.float32, device=q.device)
    flat = kv_cache.view(-1)
    _mla_fp8_partial[(head_blocks, splits, b)](
        q,
        flat.view(FP8),
        flat.view(torch.float32),
        flat.view(torch.bfloat16),
        block_table,
        cache_seqlens,
        out_part,
        lse_part,
        softmax_scale * LOG2E,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        kv_cache.stride(0),
        block_table.stride(0),
        out_part.stride(0),
        out_part.stride(1),
        lse_part.stride(0),
        lse_part.stride(1),
        S_Q=s_q,
        H_Q=h_q,
        NUM_SPLITS=splits,
        BLOCK_H=block_h,
        PAGE_SIZE=PAGE,
        TILE_W=TILE,
        DR=D_ROPE,
        ROW_BYTES=TOKEN_BYTES,
        SCALES_OFF=SCALES_AT,
        ROPE_OFF=ROPE_AT,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return combine_splits(out_part, lse_part, s_q, h_q, q.dtype)
