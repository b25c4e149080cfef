"""Kernel backends against the torch references on a CUDA device (skipped without one)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from fireflyer.kernels import fp8, mla, mla_fp8  # noqa: E402
from fireflyer.kernels.backend import has_module  # noqa: E402
from fireflyer.kernels.cli import render_table  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not has_module("triton"), reason="needs CUDA and Triton"
    ),
]
SCALE = 192**-0.5


def _mla_inputs(b: int, s_q: int, h_q: int, seqlens: list[int], seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator(device="cuda").manual_seed(seed)
    max_pages = max(math.ceil(n / mla.PAGE) for n in seqlens)
    num_blocks = b * max_pages
    q = torch.randn(b, s_q, h_q, mla.D_QK, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(num_blocks, mla.PAGE, 1, mla.D_QK, device="cuda", dtype=torch.bfloat16, generator=g)
    perm = torch.randperm(num_blocks, device="cuda", generator=g).to(torch.int32)
    table = perm.view(b, max_pages)
    lens = torch.tensor(seqlens, dtype=torch.int32, device="cuda")
    return q, kv, table, lens


def _cos_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    return fp8.calc_diff(x, y)


@pytest.mark.parametrize(
    "b,s_q,h_q,seqlens",
    [
        (2, 1, 16, [1, 64]),
        (3, 2, 128, [63, 65, 700]),
        (4, 1, 128, [4096, 1, 333, 2048]),
        (2, 2, 64, [129, 4095]),
        (8, 1, 128, [8192] * 8),  # DeepSeek-V3 decode shape
    ],
)
def test_mla_triton_matches_reference(b: int, s_q: int, h_q: int, seqlens: list[int]) -> None:
    q, kv, table, lens = _mla_inputs(b, s_q, h_q, seqlens)
    out, lse = mla.mla_decode(q, kv, table, lens, SCALE, backend="triton")
    ref_out, ref_lse = mla.mla_decode(q, kv, table, lens, SCALE, backend="torch")
    assert (out.float() - ref_out.float()).abs().max().item() <= 8e-3
    assert _cos_diff(out, ref_out) <= 5e-6
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)


def test_mla_split_count_does_not_change_the_result() -> None:
    from fireflyer.kernels.mla_triton import mla_decode_triton

    q, kv, table, lens = _mla_inputs(2, 2, 128, [1000, 3000], seed=3)
    one, lse_one = mla_decode_triton(q, kv, table, lens, SCALE, splits=1)
    many, lse_many = mla_decode_triton(q, kv, table, lens, SCALE, splits=16)
    assert _cos_diff(one, many) < 5e-6
    torch.testing.assert_close(lse_one, lse_many, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("s_q,h_q", [(1, 16), (2, 128)])
def test_mla_balanced_runs_match_the_reference_also_in_a_cuda_graph(s_q: int, h_q: int) -> None:
    from fireflyer.kernels.mla_schedule import balanced_schedule
    from fireflyer.kernels.mla_triton import balanced_parts, mla_decode_triton

    # One long sequence among short ones, an empty one: what the balanced runs are for.
    seqlens = [16384, 0, 1, 700, *[129] * 12]
    q, kv, table, lens = _mla_inputs(len(seqlens), s_q, h_q, seqlens, seed=11)
    ref_out, ref_lse = mla.mla_decode(q, kv, table, lens, SCALE, backend="torch")
    schedule = balanced_schedule(lens, balanced_parts(q), mla.PAGE)
    out, lse = mla_decode_triton(q, kv, table, lens, SCALE, schedule=schedule)
    assert _cos_diff(out, ref_out) <= 5e-6
    finite = ref_lse.isfinite()
    assert torch.equal(finite, lse.isfinite())
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-3, rtol=1e-4)
    # Schedule and kernels captured together: new lengths replay without a host round trip.
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed = balanced_schedule(lens, balanced_parts(q), mla.PAGE)
        g_out, _ = mla_decode_triton(q, kv, table, lens, SCALE, schedule=graphed)
    lens.copy_(torch.tensor(list(reversed(seqlens)), dtype=torch.int32))
    table.copy_(table.flip(0))
    graph.replay()
    want, _ = mla.mla_decode(q, kv, table, lens, SCALE, backend="torch")
    assert _cos_diff(g_out, want) <= 5e-6


def test_balanced_schedule_in_one_launch_equals_the_tensor_operations() -> None:
    from fireflyer.kernels.mla_schedule import balanced_schedule, balanced_schedule_torch

    g = torch.Generator().manual_seed(5)
    for b, parts in [(1, 1), (3, 7), (128, 132), (300, 66), (1024, 132)]:
        lens = torch.randint(0, 40000, (b,), generator=g, dtype=torch.int32).cuda()
        lens[::7] = 0
        for tile in (32, mla.PAGE):
            one, ops = balanced_schedule(lens, parts, tile), balanced_schedule_torch(lens, parts, tile)
            for field in ("runs", "split_offset", "split_count", "first_run"):
                assert torch.equal(getattr(one, field), getattr(ops, field)), (b, parts, tile, field)


def test_mla_decode_attends_a_steps_shared_balanced_schedule() -> None:
    from fireflyer.kernels.mla_schedule import StepSchedules
    from fireflyer.kernels.mla_triton import balanced_parts

    q, kv, table, lens = _mla_inputs(6, 1, 64, [9000, 1, 700, 65, 129, 3000], seed=12)
    schedules = StepSchedules(lens)
    out, lse = mla.mla_decode(q, kv, table, lens, SCALE, backend="triton", schedules=schedules)
    assert list(schedules.made) == [(balanced_parts(q), mla.PAGE)]
    ref_out, ref_lse = mla.mla_decode(q, kv, table, lens, SCALE, backend="torch")
    assert _cos_diff(out, ref_out) <= 5e-6
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize(
    "b,s_q,h_q,seqlens",
    [
        (2, 1, 16, [1, 64]),
        (3, 2, 128, [63, 65, 700]),
        (4, 1, 64, [4096, 1, 333, 2048]),
        (8, 1, 128, [8192] * 8),
    ],
)
def test_mla_fp8_cache_triton_matches_the_fp8_reference(
    b: int, s_q: int, h_q: int, seqlens: list[int]
) -> None:
    q, kv, table, lens = _mla_inputs(b, s_q, h_q, seqlens, seed=5)
    cache = mla_fp8.quantize_latent(kv)
    out, lse = mla.mla_decode(q, cache, table, lens, SCALE, backend="triton")
    ref_out, ref_lse = mla.mla_decode(q, cache, table, lens, SCALE, backend="torch")
    # BF16 outputs: a rounding flip is one unit in the last place, 2^-7 of the value at most.
    torch.testing.assert_close(out.float(), ref_out.float(), atol=8e-3, rtol=2**-7)
    assert _cos_diff(out, ref_out) <= 5e-6
    # The dequantised latent is exact in BF16 (power-of-two scales), so the scores are the
    # reference's up to summation order (measured ≤ 3e-6; 0.005 before, with arbitrary scales).
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)
    # And close to the BF16 cache it was quantised from (docs/serving.md's tolerance).
    bf16_out, _ = mla.mla_decode(q, kv, table, lens, SCALE, backend="triton")
    assert _cos_diff(out, bf16_out) <= 1e-3


def test_mla_fp8_cache_split_count_does_not_change_the_result() -> None:
    from fireflyer.kernels.mla_fp8_triton import mla_decode_fp8_triton

    q, kv, table, lens = _mla_inputs(2, 2, 128, [1000, 3000], seed=3)
    cache = mla_fp8.quantize_latent(kv)
    one, lse_one = mla_decode_fp8_triton(q, cache, table, lens, SCALE, splits=1)
    many, lse_many = mla_decode_fp8_triton(q, cache, table, lens, SCALE, splits=16)
    assert _cos_diff(one, many) < 5e-6
    torch.testing.assert_close(lse_one, lse_many, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("m,n,k", [(64, 2112, 7168), (128, 24576, 1536), (4096, 7168, 2048), (200, 384, 512)])
def test_gemm_fp8_matches_reference(m: int, n: int, k: int) -> None:
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    a_q, a_s = fp8.quantize_per_token_group(a)
    b_q, b_s = fp8.quantize_per_block(b)
    out = fp8.gemm_fp8(a_q, a_s, b_q, b_s, backend="triton")
    ref = fp8.gemm_fp8(a_q, a_s, b_q, b_s, backend="torch")
    assert fp8.calc_diff(out, ref) < 1e-3
    assert fp8.calc_diff(out, a.float() @ b.float().T) < 1e-3


@pytest.mark.parametrize("backend", ["triton", "auto"])  # auto: Gluon on Hopper
def test_grouped_contiguous_matches_reference(backend: str) -> None:
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
    out = fp8.grouped_gemm_fp8_contiguous(a_q, a_s, b_q, b_s, idx, backend=backend)  # type: ignore[arg-type]
    ref = fp8.grouped_gemm_fp8_contiguous(a_q, a_s, b_q, b_s, idx, backend="torch")
    assert fp8.calc_diff(out, ref) < 1e-3
    assert out[-128:].abs().max().item() == 0


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_grouped_masked_matches_reference(backend: str) -> None:
    groups, m_max, n, k = 6, 256, 4096, 7168
    a = torch.randn(groups, m_max, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(groups, n, k, device="cuda", dtype=torch.bfloat16)
    masked = torch.tensor([0, 1, 77, 128, 200, 256], dtype=torch.int32, device="cuda")
    pairs = [fp8.quantize_per_token_group(a[g]) for g in range(groups)]
    a_q = torch.stack([p[0] for p in pairs])
    a_s = torch.stack([p[1] for p in pairs])
    b_q, b_s = fp8.quantize_per_block(b)
    out = fp8.grouped_gemm_fp8_masked(a_q, a_s, b_q, b_s, masked, backend=backend)  # type: ignore[arg-type]
    ref = fp8.grouped_gemm_fp8_masked(a_q, a_s, b_q, b_s, masked, backend="torch")
    for g in range(groups):
        mg = int(masked[g])
        if mg:
            assert fp8.calc_diff(out[g, :mg], ref[g, :mg]) < 1e-3
        assert out[g, mg:].abs().max().item() == 0 if mg < m_max else True


@pytest.mark.parametrize(
    "m,n,k",
    [
        (1, 2112, 7168),
        (2, 2112, 7168),
        (17, 4096, 7168),
        (64, 24576, 1536),
        (301, 7168, 2048),
        (4096, 4096, 7168),
        # K of one to three weight blocks (weight scales with a leading dimension under 4)
        (5, 256, 256),
        (67, 576, 128),
        (130, 384, 384),
    ],
)
def test_cublas_blockwise_matches_the_reference(m: int, n: int, k: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(m)
    a, a_scale = fp8.quantize_per_token_group(
        torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    )
    b, b_scale = fp8.quantize_per_block(torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g))
    out = fp8.gemm_fp8(a, a_scale, b, b_scale, backend="cublas")
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert _cos_diff(out, fp8.gemm_fp8_reference(a, a_scale, b, b_scale)) <= 1e-4


def test_auto_measures_a_table_and_runs_its_correct_choice(
    tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fireflyer.kernels import autotune

    monkeypatch.setenv("FIREFLYER_CACHE_DIR", str(tmp_path))
    device = torch.device("cuda", 0)
    table = autotune.table_for(device, force=True)
    assert autotune.table_path(device).is_file()
    for klass, entry in table["ops"]["gemm"].items():
        assert entry["choice"] in ("triton", "gluon", "cublas", "official"), (klass, entry)
        assert entry["microseconds"][entry["choice"]] == min(entry["microseconds"].values())
    for entry in table["ops"]["mla"].values():
        assert entry["choice"] in ("triton", "gluon", "official")
        assert entry["microseconds"][entry["choice"]] == min(entry["microseconds"].values())
    print(render_table(table))
    for m in (8, 4096):
        a, a_scale = fp8.quantize_per_token_group(torch.randn(m, 1536, device="cuda", dtype=torch.bfloat16))
        b, b_scale = fp8.quantize_per_block(torch.randn(2112, 1536, device="cuda", dtype=torch.bfloat16))
        out = fp8.gemm_fp8(a, a_scale, b, b_scale, backend="auto")
        assert _cos_diff(out, fp8.gemm_fp8_reference(a, a_scale, b, b_scale)) <= 1e-4
