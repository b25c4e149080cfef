"""Triton FP8 block-scaled GEMMs. Each K step multiplies a 128-wide slice in FP8 on the tensor
cores and promotes the partial sum to fp32 with its two scales (the activation row's and the
weight block's), as DeepSeek-V3 prescribes for accuracy."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GROUP = 128
CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=5),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=6),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "GROUP_M": 8}, num_warps=4, num_stages=4),
]


@triton.jit
def _fp8_tile(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    offs_m,
    offs_n,
    M,
    N,
    K,
    stride_am,
    stride_asm,
    stride_bn,
    stride_bsn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None]
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_steps = tl.cdiv(K, BLOCK_K)
    for kk in range(k_steps):
        a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        a_s = tl.load(as_ptr + offs_m * stride_asm + kk, mask=m_ok, other=0.0)
        b_s = tl.load(bs_ptr + (offs_n // 128) * stride_bsn + kk, mask=n_ok, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.autotune(configs=CONFIGS, key=["M_KEY", "N", "K"])
@triton.jit
def _gemm_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    c_ptr,
    M,
    N,
    K,
    M_KEY,
    stride_am,
    stride_asm,
    stride_bn,
    stride_bsn,
    stride_cm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: neighbouring programs share B tiles in L2.
    per_group = GROUP_M * grid_n
    group_id = pid // per_group
    first_m = group_id * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _fp8_tile(
        a_ptr,
        as_ptr,
        b_ptr,
        bs_ptr,
        offs_m,
        offs_n,
        M,
        N,
        K,
        stride_am,
        stride_asm,
        stride_bn,
        stride_bsn,
        BLOCK_M,
        BLOCK_N,
        128,
    )
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(tl.bfloat16), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# Tiles must not straddle two experts' rows: BLOCK_M ≤ 128 only.
CONTIGUOUS_CONFIGS = [c for c in CONFIGS if c.kwargs["BLOCK_M"] <= GROUP]


@triton.autotune(configs=CONTIGUOUS_CONFIGS, key=["M_KEY", "N", "K"])
@triton.jit
def _grouped_contiguous_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    c_ptr,
    idx_ptr,
    M,
    N,
    K,
    M_KEY,
    stride_am,
    stride_asm,
    stride_bg,
    stride_bn,
    stride_bsg,
    stride_bsn,
    stride_cm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Groups are aligned to 128 rows, so a tile's rows share one expert (or are padding).
    expert = tl.load(idx_ptr + pid_m * BLOCK_M)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if expert < 0:
        tl.store(c_ptrs, tl.zeros((BLOCK_M, BLOCK_N), tl.bfloat16), mask=mask)
    else:
        acc = _fp8_tile(
            a_ptr,
            as_ptr,
            b_ptr + expert.to(tl.int64) * stride_bg,
            bs_ptr + expert * stride_bsg,
            offs_m,
            offs_n,
            M,
            N,
            K,
            stride_am,
            stride_asm,
            stride_bn,
            stride_bsn,
            BLOCK_M,
            BLOCK_N,
            128,
        )
        tl.store(c_ptrs, acc.to(tl.bfloat16), mask=mask)


@triton.autotune(configs=CONFIGS, key=["M_KEY", "N", "K"])
@triton.jit
def _grouped_masked_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    c_ptr,
    mask_ptr,
    M,
    N,
    K,
    M_KEY,
    stride_ag,
    stride_am,
    stride_asg,
    stride_asm,
    stride_bg,
    stride_bn,
    stride_bsg,
    stride_bsn,
    stride_cg,
    stride_cm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    g = tl.program_id(2)
    valid = tl.load(mask_ptr + g)
    if pid_m * BLOCK_M < valid:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        gl = g.to(tl.int64)
        acc = _fp8_tile(
            a_ptr + gl * stride_ag,
            as_ptr + gl * stride_asg,
            b_ptr + gl * stride_bg,
            bs_ptr + gl * stride_bsg,
            offs_m,
            offs_n,
            valid,
            N,
            K,
            stride_am,
            stride_asm,
            stride_bn,
            stride_bsn,
            BLOCK_M,
            BLOCK_N,
            128,
        )
        c_ptrs = c_ptr + gl * stride_cg + offs_m[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(tl.bfloat16), mask=(offs_m[:, None] < valid) & (offs_n[None, :] < N))


def _m_key(m: int) -> int:
    """Autotuning key for M: its power-of-two bucket (all M ≥ 4096 share one: large tiles win there),
    so that a serving engine whose token count changes every step tunes a shape at most 13 times
    rather than once per count."""
    return int(min(triton.next_power_of_2(max(m, 1)), 4096))


def gemm_fp8_triton(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor
) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    a_scale = a_scale.contiguous()
    b_scale = b_scale.contiguous()

    def grid(meta: dict[str, int]) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _gemm_kernel[grid](
        a,
        a_scale,
        b,
        b_scale,
        c,
        m,
        n,
        k,
        _m_key(m),
        a.stride(0),
        a_scale.stride(0),
        b.stride(0),
        b_scale.stride(0),
        c.stride(0),
    )
    return c


def grouped_contiguous_triton(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, m_indices: torch.Tensor
) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[1]
    if m % GROUP:
        raise ValueError(f"contiguous layout needs M ({m}) aligned to {GROUP}")
    c = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    a_scale = a_scale.contiguous()
    b_scale = b_scale.contiguous()
    idx = m_indices.to(torch.int32).contiguous()

    def grid(meta: dict[str, int]) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))

    _grouped_contiguous_kernel[grid](
        a,
        a_scale,
        b,
        b_scale,
        c,
        idx,
        m,
        n,
        k,
        _m_key(m),
        a.stride(0),
        a_scale.stride(0),
        b.stride(0),
        b.stride(1),
        b_scale.stride(0),
        b_scale.stride(1),
        c.stride(0),
    )
    return c


def grouped_masked_triton(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    masked_m: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    g, m, k = a.shape
    n = b.shape[1]
    c = torch.zeros(g, m, n, dtype=torch.bfloat16, device=a.device) if out is None else out
    a_scale = a_scale.contiguous()
    b_scale = b_scale.contiguous()
    mask = masked_m.to(torch.int32).contiguous()

    def grid(meta: dict[str, int]) -> tuple[int, int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]), g)

    _grouped_masked_kernel[grid](
        a,
        a_scale,
        b,
        b_scale,
        c,
        mask,
        m,
        n,
        k,
        _m_key(m),
        a.stride(0),
        a.stride(1),
        a_scale.stride(0),
        a_scale.stride(1),
        b.stride(0),
        b.stride(1),
        b_scale.stride(0),
        b_scale.stride(1),
        c.stride(0),
        c.stride(1),
    )
    return c
