"""FP8 (e4m3) block-scaled GEMMs in DeepSeek-V3's format: activations scaled per 1×128 group,
weights per 128×128 block, BF16 output. NT layout: out[m, n] = Σ_k a[m, k] · b[n, k].

- gemm_fp8: dense.
- grouped_gemm_fp8_contiguous: rows grouped by expert (each group's M a multiple of 128), an expert
  index per row (-1 for padding rows); weights [G, N, K].
- grouped_gemm_fp8_masked: activations [G, M_max, K] with per-expert valid row counts.
"""

from __future__ import annotations

import torch

from fireflyer.kernels.backend import Backend, gluon_or_fallback, gluon_unavailable, has_module, resolve

GROUP = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_per_token_group(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] → (e4m3 [M, K], fp32 scales [M, K/group]) with x ≈ q · scale."""
    m, k = x.shape
    if k % group:
        raise ValueError(f"K ({k}) must be a multiple of {group}")
    grouped = x.float().view(m, k // group, group)
    amax = grouped.abs().amax(dim=-1).clamp(min=1e-4)
    scale = amax / FP8_MAX
    q = (grouped / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(m, k)
    return q, scale


def quantize_per_block(w: torch.Tensor, block: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] (or [G, N, K]) → (e4m3, fp32 scales [⌈N/block⌉, K/block]) per block×block tile.
    N need not be a multiple of the block (DeepSeek-V3 has N = 2112): the last row block is partial."""
    if w.dim() == 3:
        pairs = [quantize_per_block(wi, block) for wi in w]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    n, k = w.shape
    if k % block:
        raise ValueError(f"K ({k}) must be a multiple of {block}")
    n_pad = -(-n // block) * block
    padded = torch.zeros(n_pad, k, dtype=torch.float32, device=w.device)
    padded[:n] = w.float()
    tiles = padded.view(n_pad // block, block, k // block, block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-4)
    scale = amax / FP8_MAX
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(n_pad, k)[:n]
    return q.contiguous(), scale


def dequantize_per_token_group(q: torch.Tensor, scale: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    m, k = q.shape
    return (q.float().view(m, k // group, group) * scale[..., None]).view(m, k)


def dequantize_per_block(
    q: torch.Tensor, scale: torch.Tensor, block: int | tuple[int, int] = GROUP
) -> torch.Tensor:
    """q · scale per block (rows × cols; one int for square blocks). The last row and column blocks
    may be partial, as in checkpoints whose N or K is not a multiple of the block."""
    rows, cols = (block, block) if isinstance(block, int) else block
    n, k = q.shape
    per_row = scale.float().repeat_interleave(rows, dim=0)[:n]  # [N, ⌈K/cols⌉]
    if k % cols == 0:
        return (q.float().view(n, k // cols, cols) * per_row[..., None]).view(n, k)
    return q.float() * per_row.repeat_interleave(cols, dim=1)[:, :k]


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 − 2·Σxy / Σ(x² + y²): 0 for identical tensors (DeepGEMM's measure)."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom) if denom > 0 else 0.0


def gemm_fp8_reference(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor
) -> torch.Tensor:
    return (dequantize_per_token_group(a, a_scale) @ dequantize_per_block(b, b_scale).T).to(torch.bfloat16)


def _check(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor) -> None:
    if a.dtype != FP8 or b.dtype != FP8:
        raise ValueError("a and b must be float8_e4m3fn")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"K differs: {a.shape[-1]} vs {b.shape[-1]}")
    blocks = (-(-b.shape[-2] // GROUP), b.shape[-1] // GROUP)
    if a_scale.shape[-1] != a.shape[-1] // GROUP or tuple(b_scale.shape[-2:]) != blocks:
        raise ValueError("scales must be 1×128 per activation row and 128×128 per weight block")


def _grouped_backend(backend: Backend, device: torch.device) -> str:
    """The grouped layouts have no path through DeepGEMM or cuBLAS here: where `auto` (or
    `cublas`) is asked for, our Gluon kernels run on Hopper (faster than the Triton ones on every
    grouped shape measured there, docs/benchmarks.md), else our Triton kernels, instead of the
    per-expert torch loop (which synchronises with the host). The dense table does not apply to
    them."""
    if backend in ("auto", "cublas"):
        if device.type == "cuda" and gluon_unavailable("grouped_gemm", device) is None:
            return "gluon"
        return "triton" if device.type == "cuda" and has_module("triton") else "torch"
    return resolve(backend, "grouped_gemm", device)


def pad_k_to_four_blocks(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The operands with K padded by zero columns (scales of one) to a multiple of four 128-wide
    blocks, the same product. cuBLASLt reads the weight scales with a leading dimension that is a
    multiple of 4, while torch 2.11 accepts only a leading dimension of exactly ⌈K/128⌉; where the
    two differ (K of 1–3, 5–7, … blocks) the unpadded call returned wrong results."""
    blocks = b_scale.shape[1]
    extra = -blocks % 4
    if not extra:
        return a, a_scale, b, b_scale
    columns = (blocks + extra) * GROUP - a.shape[1]
    a = torch.cat([a, a.new_zeros(a.shape[0], columns)], dim=1)
    b = torch.cat([b, b.new_zeros(b.shape[0], columns)], dim=1)
    a_scale = torch.cat([a_scale, a_scale.new_ones(a_scale.shape[0], extra)], dim=1)
    b_scale = torch.cat([b_scale, b_scale.new_ones(b_scale.shape[0], extra)], dim=1)
    return a, a_scale, b, b_scale


def gemm_fp8_cublas(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor
) -> torch.Tensor:
    """cuBLAS block-wise scaling (1×128 activations, 128×128 weights) through `torch._scaled_mm`:
    cuBLASLt wants the activation scales outer-dim-major and the weight as the column-major
    second operand, so both are passed as transposed views. It also needs M to be a multiple of 4
    (the scales' leading dimension): other M are padded with zero rows, which come out as zeros
    and are dropped; and K a multiple of four blocks (`pad_k_to_four_blocks`)."""
    a, a_scale, b, b_scale = pad_k_to_four_blocks(a, a_scale, b, b_scale)
    m = a.shape[0]
    pad = -m % 4
    if pad:
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
        a_scale = torch.cat([a_scale, a_scale.new_ones(pad, a_scale.shape[1])])
    out = torch._scaled_mm(
        a,
        b.t(),
        scale_a=a_scale.t().contiguous().t(),
        scale_b=b_scale.t(),
        out_dtype=torch.bfloat16,
    )
    return out[:m] if pad else out


def gemm_fp8(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, backend: Backend = "auto"
) -> torch.Tensor:
    """[M, K] × [N, K]ᵀ → [M, N] BF16."""
    _check(a, a_scale, b, b_scale)
    chosen = resolve(backend, "gemm", a.device, rows=a.shape[0])
    if chosen == "gluon":
        from fireflyer.kernels.fp8_gluon import gemm_fp8_gluon

        done = gluon_or_fallback(backend, lambda: gemm_fp8_gluon(a, a_scale, b, b_scale))
        if done is not None:
            return done
        chosen = "triton"
    if chosen == "cublas":
        return gemm_fp8_cublas(a, a_scale, b, b_scale)
    if chosen == "triton":
        from fireflyer.kernels.fp8_triton import gemm_fp8_triton

        return gemm_fp8_triton(a, a_scale, b, b_scale)
    if chosen == "official":
        import deep_gemm

        out = torch.empty(a.shape[0], b.shape[0], dtype=torch.bfloat16, device=a.device)
        deep_gemm.fp8_gemm_nt((a, a_scale), (b, b_scale), out)
        return out
    return gemm_fp8_reference(a, a_scale, b, b_scale)


def grouped_gemm_fp8_contiguous(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    m_indices: torch.Tensor,
    backend: Backend = "auto",
) -> torch.Tensor:
    """a [M, K] with rows grouped by expert (m_indices[r] = expert of row r, −1 for padding),
    b [G, N, K] → [M, N]; padding rows come out as zeros."""
    _check(a, a_scale, b, b_scale)
    chosen = _grouped_backend(backend, a.device)
    if chosen == "gluon":
        from fireflyer.kernels.fp8_gluon import grouped_contiguous_gluon

        done = gluon_or_fallback(backend, lambda: grouped_contiguous_gluon(a, a_scale, b, b_scale, m_indices))
        if done is not None:
            return done
        chosen = "triton"
    if chosen == "triton":
        from fireflyer.kernels.fp8_triton import grouped_contiguous_triton

        return grouped_contiguous_triton(a, a_scale, b, b_scale, m_indices)
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.bfloat16, device=a.device)
    for g in range(b.shape[0]):
        rows = (m_indices == g).nonzero().flatten()
        if rows.numel():
            out[rows] = gemm_fp8_reference(a[rows], a_scale[rows], b[g], b_scale[g])
    return out


def grouped_gemm_fp8_masked(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    masked_m: torch.Tensor,
    backend: Backend = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """a [G, M_max, K], b [G, N, K], masked_m [G] valid rows per expert → [G, M_max, N]; rows at or
    past masked_m[g] are left as zeros. With `out` (BF16 [G, M_max, N]) the valid rows are written
    there and the others left as they were (a caller that never reads them skips the zeroing)."""
    _check(a, a_scale, b, b_scale)
    chosen = _grouped_backend(backend, a.device)
    if chosen == "gluon":
        from fireflyer.kernels.fp8_gluon import grouped_masked_gluon

        done = gluon_or_fallback(
            backend, lambda: grouped_masked_gluon(a, a_scale, b, b_scale, masked_m, out=out)
        )
        if done is not None:
            return done
        chosen = "triton"
    if chosen == "triton":
        from fireflyer.kernels.fp8_triton import grouped_masked_triton

        return grouped_masked_triton(a, a_scale, b, b_scale, masked_m, out=out)
    if out is None:
        out = torch.zeros(a.shape[0], a.shape[1], b.shape[1], dtype=torch.bfloat16, device=a.device)
    for g in range(a.shape[0]):
        m = int(masked_m[g])
        if m:
            out[g, :m] = gemm_fp8_reference(a[g, :m], a_scale[g, :m], b[g], b_scale[g])
    return out
