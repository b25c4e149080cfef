"""Triton paged MLA decode: split-KV partial attention, then a combine step."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fireflyer.kernels.mla import D_QK, D_V, PAGE, num_splits

LOG2E = 1.4426950408889634
# Chosen by bench/kernels/tune_mla.py on an H100 (b=128, h_q=128, s_k=4096).
CONFIG = {"BLOCK_H": 64, "num_warps": 8, "num_stages": 2}


@triton.jit
def _mla_partial(
    Q,
    KV,
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
    DV: tl.constexpr,
    DR: tl.constexpr,
):
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
        kv_base = KV + blk * stride_kvblk + offs_n * (DV + DR)
        k_nope = tl.load(kv_base[:, None] + offs_v[None, :])
        k_pe = tl.load(kv_base[:, None] + DV + offs_r[None, :])
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


@triton.jit
def _mla_combine(
    OP,
    LP,
    OUT,
    LSE,
    stride_opb,
    stride_ops,
    stride_lpb,
    stride_lps,
    stride_ob,
    stride_lb,
    S_Q: tl.constexpr,
    H_Q: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DV: tl.constexpr,
    LN2: tl.constexpr,
):
    row = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_v = tl.arange(0, DV)
    m = float("-inf")
    for s in range(NUM_SPLITS):
        m = tl.maximum(m, tl.load(LP + pid_b * stride_lpb + s * stride_lps + row))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = 0.0
    acc = tl.zeros([DV], tl.float32)
    for s in range(NUM_SPLITS):
        w = tl.exp2(tl.load(LP + pid_b * stride_lpb + s * stride_lps + row) - m_safe)
        acc += w * tl.load(OP + pid_b * stride_opb + s * stride_ops + row * DV + offs_v)
        total += w
    total_safe = tl.where(total == 0.0, 1.0, total)
    sq = row // H_Q
    hh = row % H_Q
    tl.store(OUT + pid_b * stride_ob + row * DV + offs_v, (acc / total_safe).to(OUT.dtype.element_ty))
    lse = tl.where(total == 0.0, float("-inf"), (m_safe + tl.log2(total_safe)) * LN2)
    tl.store(LSE + pid_b * stride_lb + hh * S_Q + sq, lse)


def split_count(q: torch.Tensor, block_table: torch.Tensor, block_h: int) -> int:
    """Splits of the KV sequence for this batch on this device (see mla.num_splits)."""
    b, s_q, h_q, _ = q.shape
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return num_splits(b, triton.cdiv(s_q * h_q, block_h), block_table.shape[1], sms, waves=1.0)


def combine_splits(
    out_part: torch.Tensor, lse_part: torch.Tensor, s_q: int, h_q: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The splits' partial outputs [b, splits, s_q*h_q, 512] and log2-sum-exps merged into out
    [b, s_q, h_q, 512] (`dtype`) and lse [b, h_q, s_q] (natural log)."""
    b, splits, rows, _ = out_part.shape
    out = torch.empty(b, s_q, h_q, D_V, dtype=dtype, device=out_part.device)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=out_part.device)
    _mla_combine[(rows, b)](
        out_part,
        lse_part,
        out,
        lse,
        out_part.stride(0),
        out_part.stride(1),
        lse_part.stride(0),
        lse_part.stride(1),
        out.stride(0),
        lse.stride(0),
        S_Q=s_q,
        H_Q=h_q,
        NUM_SPLITS=splits,
        DV=D_V,
        LN2=math.log(2.0),
        num_warps=4,
    )
    return out, lse


def mla_decode_triton(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    splits: int | None = None,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = {**CONFIG, **(config or {})}
    b, s_q, h_q, _ = q.shape
    q = q.contiguous()
    rows = s_q * h_q
    head_blocks = triton.cdiv(rows, cfg["BLOCK_H"])
    if splits is None:
        splits = split_count(q, block_table, cfg["BLOCK_H"])
    out_part = torch.empty(b, splits, rows, D_V, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(b, splits, rows, dtype=torch.float32, device=q.device)
    _mla_partial[(head_blocks, splits, b)](
        q,
        kv_cache,
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
        DV=D_V,
        DR=D_QK - D_V,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return combine_splits(out_part, lse_part, s_q, h_q, q.dtype)
