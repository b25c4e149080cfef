"""The warp-specialised Gluon FP8 GEMMs against the torch references (Hopper only; skipped elsewhere)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from fireflyer.kernels import fp8  # noqa: E402
from fireflyer.kernels import fp8_gluon as fg  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not fg.HAVE_GLUON or not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
        reason="needs a Hopper GPU and Triton's Gluon",
    ),
]
# DeepSeek-V3's dense (N, K) shapes.
V3_SHAPES = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]


def _operands(m: int, n: int, k: int, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g)
    return (*fp8.quantize_per_token_group(a), *fp8.quantize_per_block(b))


@pytest.mark.parametrize("m", [1, 64, 128, 300, 4096])
@pytest.mark.parametrize("n,k", V3_SHAPES)
def test_dense_matches_reference_on_v3_shapes(m: int, n: int, k: int) -> None:
    a, a_s, b, b_s = _operands(m, n, k, seed=m + n)
    out = fg.gemm_fp8_gluon(a, a_s, b, b_s)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert fp8.calc_diff(out, fp8.gemm_fp8_reference(a, a_s, b, b_s)) < 1e-3


@pytest.mark.parametrize("name", sorted(fg.CONFIGS))
# K = 640 is five K steps: a two-step stage ends past K. N = 2112, 576 and 136 end in a partial
# column of tiles (64 or 8 valid columns), whose other columns TMA loads as zeros and never stores.
@pytest.mark.parametrize(
    "m,n,k", [(200, 2112, 512), (4096, 576, 1536), (17, 384, 7168), (130, 256, 640), (300, 136, 384)]
)
def test_every_config_matches_reference(name: str, m: int, n: int, k: int) -> None:
    a, a_s, b, b_s = _operands(m, n, k, seed=7)
    out = fg.gemm_fp8_gluon(a, a_s, b, b_s, config=fg.CONFIGS[name])
    ref = fp8.gemm_fp8_reference(a, a_s, b, b_s)
    assert fp8.calc_diff(out, ref) < 1e-3
    # The tails (rows past a tile, columns past a 128-block) are real values, not zeros or garbage.
    assert torch.isfinite(out.float()).all()
    assert fp8.calc_diff(out[-1:, -8:], ref[-1:, -8:]) < 1e-3


def test_unsupported_inputs_raise_value_error() -> None:
    a, a_s, b, b_s = _operands(64, 256, 512)
    with pytest.raises(ValueError):
        fg.gemm_fp8_gluon(a.to(torch.bfloat16), a_s, b, b_s)
    with pytest.raises(ValueError):
        fg.gemm_fp8_gluon(a, a_s, b[:250], b_s)  # N not a multiple of 8
    with pytest.raises(ValueError):
        fg.gemm_fp8_gluon(a, a_s[:, :2], b, b_s)


@pytest.mark.parametrize("name", ["128x128", "64x128", "128x128k2", "128x128k2p"])
def test_grouped_contiguous_matches_reference(name: str) -> None:
    groups, n, k = 4, 4096, 7168
    sizes = [128, 384, 0, 256]
    m = sum(sizes) + 128  # one padding tile
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(groups, n, k, device="cuda", dtype=torch.bfloat16)
    idx = torch.cat(
        [torch.full((s,), g, dtype=torch.int32) for g, s in enumerate(sizes)]
        + [torch.full((128,), -1, dtype=torch.int32)]
    ).cuda()
    a_q, a_s = fp8.quantize_per_token_group(a)
    b_q, b_s = fp8.quantize_per_block(b)
    out = fg.grouped_contiguous_gluon(a_q, a_s, b_q, b_s, idx, config=fg.CONFIGS[name])
    ref = fp8.grouped_gemm_fp8_contiguous(a_q, a_s, b_q, b_s, idx, backend="torch")
    assert fp8.calc_diff(out, ref) < 1e-3
    assert out[-128:].abs().max().item() == 0


def test_grouped_contiguous_with_a_partial_weight_block() -> None:
    groups, n, k = 3, 576, 1536  # N = 4.5 blocks of 128: tiles reach into the next expert's rows
    idx = torch.arange(groups, dtype=torch.int32, device="cuda").repeat_interleave(128)
    a_q, a_s = fp8.quantize_per_token_group(torch.randn(3 * 128, k, device="cuda", dtype=torch.bfloat16))
    b_q, b_s = fp8.quantize_per_block(torch.randn(groups, n, k, device="cuda", dtype=torch.bfloat16))
    out = fg.grouped_contiguous_gluon(a_q, a_s, b_q, b_s, idx)
    ref = fp8.grouped_gemm_fp8_contiguous(a_q, a_s, b_q, b_s, idx, backend="torch")
    assert fp8.calc_diff(out, ref) < 1e-3


@pytest.mark.parametrize("name", [None, "128x128k2", "64x128k2", "64x128k2p"])
@pytest.mark.parametrize("m_max", [64, 256])
def test_grouped_masked_matches_reference_and_leaves_other_rows(m_max: int, name: str | None) -> None:
    config = fg.CONFIGS[name] if name else None
    groups, n, k = 6, 4096, 7168
    a = torch.randn(groups, m_max, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(groups, n, k, device="cuda", dtype=torch.bfloat16)
    masked = torch.tensor([0, 1, 33, m_max // 2, m_max - 5, m_max], dtype=torch.int32, device="cuda")
    a_q, a_s = fp8.quantize_per_token_group(a.view(-1, k))
    a_q, a_s = a_q.view(groups, m_max, k), a_s.view(groups, m_max, -1)
    b_q, b_s = fp8.quantize_per_block(b)
    ref = fp8.grouped_gemm_fp8_masked(a_q, a_s, b_q, b_s, masked, backend="torch")
    sentinel = torch.full((groups, m_max, n), 7.0, device="cuda", dtype=torch.bfloat16)
    out = fg.grouped_masked_gluon(a_q, a_s, b_q, b_s, masked, out=sentinel, config=config)
    fresh = fg.grouped_masked_gluon(a_q, a_s, b_q, b_s, masked, config=config)
    for g in range(groups):
        mg = int(masked[g])
        if mg:
            assert fp8.calc_diff(out[g, :mg], ref[g, :mg]) < 1e-3
        assert (out[g, mg:] == 7.0).all()
        assert (fresh[g, mg:] == 0).all()
