"""The FP8 latent KV cache for MLA decode: FlashMLA's FP8 token layout, 656 bytes per token.

A token's cache row is one byte string:
- bytes [0, 512): the 512-wide compressed latent (the no-RoPE part, also the value) in e4m3,
  quantised in 4 tiles of 128, each with its own scale;
- bytes [512, 528): those 4 scales, fp32 (latent ≈ e4m3 · scale of its tile). This quantiser
  writes powers of two (the tile's max |x| / 448, rounded up), so e4m3 · scale is exact in BF16
  and the decode kernel's BF16 operands carry no rounding the fp32 reference lacks (with
  arbitrary scales that rounding moved the log-sum-exp by up to 0.005);
- bytes [528, 656): the 64-wide RoPE key, BF16. Kept unquantised: it carries the position, and
  rounding it to 3 mantissa bits moves the attention scores far more than the latent's rounding.

656 bytes against 1152 for a BF16 row (0.57×). Every offset is aligned to its element (the scales
to 4 bytes, the RoPE part to 2) and each row starts on 16 bytes, so the kernels load the row
through typed views of the same bytes. The cache tensor is uint8 [blocks, 64, 656]: the engine,
the KV tier and the hand-off move it as plain bytes.
"""

from __future__ import annotations

import torch

from fireflyer.kernels.backend import Backend, resolve
from fireflyer.kernels.mla import D_QK, D_ROPE, D_V, PAGE, check_shapes, mla_decode_reference

TILE = 128
TILES = D_V // TILE  # 4 scales per token
SCALES_AT = D_V  # byte offset of the scales
ROPE_AT = SCALES_AT + 4 * TILES  # byte offset of the BF16 RoPE part: 528
TOKEN_BYTES = ROPE_AT + 2 * D_ROPE  # 656
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# A tile of zeros (unwritten rows, padding) still gets a positive scale: dequantises to zeros.
MIN_SCALE = 1e-12


def is_fp8_cache(kv_cache: torch.Tensor) -> bool:
    """A cache in this layout (a uint8 tensor whose rows are TOKEN_BYTES wide)."""
    return kv_cache.dtype == torch.uint8 and kv_cache.shape[-1] == TOKEN_BYTES


def quantize_latent(entry: torch.Tensor) -> torch.Tensor:
    """[..., 576] latent + RoPE (any float dtype) → uint8 [..., 656] rows of this layout."""
    if entry.shape[-1] != D_QK:
        raise ValueError(f"expected [..., {D_QK}] latent entries, got {tuple(entry.shape)}")
    lead = entry.shape[:-1]
    flat = entry.reshape(-1, D_QK)
    tiles = flat[:, :D_V].float().view(-1, TILES, TILE)
    least = (tiles.abs().amax(dim=-1) / FP8_MAX).clamp(min=MIN_SCALE)  # [n, 4]
    scale = torch.exp2(torch.ceil(torch.log2(least)))  # a power of two: see the module docstring
    quantized = (tiles / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(-1, D_V)
    out = torch.empty(flat.shape[0], TOKEN_BYTES, dtype=torch.uint8, device=entry.device)
    out[:, :SCALES_AT] = quantized.view(torch.uint8)
    out[:, SCALES_AT:ROPE_AT] = scale.contiguous().view(torch.uint8)
    out[:, ROPE_AT:] = flat[:, D_V:].to(torch.bfloat16).contiguous().view(torch.uint8)
    return out.view(*lead, TOKEN_BYTES)


def dequantize_latent(rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., 656] rows → [..., 576] latent + RoPE in `dtype`."""
    if not is_fp8_cache(rows):
        raise ValueError(f"expected uint8 [..., {TOKEN_BYTES}] rows, got {rows.dtype} {tuple(rows.shape)}")
    lead = rows.shape[:-1]
    flat = rows.reshape(-1, TOKEN_BYTES)
    latent = flat[:, :SCALES_AT].view(FP8).float().view(-1, TILES, TILE)
    scale = flat[:, SCALES_AT:ROPE_AT].view(torch.float32)  # [n, 4]
    rope = flat[:, ROPE_AT:].view(torch.bfloat16).float()
    out = torch.cat([(latent * scale[..., None]).view(-1, D_V), rope], dim=-1)
    return out.to(dtype).view(*lead, D_QK)


def check_fp8_shapes(
    q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor
) -> None:
    if kv_cache.dtype != torch.uint8:
        raise ValueError(f"the FP8 kv_cache is uint8 bytes, got {kv_cache.dtype}")
    check_shapes(q, kv_cache, block_table, cache_seqlens, token_width=TOKEN_BYTES)


def mla_decode_fp8_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition of correct for the FP8 cache: dequantise the blocks the batch uses, then the
    BF16 cache's reference attention (in fp32) over them."""
    check_fp8_shapes(q, kv_cache, block_table, cache_seqlens)
    used = torch.unique(block_table.long())
    dense = dequantize_latent(kv_cache[used]).view(-1, PAGE, 1, D_QK)
    compact_table = torch.searchsorted(used, block_table.long()).to(torch.int32)
    return mla_decode_reference(q, dense, compact_table, cache_seqlens, softmax_scale)


def mla_decode_fp8(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged MLA decode over the FP8 cache: the Triton kernel (FP8 loads, dequantised in registers)
    on CUDA, the torch reference elsewhere. FlashMLA's dense decode and our Gluon kernel take no
    FP8 cache in this layout, so `auto` never picks them here and naming them is refused."""
    check_fp8_shapes(q, kv_cache, block_table, cache_seqlens)
    if backend in ("official", "gluon"):
        raise ValueError(f"the FP8 KV cache decodes with the triton or torch backend, not {backend!r}")
    chosen = resolve(backend, "mla", q.device, rows=q.shape[1] * q.shape[2])
    if chosen in ("official", "gluon"):  # a measured auto choice for the BF16 cache
        chosen = "triton" if q.device.type == "cuda" else "torch"
    if chosen == "triton":
        from fireflyer.kernels.mla_fp8_triton import mla_decode_fp8_triton

        return mla_decode_fp8_triton(q, kv_cache, block_table, cache_seqlens, softmax_scale)
    return mla_decode_fp8_reference(q, kv_cache, block_table, cache_seqlens, softmax_scale)
