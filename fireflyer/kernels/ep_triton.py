"""Triton kernel for the reductions of EP combine: out[r] = Σ_k w[r, k] · src[pos[r, k]]."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_H = 1024


@triton.jit
def _gather_sum_kernel(
    src, pos, weight, out, hidden, src_stride, out_stride, K: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = cols < hidden
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        p = tl.load(pos + row * K + k)
        w = tl.load(weight + row * K + k)
        present = p >= 0
        safe = tl.where(present, p, 0).to(tl.int64)
        values = tl.load(src + safe * src_stride + cols, mask=in_bounds & present, other=0.0)
        acc += values.to(tl.float32) * w
    tl.store(out + row.to(tl.int64) * out_stride + cols, acc.to(out.dtype.element_ty), mask=in_bounds)


def gather_sum(
    src: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    rows, k = pos.shape
    hidden = src.shape[1]
    out = torch.empty((rows, hidden), dtype=out_dtype, device=src.device)
    if rows == 0:
        return out
    grid = (rows, triton.cdiv(hidden, BLOCK_H))
    _gather_sum_kernel[grid](
        src,
        pos.to(torch.int32).contiguous(),
        weight.float().contiguous(),
        out,
        hidden,
        src.stride(0),
        out.stride(0),
        K=k,
        BLOCK=BLOCK_H,
    )
    return out
