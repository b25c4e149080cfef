"""The FP8 latent KV cache (FlashMLA's 656-byte token layout): quantisation error bounds, decode
over it against the BF16 cache, and the Triton kernel (in Triton's interpreter) against the torch
reference over the same bytes."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from fireflyer.kernels import fp8, mla, mla_fp8  # noqa: E402
from tests.unit.interpreted import run_interpreted  # noqa: E402

SCALE = 192**-0.5
# Decode over the FP8 cache against the BF16 cache, on unit-scale latents (what kv_a_layernorm
# writes): docs/serving.md quotes these bounds.
MAX_OUTPUT_DIFF = 1e-3  # fp8.calc_diff of the outputs (measured ≈ 6e-4)
MAX_LSE_ERROR = 0.15  # natural log, the worst row (measured ≤ 0.08)
MEAN_LSE_ERROR = 0.02  # natural log, over all rows (measured ≈ 0.011)


def _entries(tokens: int, g: torch.Generator) -> torch.Tensor:
    """Cache entries as the model writes them: an RMS-normalised latent and a RoPE key."""
    latent = torch.randn(tokens, mla.D_V, generator=g)
    rope = torch.randn(tokens, mla.D_QK - mla.D_V, generator=g)
    return torch.cat([latent, rope], dim=-1)


def paged_entries(  # type: ignore[no-untyped-def]
    b: int, s_q: int, h_q: int, seqlens: list[int], seed: int = 0
):
    """q BF16, fp32 entries [blocks, 64, 1, 576], a shuffled block table, seqlens."""
    g = torch.Generator().manual_seed(seed)
    pages = max(math.ceil(n / mla.PAGE) for n in seqlens)
    q = torch.randn(b, s_q, h_q, mla.D_QK, generator=g).to(torch.bfloat16)
    entries = _entries(b * pages * mla.PAGE, g).view(b * pages, mla.PAGE, 1, mla.D_QK)
    table = torch.randperm(b * pages, generator=g).to(torch.int32).view(b, pages)
    return q, entries, table, torch.tensor(seqlens, dtype=torch.int32)


def fp8_paged(b: int, s_q: int, h_q: int, seqlens: list[int], seed: int = 0):  # type: ignore[no-untyped-def]
    q, entries, table, lens = paged_entries(b, s_q, h_q, seqlens, seed)
    return q, mla_fp8.quantize_latent(entries), table, lens


def test_a_token_takes_656_bytes_about_half_of_bf16() -> None:
    rows = mla_fp8.quantize_latent(torch.randn(3, 7, mla.D_QK))
    assert rows.dtype == torch.uint8 and rows.shape == (3, 7, 656)
    assert mla_fp8.TOKEN_BYTES / (2 * mla.D_QK) < 0.57


def test_round_trip_error_is_within_e4m3_rounding_of_each_tile() -> None:
    g = torch.Generator().manual_seed(0)
    x = _entries(64, g)
    # Tiles of one token four decades apart: a scale per 128-wide tile keeps the small ones exact
    # to e4m3's precision, where one scale per token would flush them to zero.
    x[:, : mla_fp8.D_V] *= torch.tensor([1e3, 1.0, 1e-1, 1e-3]).repeat_interleave(128)
    back = mla_fp8.dequantize_latent(mla_fp8.quantize_latent(x))
    latent, rope = x[:, : mla_fp8.D_V], x[:, mla_fp8.D_V :]
    scales = latent.view(64, 4, 128).abs().amax(-1) / fp8.FP8_MAX
    bound = latent.abs() * 2**-4 + scales.repeat_interleave(128, dim=1) * 2**-9
    assert ((back[:, : mla_fp8.D_V] - latent).abs() <= bound).all()
    small = latent[:, 384:]
    close = (back[:, 384 : mla_fp8.D_V] - small).abs() <= small.abs() * 2**-4
    assert close.float().mean().item() > 0.95
    # The RoPE part is BF16: its only error is BF16 rounding.
    assert torch.equal(back[:, mla_fp8.D_V :], rope.to(torch.bfloat16).float())


def test_scales_are_powers_of_two_so_the_latent_dequantises_exactly_to_bf16() -> None:
    g = torch.Generator().manual_seed(3)
    x = _entries(256, g) * torch.logspace(-3, 3, 256)[:, None]
    rows = mla_fp8.quantize_latent(x)
    scales = rows[:, mla_fp8.SCALES_AT : mla_fp8.ROPE_AT].view(torch.float32)
    assert torch.equal(scales, torch.exp2(torch.log2(scales).round()))
    # Each scale is the smallest power of two that keeps its tile's largest value within e4m3.
    amax = x[:, : mla_fp8.D_V].view(256, 4, 128).abs().amax(-1)
    assert (amax / scales <= fp8.FP8_MAX).all() and (amax / scales > fp8.FP8_MAX / 2).all()
    # The decode kernel feeds the tensor cores BF16: no rounding the fp32 reference lacks.
    exact = mla_fp8.dequantize_latent(rows)
    assert torch.equal(mla_fp8.dequantize_latent(rows, torch.bfloat16).float(), exact)


def test_zero_rows_stay_zero_and_other_widths_are_refused() -> None:
    back = mla_fp8.dequantize_latent(mla_fp8.quantize_latent(torch.zeros(2, mla.D_QK)))
    assert back.abs().max().item() == 0.0
    with pytest.raises(ValueError, match="576"):
        mla_fp8.quantize_latent(torch.zeros(2, 512))
    with pytest.raises(ValueError, match="656"):
        mla_fp8.dequantize_latent(torch.zeros(2, 576, dtype=torch.uint8))


def test_decode_over_the_fp8_cache_stays_close_to_the_bf16_cache() -> None:
    q, entries, table, lens = paged_entries(4, 2, 16, [200, 64, 1000, 3], seed=2)
    bf16_out, bf16_lse = mla.mla_decode(q, entries.to(torch.bfloat16), table, lens, SCALE, backend="torch")
    cache = mla_fp8.quantize_latent(entries)
    out, lse = mla.mla_decode(q, cache, table, lens, SCALE, backend="torch")  # a uint8 cache: FP8
    assert out.shape == bf16_out.shape and out.dtype == torch.bfloat16
    assert fp8.calc_diff(out, bf16_out) < MAX_OUTPUT_DIFF
    finite = bf16_lse.isfinite()
    assert torch.equal(finite, lse.isfinite())
    lse_error = (lse[finite] - bf16_lse[finite]).abs()
    assert lse_error.max().item() < MAX_LSE_ERROR and lse_error.mean().item() < MEAN_LSE_ERROR


def test_fp8_reference_is_the_bf16_reference_over_the_dequantised_cache() -> None:
    q, cache, table, lens = fp8_paged(2, 1, 8, [130, 7], seed=4)
    dense = mla_fp8.dequantize_latent(cache)
    out, lse = mla_fp8.mla_decode_fp8_reference(q, cache, table, lens, SCALE)
    want_out, want_lse = mla.mla_decode_reference(q, dense, table, lens, SCALE)
    assert torch.equal(out, want_out) and torch.allclose(lse, want_lse)


def test_fp8_cache_refuses_the_official_backend_and_bad_layouts() -> None:
    q, cache, table, lens = fp8_paged(1, 1, 4, [10])
    with pytest.raises(ValueError, match="official"):
        mla.mla_decode(q, cache, table, lens, SCALE, backend="official")
    with pytest.raises(ValueError, match="656"):
        mla.mla_decode(q, cache[..., :600], table, lens, SCALE, backend="torch")


def test_triton_kernel_in_the_interpreter_equals_the_fp8_reference() -> None:
    pytest.importorskip("triton")
    errors = run_interpreted("tests.unit.mla_fp8_interpreted")
    # Both in fp32: only the summation order differs.
    assert errors["out_err"] <= 1e-4 and errors["lse_err"] <= 1e-4, errors
