"""Triton paged MLA decode over the FP8 latent cache (layout: fireflyer.kernels.mla_fp8).

The same split-KV partial attention and combine as the BF16 kernel (mla_triton), but each page
is read as 656 bytes per token: the e4m3 latent, its 4 fp32 tile scales and the BF16 RoPE part,
through three typed views of the same bytes. The latent is scaled in registers and fed to the
tensor cores in the query's dtype, so HBM carries 0.57× the BF16 cache's bytes. The quantiser's
scales are powers of two, so the scaled latent is exact in BF16 and the scores equal the fp32
reference's up to summation order.

Measured slower than the BF16 kernel on the H200 all the same (docs/benchmarks.md): the per-page
dequantisation sits between the loads and the tensor cores and nothing overlaps it. Scaling the
[heads, 64] partial products per 128-wide tile instead (4 dots for QKᵀ and 4 for PV per page), and
scaling in BF16 over narrower token steps, were measured slower still, so this single-dot form
stays.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fireflyer.kernels.mla import PAGE
from fireflyer.kernels.mla_fp8 import D_ROPE, FP8, ROPE_AT, SCALES_AT, TILE, TILES, TOKEN_BYTES
from fireflyer.kernels.mla_triton import CONFIG, LOG2E, combine_splits, split_count

D_V = TILES * TILE


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
    N_TILES: tl.constexpr,
    DR: tl.constexpr,
    ROW_BYTES: tl.constexpr,
    SCALES_OFF: tl.constexpr,
    ROPE_OFF: tl.constexpr,
):
    # KV8, KVS and KVR view the same bytes as e4m3, fp32 and bf16; stride_kvblk is in bytes.
    DV: tl.constexpr = TILE_W * N_TILES
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
    offs_v = tl.arange(0, DV)
    offs_r = tl.arange(0, DR)
    offs_t = tl.arange(0, N_TILES)
    offs_c = tl.arange(0, TILE_W)
    q_base = Q + pid_b * stride_qb + sq * stride_qs + hh * stride_qh
    q_nope = tl.load(q_base[:, None] + offs_v[None, :], mask=row_ok[:, None], other=0.0)
    q_pe = tl.load(q_base[:, None] + DV + offs_r[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, DV], tl.float32)
    offs_n = tl.arange(0, PAGE_SIZE)
    query_pos = seqlen - S_Q + sq
    for page in range(first, last):
        blk = tl.load(BT + pid_b * stride_btb + page).to(tl.int64)
        row_bytes = blk * stride_kvblk + offs_n * ROW_BYTES  # [PAGE] byte offset of each token
        tile_at = offs_t[None, :, None] * TILE_W + offs_c[None, None, :]
        k_fp8 = tl.load(KV8 + row_bytes[:, None, None] + tile_at)  # [PAGE, tiles, tile]
        # The same rows in fp32 and bf16 elements (every offset is a multiple of the width).
        row_f32 = blk * (stride_kvblk // 4) + offs_n * (ROW_BYTES // 4) + SCALES_OFF // 4
        row_bf16 = blk * (stride_kvblk // 2) + offs_n * (ROW_BYTES // 2) + ROPE_OFF // 2
        k_scale = tl.load(KVS + row_f32[:, None] + offs_t[None, :])
        # fp32 then the query's dtype: exact for the quantiser's power-of-two scales, and measured
        # faster than converting e4m3 to BF16 and scaling there.
        k_tiles = k_fp8.to(tl.float32) * k_scale[:, :, None]
        k_nope = tl.reshape(k_tiles, (PAGE_SIZE, DV)).to(q_nope.dtype)
        k_pe = tl.load(KVR + row_bf16[:, None] + offs_r[None, :]).to(q_pe.dtype)
        s = tl.dot(q_nope, tl.trans(k_nope)) + tl.dot(q_pe, tl.trans(k_pe))
        s = s * scale_log2
        pos = page * PAGE_SIZE + offs_n
        keep = (pos[None, :] < seqlen) & (pos[None, :] <= query_pos[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k_nope.dtype), k_nope)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    op = OP + pid_b * stride_opb + pid_s * stride_ops + rows[:, None] * DV + offs_v[None, :]
    tl.store(op, out, mask=row_ok[:, None])
    tl.store(LP + pid_b * stride_lpb + pid_s * stride_lps + rows, lse, mask=row_ok)


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
    head_blocks = triton.cdiv(rows, cfg["BLOCK_H"])
    if splits is None:
        splits = split_count(q, block_table, cfg["BLOCK_H"])
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
        BLOCK_H=cfg["BLOCK_H"],
        PAGE_SIZE=PAGE,
        TILE_W=TILE,
        N_TILES=TILES,
        DR=D_ROPE,
        ROW_BYTES=TOKEN_BYTES,
        SCALES_OFF=SCALES_AT,
        ROPE_OFF=ROPE_AT,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return combine_splits(out_part, lse_part, s_q, h_q, q.dtype)
