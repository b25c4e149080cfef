"""Triton paged MLA decode: split-KV partial attention, then a combine step."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fireflyer.kernels.mla import D_QK, D_V, PAGE, num_splits
from fireflyer.kernels.mla_schedule import MlaSchedule, balanced_schedule

LOG2E = 1.4426950408889634
# Chosen by bench/kernels/tune_mla.py on an H100 (b=128, h_q=128, s_k=4096).
CONFIG = {"BLOCK_H": 64, "num_warps": 8, "num_stages": 2}


@triton.jit
def _attend(
    Q,
    KV,
    BT,
    seq,
    seqlen,
    first,
    last,
    rows,
    scale_log2,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kvblk,
    stride_btb,
    S_Q: tl.constexpr,
    H_Q: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    DV: tl.constexpr,
    DR: tl.constexpr,
):
    """Query rows `rows` of sequence `seq` attended to its pages [first, last): the normalised
    partial output [BLOCK_H, DV] and its log2-sum-exp (−∞ where no key was visible)."""
    row_ok = rows < S_Q * H_Q
    sq = rows // H_Q
    hh = rows % H_Q
    offs_v = tl.arange(0, DV)
    offs_r = tl.arange(0, DR)
    q_base = Q + seq * stride_qb + sq * stride_qs + hh * stride_qh
    q_nope = tl.load(q_base[:, None] + offs_v[None, :], mask=row_ok[:, None], other=0.0)
    q_pe = tl.load(q_base[:, None] + DV + offs_r[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, DV], tl.float32)
    offs_n = tl.arange(0, PAGE_SIZE)
    query_pos = seqlen - S_Q + sq
    for page in range(first, last):
        blk = tl.load(BT + seq * stride_btb + page).to(tl.int64)
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
    return out, lse


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
    seqlen = tl.load(SEQ + pid_b)
    pages = tl.cdiv(seqlen, PAGE_SIZE)
    per_split = tl.cdiv(pages, NUM_SPLITS)
    first = pid_s * per_split
    last = tl.minimum(first + per_split, pages)
    out, lse = _attend(
        Q, KV, BT, pid_b, seqlen, first, last, rows, scale_log2, stride_qb, stride_qs, stride_qh,
        stride_kvblk, stride_btb, S_Q, H_Q, BLOCK_H, PAGE_SIZE, DV, DR,
    )  # fmt: skip
    offs_v = tl.arange(0, DV)
    op = OP + pid_b * stride_opb + pid_s * stride_ops + rows[:, None] * DV + offs_v[None, :]
    tl.store(op, out, mask=row_ok[:, None])
    tl.store(LP + pid_b * stride_lpb + pid_s * stride_lps + rows, lse, mask=row_ok)


@triton.jit
def _mla_partial_runs(
    Q,
    KV,
    BT,
    SEQ,
    RUNS,
    OFFSET,
    FIRST_RUN,
    OP,
    LP,
    scale_log2,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kvblk,
    stride_btb,
    S_Q: tl.constexpr,
    H_Q: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    DV: tl.constexpr,
    DR: tl.constexpr,
):
    """One run of a length-balanced schedule (mla_schedule): the pages from (first sequence,
    first page) to (last sequence, end page), each sequence's share into its own partial slot."""
    pid_h = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < S_Q * H_Q
    offs_v = tl.arange(0, DV)
    first_seq = tl.load(RUNS + pid_r * 4)
    first_page = tl.load(RUNS + pid_r * 4 + 1)
    last_seq = tl.load(RUNS + pid_r * 4 + 2)
    end_page = tl.load(RUNS + pid_r * 4 + 3)
    for seq in range(first_seq, last_seq + 1):
        seqlen = tl.load(SEQ + seq)
        first = tl.where(seq == first_seq, first_page, 0)
        last = tl.where(seq == last_seq, end_page, tl.cdiv(seqlen, PAGE_SIZE))
        if last > first:  # a sequence without KV inside the run owns no slot of this run
            out, lse = _attend(
                Q, KV, BT, seq, seqlen, first, last, rows, scale_log2, stride_qb, stride_qs,
                stride_qh, stride_kvblk, stride_btb, S_Q, H_Q, BLOCK_H, PAGE_SIZE, DV, DR,
            )  # fmt: skip
            slot = (tl.load(OFFSET + seq) + pid_r - tl.load(FIRST_RUN + seq)).to(tl.int64)
            op = OP + slot * (S_Q * H_Q * DV) + rows[:, None] * DV + offs_v[None, :]
            tl.store(op, out, mask=row_ok[:, None])
            tl.store(LP + slot * (S_Q * H_Q) + rows, lse, mask=row_ok)


@triton.jit
def _mla_combine(
    OP,
    LP,
    OUT,
    LSE,
    OFFSET,
    COUNT,
    stride_ob,
    stride_lb,
    S_Q: tl.constexpr,
    H_Q: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DV: tl.constexpr,
    LN2: tl.constexpr,
    RUNS: tl.constexpr,
):
    """Row `row` of sequence pid_b from its partial slots: NUM_SPLITS consecutive ones per
    sequence, or (RUNS) COUNT[b] of them from OFFSET[b]; no slot at all gives zeros, lse −∞."""
    row = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_v = tl.arange(0, DV)
    if RUNS:
        first = tl.load(OFFSET + pid_b).to(tl.int64)
        count = tl.load(COUNT + pid_b)
    else:
        first = pid_b.to(tl.int64) * NUM_SPLITS
        count = NUM_SPLITS
    lp = LP + first * (S_Q * H_Q) + row
    op = OP + first * (S_Q * H_Q * DV) + row * DV + offs_v
    m = float("-inf")
    for s in range(count):
        m = tl.maximum(m, tl.load(lp + s * (S_Q * H_Q)))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = 0.0
    acc = tl.zeros([DV], tl.float32)
    for s in range(count):
        w = tl.exp2(tl.load(lp + s * (S_Q * H_Q)) - m_safe)
        acc += w * tl.load(op + s * (S_Q * H_Q * DV))
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
    out_part: torch.Tensor,
    lse_part: torch.Tensor,
    s_q: int,
    h_q: int,
    dtype: torch.dtype,
    schedule: MlaSchedule | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial outputs [b, splits, s_q*h_q, 512] and log2-sum-exps [b, splits, s_q*h_q]
    (contiguous) merged into out [b, s_q, h_q, 512] (`dtype`) and lse [b, h_q, s_q] (natural log).
    With a schedule the partials are [slots, s_q*h_q, …], each sequence's at its split offset."""
    if schedule is None:
        b, splits, rows, _ = out_part.shape
        offset = count = lse_part  # unread without RUNS
    else:
        b, splits, rows = schedule.split_count.shape[0], 0, out_part.shape[1]
        offset, count = schedule.split_offset, schedule.split_count
    assert out_part.is_contiguous() and lse_part.is_contiguous()
    out = torch.empty(b, s_q, h_q, D_V, dtype=dtype, device=out_part.device)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=out_part.device)
    _mla_combine[(rows, b)](
        out_part,
        lse_part,
        out,
        lse,
        offset,
        count,
        out.stride(0),
        lse.stride(0),
        S_Q=s_q,
        H_Q=h_q,
        NUM_SPLITS=splits,
        DV=D_V,
        LN2=math.log(2.0),
        RUNS=schedule is not None,
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
    schedule: MlaSchedule | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`schedule` (mla_schedule.balanced_schedule over 64-token tiles): length-balanced runs in
    place of `splits` uniform splits per sequence."""
    cfg = {**CONFIG, **(config or {})}
    b, s_q, h_q, _ = q.shape
    q = q.contiguous()
    rows = s_q * h_q
    head_blocks = triton.cdiv(rows, cfg["BLOCK_H"])
    common = {
        "S_Q": s_q,
        "H_Q": h_q,
        "BLOCK_H": cfg["BLOCK_H"],
        "PAGE_SIZE": PAGE,
        "DV": D_V,
        "DR": D_QK - D_V,
        "num_warps": cfg["num_warps"],
        "num_stages": cfg["num_stages"],
    }
    if schedule is not None:
        if schedule.tile_tokens != PAGE or schedule.split_count.shape[0] != b:
            raise ValueError(f"the schedule must be over {PAGE}-token tiles of these {b} sequences")
        out_part = torch.empty(schedule.slots, rows, D_V, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(schedule.slots, rows, dtype=torch.float32, device=q.device)
        _mla_partial_runs[(head_blocks, schedule.parts)](
            q,
            kv_cache,
            block_table,
            cache_seqlens,
            schedule.runs,
            schedule.split_offset,
            schedule.first_run,
            out_part,
            lse_part,
            softmax_scale * LOG2E,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            kv_cache.stride(0),
            block_table.stride(0),
            **common,
        )
        return combine_splits(out_part, lse_part, s_q, h_q, q.dtype, schedule)
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
        NUM_SPLITS=splits,
        **common,
    )
    return combine_splits(out_part, lse_part, s_q, h_q, q.dtype)


def balanced_parts(q: torch.Tensor, block_h: int = CONFIG["BLOCK_H"], waves: float = 1.0) -> int:
    """Runs for a balanced schedule: enough programs (query tiles × runs) to fill the GPU
    `waves` times over."""
    head_blocks = triton.cdiv(q.shape[1] * q.shape[2], block_h)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
    return max(1, int(waves * sms) // head_blocks)


def mla_decode_triton_balanced(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    parts: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel over a balanced schedule made here (in a decode step, make the
    schedule once and pass it to every layer's `mla_decode_triton`)."""
    schedule = balanced_schedule(cache_seqlens, parts or balanced_parts(q), PAGE)
    return mla_decode_triton(q, kv_cache, block_table, cache_seqlens, softmax_scale, schedule=schedule)
